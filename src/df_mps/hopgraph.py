"""One hop of ``df_mps.realtime``'s stream as one fixed-shape graph, compiled ahead of time.

Stepped eagerly, a hop of ``RealtimeEnhancer`` is some 150 small PyTorch ops, and on the CPU
their dispatch costs more than their arithmetic. ``HopGraph`` is the whole hop at the model's
rate as one pure function of the hop's samples, its options and the carried state: the STFT
frame, the ERB and unit-norm features, the pulsed model (``PulsedDfNet.frames``, the eager
code itself, in its graph form), the mask, deep filter, post-filter and attenuation limit, and
the overlap-add synthesis. Its shapes are fixed (rows x one hop), it has no data-dependent
control flow and no complex arithmetic, so ``torch.export`` takes it whole and AOTInductor
compiles it into one shared library with the weights inside: a hop is one call into C++.

``compiled_hop`` returns that step, from df_mps's cache (``<cache>/realtime``) where a package
for the same weights, row count, PyTorch, processor and thread count was built before; the
build itself takes a minute or so on a small machine, once. Where it can't be had (no C++
compiler, no AOTInductor, a failed export or build) it raises ``CompileUnavailable`` and
``RealtimeEnhancer`` runs eager. The post-filter and the attenuation limit are inputs, so one
package serves all their settings.

What did not pay, measured per hop on one thread (2 cores, shared): ``torch.compile`` of the
same function (dynamo's guards over ~100 tensors and the Python wrapper cost what the fusion
saved: about eager's time); inductor's freezing with grad mode off (oneDNN's matrix products
and convolutions: 2x slower than without); real DFT matrices for the FFTs (slower than
PyTorch's FFT); ``torch.fft.irfft`` inside the graph (AOTInductor has no C shim for it and
goes through a slow fallback: hence ``_irfft`` through forward FFTs).

Inputs: the hop's samples [B, hop], the options (``options``), then the state: the analysis
memory [B, n - hop], the ERB and unit normalisation states [B, E], [B, F'], the spectrum
window [B, 1, W, F, 2], the synthesis memory [B, hop], and each conv block's and GRU's carried
state (``PulsedDfNet.stateful_layers``). Outputs: the samples [B, hop], the local SNR
[B, 1, 1], and the state after the hop in the same order.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._log import logger
from .util import build_dir, cpu_identity, prune_unused

# Bumped whenever the graph's code changes what it computes: part of the cache key.
GRAPH_VERSION = 7


class CompileUnavailable(RuntimeError):
    """The compiled hop can't be had here; the message is one line."""


def _compiler() -> Optional[str]:
    """The C++ compiler inductor would use, or None where there is none."""
    try:
        from torch._inductor import config
    except Exception:  # noqa: BLE001 - a PyTorch without inductor
        return None
    names = config.cpp.cxx if isinstance(config.cpp.cxx, tuple) else (config.cpp.cxx,)
    for name in (*names, os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


class HopGraph(torch.nn.Module):
    """The hop function of a ``_ModelRateStream`` (see the module's docstring), as an
    ``nn.Module`` for ``torch.export``; run as it is, it is the eager reference."""

    def __init__(self, stream):
        super().__init__()
        _init(self, stream)

    def forward(self, x, options, *state):
        return _forward(self, x, options, state)


def _init(graph, stream) -> None:

    pulsed = stream.pulsed
    if stream.fft_size != 2 * stream.hop:
        raise CompileUnavailable(
            f"the compiled hop needs fft_size = 2 x hop (this model: {stream.fft_size}, "
            f"{stream.hop})"
        )
    graph.pulsed = pulsed
    graph.layers = pulsed.stateful_layers()
    graph.fft_size, graph.hop = stream.fft_size, stream.hop
    graph.nb_df = pulsed.nb_df
    graph.widths = tuple(int(w) for w in stream.dsp.erb_widths())
    a32 = np.float32(stream.alpha)
    graph.alpha = float(a32)
    graph.one_minus = float(np.float32(1.0) - a32)  # libdf computes (1 - alpha) in float32
    # constants as the eager stream has them: the analysis window times wnorm (df_mps.dsp's
    # DF.features) and the synthesis window (libdf's; _ModelRateStream._overlap_add)
    cpu = torch.device("cpu")
    graph.register_buffer("scaled_window", stream.dsp._scaled_window_t(cpu).clone())
    graph.register_buffer("window", stream.window.clone())
    keep = torch.ones(stream.fft_size // 2 + 1)
    keep[0] = 0.0
    if stream.fft_size % 2 == 0:
        keep[-1] = 0.0
    graph.register_buffer("keep_imag", keep)


def _rfft(frames):
    """view_as_real(torch.fft.rfft(frames)): [B, n] -> [B, n // 2 + 1, 2]."""
    return torch.view_as_real(torch.fft.rfft(frames, dim=-1))


def _irfft(ri, n: int, keep):
    """realfft's unnormalised inverse, ``torch.fft.irfft(view_as_complex(ri), n=n,
    norm="forward")`` (the imaginary parts of DC and Nyquist ignored, as realfft and
    pocketfft do), through one forward real FFT: AOTInductor calls the forward real FFT
    directly, the inverse only through a slow fallback.

    Over all n bins, with X the Hermitian spectrum, x = Re(DFT(conj X)) = A - Im(B) where A
    is the DFT of the even real part Zr and B that of the odd negated imaginary part Zi: both
    real signals, so two rffts (one call) give A (real) and Im(B) for t <= n/2, and their
    symmetries give t > n/2 (x[t] = A[n - t] + Im(B)[n - t]).
    """
    b = ri.shape[0]
    re, im = ri[..., 0], ri[..., 1] * keep  # keep: 0 at DC and Nyquist, else 1
    tail = slice(1, (n + 1) // 2)
    zr = torch.cat((re, re[:, tail].flip(1)), dim=1)  # [B, n], even
    zi = torch.cat((-im, im[:, tail].flip(1)), dim=1)  # [B, n], odd
    spec = _rfft(torch.cat((zr, zi), dim=0))
    a, bi = spec[:b, :, 0], spec[b:, :, 1]  # [B, f]
    back = (a + bi)[:, tail].flip(1)  # t = n // 2 + 1 ... n - 1
    return torch.cat((a - bi, back), dim=1)


def options(lim: Optional[float], post_filter: bool):
    """The graph's options input: [lim, 1 - lim, post-filter 0/1] (lim None: 0, so that the
    mix noisy * 0 + enhanced * 1 is the enhanced spectrum exactly)."""
    lim = 0.0 if lim is None else float(lim)
    return torch.tensor([lim, 1.0 - lim, 1.0 if post_filter else 0.0], dtype=torch.float32)


def _forward(graph, x, options, state: Sequence):
    from . import dsp
    from .kernels import post_filter_real

    analysis, erb_norm, unit_norm, spec_state, ola = state[:5]
    layer_state = dict(zip(graph.layers, state[5:]))
    hop, n, nb_df = graph.hop, graph.fft_size, graph.nb_df
    # -- analysis and features (df_mps.dsp.DF.features for one frame)
    frame = torch.cat((analysis, x), dim=-1)  # [B, n]
    ri = _rfft(frame * graph.scaled_window)  # [B, F, 2]
    erb_db = dsp._erb_ri(ri, graph.widths, db=True)  # [B, E]
    erb_norm = erb_db * graph.one_minus + erb_norm * graph.alpha
    erb_feat = (erb_db - erb_norm) / dsp.ERB_NORM_DIVISOR
    low = ri[:, :nb_df]
    unit_norm = torch.hypot(low[..., 0], low[..., 1]) * graph.one_minus + unit_norm * graph.alpha
    spec_feat = low / torch.sqrt(unit_norm).unsqueeze(-1)
    # -- the pulsed model (PulsedDfNet.step for one frame past the lookahead)
    window = torch.cat((spec_state, ri[:, None, None]), dim=2)
    pulsed = graph.pulsed
    spec_e, lsnr, noisy, layer_state = pulsed.frames(
        window,
        erb_feat[:, None, None],
        spec_feat[:, None, None],
        0,
        layer_state,
        graph=True,
        post_filter=False,
    )
    # the post-filter and the attenuation limit are inputs, so that one graph serves all
    # their settings: both computed, one kept
    filtered = post_filter_real(spec_e, noisy, pulsed.post_filter_beta)
    spec_e = torch.where(options[2] > 0.5, filtered, spec_e)
    # -- synthesis (_ModelRateStream._synthesise and _overlap_add for one frame)
    enhanced = noisy[:, 0, 0] * options[0] + spec_e[:, 0, 0] * options[1]  # [B, F, 2]
    frames = _irfft(enhanced, n, graph.keep_imag) * graph.window  # [B, n]
    samples = frames[:, :hop] + ola
    new_state = [
        frame[:, hop:],
        erb_norm,
        unit_norm,
        window[:, :, 1:],
        frames[:, hop:],
        *(layer_state[layer] for layer in graph.layers),
    ]
    # Contiguous, as the inputs they become next hop: the compiled code assumes the strides
    # it was compiled for.
    return (samples, lsnr, *(t.contiguous() for t in new_state))


# -- compiling ---------------------------------------------------------------------------------
def _cache_key(graph, example: Sequence) -> str:
    """A digest of everything the compiled code depends on: the weights and constants and the
    layers' settings, the shapes, the graph's code version, PyTorch's version, the processor
    and the thread count (inductor's loops are parallel for as many threads as it has)."""
    h = hashlib.sha256()
    threads = torch.get_num_threads()
    h.update(f"v{GRAPH_VERSION}|{torch.__version__}|{cpu_identity()}|{threads}|".encode())
    h.update(repr([tuple(t.shape) for t in example]).encode())
    h.update(repr((graph.fft_size, graph.hop, graph.widths, graph.alpha)).encode())
    tensors, settings = _contents(graph)
    h.update(repr(settings).encode())
    for t in tensors:
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()[:24]


# what the pulsed model and its layers carry that is no setting of the graph: stream state,
# the model, and the post-filter switch (an input of the graph)
_NOT_SETTINGS = {
    "state",
    "model",
    "spec_state",
    "frames_spec",
    "frames_in",
    "batch",
    "device",
    "post_filter",
}


def _contents(graph) -> Tuple[List, list]:
    """(every tensor the graph reads besides its inputs, the layers' other settings), in a
    fixed order: the pulsed model's layers and scalars, the mask's and the graph's buffers."""
    seen, tensors = set(), []

    def describe(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                tensors.append(obj)
            return "tensor"
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, (list, tuple)):
            return [describe(item, depth) for item in obj]
        if isinstance(obj, torch.nn.Module):
            return type(obj).__name__  # its tensors are read through the layers' own copies
        if hasattr(obj, "__dict__") and depth < 4:
            items = sorted((k, v) for k, v in vars(obj).items() if k not in _NOT_SETTINGS)
            return [type(obj).__name__, [(k, describe(v, depth + 1)) for k, v in items]]
        return getattr(obj, "__name__", type(obj).__name__)  # activations: by name

    pulsed = graph.pulsed
    settings = [describe(pulsed)]
    settings.append(describe(list(pulsed.model.mask.buffers())))
    settings.append(describe(list(graph.buffers())))
    return tensors, settings


def package_dir() -> Path:
    from .models.cache import cache_root

    return cache_root() / "realtime"


# inductor's options, tried in this order. C++ GEMM templates for the matrix products
# (max-autotune: 0.35 ms a hop here, against 0.45 with oneMKL's, whose small-matrix calls
# pack their inputs every time); one memory pool for the intermediate buffers (memory planning:
# 5-10% less); epilogue fusion into the templates off (in PyTorch 2.14 it fails on this graph,
# an indexing assertion). Then without the pool, then inductor's defaults.
_AUTOTUNE = {
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "epilogue_fusion": False,
}
CONFIGS = ({**_AUTOTUNE, "memory_planning": True}, _AUTOTUNE, {})


def _load(path: Path):
    """The package's run function: a list of input tensors -> the list of outputs. Its
    loader directly (AOTICompiledModel's __call__ parses its pytree specs on every call), and
    without importing torch._inductor where PyTorch lets (1.6 s of imports here)."""
    loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader is not None:
        try:
            # (path, model name, run single-threaded, runners, device index), as
            # torch._inductor.package.load_package calls it
            return loader(str(path), "model", True, 1, -1).run
        except TypeError:  # another signature: through the public function
            pass
    inductor = importlib.import_module("torch._inductor")
    return inductor.aoti_load_package(str(path), run_single_threaded=True).loader.run


def compiled_hop(graph, example: Sequence) -> Tuple[Callable, float, bool]:
    """(the compiled hop: a list [x, *state] -> [samples, lsnr, *state], seconds spent
    building or loading it, whether it came from the cache) for ``graph`` at the shapes of
    ``example``, built here and now where the cache hasn't it; raises ``CompileUnavailable``
    where it can't be had."""
    t0 = time.perf_counter()
    path = _package_path(graph, example)
    runner = _cached_runner(path, example)
    if runner is not None:
        return runner, time.perf_counter() - t0, True
    inductor = _inductor()
    folder, shared = _build_folder(path, "")
    target, built = folder / path.name, False
    try:
        exported = _export(graph, example)
        with _build_lock(target):
            # another process may have built it while this one waited for the lock
            runner = _cached_runner(target, example) if shared else None
            if runner is None:
                _install(inductor, exported, target, example)
                runner, built = _load_built(target), True
    finally:
        if not shared:  # a private build directory: the loader has what it needs
            shutil.rmtree(folder, ignore_errors=True)
    if shared:
        _prune(folder, keep=target)
    return runner, time.perf_counter() - t0, not built


def cached_hop_or_build(graph, example: Sequence):
    """(the compiled hop's run function, None) where df_mps's cache has it, else (None, a
    ``HopBuild`` building it in a child process while the caller runs eager); raises
    ``CompileUnavailable`` where it can't be had (no C++ compiler, a failed export, a package
    that failed its trial before)."""
    path = _package_path(graph, example)
    runner = _cached_runner(path, example)
    if runner is not None:
        return runner, None
    running = _builds.get(path)
    if running is not None and not running.wait(0):
        return None, running  # another stream of this process asked for the same package
    refused = _recent_build_failure(path)
    if refused is not None:
        raise CompileUnavailable(refused)
    _inductor_for_auto()  # fails here, not in the child, where there is none
    if path.parent.is_dir() and _being_built(path):
        # another process builds it: wait for that one (no second child queued behind it)
        logger.warning(
            "df_mps: the real-time hop for this model and channel count is being compiled "
            "by another process; eager until then"
        )
        build = HopBuild.watching(path)
        _builds[path] = build
        return None, build
    folder, shared = _build_folder(path, "in the background, ")
    try:
        build = HopBuild(folder, path.name, _export(graph, example), example, shared=shared)
    except BaseException:
        if not shared:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if shared:
        _builds[path] = build
    return None, build


def _package_path(graph, example: Sequence) -> Path:
    """Where df_mps's cache keeps the package of ``graph`` at the example's shapes."""
    return package_dir() / f"hop-{_cache_key(graph, example)}.pt2"


def _tmp_package(path: Path, pid: int) -> Path:
    """Where process ``pid`` builds the package for ``path`` before it takes its name."""
    return path.with_name(f".{path.stem}.{pid}.tmp.pt2")


def _trial_failure(path: Path) -> Optional[str]:
    """Why the package at ``path`` is refused: it failed its trial here (its failure
    marker); or None."""
    failed = _markers(path)[1]
    if not failed.is_file():
        return None
    why = failed.read_text(errors="replace").strip() or "a trial process failed"
    return f"{why}; delete {failed} to try again"


def _cached_runner(path: Path, example: Sequence) -> Optional[Callable]:
    """The run function of the package at ``path`` where it is built and has passed its
    trial (tried now if it hasn't been), None where there is none or it doesn't load; raises
    CompileUnavailable where that package failed its trial."""
    refused = _trial_failure(path)
    if refused is not None:  # the same package here crashed a trial process: not built again
        raise CompileUnavailable(refused)
    if not path.is_file():
        return None
    _check_in_child(path, example)
    try:
        runner = _load(path)
    except Exception as exc:  # noqa: BLE001 - a stale or broken package: build anew
        logger.debug(f"df_mps: cached hop package {path} did not load ({exc}); rebuilding")
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # in use: kept by _prune
    return runner


def _load_built(path: Path) -> Callable:
    try:
        return _load(path)
    except Exception as exc:  # noqa: BLE001 - compiling is never required
        raise CompileUnavailable(f"the built package did not load: {_one_line(exc)}") from exc


def _inductor():
    """torch._inductor, where it can build a package here; else CompileUnavailable."""
    try:
        inductor = importlib.import_module("torch._inductor")
        importlib.import_module("torch.export")
    except Exception as exc:  # noqa: BLE001 - a PyTorch without inductor
        raise CompileUnavailable(f"no torch._inductor here ({_one_line(exc)})") from exc
    if not hasattr(inductor, "aoti_compile_and_package"):
        raise CompileUnavailable(f"PyTorch {torch.__version__} has no AOTInductor")
    compiler = _compiler()
    if compiler is None:
        raise CompileUnavailable("no C++ compiler (g++, c++, clang++) found")
    return inductor


def _inductor_for_auto():
    """``_inductor()``, and where the build is sure to fail for want of OpenMP (macOS's
    Apple clang without one), CompileUnavailable before any build: compile="auto" doesn't
    start a build that fails after a minute at every start (compile=True still tries)."""
    inductor = _inductor()
    why = _no_openmp(_compiler() or "")
    if why is not None:
        raise CompileUnavailable(why)
    return inductor


def plan() -> Tuple[bool, str]:
    """(whether ``RealtimeEnhancer(compile="auto")`` on the CPU would run its hops compiled,
    why), for ``doctor``: the setting, the compiler and the cache, without building."""
    from .realtime import COMPILE_ENV, _compile_choice

    try:
        choice = _compile_choice(None)
    except ValueError as exc:
        return False, str(exc)
    if choice is False:
        return False, f"{COMPILE_ENV}={os.environ.get(COMPILE_ENV, '').strip()}"
    try:
        _inductor() if choice is True else _inductor_for_auto()
    except CompileUnavailable as exc:
        return False, str(exc)
    folder = package_dir()
    built = len(list(folder.glob("hop-*.pt2"))) if folder.is_dir() else 0
    when = "before the constructor returns" if choice is True else "in the background"
    return True, (
        f"one AOTInductor call a hop where its build succeeds, built once per model, channel "
        f"count and thread count (about a minute, {when}); {built} package(s) in {folder}"
    )


def _no_openmp(compiler: str) -> Optional[str]:
    """Why inductor's C++ can't be built here for want of OpenMP, or None. Only macOS's
    Apple clang comes without it; inductor then looks for ``$OMP_PREFIX``, conda's
    llvm-openmp and Homebrew's libomp (its cpp_builder), and without any of them its build
    fails after a minute of work: on every start, where nothing said so first."""
    if sys.platform != "darwin":
        return None
    try:
        from torch._inductor import cpp_builder as builder

        get = getattr(builder, "get_cpp_compiler", None)
        if not builder._is_apple_clang(get() if get else compiler):
            return None
        prefix = os.environ.get("OMP_PREFIX")
        if prefix and os.path.exists(os.path.join(prefix, "include", "omp.h")):
            return None
        # an omp.h the compiler finds by itself (/usr/local, as R's OpenMP build puts it, or
        # the include paths it is given through the environment)
        places = ["/usr/local/include"]
        for name in ("CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH"):
            places += [d for d in os.environ.get(name, "").split(os.pathsep) if d]
        if any(os.path.exists(os.path.join(d, "omp.h")) for d in places):
            return None
        if os.environ.get("CONDA_PREFIX") and builder.is_conda_llvm_openmp_installed():
            return None
        if builder.homebrew_libomp()[0]:
            return None
    except Exception:  # noqa: BLE001 - another PyTorch's builder: let the build try
        return None
    return "Apple clang has no OpenMP here (brew install libomp, or set OMP_PREFIX)"


def _build_folder(path: Path, how: str) -> Tuple[Path, bool]:
    """(where to build the package for ``path``, whether that is the cache), with the
    warning that says why a first start does more than usual."""
    folder, shared = build_dir(path.parent, "df-mps-hop-")
    # A warning, so that the command line (whose default level it is) says what its first
    # start does.
    where = f"cached in {folder}" if shared else f"not cached: {path.parent} is not writable"
    eager = "; eager until then" if how else ""
    logger.warning(
        f"df_mps: compiling the real-time hop for this model and channel count {how}once "
        f"(about a minute; {where}){eager}"
    )
    return folder, shared


def _export(graph, example: Sequence):
    """``torch.export`` of the hop graph at the example's shapes."""
    try:
        with torch.inference_mode(False):
            with torch.no_grad():
                # One eager call first: df_mps.dsp's constants exist as real tensors before
                # the export traces them (as constants of the graph).
                graph(*example)
                return torch.export.export(graph, tuple(example), strict=False)
    except Exception as exc:  # noqa: BLE001 - compiling is never required
        raise CompileUnavailable(f"torch.export failed: {_one_line(exc)}") from exc


@contextlib.contextmanager
def _build_lock(path: Path, shared: bool = False):
    """Held while the package at ``path`` is built and put in place: one build of a package
    at a time across processes (``flock`` on a ``.lock`` file beside it, which stays); with
    ``shared``, a shared lock (a reader waiting for a build to end). Where there is no
    ``flock`` or it fails (Windows, some network file systems), builds may overlap, each
    putting a whole package in place."""
    fd = _lock_fd(path)
    try:
        if fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # and with it the lock


def _lock_fd(path: Path) -> Optional[int]:
    """A descriptor of the package's lock file (read-only where another user's file can't
    be opened to write: flock doesn't mind), or None where there is no flock or no file."""
    try:
        import fcntl  # noqa: F401 - only where there is flock
    except ImportError:  # Windows
        return None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        with contextlib.suppress(OSError):
            return os.open(_lock_file(path), flags, 0o644)
    return None


def _being_built(path: Path) -> bool:
    """Whether another process holds the package's build lock now."""
    fd = _lock_fd(path)
    if fd is None:
        return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _install(inductor, exported, path: Path, example: Sequence) -> None:
    """Build the package for ``path`` under a temporary name beside it, try it in a child
    process, then give it its name and its pass marker; the caller holds the build lock.
    CompileUnavailable where the build or the trial fails (a failed trial is marked): a
    package is never at its name untried or half-written."""
    tmp = _tmp_package(path, os.getpid())
    refused = _build_failed_marker(path)
    try:
        try:
            _build(inductor, exported, tmp)
        except CompileUnavailable as exc:  # remembered: "auto" doesn't retry it at every start
            if not getattr(exc, "transient", False):
                with contextlib.suppress(OSError):
                    refused.write_text(f"{exc}\n")
            raise
        _check_in_child(tmp, example, markers_of=path)
        try:
            os.replace(tmp, path)
            _markers(path)[0].touch()
        except OSError as exc:
            raise CompileUnavailable(f"the package could not be put in place: {exc}") from exc
        with contextlib.suppress(OSError):
            refused.unlink(missing_ok=True)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


BUILD_RETRY_DAYS = 1  # a package whose build failed is built again by "auto" after this long


def _build_failed_marker(path: Path) -> Path:
    return path.with_name(path.name + ".buildfailed")


def _recent_build_failure(path: Path) -> Optional[str]:
    """Why compile="auto" doesn't build the package at ``path`` now: its build failed here
    less than BUILD_RETRY_DAYS ago (AOTInductor's error, the same at every start until the
    compiler, its libraries or PyTorch change); or None."""
    marker = _build_failed_marker(path)
    try:
        age = time.time() - marker.stat().st_mtime
        why = marker.read_text(errors="replace").strip()
    except OSError:
        return None
    if age > BUILD_RETRY_DAYS * 86400:
        return None
    why = why or "its build failed"
    return f"{why} (an earlier start's build; tried again a day after, or delete {marker})"


def _built(path: Path) -> bool:
    """Whether the package at ``path`` is in place with its pass marker."""
    return path.is_file() and _markers(path)[0].is_file()


def _usable(path: Path) -> bool:
    """Whether the package at ``path`` has passed its trial and loads here (a package with
    its pass marker that doesn't load is stale: rebuilt)."""
    if not _built(path):
        return False
    try:
        _load(path)
    except Exception:  # noqa: BLE001 - stale or broken
        return False
    return True


# -- building in the background ----------------------------------------------------------------
# Builds of the shared cache under way in this process, by package path (two streams of one
# model share one); a finished build leaves, and later streams find its package in the cache.
_builds: dict = {}
# Builds in private directories (an unwritable cache): of no use once this process is gone.
_private: set = set()
_serial = itertools.count()
_BUILD_FAILED = 3  # the build child's exit status for a build that failed (reason on stderr)


class HopBuild:
    """A package of the compiled hop built in a child process (``python -m
    df_mps.hopgraph``, at low priority) while the caller's stream runs eager: the graph is
    exported here (a few seconds), built and tried there (about a minute). ``poll()`` hands
    over the package's run function once it is ready, loaded beforehand on a helper thread;
    ``wait()`` waits for that.

    A build into df_mps's cache finishes even where its caller exits first, so that a program
    that runs for less than a minute still leaves the package for its next start; one build of
    a package runs at a time (a lock beside it). A build into a private directory (the cache
    is not writable) is of no use to anyone else: it is stopped (``cancel()``, with everything
    it started) when the interpreter exits, and stops itself if its parent dies."""

    def __init__(self, folder: Path, name: str, exported, example: Sequence, shared: bool):
        self._start(folder / name, shared)
        self.exported_file = folder / f".{self.path.stem}.{os.getpid()}.{next(_serial)}.export.pt2"
        spec = [(list(t.shape), str(t.dtype).replace("torch.", "")) for t in example]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._stderr = None
        try:
            # the child's stderr, for the reason of a failed build (closed in _finish)
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # weights sharing storage: saved whole
                torch.export.save(exported, str(self.exported_file))
            argv = _build_argv(
                str(self.exported_file),
                str(self.path),
                json.dumps(spec),
                str(torch.get_num_threads()),
                str(os.getpid()),
                "shared" if shared else "private",
            )
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                start_new_session=True,  # its own process group: cancel() stops all of it
            )
        except Exception as exc:  # noqa: BLE001 - compiling is never required
            with contextlib.suppress(OSError):
                self.exported_file.unlink(missing_ok=True)
            if self._stderr is not None:
                self._stderr.close()
            raise CompileUnavailable(
                f"the background build did not start: {_one_line(exc)}"
            ) from exc
        if not shared:
            _private.add(self)
        threading.Thread(target=self._wait_for_child, daemon=True).start()

    @classmethod
    def watching(cls, path: Path) -> HopBuild:
        """A HopBuild that waits for another process's build of the package at ``path``
        (that process holds its build lock) and then loads it; no child of its own."""
        self = cls.__new__(cls)
        self._start(path, shared=True)
        self.proc = None
        threading.Thread(target=self._wait_for_other, daemon=True).start()
        return self

    def _start(self, path: Path, shared: bool) -> None:
        self.folder, self.path, self.shared = path.parent, path, shared
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._done = False
        self._runner: Optional[Callable] = None
        self._error: Optional[str] = None

    def _leave_registries(self) -> None:
        self._done = True
        _private.discard(self)
        if _builds.get(self.path) is self:
            _builds.pop(self.path, None)

    def _wait_for_other(self) -> None:
        with _build_lock(self.path, shared=True):  # until that build has ended
            pass
        with self._lock:
            if self._done:
                return
            self._leave_registries()
            if _built(self.path) and _trial_failure(self.path) is None:
                try:
                    self._runner = _load_built(self.path)
                except CompileUnavailable as exc:
                    self._error = str(exc)
            else:
                self._error = "another process's build of the compiled hop failed"
        self._ready.set()

    def poll(self) -> Optional[Callable]:
        """None while the build runs; once it has built and passed its trial, a run function
        of the package (loaded already for the first caller; a new one for each later one);
        raises CompileUnavailable where it failed or was cancelled."""
        if not self._ready.is_set():
            return None
        if self._error is not None:
            raise CompileUnavailable(self._error)
        runner, self._runner = self._runner, None
        return runner if runner is not None else _load_built(self.path)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until the build has ended (and its package is loaded), at most ``timeout``
        seconds; whether it has."""
        return self._ready.wait(timeout)

    def cancel(self) -> None:
        """Stop the build (the child and whatever it started) and remove its files."""
        with self._lock:
            if self._done:
                if not self.shared:  # done, but the helper thread may not have removed it
                    shutil.rmtree(self.folder, ignore_errors=True)
                return
            if self.proc is None:  # watching another process's build: nothing of ours
                self._done, self._error = True, "the background build was cancelled"
                self._ready.set()
                return
            with contextlib.suppress(OSError):
                if hasattr(os, "killpg"):  # the group, whose leader may have exited already
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:  # Windows: no process groups; the child alone
                    self.proc.kill()
            with contextlib.suppress(subprocess.SubprocessError):
                self.proc.wait(10)
            self._finish(cancelled=True)
        self._ready.set()

    def _wait_for_child(self) -> None:
        # On a helper thread: the package is loaded (5-15 ms, holding the interpreter) when
        # the build ends, where a live program mostly waits for its next chunk, rather than
        # inside a stream's process() call.
        self.proc.wait()
        with self._lock:
            if self._done:  # cancelled
                return
            self._finish()
        if self._error is None:
            try:
                self._runner = _load_built(self.path)
            except CompileUnavailable as exc:
                self._error = str(exc)
        if not self.shared:  # a private build directory: the loader has what it needs
            shutil.rmtree(self.folder, ignore_errors=True)
        self._ready.set()

    def _finish(self, cancelled: bool = False) -> None:
        self._leave_registries()
        code = self.proc.returncode
        self._stderr.seek(0)
        lines = [x for x in self._stderr.read().decode(errors="replace").splitlines() if x.strip()]
        self._stderr.close()
        # the child's own files, where it was stopped before it removed them
        with contextlib.suppress(OSError):
            self.exported_file.unlink(missing_ok=True)
            _tmp_package(self.path, self.proc.pid).unlink(missing_ok=True)
        if cancelled:
            self._error = "the background build was cancelled"
        elif code != 0 or not _built(self.path):
            why = lines[-1].strip() if lines else f"exit status {code}"
            failed = code == _BUILD_FAILED
            self._error = why if failed else f"the build process failed ({why[:200]})"
        if self._error is not None and not self.shared:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self._error is None and self.shared:
            _prune(self.folder, keep=self.path)


def _build_argv(*args: str) -> List[str]:
    """The build child's command line (``_build_in_child``'s arguments)."""
    return [sys.executable, "-m", "df_mps.hopgraph", *args]


@atexit.register
def _cancel_private_builds() -> None:
    for build in list(_private):
        build.cancel()


def _build_in_child(argv: Sequence[str]) -> int:
    """The build child: ``EXPORTED FINAL SPEC THREADS PARENT_PID shared|private``. Builds the
    package from the exported graph and puts it at FINAL once it has passed its trial (under
    the build lock; where another process built it meanwhile, nothing to do); exit status 0,
    or ``_BUILD_FAILED`` with the reason as the last line on stderr."""
    exported_file, final, spec, threads, parent, where = argv
    final, exported_file = Path(final), Path(exported_file)
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)  # the caller's live stream comes first
    if where == "private":
        tmp = _tmp_package(final, os.getpid())

        def stop_with_parent() -> None:
            # A private package is of no use once its parent is gone (even one killed
            # without running its atexit): stop, and leave no files.
            while os.getppid() == int(parent):
                time.sleep(1.0)
            for path in (exported_file, tmp):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            shutil.rmtree(final.parent, ignore_errors=True)  # the private directory
            if hasattr(os, "killpg") and os.getpgrp() == os.getpid():  # a group of its own
                os.killpg(0, signal.SIGKILL)
            os._exit(1)

        threading.Thread(target=stop_with_parent, daemon=True).start()
    torch.set_num_threads(int(threads))  # the thread count is part of the package's key
    try:
        try:
            inductor = _inductor()
            try:
                exported = torch.export.load(str(exported_file))
            except Exception as exc:  # noqa: BLE001 - reported as one line
                raise CompileUnavailable(
                    f"the exported hop did not load: {_one_line(exc)}"
                ) from exc
        finally:
            with contextlib.suppress(OSError):
                exported_file.unlink(missing_ok=True)
        example = [torch.zeros(s, dtype=getattr(torch, d)) for s, d in json.loads(spec)]
        with _build_lock(final):
            refused = _trial_failure(final)  # another process's build of it failed its trial
            if refused is not None:
                raise CompileUnavailable(refused)
            if _usable(final):
                return 0  # another process built it while this one waited for the lock
            refused = _recent_build_failure(final)  # that one failed while this one waited
            if refused is not None:
                raise CompileUnavailable(refused)
            _install(inductor, exported, final, example)
    except CompileUnavailable as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return _BUILD_FAILED
    return 0


_TRIAL_STARTED = "df-mps-trial: loading"  # printed by the trial child before the loader runs
_TRIAL_PASSED = "df-mps-trial: ok"  # and after the hop ran
# Exit statuses that say the child was stopped from outside (killed for memory, interrupted),
# not that the package failed: no failure marker for those.
_STOPPED = {-getattr(signal, "SIGKILL", 9), -signal.SIGINT, -signal.SIGTERM}


def _markers(path: Path) -> Tuple[Path, Path]:
    """(the trial's pass marker, its failure marker) of the package at ``path``."""
    return path.with_name(path.name + ".ok"), path.with_name(path.name + ".failed")


def _lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _companions(path: Path) -> Tuple[Path, ...]:
    """The files that go with the package at ``path`` when it is pruned."""
    return (*_markers(path), _lock_file(path), _build_failed_marker(path))


def _check_in_child(path: Path, example: Sequence, markers_of: Optional[Path] = None) -> None:
    """Load the package and run one hop on zeros in a child process, once per package (a
    marker file beside it records the pass, another a failure of the package itself; for a
    new build, tried at its temporary path, ``markers_of`` names the package whose failure
    marker records a failure, and the caller records the pass once it is in place): a
    package that crashes its loader takes the child down, not the caller, and the stream runs
    eager (CompileUnavailable). Measured: on the H200 machine's PyTorch 2.11 a package built
    there crashed the process that loaded it (a segmentation fault in the AOTInductor loader).
    Where no child Python can be started (a frozen or embedded program), the hop isn't
    compiled."""
    passed, failed = _markers(markers_of or path)
    if markers_of is None and passed.is_file():
        return
    if getattr(sys, "frozen", False) or not sys.executable:
        raise CompileUnavailable("no Python interpreter to try the compiled hop in")
    spec = [(list(t.shape), str(t.dtype).replace("torch.", "")) for t in example]
    code = (
        "import json, sys, torch\n"
        "from df_mps.hopgraph import _load\n"
        f"print({_TRIAL_STARTED!r}, flush=True)\n"
        "run = _load(sys.argv[1])\n"
        "run([torch.zeros(s, dtype=getattr(torch, d)) for s, d in json.loads(sys.argv[2])])\n"
        f"print({_TRIAL_PASSED!r}, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path), json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, ValueError, TypeError, subprocess.SubprocessError) as exc:
        raise CompileUnavailable(f"the compiled hop could not be tried: {_one_line(exc)}") from exc
    out = proc.stdout.splitlines()
    if proc.returncode == 0 and _TRIAL_PASSED in out:
        if markers_of is None:
            with contextlib.suppress(OSError):
                passed.touch()
        return
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
    if _TRIAL_STARTED not in out or proc.returncode in _STOPPED or proc.returncode == 0:
        # The child never reached the loader (another interpreter, an import error), was
        # stopped from outside, or is no Python child at all: nothing is known of the package.
        raise CompileUnavailable(f"the compiled hop could not be tried ({why[:200]})")
    message = f"the compiled hop failed in a trial process ({why[:200]})"
    with contextlib.suppress(OSError):
        failed.write_text(message + "\n")
    raise CompileUnavailable(message)


def _build(inductor, exported, tmp: Path) -> Path:
    """AOTInductor's package of ``exported`` at ``tmp``, with the first of CONFIGS that
    builds; CompileUnavailable where none does."""
    errors = []
    for options in CONFIGS:
        try:
            # Compiled with grad mode on, as inductor's default: with it off, inductor
            # swaps the matrix products and convolutions for oneDNN's, 2x slower a hop here.
            with torch.inference_mode(False), warnings.catch_warnings():
                # the FFT's complex output goes to PyTorch's own FFT (as intended)
                warnings.filterwarnings("ignore", message=".*complex operators")
                inductor.aoti_compile_and_package(
                    exported, package_path=str(tmp), inductor_configs=dict(options)
                )
            return tmp
        except Exception as exc:  # noqa: BLE001 - the next options, else eager
            errors.append(_one_line(exc))
            transient = isinstance(exc, (OSError, MemoryError)) or any(
                sign in str(exc) for sign in _TRANSIENT
            )
            logger.debug(f"df_mps: compiling the hop with {options} failed: {errors[-1]}")
            with contextlib.suppress(OSError):
                tmp.unlink()
    failure = CompileUnavailable(f"AOTInductor failed: {errors[-1]}")
    failure.transient = transient  # not remembered by _install: the next start tries again
    raise failure


# what says a build failed for want of room, not for what it builds
_TRANSIENT = ("Killed signal", "No space left", "Cannot allocate memory", "out of memory")


PRUNE_DAYS = 30  # cached packages unused this long go when a new one is built


def _prune(folder: Path, keep: Path) -> None:
    """Remove the cached packages not loaded for PRUNE_DAYS (older PyTorch, df_mps, models)."""
    prune_unused(folder, "hop-*.pt2", keep, PRUNE_DAYS, companions=_companions)
    # a build's own files, left where its process and its parent were killed together
    prune_unused(folder, ".hop-*.pt2", keep, 1)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(_build_in_child(sys.argv[1:]))
