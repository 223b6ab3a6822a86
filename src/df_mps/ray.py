"""Corpora through Ray Data: one DeepFilterNet engine per actor, resumable and fault-tolerant.

    pip install 'df-mps[ray]'
    df-mps-enhance -i corpus/ -r -o clean/ --ray               # a local cluster, one actor per GPU
    df-mps-enhance -i /shared/corpus -r -o /shared/clean --ray auto --skip-existing

``EnhanceFiles`` is a callable class for ``ray.data.Dataset.map_batches``: each actor loads one
engine on its device in ``__init__`` and turns batches of rows ``{"src", "dst"}`` into rows of
results (``status`` ok / skipped / error, one-line ``error``, audio seconds, RTF, ...). One bad
file is one ``error`` row, never a failed batch. Outputs are written by the library, which
writes to a temporary file beside the target and renames it into place, so an output is either
complete or absent.

Fault tolerance is Ray's: the actors run with ``max_restarts`` and ``max_task_retries``, so the
batch of an actor whose process dies is retried on its replacement. Files that the dead actor
had finished are found complete and reported ``skipped``; the temporary file of the one it was
writing is removed before that file is redone.

``run_on_ray`` runs (source, target) pairs as such a dataset and yields the result rows as they
finish; ``run_cli`` is what ``df-mps-enhance --ray`` calls. Ray itself is imported only when a
run starts: ``import df_mps.ray`` works without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._log import logger
from .api import Enhancer, FileError, FileResult, UserError
from .audio import AudioFileError, discard, temps_of
from .enhance import (
    MAX_DEFAULT_THREADS,
    PROG,
    enhance_file,
    enhancer_options,
    output_is_complete,
)
from .util import freeze_long_lived_objects, keep_freed_buffers

__all__ = [
    "COLUMNS",
    "DEFAULT_REPORT_NAME",
    "EnhanceFiles",
    "FileError",
    "make_engine",
    "ray_address",
    "remove_stale_temp_files",
    "run_cli",
    "run_on_ray",
]

DEFAULT_REPORT_NAME = "df-mps-report.jsonl"
MAX_FILES_PER_BATCH = 16
# Enough for a worker that dies now and then (preemption, OOM kill); a file that kills every
# worker it meets still ends the run instead of looping forever.
DEFAULT_RETRIES = 4

# The result row, column by column (what EnhanceFiles returns and the report holds).
COLUMNS = {
    "src": str,
    "dst": str,
    "status": str,  # ok, skipped or error
    "error": str,  # one line; "" when ok
    "audio_seconds": float,
    "model_seconds": float,  # resampling + model, as the CLI's RTF counts it
    "rtf": float,  # model_seconds / audio_seconds
    "seconds": float,  # this file's wall time in the worker, decode to encode
    "started": float,  # unix time: when the worker started this file
    "finished": float,  # unix time: when its output was complete
    "sample_rate": int,
    "channels": int,
    "frames": int,
    "worker": str,  # host:pid of the actor
    "device": str,
}
# The columns of an "ok" row that are its FileResult's figures, by the same names.
_RESULT_FIGURES = ("audio_seconds", "model_seconds", "rtf", "sample_rate", "channels", "frames")
_COMPLETE = "output exists and is complete"  # the error column of a skipped file


def _new_row(source, target, **columns) -> dict:
    """A result row for (source, target): ``columns`` given, the others empty ("" or 0)."""
    row = {name: kind() for name, kind in COLUMNS.items()}
    row.update(src=str(source), dst=str(target), **columns)
    return row


# -- the library: df_mps.api.Enhancer, or upstream's whole-file call file by file ----------------


class _WholeFileEngine:
    """An ``Enhancer``'s upstream whole-file call (``--whole-file``), file by file, with
    ``Enhancer.enhance_files``'s interface: yields a ``FileResult`` or a ``FileError`` per job,
    never raises for a file."""

    def __init__(self, enhancer: Enhancer):
        self.enhancer = enhancer

    @property
    def device(self):
        return self.enhancer.device

    def enhance_files(self, jobs, *, overwrite: bool = False) -> Iterator:
        for source, target in jobs:
            try:
                yield enhance_file(
                    source, target, self.enhancer, overwrite=overwrite, whole_file=True
                )
            except AudioFileError as exc:
                yield FileError(Path(source), Path(target), _one_line(exc))
            except Exception as exc:  # one bad file is one error row, whatever it raised
                logger.opt(exception=exc).debug("traceback")
                message = f"'{source}': {type(exc).__name__}: {_one_line(exc)}"
                yield FileError(Path(source), Path(target), message)


def make_engine(options: dict):
    """The engine an actor runs: ``df_mps.api.Enhancer(**options)`` (its batched engine); with
    ``whole_file``, that enhancer's upstream whole-file call, file by file."""
    options = dict(options)
    whole_file = options.pop("whole_file", False)
    enhancer = Enhancer(**options)
    return _WholeFileEngine(enhancer) if whole_file else enhancer


# -- the actor ---------------------------------------------------------------------------------
class EnhanceFiles:
    """A callable class for ``Dataset.map_batches(EnhanceFiles, batch_format="numpy", ...)``.

    ``enhancer_options``: keywords of ``df_mps.api.Enhancer`` (model, device, post_filter,
    atten_lim_db, pad, epoch, mask_only, batch, piece_seconds, threads, precision,
    cuda_graphs), plus ``whole_file``: upstream's whole-file call instead of the engine.
    ``forward_method``: df_mps's route (auto, real, complex), set before the model loads.
    ``existing``: what to do with a target that exists: "skip" it when it is a complete output
    of its source (else the file is an error row: its target exists), or "overwrite" it.
    ``log_level``: the actor process's loguru level (None leaves its logging alone).

    Batches are numpy (Ray Data's default): the rows are two short strings, so numpy arrays
    are all that is needed, and no pandas frame is built and torn down per batch.
    """

    def __init__(
        self,
        enhancer_options: Optional[dict] = None,
        *,
        forward_method: Optional[str] = None,
        existing: str = "skip",
        log_level: Optional[str] = "WARNING",
    ):
        if existing not in ("skip", "overwrite"):
            raise ValueError(f"existing must be 'skip' or 'overwrite', not {existing!r}")
        if log_level is not None:
            # This process is the actor's own: its log lines reach the driver's terminal, where
            # the per-file lines come from the driver instead.
            logger.remove()
            if log_level.lower() != "none":
                logger.add(sys.stderr, level=log_level.upper())
        options = dict(enhancer_options or {})
        import df_mps
        from df_mps import settings

        if not settings.get().disabled:
            device = options.get("device")
            df_mps.patch(device=None if device == "auto" else device, forward_method=forward_method)
        self.engine = make_engine(options)
        self.freed_buffers_kept = False
        if _in_a_ray_actor():
            # The actor's process is ours: its full garbage collections (one took 0.15 s of
            # a batch on an H100, holding the GIL from the engine's scheduling thread) scan
            # only what comes after the model load, and large freed buffers stay for reuse
            # (df_mps.util.keep_freed_buffers). Made in another process (a test, a notebook),
            # the class leaves that process's collector and malloc alone.
            freeze_long_lived_objects()
            self.freed_buffers_kept = keep_freed_buffers()
        self.existing = existing
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.device = str(self.engine.device)
        logger.debug(f"EnhanceFiles actor {self.worker} ready on {self.device}")

    def process_state(self) -> dict:
        """What this actor set up in its process: its pid, the objects frozen out of the
        garbage collector's sight, and whether large freed buffers are kept for reuse."""
        import gc

        return {
            "pid": os.getpid(),
            "gc_frozen_objects": gc.get_freeze_count(),
            "freed_buffers_kept": self.freed_buffers_kept,
        }

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        pairs = [(str(s), str(d)) for s, d in zip(batch["src"], batch["dst"])]
        rows: Dict[Tuple[str, str], dict] = {}
        todo: List[Tuple[str, str]] = []
        for source, target in pairs:
            if self.existing == "skip" and output_is_complete(source, target):
                rows[_key(source, target)] = self._skipped(source, target)
                continue
            # A worker that died while writing this target left its temporary file behind; its
            # task is being retried here, so that file is stale.
            remove_stale_temp_files(target)
            todo.append((source, target))
        overwrite = self.existing == "overwrite"
        started = time.time()
        try:
            # Results come as files finish, not in order (df_mps.api's batched engine).
            for result in self.engine.enhance_files(todo, overwrite=overwrite):
                finished = time.time()
                rows[_key(result.source, result.target)] = self._row(result, started, finished)
                started = finished
        except Exception as exc:  # the engine itself failed: its unfinished files are errors
            logger.opt(exception=exc).debug("traceback")
            message = f"the engine failed: {type(exc).__name__}: {_one_line(exc)}"
            for source, target in todo:
                if _key(source, target) not in rows:
                    error = FileError(Path(source), Path(target), f"'{source}': {message}")
                    rows[_key(source, target)] = self._row(error, started, time.time())
        return _columns([rows[_key(*pair)] for pair in pairs])

    def _base(self, source: str, target: str) -> dict:
        return _new_row(source, target, worker=self.worker, device=self.device)

    def _skipped(self, source: str, target: str) -> dict:
        import soundfile as sf

        row = self._base(source, target)
        now = time.time()
        row.update(status="skipped", error=_COMPLETE, started=now, finished=now)
        try:
            info = sf.info(target)
        except (RuntimeError, OSError):  # checked complete a moment ago; the figures can go
            return row
        row.update(
            audio_seconds=info.frames / info.samplerate,
            sample_rate=int(info.samplerate),
            channels=int(info.channels),
            frames=int(info.frames),
        )
        return row

    def _row(self, result: Union[FileResult, FileError], started: float, finished: float):
        row = self._base(str(result.source), str(result.target))
        row.update(started=started, finished=finished, seconds=finished - started)
        if isinstance(result, FileError):
            row.update(status="error", error=result.message)
            return row
        row.update(status="ok", **{name: getattr(result, name) for name in _RESULT_FIGURES})
        return row


def _in_a_ray_actor() -> bool:
    """Whether this code runs inside a Ray actor's process (not a driver, not without Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - an older or stripped Ray: not ours to decide
        return False


def _key(source, target) -> Tuple[str, str]:
    return (os.path.normpath(os.fspath(source)), os.path.normpath(os.fspath(target)))


def _columns(rows: Sequence[dict]) -> Dict[str, np.ndarray]:
    out = {}
    for name, kind in COLUMNS.items():
        values = [row[name] for row in rows]
        dtype = {str: np.str_, float: np.float64, int: np.int64}[kind]
        out[name] = np.array(values, dtype=dtype)
    return out


def remove_stale_temp_files(target) -> int:
    """Remove the library's temporary files for ``target`` (tagged with its name, beside it).
    Only for targets no live process is writing: a worker's retried task, or a run that has
    ended. Returns how many were removed."""
    removed = 0
    for path in temps_of(target):
        discard(path)
        removed += 1
    return removed


# -- the driver --------------------------------------------------------------------------------
def ray_address(value: str) -> str:
    """argparse type of ``--ray [ADDRESS]``: local, auto, ray://HOST:PORT or HOST:PORT.

    Refusing anything else keeps ``--ray noisy.wav`` from taking a file for an address.
    """
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if text in ("local", "auto") or text.startswith("ray://") or (sep and host and port.isdigit()):
        return text
    import argparse

    raise argparse.ArgumentTypeError(
        f"invalid ADDRESS {value!r}: use local, auto, ray://HOST:PORT or HOST:PORT "
        "(put --ray after the files, or write --ray=local)"
    )


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"--ray needs Ray Data ({_one_line(exc)}): pip install 'df-mps[ray]'"
        ) from None
    return ray


def _connect(ray, address: Optional[str], num_cpus: Optional[int]) -> bool:
    """Start or join a cluster; True when this call started it (and must shut it down)."""
    if ray.is_initialized():  # a caller (a notebook, a test) already chose the cluster
        return False
    kwargs = dict(include_dashboard=False, logging_level="WARNING", configure_logging=True)
    if address in (None, "local"):
        # "local": a new cluster on this machine, never one that `ray start` left running.
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


@dataclasses.dataclass
class _Sizes:
    workers: int
    gpus: float  # per actor: 0 (a CPU actor), 1, or a fraction to share a GPU
    cpus: int  # Ray CPUs per actor
    threads: int  # torch threads per actor
    device: Optional[str]  # for the engine; None lets df_mps choose (mps on a Mac, else cpu)


def _sizes(
    ray,
    device: Optional[str],
    workers: Optional[int],
    threads: Optional[int],
    gpus_per_worker: Optional[float] = None,
) -> _Sizes:
    """How many actors, and what each asks of this cluster."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    kind = (device or "auto").split(":")[0]
    if kind == "cuda" and not gpus:
        raise UserError("--device cuda: the Ray cluster has no GPUs")
    use_gpu = kind == "cuda" or (kind == "auto" and gpus > 0)
    per_gpu = gpus_per_worker if gpus_per_worker else 1.0
    if workers is None:
        workers = max(1, int(gpus / per_gpu)) if use_gpu else 1
    share = max(1, cpus // workers)
    if threads is None:
        threads = min(MAX_DEFAULT_THREADS, share)
    if workers > (gpus / per_gpu if use_gpu else cpus):
        logger.warning(
            f"ray: {workers} actor(s) asked for, but the cluster has {cpus} CPU(s) and "
            f"{gpus} GPU(s): the rest start only when it grows"
        )
    return _Sizes(
        workers=workers,
        gpus=per_gpu if use_gpu else 0,
        cpus=min(threads, share),  # never more than the cluster has, or no actor starts
        threads=threads,
        device="cuda" if use_gpu else (None if kind == "auto" else device),
    )


def _stop_execution(dataset) -> None:
    # On the way out (an interrupt too), before the cluster goes: Ray Data's executor thread
    # would otherwise outlive ray.shutdown(), and Ray's core then ends the whole process, before
    # the temporary files are swept. This is what Dataset.__del__ does, done now and waited for.
    executor = getattr(dataset, "_current_executor", None)
    if executor is not None:
        try:
            executor.shutdown(force=True)
        except Exception as exc:
            logger.debug(f"ray: stopping the dataset's execution: {_one_line(exc)}")


def _quiet_ray_data_console() -> None:
    # Ray Data logs each dataset's start, plan and end at INFO on the console (its log file in
    # the session directory keeps them); the command has its own bar and summary.
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def default_files_per_batch(files: int, workers: int, rows: int = 1) -> int:
    """About four batches per worker, so work spreads and a retry redoes little, at most 16;
    but at least the engine's ``rows`` (its batch), so that its lanes are full."""
    spread = max(1, min(MAX_FILES_PER_BATCH, math.ceil(files / (4 * workers))))
    return max(spread, min(rows, math.ceil(files / workers)))


def run_on_ray(
    jobs: Iterable[Tuple[Union[str, os.PathLike], Union[str, os.PathLike]]],
    *,
    address: Optional[str] = None,
    workers: Optional[int] = None,
    enhancer_options: Optional[dict] = None,
    forward_method: Optional[str] = None,
    overwrite: bool = False,
    report_path: Union[str, os.PathLike, None] = None,
    files_per_batch: Optional[int] = None,
    num_cpus: Optional[int] = None,
    max_restarts: int = DEFAULT_RETRIES,
    max_task_retries: int = DEFAULT_RETRIES,
    gpus_per_worker: Optional[float] = None,
    progress_bars: bool = False,
    log_level: Optional[str] = "WARNING",
) -> Iterator[dict]:
    """Enhance (source, target) pairs with a pool of ``EnhanceFiles`` actors; yields one result
    row (a dict, see ``COLUMNS``) per job as it finishes, not in input order.

    ``address``: None or "local" starts a local cluster (``num_cpus`` CPUs, default all) and
    shuts it down at the end; "auto", "ray://HOST:PORT" or "HOST:PORT" joins a cluster. If Ray
    is already initialised in this process, that cluster is used and left running.
    ``workers``: actors (default one per GPU, else one). ``enhancer_options["threads"]``: torch
    threads (and Ray CPUs) per actor, default min(4, CPUs / workers). ``overwrite``: replace
    existing targets; otherwise a target that exists and is complete is a ``skipped`` row.
    ``report_path``: the rows as JSON lines, written as they come. ``max_restarts`` and
    ``max_task_retries`` are Ray's actor retries. ``gpus_per_worker``: each GPU actor's share
    (default 1; 0.5 puts two actors on each GPU). ``progress_bars``: Ray Data's own bars and
    log lines on the console; ``log_level``: the actors' loguru level.
    """
    pairs = [(str(s), str(d)) for s, d in jobs]
    with contextlib.ExitStack() as stack:
        report = None
        if report_path is not None:
            report = stack.enter_context(open(report_path, "w", encoding="utf-8"))
        if not pairs:
            return
        ray = _import_ray()
        started_here = _connect(ray, address, num_cpus)
        try:
            options = dict(enhancer_options or {})
            # No --device: the driver's DF_MPS_DEVICE decides where it names a device every
            # machine can have (cpu, cuda), as it does for the plain CLI (on the H200 a test's
            # DF_MPS_DEVICE=cpu run went to the GPU). mps or auto there is about the driver's
            # own machine (a Mac joining a GPU cluster): the cluster's GPUs decide.
            from . import settings

            device = options.get("device")
            chosen = settings.get().device
            if device is None and chosen and chosen.split(":")[0] in ("cpu", "cuda"):
                device = chosen
            size = _sizes(ray, device, workers, options.get("threads"), gpus_per_worker)
            options.update(threads=size.threads, device=size.device)
            from .engine import default_batch

            rows = options.get("batch")
            if not isinstance(rows, int):
                rows = default_batch(str(size.device or "cpu").split(":")[0])
            batch = files_per_batch or default_files_per_batch(len(pairs), size.workers, rows)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = progress_bars
            if not progress_bars:
                _quiet_ray_data_console()
            each = f"{size.gpus:g} GPU" if size.gpus else f"{size.cpus} CPU"
            logger.info(
                f"ray: {len(pairs)} file(s) on {size.workers} actor(s) ({each} and "
                f"{size.threads} torch thread(s) each), {batch} file(s) per batch"
            )
            dataset = ray.data.from_items(
                [{"src": s, "dst": d} for s, d in pairs], override_num_blocks=len(pairs)
            )
            with warnings.catch_warnings():
                # Ray 2.60-2.63 deprecate passing actor options (max_restarts, ...) through
                # map_batches' **ray_remote_args, with no named replacement yet; the extra
                # stops below 2.64, where Ray says they go.
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                dataset = dataset.map_batches(
                    EnhanceFiles,
                    fn_constructor_kwargs=dict(
                        enhancer_options=options,
                        forward_method=forward_method,
                        existing="overwrite" if overwrite else "skip",
                        log_level=log_level,
                    ),
                    batch_size=batch,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=size.workers),
                    num_gpus=size.gpus,
                    num_cpus=size.cpus,
                    max_restarts=max_restarts,
                    max_task_retries=max_task_retries,
                    # The driver's DF_MPS_* settings (the engine's knobs, the forward method)
                    # hold in the actors too, which a cluster starts with its own environment.
                    runtime_env={"env_vars": _settings_env()},
                )
            stack.callback(_stop_execution, dataset)
            for row in dataset.iter_rows():
                row = {name: kind(row[name]) for name, kind in COLUMNS.items()}
                if report is not None:
                    report.write(json.dumps(row) + "\n")
                    report.flush()
                yield row
        finally:
            stack.close()
            if started_here:
                ray.shutdown()  # ends the actors, so none is still writing below
            for _, target in pairs:
                remove_stale_temp_files(target)


# -- the command line's --ray ----------------------------------------------------------------
def run_cli(jobs, args, output_dir: Path) -> int:
    """``df-mps-enhance --ray``: the planned jobs (``df_mps.enhance.plan_jobs``) on Ray.

    Planned errors and ``--skip-existing`` skips become report rows too, so the report has one
    row per planned file. Returns the exit status: 1 when any file failed.
    """
    from tqdm import tqdm

    report_path = Path(args.report) if args.report else output_dir / DEFAULT_REPORT_NAME
    report_path.parent.mkdir(parents=True, exist_ok=True)
    planned: List[dict] = []
    todo = []
    for job in jobs:
        row = _new_row(job.source, job.target or "")
        if job.error is not None:
            row.update(status="error", error=job.error)
            _say(f"error: {job.error} (skipped)")
            planned.append(row)
        elif getattr(job, "skipped", False):
            row.update(status="skipped", error=_COMPLETE)
            planned.append(row)
        else:
            todo.append((job.source, job.target))
    skipped = sum(row["status"] == "skipped" for row in planned)
    if skipped:
        _say(f"{skipped} file(s) skipped: their output exists and is complete")
    # The actors log warnings and worse; the line per file comes from here.
    actor_log_level = "WARNING" if args.log_level in ("trace", "debug", "info") else args.log_level
    counts = {"ok": 0, "skipped": skipped, "error": len(planned) - skipped}
    audio = model = 0.0
    t0 = time.perf_counter()
    with open(report_path, "w", encoding="utf-8") as report:
        for row in planned:
            report.write(json.dumps(row) + "\n")
        report.flush()
        rows = contextlib.closing(  # closed on an interrupt too: the cluster ends, temps go
            run_on_ray(
                todo,
                address=args.ray,
                workers=args.ray_workers,
                enhancer_options=_actor_options(args),
                forward_method=args.forward_method,
                overwrite=args.overwrite,
                files_per_batch=args.ray_batch,
                log_level=actor_log_level,
            )
        )
        bar = tqdm(total=len(todo), unit="file", disable=None, file=sys.stderr, dynamic_ncols=True)
        with rows as results, bar:
            for row in results:
                report.write(json.dumps(row) + "\n")
                report.flush()
                bar.update(1)
                counts[row["status"]] += 1
                if row["status"] == "error":
                    _say(f"error: {row['error']} (skipped)")
                elif row["status"] == "ok":
                    audio += row["audio_seconds"]
                    model += row["model_seconds"]
                    bar.set_postfix_str(f"RTF {row['rtf']:.3f}")
                    logger.info(
                        f"enhanced '{row['src']}' -> '{row['dst']}' "
                        f"({row['audio_seconds']:.2f} s audio, RTF {row['rtf']:.3f}, "
                        f"on {row['worker']})"
                    )
    wall = time.perf_counter() - t0
    text = f"enhanced {counts['ok']} of {len(jobs)} file(s) on Ray in {wall:.1f} s"
    if audio:
        text += f", RTF {model / audio:.3f}"
    if counts["skipped"]:
        text += f"; {counts['skipped']} skipped (complete)"
    if counts["error"]:
        text += f"; {counts['error']} failed"
    _say(text + f"; report: {report_path}")
    return 1 if counts["error"] else 0


# Not sent to actors, which may run on other machines (those of a local cluster inherit this
# environment anyway): this machine's paths, and its device choice, which run_on_ray turns
# into each actor's device itself (an mps here means nothing to a Linux GPU worker).
_LOCAL_SETTINGS = ("DF_MPS_CACHE_DIR", "DF_MPS_SHARED", "DF_MPS_DEVICE")


def _settings_env() -> dict:
    """This process's DF_MPS_* environment variables, for the actors (not its paths)."""
    return {
        name: value
        for name, value in os.environ.items()
        if name.startswith("DF_MPS_") and name not in _LOCAL_SETTINGS
    }


def _actor_options(args) -> dict:
    """What each actor builds its engine from: the local run's Enhancer options
    (``df_mps.enhance.enhancer_options``), the device and threads that ``run_on_ray`` sizes the
    actors by, and ``--whole-file``."""
    return dict(
        enhancer_options(args), device=args.device, threads=args.threads, whole_file=args.whole_file
    )


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"{PROG}: {message}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
