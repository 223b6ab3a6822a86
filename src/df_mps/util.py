"""Small helpers that several df_mps modules share: one copy of each.

Nothing here imports torch or DeepFilterNet, so any module (the launcher's bootstrap
included) can use it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import warnings
from typing import Iterator, Optional, Union

from .settings import FALSE_WORDS

__all__ = [
    "PathLike",
    "build_dir",
    "cpu_identity",
    "freeze_long_lived_objects",
    "long_lived_objects_frozen",
    "installed_version",
    "keep_freed_buffers",
    "large_buffers_kept",
    "one_line",
    "prune_unused",
    "quiet_resample_rename",
    "sysctl",
]

PathLike = Union[str, "os.PathLike[str]"]


def one_line(exc: BaseException, *, with_type: bool = False) -> str:
    """``exc``'s message on one line, for a user: whitespace collapsed, no closing full stop.

    libsndfile's own reason is taken where soundfile has one (``error_string``), without the
    "Error opening '<path>': " soundfile puts around it. An exception without a message reads
    as its type's name; ``with_type`` puts the type's name in front of any message.
    """
    text = getattr(exc, "error_string", None) or str(exc)
    text = " ".join(text.split()).rstrip(".")
    name = type(exc).__name__
    if not text:
        return name
    return f"{name}: {text}" if with_type else text


def installed_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist`` (as pip names it), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def sysctl(name: str) -> Optional[str]:
    """``sysctl -n name`` (macOS, BSD) as text, or None where it fails or says nothing."""
    try:
        out = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextlib.contextmanager
def quiet_resample_rename() -> Iterator[None]:
    """Silence torchaudio's warning that "sinc_interpolation" was renamed.

    Upstream's ``df.io.resample`` passes the old name; torchaudio warns and then builds the
    same kernel (a Kaiser window with torchaudio 2.11), so the warning says nothing to a user.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*resampling method name is being")
        yield


def cpu_identity() -> str:
    """A digest of the processor, for caches of code built for it (-march=native: the
    compiled real-time hop, the C GRU kernel): Linux's model name and flags, else what Python
    and, where it is loaded, PyTorch tell."""
    import hashlib
    import platform
    import sys

    torch = sys.modules.get("torch")  # not imported here (see the module's docstring)
    backends = getattr(torch, "backends", None)
    capability = getattr(getattr(backends, "cpu", None), "get_cpu_capability", None)
    parts = [platform.machine(), platform.processor(), capability() if capability else ""]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    parts.append(line.split(":", 1)[-1].strip())
                elif not line.strip() and len(parts) > 3:
                    break  # the first processor's block
    except OSError:
        pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def freeze_long_lived_objects() -> None:
    """Collect, then put every object alive now out of the garbage collector's sight
    (``gc.freeze``): its full collections then scan only what came after. For processes
    df-mps owns (a Ray actor), once the model is loaded; ``long_lived_objects_frozen`` for a
    call that others may make in their own process.

    Why: a full collection holds the GIL while it walks every tracked object, and the engine's
    scheduling thread waits. In a Ray actor (260,000 objects: torch, Ray, pyarrow) one took
    0.15 s of a 0.81 s batch of 64 files on an H100 (``benchmarks/bench_ray.py --probe``).
    """
    import gc

    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """``freeze_long_lived_objects`` for the block, and everything frozen the collector's
    again after it. Where objects were frozen already when the block began (by the caller's
    own ``gc.freeze``), nothing is unfrozen after it: what the block froze stays frozen too."""
    import gc

    frozen_before = gc.get_freeze_count()
    freeze_long_lived_objects()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The mmap threshold kept: the most glibc accepts on 64-bit systems before 2.35 (HEAP_MAX_SIZE
# / 2), and the most its own moving threshold rises to. Buffers above it are mapped afresh.
_KEEP_MMAP_THRESHOLD = 32 * 1024 * 1024
_KEEP_TRIM_THRESHOLD = 1024 * 1024 * 1024
# After a large_buffers_kept block: where glibc's own moving thresholds end up once it has
# seen such buffers (the trim threshold twice the mmap threshold), so the block leaves the
# process no worse than glibc would (setting either threshold stops glibc moving them).
_AFTER_TRIM_THRESHOLD = 2 * _KEEP_MMAP_THRESHOLD
# Settings of the user's own for glibc's malloc, or another malloc in front of it: df-mps
# then leaves malloc alone.
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_kept_lock = threading.Lock()
_kept_depth = 0  # large_buffers_kept blocks open now
_kept_by_block = None  # (mallopt, malloc_trim) where the open blocks applied the thresholds
_kept_for_process = False  # keep_freed_buffers applied them for the whole process


def _mallopt():
    """glibc's ``mallopt`` and ``malloc_trim``, or None: not glibc on Linux, the user's own
    malloc settings or another malloc preloaded, or ``DF_MPS_KEEP_FREED_BUFFERS=0``."""
    import ctypes
    import platform

    opt_out = os.environ.get("DF_MPS_KEEP_FREED_BUFFERS", "").strip().lower()
    if opt_out in FALSE_WORDS:
        return None
    if any(name in os.environ for name in _USER_MALLOC_ENV):
        return None
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    # int mallopt(int, int); int malloc_trim(size_t)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return mallopt, malloc_trim


def _set_thresholds(mallopt, mmap_threshold: int, trim_threshold: int) -> bool:
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def keep_freed_buffers() -> bool:
    """Make glibc keep freed buffers of up to 32 MiB in the process for the next allocation,
    for the rest of the process. For processes df-mps owns (a Ray actor);
    ``large_buffers_kept`` for a call that others may make in their own process. Returns
    whether it applied: glibc on Linux, no malloc settings of the user's (``MALLOC_*_``
    variables, ``glibc.malloc`` tunables, a malloc in ``LD_PRELOAD``), and
    ``DF_MPS_KEEP_FREED_BUFFERS`` not 0.

    Why: DFN3's convolutions make buffers of tens of MB per piece (the DF encoder's first
    layer: 64 channels x 96 bins x 1,000 frames, 24.5 MB a row), several alive at once. glibc
    maps a large buffer afresh until its moving threshold has risen past that size, and it
    gives the top of its heap back to the system whenever more than twice that threshold is
    free there (and shrinks the heaps of other threads' arenas likewise): the next buffers
    fault every page in again. On the CPU that cost the DF encoder 30-70 ms of 230 per 10 s
    of a row, against 30-34 ms with the thresholds held high (``cpu_step_parts.py``: 405,000
    page faults against 163,000). The cost is memory: the process keeps what it has freed, up
    to its peak (the 30-minute file among 20 others: 991 MiB peak RSS against 838).
    """
    global _kept_for_process
    calls = _mallopt()
    if calls is None:
        return False
    with _kept_lock:
        applied = _set_thresholds(calls[0], _KEEP_MMAP_THRESHOLD, _KEEP_TRIM_THRESHOLD)
        _kept_for_process = _kept_for_process or applied
    return applied


@contextlib.contextmanager
def large_buffers_kept() -> Iterator[bool]:
    """``keep_freed_buffers`` for the block; yields whether it applied. After the outermost
    block, where glibc's own moving thresholds would be by then (32 MiB, and 64 MiB for the
    heap's top; glibc stops moving them once they are set) and the kept memory given back
    (``malloc_trim``); unless ``keep_freed_buffers`` was called for the whole process."""
    global _kept_depth, _kept_by_block
    with _kept_lock:
        if _kept_depth == 0 and not _kept_for_process:
            calls = _mallopt()
            if calls is not None and _set_thresholds(
                calls[0], _KEEP_MMAP_THRESHOLD, _KEEP_TRIM_THRESHOLD
            ):
                _kept_by_block = calls
        _kept_depth += 1
        applied = _kept_by_block is not None or _kept_for_process
    try:
        yield applied
    finally:
        with _kept_lock:
            _kept_depth -= 1
            if _kept_depth == 0 and _kept_by_block is not None:
                mallopt, malloc_trim = _kept_by_block
                _kept_by_block = None
                if not _kept_for_process:
                    _set_thresholds(mallopt, _KEEP_MMAP_THRESHOLD, _AFTER_TRIM_THRESHOLD)
                    malloc_trim(0)


def build_dir(folder, prefix: str):
    """(where to build, whether that is ``folder``): ``folder`` (made if need be) where it
    can be written, else a new private temporary directory, named with ``prefix``, that the
    caller removes (the build is then not kept). For df-mps's caches of compiled code."""
    import tempfile
    from pathlib import Path

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return folder, True
    except OSError:
        return Path(tempfile.mkdtemp(prefix=prefix)), False


def prune_unused(folder, pattern: str, keep, days: float, companions=None) -> None:
    """Remove the files in ``folder`` matching ``pattern`` not modified for ``days`` (their
    users touch them at each load, ``os.utime``), but never ``keep``; with each, the files
    ``companions(path)`` names. For df-mps's caches of compiled code (older sources, compilers,
    PyTorch versions)."""
    import time

    cutoff = time.time() - days * 86400
    for old in folder.glob(pattern):
        with contextlib.suppress(OSError):
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
                for extra in companions(old) if companions else ():
                    extra.unlink(missing_ok=True)
