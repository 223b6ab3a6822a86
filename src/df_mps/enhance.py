"""The df-mps command line: DeepFilterNet's ``deepFilter``, made safe for a user's files.

    python -m df_mps.enhance noisy.wav                 # writes ./noisy_DeepFilterNet3.wav
    df-mps-enhance -o out/ -i recordings/ -r           # a directory tree, mirrored under out/

It takes upstream's options (``-m``, ``--pf``, ``-o``, ``--atten-lim``, ``--no-delay-compensation``,
``--no-suffix``, ``-i``, ``--log-level``, ``-e``) and adds ``--device``, ``--forward-method``,
``--threads``, ``-r/--recursive``, ``--overwrite``, ``--batch``, ``--piece-seconds``,
``--whole-file`` and ``--allow-truncated``. Differences from upstream:

- Many files at once: up to ``--batch`` channels of as many files share each forward of the
  model (``df_mps.engine``: continuous batching; when a file ends its rows take the next file).
  Each file's output is the same whatever batch it rode in (1e-5), and equals upstream's
  whole-file output to float32 rounding. ``--batch auto`` picks per device (CPU 4, CUDA 64,
  MPS 16).
- Files of any length are enhanced in bounded memory at constant speed: the audio streams from
  disk and back in blocks, and the model runs on pieces of ``--piece-seconds`` (10 s) whose
  state carries over exactly. One progress bar, in seconds of audio, covers the run.
  ``--whole-file`` reads each file whole and runs it at once, as upstream (memory grows ~550 MB
  per minute of audio).

- Audio goes through soundfile (no torchaudio backend, torchcodec or FFmpeg). The output has the
  input's sample rate, channel count, length and, where the format allows, sample format; an
  RF64 or W64 input named ``.wav`` stays RF64 or W64, and a WAV output that could pass 4 GiB
  is written as RF64 (plain WAV's sizes stop at 4 GiB).
- An input file is never overwritten, not even with ``--overwrite``. An existing output file is
  replaced only with ``--overwrite`` (upstream replaces it silently). Outputs are written to a
  temporary file in the target directory and renamed into place, so an interrupted run leaves
  either the complete file or none.
- A file that can't be processed (missing, unreadable, empty, corrupt, not audio, no samples,
  NaN or Inf, or a WAV/RF64/W64/AIFF holding less than its header declares:
  ``--allow-truncated`` enhances what is there) is reported in one line naming the file and the
  plain cause, and skipped; so is an output that can't be written (disk full, permission
  denied). Problems with the output location stop the run before the model loads. A header
  that declares no length (0 or 0xFFFFFFFF: a recorder that died before finalising it) is not
  truncation: the file is read to its end and enhanced, with a one-line warning.
- Exit status: 0 when every file was enhanced, 1 when any failed or the run could not start,
  2 for a command-line usage error, 130 when interrupted (Ctrl-C), 143 for SIGTERM and 129 for
  SIGHUP (which clean up as Ctrl-C does).

The command is thin: it parses options, plans jobs (refusing unsafe outputs before any model
loads), and hands them to ``df_mps.api.Enhancer.enhance_files``, which runs them through the
engine and writes through ``df_mps.audio``'s atomic writer; it prints as results come back.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._log import logger
from .api import (
    Enhancer,
    FileError,
    FileResult,
    UserError,
    load_enhancer,
    output_suffix,
    resolve_model,
)
from .audio import (
    EXTENSION_FORMATS,
    TEMP_SUFFIX,
    AudioFileError,
    audio_info,
    discard,
    new_temp,
    no_length,
    read_audio,
    refuse_input_as_output,
    truncation,
    write_audio,
    write_error,
)
from .engine import DEFAULT_BATCH, DEFAULT_PIECE_SECONDS
from .errors import os_reason
from .models import (
    DEFAULT_MODEL,
    PRETRAINED_MODELS,
)
from .streaming import BadAudioError
from .util import (
    PathLike,
    installed_version,
    large_buffers_kept,
    long_lived_objects_frozen,
    one_line,
    sysctl,
)

PROG = "df-mps-enhance"
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "none")
MAX_DEFAULT_THREADS = 4

__all__ = [
    "DEFAULT_MODEL",
    "PRETRAINED_MODELS",
    "BadAudioError",
    "FileError",
    "output_suffix",
    "resolve_model",
    "Enhancer",
    "FileResult",
    "UserError",
    "enhance_file",
    "load_enhancer",
    "main",
]


# -- one file ---------------------------------------------------------------------------------
def enhance_file(
    source: PathLike,
    target: PathLike,
    enhancer: Enhancer,
    *,
    overwrite: bool = False,
    whole_file: bool = False,
    piece_seconds: Optional[float] = None,
    progress=False,
) -> FileResult:
    """Enhance one file into ``target``: same rate, channels, length and sample format.

    ``target`` is written atomically; it is never ``source`` (``AudioFileError``), and an
    existing ``target`` is replaced only with ``overwrite``. Raises ``AudioFileError`` (one-line
    message) for a file that can't be read, has no samples or holds NaN/Inf, and for a write
    that fails.

    By default the file streams through the engine (``Enhancer.enhance_file``) in pieces of
    ``piece_seconds``, in bounded memory (``progress``: a callable given seconds of audio
    done). ``whole_file=True`` reads the whole file and calls ``enhancer(audio, sample_rate)``
    on it once, as upstream does.
    """
    source, target = Path(source), Path(target)
    refuse_input_as_output(source, target)
    if whole_file:
        return _enhance_whole_file(source, target, enhancer, overwrite)
    return enhancer.enhance_file(
        source,
        target,
        overwrite=overwrite,
        piece_seconds=piece_seconds,
        progress=progress if callable(progress) else None,
    )


def _enhance_whole_file(
    source: Path, target: Path, enhancer: Enhancer, overwrite: bool
) -> FileResult:
    import torch

    data, info = read_audio(source)
    check_samples(source, data)
    audio = torch.from_numpy(np.ascontiguousarray(data.T))
    t0 = time.perf_counter()
    enhanced = enhancer(audio, int(info.samplerate))
    seconds = time.perf_counter() - t0
    samples = enhanced.detach().cpu().numpy().T
    target.parent.mkdir(parents=True, exist_ok=True)
    refuse_input_as_output(source, target)
    try:
        subtype = write_audio(
            target,
            samples,
            info.samplerate,
            subtype=info.subtype,
            overwrite=overwrite,
            source_format=info.format,  # RF64 and W64 stay so
        )
    except OSError as exc:
        raise write_error(target, exc) from None
    return FileResult(
        source=source,
        target=target,
        sample_rate=int(info.samplerate),
        channels=int(info.channels),
        frames=int(data.shape[0]),
        subtype=subtype,
        model_seconds=seconds,
    )


def check_samples(source: Path, data: np.ndarray) -> None:
    if data.shape[0] == 0:
        raise BadAudioError(f"'{source}': has no audio samples")
    if not np.isfinite(data).all():
        bad = int(data.size - np.isfinite(data).sum())
        raise BadAudioError(f"'{source}': contains {bad} NaN or Inf sample(s)")


# -- planning: which file goes where, checked before the model loads ---------------------------
@dataclasses.dataclass
class Job:
    source: Path
    target: Optional[Path] = None
    error: Optional[str] = None
    skipped: bool = False  # --skip-existing: the target exists and is complete


def audio_extensions() -> frozenset:
    import soundfile as sf

    formats = set(sf.available_formats()) - {"RAW"}
    exts = {ext for ext, fmt in EXTENSION_FORMATS.items() if fmt in formats}
    exts |= {fmt.lower() for fmt in formats}
    return frozenset(exts)


def _is_audio_name(name: str, extensions: frozenset) -> bool:
    if name.startswith(".") or name.endswith(TEMP_SUFFIX):
        return False
    return os.path.splitext(name)[1].lower().lstrip(".") in extensions


def collect_inputs(
    files: Sequence[str],
    noisy_dir: Optional[str],
    recursive: bool,
    output_dir: Path,
    errors: Optional[List[str]] = None,
) -> List[Tuple[Path, Path]]:
    """(input file, its sub-directory relative to the output dir) for every input.

    A sub-directory that can't be read is one line in ``errors`` (when given; else the run
    stops with it) and the walk goes on.
    """
    if noisy_dir is None:
        return [(Path(f), Path()) for f in files]
    root = Path(noisy_dir)
    try:
        is_dir = stat.S_ISDIR(os.stat(root).st_mode)
    except FileNotFoundError:
        raise UserError(f"input directory '{root}' does not exist") from None
    except OSError as exc:
        raise UserError(f"input directory '{root}': {os_reason(exc)}") from None
    if not is_dir:
        raise UserError(f"input directory '{root}' is not a directory")
    extensions = audio_extensions()
    found: List[Tuple[Path, Path]] = []
    out_real = os.path.realpath(output_dir)

    def walk_error(exc: OSError) -> None:
        if errors is None or os.path.realpath(exc.filename or root) == os.path.realpath(root):
            _raise_walk_error(exc)
        errors.append(f"can't read directory '{exc.filename}': {os_reason(exc)}")

    for current, dirs, names in os.walk(root, onerror=walk_error):
        # Never descend into the output directory (an earlier run's results are not inputs),
        # nor into hidden directories.
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and os.path.realpath(os.path.join(current, d)) != out_real
        )
        rel = Path(os.path.relpath(current, root))
        for name in sorted(names):
            if _is_audio_name(name, extensions):
                found.append((Path(current) / name, rel))
        if not recursive:
            break
    if not found:
        raise UserError(
            f"no audio files in '{root}'" + ("" if recursive else " (use -r for sub-directories)")
        )
    return found


def _raise_walk_error(exc: OSError) -> None:
    raise UserError(f"can't read directory '{exc.filename}': {os_reason(exc)}")


def check_output_dir(output_dir: Path) -> None:
    """Fail before any work when ``output_dir`` can't be used (it is created later)."""
    path = output_dir
    while not path.exists():
        if path.is_symlink():
            raise UserError(f"output directory '{output_dir}': '{path}' is a broken link")
        parent = path.parent
        if parent == path:
            break
        path = parent
    if not path.is_dir():
        what = "is a file" if path == output_dir else f"can't be created: '{path}' is a file"
        raise UserError(f"output directory '{output_dir}' {what}")
    # Try it, as the writer will: permission bits don't tell about read-only mounts, or root.
    try:
        probe = new_temp(path / "probe")
    except OSError as exc:
        where = "is not writable" if path == output_dir else f"can't be created in '{path}'"
        raise UserError(f"output directory '{output_dir}' {where} ({os_reason(exc)})") from None
    discard(probe)


def output_is_complete(source: PathLike, target: PathLike) -> bool:
    """True when ``target`` is readable audio with ``source``'s rate, channels and frames, as
    every output of this command is (writes are atomic: a partial output never has its name)."""
    import soundfile as sf

    try:
        expected = audio_info(source)
        with sf.SoundFile(os.fspath(target)) as out:
            if (out.samplerate, out.channels, out.frames) != (
                expected.samplerate,
                expected.channels,
                expected.frames,
            ):
                return False
            if out.frames:  # the header's length is backed by data: the last frame reads
                out.seek(out.frames - 1)
                return len(out.read(1)) == 1
            return True
    except (RuntimeError, OSError, ValueError, TypeError):  # sf.LibsndfileError: RuntimeError
        return False


def plan_jobs(
    inputs: Sequence[Tuple[Path, Path]],
    output_dir: Path,
    suffix: Optional[str],
    overwrite: bool,
    skip_existing: bool = False,
    allow_truncated: bool = False,
) -> List[Job]:
    """Pair each input with its output path, refusing any pairing that could lose a file.

    An input that can't be used (missing, unreadable, a WAV/RF64/W64/AIFF holding less than
    its header declares unless ``allow_truncated``, ...) or an output path that can't be
    checked gets a one-line ``error`` naming the file and the plain cause; the rest go on. A
    header that declares no length is a warning: the file is read to its end.
    """
    jobs: List[Job] = []
    input_real: Dict[str, Path] = {}
    input_ids: Dict[Tuple[int, int], Path] = {}
    for source, _ in inputs:
        try:
            st = source.stat()
        except OSError:
            continue  # reported below, in its own job
        if stat.S_ISREG(st.st_mode):
            input_real.setdefault(os.path.realpath(source), source)
            input_ids.setdefault((st.st_dev, st.st_ino), source)
    taken: Dict[str, Path] = {}
    folds: Dict[Path, bool] = {}  # directory -> whether its filesystem ignores case
    for source, rel in inputs:
        job = Job(source)
        jobs.append(job)
        job.error = _input_problem(source)
        if job.error is not None:
            continue
        cut = truncation(source)
        if cut is not None and not allow_truncated:
            job.error = f"'{source}': {cut} (--allow-truncated enhances what is there)"
            continue
        if cut is not None:
            logger.warning(f"'{source}': {cut}; enhancing what is there (--allow-truncated)")
        open_ended = no_length(source)
        if open_ended is not None:
            logger.warning(f"'{source}': {open_ended}")
        stem, ext = os.path.splitext(source.name)
        name = stem + (f"_{suffix}" if suffix else "") + ext
        target = output_dir / rel / name
        job.target = target
        try:
            job.error = _output_problem(
                source, target, overwrite, input_real, input_ids, taken, folds, skip_existing
            )
            if job.error is None and skip_existing and target.exists():
                if output_is_complete(source, target):
                    job.skipped = True
                elif not overwrite:
                    job.error = (
                        f"'{source}': output '{target}' exists and is not a complete output "
                        "of this input (use --overwrite to replace it)"
                    )
        except OSError as exc:
            job.error = f"'{source}': can't check its output '{target}': {os_reason(exc)}"
    return jobs


def _input_problem(source: Path) -> Optional[str]:
    """Why ``source`` can't be enhanced, in one line, or None: checked before the model loads."""
    try:
        st = source.stat()
    except FileNotFoundError:
        return f"'{source}': no such file"
    except OSError as exc:
        return f"'{source}': {os_reason(exc)}"
    if not stat.S_ISREG(st.st_mode):
        return f"'{source}': not a file"
    if st.st_size == 0:
        return f"'{source}': empty file"
    try:
        with open(source, "rb"):  # permission bits don't tell about ACLs, mounts or root
            pass
    except OSError as exc:
        return f"'{source}': {os_reason(exc)}"
    return None


def _output_problem(
    source, target, overwrite, input_real, input_ids, taken, folds, skip_existing=False
):
    """Why ``target`` can't be ``source``'s output, in one line, or None."""
    real = os.path.realpath(target)
    target_id = _file_id(target) if target.exists() else None
    if real in input_real or target_id in input_ids:
        if real in input_real:
            other = input_real[real]
            what = "itself" if _same_path(other, source) else f"'{other}'"
        else:  # another name for an input's data: a hard link
            what = f"'{input_ids[target_id]}' (a hard link to it)"
        return (
            f"'{source}': its output '{target}' would overwrite the input {what}; refused "
            "(use -o DIR or drop --no-suffix)"
        )
    key = os.path.normcase(real)
    if _ignores_case(target.parent, folds):
        # APFS and HFS+ by default, FAT, SMB shares: "Take.wav" and "take.WAV" are one file.
        key = key.casefold()
    if key in taken:
        return f"'{source}': its output '{target}' is also the output of '{taken[key]}'"
    taken[key] = source
    blocker = _non_dir_ancestor(target.parent)
    if blocker is not None:
        return f"'{source}': can't create '{target.parent}': '{blocker}' is a file"
    if target.is_dir():
        return f"'{source}': its output '{target}' is a directory"
    if target.exists() and not overwrite and not skip_existing:
        return f"'{source}': output '{target}' exists (use --overwrite to replace it)"
    return None


def _same_path(a: Optional[Path], b: Path) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def filesystem_ignores_case(directory: PathLike) -> bool:
    """Whether the filesystem holding ``directory`` (or its nearest existing ancestor) treats
    names that differ only in case as one file. Probed with a temporary file, not assumed."""
    path = Path(directory)
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".df-mps-case-probe-", suffix="-Aa", dir=path)
    except OSError:
        # Can't probe (read-only, no permission): the names alone decide, as on a
        # case-sensitive filesystem; nothing is written there anyway.
        return False
    os.close(fd)
    try:
        head, tail = os.path.split(probe)
        return os.path.exists(os.path.join(head, tail.swapcase()))
    finally:
        os.unlink(probe)


def _ignores_case(directory: Path, folds: Dict[Path, bool]) -> bool:
    if directory not in folds:
        folds[directory] = filesystem_ignores_case(directory)
    return folds[directory]


def _file_id(path: Path) -> Tuple[int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino)


def _non_dir_ancestor(path: Path) -> Optional[Path]:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


# -- the command ------------------------------------------------------------------------------
def _epoch(value: str) -> Union[int, str]:
    if value.lower() in ("best", "latest", "none"):
        return value.lower()
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid epoch {value!r}: use best, latest, none or a number"
        ) from None


def _number_in(value: str, parse, low, high, what: str, hint: str):
    """``value`` as ``parse`` (int or float) reads it, where that lies in [low, high]; else
    the option's one-line error."""
    try:
        n = parse(value)
    except ValueError:
        n = None
    if n is None or not low <= n <= high:  # NaN fails the comparison too
        raise argparse.ArgumentTypeError(f"invalid {what} {value!r}: {hint}")
    return n


def _piece_seconds(value: str):
    if value.lower() == "auto":
        return "auto"
    return _number_in(value, float, 0.5, 3600, "piece length", "use seconds between 0.5 and 3600")


def _batch(value: str):
    if value.lower() == "auto":
        return "auto"
    return _number_in(value, int, 1, 4096, "batch", "use auto or 1 to 4096")


def _threads(value: str) -> int:
    return _number_in(value, int, 1, float("inf"), "thread count", "use a number >= 1")


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        upstream = installed_version("deepfilternet") or "not installed"
        print(f"df-mps {__version__}, DeepFilterNet {upstream}")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Enhance noisy speech with DeepFilterNet (through df-mps). "
        "Outputs keep each input's sample rate, channels, length and sample format.",
        epilog="An input file is never overwritten. Exit status: 0 all files enhanced, "
        "1 a file failed or the run could not start, 2 usage error, 130 interrupted, "
        "143 SIGTERM, 129 SIGHUP.",
    )
    p.add_argument("noisy_audio_files", nargs="*", metavar="FILE", help="noisy audio files")
    p.add_argument(
        "-i", "--noisy-dir", metavar="DIR", help="enhance the audio files in DIR (instead of FILEs)"
    )
    p.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help="with -i: include sub-directories, mirrored under the output directory",
    )
    p.add_argument(
        "-o",
        "--output-dir",
        metavar="DIR",
        default=None,
        help="where enhanced files go (default: the current directory; created if missing)",
    )
    p.add_argument(
        "--no-suffix",
        dest="suffix",
        action="store_false",
        help="don't add the model name to output file names",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (inputs are never replaced)",
    )
    p.add_argument(
        "-m",
        "--model-base-dir",
        metavar="MODEL",
        default=None,
        help="model directory (config.ini + checkpoints/) or pretrained name "
        "(DeepFilterNet, DeepFilterNet2, DeepFilterNet3); default DeepFilterNet3",
    )
    p.add_argument(
        "-e",
        "--epoch",
        type=_epoch,
        default="best",
        help="checkpoint to load: best, latest or an epoch number (default best)",
    )
    p.add_argument(
        "--pf",
        action="store_true",
        help="post-filter that slightly over-attenuates very noisy sections",
    )
    p.add_argument(
        "-a",
        "--atten-lim",
        type=float,
        default=None,
        metavar="DB",
        help="limit the noise attenuation to DB decibels (mixes in the noisy input)",
    )
    p.add_argument(
        "--no-delay-compensation",
        dest="compensate_delay",
        action="store_false",
        help="don't compensate the STFT delay (output lags by n_fft - hop samples)",
    )
    p.add_argument("--no-df-stage", action="store_true", help="run the ERB mask stage only")
    p.add_argument(
        "--allow-truncated",
        action="store_true",
        help="enhance a WAV/RF64/W64/AIFF that holds less than its header declares (a cut "
        "download) instead of skipping it; warns",
    )
    p.add_argument(
        "--piece-seconds",
        type=_piece_seconds,
        default="auto",
        metavar="S",
        help="the model runs on pieces of S seconds whose state carries over exactly, so any "
        f"length fits in bounded memory (default auto: {DEFAULT_PIECE_SECONDS:g} s, on the CPU "
        f"{DEFAULT_PIECE_SECONDS:g} s / batch; outputs don't depend on it)",
    )
    p.add_argument(
        "--batch",
        type=_batch,
        default="auto",
        metavar="N",
        help="channels of files that share one forward of the model (continuous batching); "
        "'auto' picks per device: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items())
        + " (default auto). Outputs don't depend on it",
    )
    p.add_argument(
        "--split-long",
        action="store_true",
        help="spread a file that would set the wall time alone across several lanes, in "
        "segments with 5 s of warm-up and a 0.5 s crossfade. Faster where lanes would idle; "
        "NOT equal to upstream's output (see docs/troubleshooting.md)",
    )
    p.add_argument(
        "--whole-file",
        action="store_true",
        help="read each file whole and run it at once, as upstream (memory grows with the "
        "length: ~550 MB per minute of audio)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "mps", "cuda", "cpu"),
        default=None,
        help="where the model runs (default: DF_MPS_DEVICE, else cuda, mps, cpu)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="the network's dtype (its GRUs, the STFT, features and synthesis stay fp32); "
        "where the device lacks it, one warning and fp32 (default fp32)",
    )
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="on CUDA, run the step eagerly instead of replaying captured CUDA graphs",
    )
    p.add_argument(
        "--forward-method",
        choices=("auto", "real", "complex"),
        default=None,
        help="complex math or df-mps's real-valued kernels (default: auto, i.e. "
        "complex wherever the device supports it)",
    )
    p.add_argument(
        "--threads",
        type=_threads,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: min(4, performance cores), or torch's "
        "own choice where OMP_NUM_THREADS is set)",
    )
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default="info",
        help="logging verbosity (default info)",
    )
    p.add_argument(
        "-d",
        "--debug",
        dest="log_level",
        action="store_const",
        const="debug",
        help="same as --log-level debug",
    )
    from .ray import ray_address  # Ray itself is imported only when --ray runs

    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip files whose output exists and is complete (same rate, channels and length "
        "as the input): re-running an interrupted run does only what is left",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        type=ray_address,
        metavar="ADDRESS",
        help="run the files as a Ray Data job (pip install 'df-mps[ray]'): no ADDRESS starts "
        "a local cluster; auto, ray://HOST:PORT or HOST:PORT joins one",
    )
    p.add_argument(
        "--ray-workers",
        type=_threads,
        metavar="N",
        help="with --ray: number of actors, each with its own model (default: one per GPU, "
        "else one)",
    )
    p.add_argument(
        "--ray-batch",
        type=_threads,
        metavar="N",
        help="with --ray: files per batch, the unit a dead worker's replacement redoes "
        "(default: about four batches per actor, at most 16)",
    )
    p.add_argument(
        "--report",
        metavar="PATH",
        help="with --ray: per-file results as JSON lines (default: "
        "df-mps-report.jsonl in the output directory)",
    )
    p.add_argument("-v", "--version", action=_Version)
    return p


def default_threads() -> Optional[int]:
    """Threads for torch when --threads is not given; None keeps torch's choice.

    DeepFilterNet works on 10 ms frames with small convolutions and GRUs, so intra-op
    parallelism stops paying off after a few threads and the synchronisation starts to cost.
    On Apple Silicon torch's default counts the efficiency cores too, and a parallel region
    waits for its slowest thread. Hence: at most 4, and no more than the performance cores.
    """
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("TORCH_NUM_THREADS"):
        return None
    import torch

    cores = torch.get_num_threads()  # torch's default: the physical cores
    perf = _performance_cores()
    if perf:
        cores = min(cores, perf)
    return max(1, min(MAX_DEFAULT_THREADS, cores))


def _performance_cores() -> Optional[int]:
    if sys.platform != "darwin":
        return None
    try:
        return int(sysctl("hw.perflevel0.physicalcpu") or "")
    except ValueError:
        return None


def _setup_logging(level: str) -> None:
    """The command's logging: one handler, on stderr, at ``level``.

    Like any program's entry point, this replaces loguru's handlers for the whole process.
    """
    from tqdm import tqdm

    logger.remove()
    if level == "none":
        return
    fmt = "{time:HH:mm:ss} | {level: <8} | {message}"
    # Through tqdm.write, so log lines don't tear the progress bar; sys.stderr is looked up
    # at each write.
    logger.add(
        lambda msg: tqdm.write(msg, end="", file=sys.stderr),
        level=level.upper(),
        format=fmt,
        colorize=False,
    )


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"{PROG}: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (the console script passes it to sys.exit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    _setup_logging(args.log_level)
    try:
        with _termination_interrupts():
            return run(args)
    except UserError as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if signum == signal.SIGINT:
            _say("interrupted; no partial output files were left")
        else:
            _say(f"stopped by {signal.Signals(signum).name}; no partial output files were left")
        return 128 + int(signum)  # as a shell reports a signal: 130, 143 (TERM), 129 (HUP)
    except Exception as exc:
        logger.opt(exception=exc).debug("traceback")
        _say(
            f"error: unexpected {type(exc).__name__}: {one_line(exc)} "
            "(run with --log-level debug for the traceback)"
        )
        return 1


class SignalInterrupt(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that it cleans up as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _termination_interrupts():
    """While the command runs, SIGTERM and SIGHUP raise ``SignalInterrupt``: every temporary
    file is removed by the same code that removes it on Ctrl-C. A repeat of the signal during
    that cleanup is ignored, so that the cleanup completes."""
    names = ("SIGTERM", "SIGHUP")
    signums = [getattr(signal, n) for n in names if hasattr(signal, n)]
    raised = []

    def interrupt(signum, frame):
        if not raised:
            raised.append(signum)
            raise SignalInterrupt(signum)

    previous = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, interrupt)
    except ValueError:  # not the main thread: Python delivers signals to the main thread only
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(args: argparse.Namespace) -> int:
    if args.noisy_dir is not None and args.noisy_audio_files:
        raise UserError("give either FILEs or -i/--noisy-dir, not both")
    if args.noisy_dir is None and not args.noisy_audio_files:
        raise UserError("no input: give FILEs or -i/--noisy-dir DIR")
    if args.recursive and args.noisy_dir is None:
        raise UserError("-r/--recursive needs -i/--noisy-dir")
    if args.split_long and args.whole_file:
        raise UserError("--split-long and --whole-file exclude each other")
    if args.split_long and args.ray is not None:
        # Ray's actors each run whole files (a retried batch redoes whole outputs); a split
        # file's segments would span actors. Refused rather than silently run exact.
        raise UserError("--split-long and --ray exclude each other (Ray's actors run whole files)")

    _configure_df_mps(args.device, args.forward_method)
    _configure_threads(args.threads)

    output_dir = Path(args.output_dir) if args.output_dir is not None else Path(".")
    walk_errors: List[str] = []
    inputs = collect_inputs(
        args.noisy_audio_files, args.noisy_dir, args.recursive, output_dir, walk_errors
    )
    check_output_dir(output_dir)
    model_dir = resolve_model(args.model_base_dir)
    suffix = output_suffix(args.model_base_dir, model_dir, args.pf) if args.suffix else None
    jobs = plan_jobs(
        inputs,
        output_dir,
        suffix,
        args.overwrite,
        skip_existing=args.skip_existing,
        allow_truncated=args.allow_truncated,
    )
    for message in walk_errors:
        _say(f"error: {message} (skipped)")
    if args.ray is not None:  # the same planned jobs, as a Ray Data job (df_mps.ray)
        from .ray import run_cli as run_on_ray_cli

        return run_on_ray_cli(jobs, args, output_dir)

    failed = 0
    for job in jobs:
        if job.error is not None:
            failed += 1
            _say(f"error: {job.error} (skipped)")
    if any(job.skipped for job in jobs):
        n = sum(job.skipped for job in jobs)
        _say(f"{n} file(s) skipped: their output exists and is complete")
    todo = [job for job in jobs if job.error is None and not job.skipped]
    done: List[FileResult] = []
    if todo:
        enhancer = Enhancer(**enhancer_options(args))
        logger.debug(f"batch {enhancer.batch} on {enhancer.device}")
        # The model and modules out of the collector's sight, and large freed buffers kept
        # for reuse: see df_mps.util.
        with long_lived_objects_frozen(), large_buffers_kept():
            for result in _run_jobs(
                todo,
                enhancer,
                args.overwrite,
                whole_file=args.whole_file,
                split_long=args.split_long,
            ):
                if isinstance(result, FileResult):
                    done.append(result)
                else:
                    failed += 1
    _summary(done, failed, len(jobs), len(walk_errors))
    return 1 if failed or walk_errors else 0


# The df_mps.api.Enhancer keywords that the command's options set, each with the option's
# argparse dest. --device and --threads are not among them: ``run`` sets them for the whole
# process before the model loads, and df_mps.ray sizes them per actor.
_ENHANCER_OPTIONS = {
    "model": "model_base_dir",
    "post_filter": "pf",
    "epoch": "epoch",
    "mask_only": "no_df_stage",
    "pad": "compensate_delay",
    "atten_lim_db": "atten_lim",
    "batch": "batch",
    "piece_seconds": "piece_seconds",
    "precision": "precision",
    "cuda_graphs": "cuda_graphs",
}


def enhancer_options(args: argparse.Namespace) -> dict:
    """The ``df_mps.api.Enhancer`` keywords that the parsed options ask for: the one mapping
    from the command's options to the model and its engine, for this process and for the
    ``--ray`` actors alike (``df_mps.ray.run_cli``). Without ``device`` and ``threads``."""
    return {keyword: getattr(args, dest) for keyword, dest in _ENHANCER_OPTIONS.items()}


def _run_jobs(
    jobs: Sequence[Job],
    enhancer: Enhancer,
    overwrite: bool,
    *,
    whole_file: bool = False,
    split_long: bool = False,
) -> Iterable:
    """Results (``FileResult`` or ``FileError``) as files finish, with one progress bar in
    seconds of audio over all of them and a line per file."""
    from tqdm import tqdm

    total = sum(_duration(job.source) for job in jobs)
    with tqdm(
        total=round(total, 1),
        unit="s",
        desc=f"{len(jobs)} file(s)",
        disable=None,
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}{postfix}]",
    ) as bar:
        started = time.perf_counter()

        def advance(seconds: float) -> None:
            bar.update(seconds)
            if bar.n:
                bar.set_postfix_str(f"RTF {(time.perf_counter() - started) / bar.n:.3f}")

        if whole_file:
            results = _whole_files(jobs, enhancer, overwrite)
        else:
            pairs = [(job.source, job.target) for job in jobs]
            results = enhancer.enhance_files(
                pairs, overwrite=overwrite, progress=advance, split_long=split_long
            )
        for result in results:
            if isinstance(result, FileError):
                _say(f"error: {result.message} (skipped)")
                yield result
                continue
            if whole_file:
                advance(result.audio_seconds)
            logger.info(
                f"enhanced '{result.source}' -> '{result.target}' "
                f"({result.audio_seconds:.2f} s audio in {result.model_seconds:.2f} s, "
                f"RTF {result.rtf:.3f})"
            )
            yield result


def _whole_files(jobs: Sequence[Job], enhancer: Enhancer, overwrite: bool):
    for job in jobs:
        try:
            yield _enhance_whole_file(job.source, job.target, enhancer, overwrite)
        except AudioFileError as exc:
            yield FileError(job.source, job.target, str(exc))
        except OSError as exc:  # the OS refused a read or write of this job's files
            yield FileError(job.source, job.target, _os_error_line(job, exc))
        except (Exception, SystemExit) as exc:
            logger.opt(exception=exc).debug("traceback")
            yield FileError(
                job.source,
                job.target,
                f"'{job.source}': {type(exc).__name__}: {one_line(exc)} (run with --log-level "
                "debug for the traceback)",
            )


def _os_error_line(job: Job, exc: OSError) -> str:
    """One line naming the file the error is about (the input, else the output) and the cause."""
    name = getattr(exc, "filename", None)
    if name is None or os.path.abspath(os.fsdecode(name)) == os.path.abspath(job.source):
        return f"'{job.source}': {os_reason(exc)}"
    # A temporary file or a directory on the way to the output: the output is what failed.
    return f"'{job.target}': can't write: {os_reason(exc)}"


def _duration(path: Path) -> float:
    try:
        info = audio_info(path)
        return info.frames / info.samplerate if info.frames > 0 else 0.0
    except Exception:  # noqa: BLE001 - unreadable files are reported when they are enhanced
        return 0.0


def _summary(done: Sequence[FileResult], failed: int, total: int, unreadable_dirs: int = 0) -> None:
    audio = sum(r.audio_seconds for r in done)
    seconds = sum(r.model_seconds for r in done)
    rtf = f", RTF {seconds / audio:.3f}" if audio else ""
    text = f"enhanced {len(done)} of {total} file(s){rtf}"
    if failed:
        text += f"; {failed} failed"
    if unreadable_dirs:
        text += f"; {unreadable_dirs} director{'y' if unreadable_dirs == 1 else 'ies'} unreadable"
    _say(text)


def _configure_df_mps(device: Optional[str], forward_method: Optional[str]) -> None:
    import df_mps

    from . import capabilities, settings

    if settings.get().disabled:
        logger.warning(
            "df_mps: DF_MPS_DISABLE is set, so DeepFilterNet runs unpatched"
            + (" (--device/--forward-method are ignored)" if device or forward_method else "")
            + ". Unset DF_MPS_DISABLE to use df_mps."
        )
        return
    caps = capabilities.get()
    if device == "cuda" and not caps.cuda_available:
        raise UserError("--device cuda: CUDA is not available to this torch")
    if device == "mps" and not caps.mps_available:
        why = "this Python runs under Rosetta 2" if caps.rosetta else "MPS is not available here"
        raise UserError(f"--device mps: {why}")
    df_mps.patch(device=device, forward_method=forward_method)


def _configure_threads(threads: Optional[int]) -> None:
    import torch

    n = threads if threads is not None else default_threads()
    if n is not None:
        torch.set_num_threads(n)
    logger.debug(f"torch uses {torch.get_num_threads()} CPU thread(s)")


if __name__ == "__main__":
    sys.exit(main())
