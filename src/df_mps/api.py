"""df-mps as a library: an ``Enhancer`` that enhances files, lists of files and arrays.

    from df_mps.api import Enhancer

    enhancer = Enhancer()                                   # DeepFilterNet3, batch "auto"
    enhancer.enhance_file("noisy.wav", "clean.wav")
    for result in enhancer.enhance_files([("a.wav", "out/a.wav"), ("b.flac", "out/b.flac")]):
        print(result)                                       # as each file finishes
    clean = enhancer.enhance_array(audio, 16000)            # [frames, channels] or 1-D

Every call runs through ``df_mps.engine``: up to ``batch`` channels of as many files share each
forward of the model (continuous batching), and each file's output equals what upstream's
``enhance()`` gives for it alone, to float32 rounding, whatever else rides in the batch. Outputs
keep the input's rate, channels, length and (where the format allows) sample format; they are
written atomically, never onto an input, and an existing output only with ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import numpy as np

from . import engine as _engine_module
from .audio import (
    AudioFileError,
    AudioFileWriter,
    open_audio,
    open_error,
    read_audio,
    same_file,
)
from .engine import ArraySink, ArraySource, Engine, Job, Sink, Source, nonfinite_reason
from .errors import os_reason, sndfile_reason
from .models import DEFAULT_MODEL, PRETRAINED_MODELS
from .util import PathLike, one_line, quiet_resample_rename

__all__ = [
    "AudioFileError",
    "Enhancer",
    "FileError",
    "FileResult",
    "UserError",
    "load_enhancer",
]


class UserError(Exception):
    """Something the user can fix (a model that can't be found or loaded, a bad option); the
    message is one line, shown without a traceback."""


@dataclasses.dataclass
class FileResult:
    source: Path
    target: Path
    sample_rate: int
    channels: int
    frames: int
    subtype: str  # what was written
    model_seconds: float  # this file's share of resampling, DSP and model time

    @property
    def audio_seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0

    @property
    def rtf(self) -> float:
        """Real-time factor: processing time / audio duration (below 1 is faster than real time)."""
        return self.model_seconds / self.audio_seconds if self.audio_seconds else 0.0


@dataclasses.dataclass
class FileError:
    source: Path
    target: Optional[Path]
    message: str  # one line

    def __str__(self) -> str:
        return self.message


# -- files as engine sources and sinks --------------------------------------------------------
class FileSource(Source):
    """A file read in blocks through soundfile, with read_audio's checks and one-line errors.

    Every failure is an ``AudioFileError`` naming the file and the plain cause (permission
    denied, input/output error, ...), so that the engine reports it as it is. The name goes to
    soundfile as bytes (``os.fsencode``): a Linux file name need not be UTF-8.
    """

    def __init__(self, path: Path, on_read: Optional[Callable[[int], object]] = None):
        import soundfile as sf

        self.path = path
        self.on_read = on_read
        info = sound_info(path)
        self.info = info
        self.sample_rate = int(info.samplerate)
        self.channels = int(info.channels)
        try:
            self._file = open_audio(path)  # a WAV without a length: to the end of the file
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as exc:
            raise open_error(path, exc) from None
        self._read = 0

    def read(self, frames: int) -> np.ndarray:
        import soundfile as sf

        try:
            data = self._file.read(frames=frames, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
            raise AudioFileError(
                f"'{self.path}': read failed at {self._read / self.sample_rate:.2f} s "
                f"({sndfile_reason(exc)})"
            ) from None
        from .streaming import BadAudioError

        bad = nonfinite_reason(data, self._read, self.sample_rate)
        if bad is not None:
            raise BadAudioError(f"'{self.path}': {bad}")
        self._read += data.shape[0]
        if self._read == 0 and data.shape[0] < frames:
            raise BadAudioError(f"'{self.path}': has no audio samples")
        if self.on_read is not None and data.shape[0]:
            self.on_read(data.shape[0])
        return data

    def close(self) -> None:
        self._file.close()


class FileSink(Sink):
    """The output file, written into a temporary file and renamed into place on commit.

    It keeps the input's container where the extensions match (an RF64 or W64 ``.wav`` stays
    so) and opens a WAV that could pass 4 GiB as RF64 (``audio.open_for_writing``). Every
    failure is an ``AudioFileError`` naming the output and the plain cause (disk full, ...).
    """

    def __init__(self, source: FileSource, target: Path, overwrite: bool):
        self.source, self.target = source, target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AudioFileError(f"'{target}': can't write: {os_reason(exc)}") from None
        self._writer = AudioFileWriter(
            target,
            source.sample_rate,
            source.channels,
            source.info.subtype,
            overwrite=overwrite,
            source_format=source.info.format,  # RF64 and W64 stay so
            frames=int(source.info.frames),
        )
        self.subtype = self._writer.subtype

    def write(self, samples: np.ndarray) -> None:
        self._writer.write(samples)

    def commit(self) -> None:
        if same_file(self.source.path, self.target):  # the target path changed under us
            raise AudioFileError(
                f"'{self.source.path}': the output path is the input file itself; refused"
            )
        self._writer.commit()

    def abort(self) -> None:
        self._writer.close()


def sound_info(path: Path):
    """soundfile's info for ``path``, with read_audio's checks and one-line errors."""
    return read_audio(path, num_frames=0)[1]


def file_job(
    source: Path,
    target: Path,
    overwrite: bool,
    on_read: Optional[Callable[[int], object]] = None,
) -> Job:
    """An engine job that enhances the file ``source`` into ``target``. Its ``tag`` is
    (source, target, {"sink": FileSink once opened})."""
    opened = {}

    def opener():
        reader, sink = _open_file_job(source, target, overwrite, on_read)
        opened["sink"] = sink
        return reader, sink

    return Job(open=opener, tag=(source, target, opened))


def _open_file_job(
    source: Path, target: Path, overwrite: bool, on_read=None
) -> Tuple[Source, Sink]:
    if same_file(source, target):
        raise AudioFileError(f"'{source}': the output path is the input file itself; refused")
    reader = FileSource(source, on_read)
    try:
        if not overwrite and os.path.lexists(target):
            raise AudioFileError(f"'{target}': output exists (use --overwrite to replace it)")
        try:
            is_dir = target.is_dir()
        except OSError as exc:
            raise AudioFileError(f"'{target}': can't write: {os_reason(exc)}") from None
        if is_dir:
            raise AudioFileError(f"'{target}': the output path is a directory")
        return reader, FileSink(reader, target, overwrite)
    except BaseException:
        reader.close()
        raise


# -- loading the model ------------------------------------------------------------------------
_model_cache: Dict[tuple, tuple] = {}


def load_model(
    model: Optional[PathLike] = None,
    *,
    post_filter: bool = False,
    epoch: Union[str, int, None] = "best",
    mask_only: bool = False,
):
    """(model directory, network, df_state) for ``model`` (a directory, a pretrained name, None
    for DeepFilterNet3). The last model loaded is kept, so loading it again in the same process
    is cheap. Raises ``UserError`` with a one-line reason when it can't load."""
    from . import settings

    model_dir = resolve_model(model)
    key = (str(model_dir), post_filter, str(epoch), mask_only, settings.get())
    if key not in _model_cache:
        _model_cache.clear()  # one model at a time: DeepFilterNet's config is process-global
        _model_cache[key] = _init_model(model_dir, post_filter, epoch, mask_only)
    net, df_state = _model_cache[key]
    return model_dir, net, df_state


def resolve_model(model: Optional[PathLike]) -> Path:
    from .models import ModelNotFoundError, resolve_model_dir

    try:
        return Path(resolve_model_dir(model))
    except ModelNotFoundError as exc:
        raise UserError(str(exc)) from None


def output_suffix(model: Optional[PathLike], model_dir: Path, post_filter: bool) -> str:
    """Upstream's suffix: the model's name (its directory's name), plus "_pf" with --pf."""
    requested = os.fspath(model) if model is not None else DEFAULT_MODEL
    name = requested if requested in PRETRAINED_MODELS else Path(model_dir).resolve().name
    return name + ("_pf" if post_filter else "")


def _init_model(model_dir: Path, post_filter: bool, epoch, mask_only: bool):
    from ._log import logger
    from .models import init_df

    _keep_our_logging()
    try:
        # log_file=None: upstream would write enhance.log into the model directory, which may
        # be read-only (a shared or system-wide install).
        options = dict(post_filter=post_filter, epoch=epoch, mask_only=mask_only)
        net, df_state, _ = init_df(str(model_dir), log_file=None, **options)
    except SystemExit:
        # Upstream calls exit(1) when it finds no checkpoint.
        raise UserError(
            f"no checkpoint for epoch '{epoch}' in '{model_dir / 'checkpoints'}'"
        ) from None
    except UserError:
        raise
    except Exception as exc:
        logger.opt(exception=exc).debug("model load failed")
        raise UserError(f"could not load the model in '{model_dir}': {one_line(exc)}") from None
    return net, df_state


def _keep_our_logging() -> None:
    # Upstream's init_logger() removes every loguru handler and logs to the sys.stdout of that
    # moment; the caller has set up its own, so upstream's is marked as done.
    try:
        import df.logger as df_logger
    except ImportError:
        return
    if hasattr(df_logger, "_logger_initialized"):
        df_logger._logger_initialized = True


def load_enhancer(model: Optional[PathLike] = None, **options) -> Enhancer:
    """``Enhancer(model, **options)``: kept for the code written against df-mps 0.1."""
    return Enhancer(model, **options)


def _resample(audio, orig_sr: int, new_sr: int):
    if orig_sr == new_sr:
        return audio
    from .streaming import StreamResampler

    if not StreamResampler.fits_sinc_kernel(orig_sr, new_sr):
        # torchaudio's kernel would exhaust memory (22,051 Hz: 4.2 GB): soxr, as the stream does.
        import torch

        resampler = StreamResampler(orig_sr, new_sr)
        return torch.cat([resampler.process(audio), resampler.finish()], dim=-1)
    from df.io import resample

    with quiet_resample_rename():
        return resample(audio, orig_sr, new_sr)


# -- the enhancer -----------------------------------------------------------------------------
class Enhancer:
    """A loaded DeepFilterNet model and the engine that runs it.

    ``model``: a model directory, a pretrained name (DeepFilterNet, DeepFilterNet2,
    DeepFilterNet3) or None for DeepFilterNet3 (built offline). ``device``: "auto", "cuda",
    "cuda:N", "mps" or "cpu" (df-mps's device choice, as ``DF_MPS_DEVICE``). ``batch``: rows
    (channels of files) per forward, or "auto" (``df_mps.engine.DEFAULT_BATCH`` for the
    device). ``piece_seconds``: the length of the pieces each row runs on (memory; the result
    does not depend on it). ``threads``: torch's CPU threads. ``post_filter``, ``atten_lim_db``,
    ``pad`` (delay compensation), ``epoch`` and ``mask_only`` are upstream's options.
    ``precision``: the network's dtype in the engine, "fp32", "bf16" or "fp16"; its GRUs stay
    fp32 (``df_mps.precision``: where the device lacks the dtype, one warning and fp32;
    upstream's whole-file ``__call__`` stays fp32). ``cuda_graphs``: on CUDA, replay the
    engine's step as CUDA graphs (``df_mps.graphs``).
    """

    def __init__(
        self,
        model: Optional[PathLike] = None,
        *,
        device: Optional[str] = None,
        post_filter: bool = False,
        atten_lim_db: Optional[float] = None,
        pad: bool = True,
        epoch: Union[str, int, None] = "best",
        mask_only: bool = False,
        batch: Union[int, str] = "auto",
        piece_seconds: Union[float, str] = "auto",
        threads: Optional[int] = None,
        precision: str = "fp32",
        cuda_graphs: bool = True,
    ):
        import torch

        from . import precision as precision_rules

        if threads is not None:
            torch.set_num_threads(int(threads))
        if device is not None:
            import df_mps

            df_mps.patch(device=device)
        precision_rules.check(precision)
        if piece_seconds != "auto" and not float(piece_seconds) > 0:
            raise ValueError(f"piece_seconds must be positive, not {piece_seconds}")
        self.model_dir, self.model, self.df_state = load_model(
            model, post_filter=post_filter, epoch=epoch, mask_only=mask_only
        )
        self.suffix = output_suffix(model, self.model_dir, post_filter)
        self.pad = pad
        self.atten_lim_db = atten_lim_db
        self.post_filter = post_filter
        self.device = next(self.model.parameters()).device
        # GPU fast paths (df_mps.precision, df_mps.graphs): the network in the dtype that runs
        # here (fp32 where the device lacks the one asked for), CUDA graphs on CUDA.
        self.precision_choice = precision_rules.resolve(precision, self.device)
        self.precision = self.precision_choice.precision
        self.cuda_graphs = bool(cuda_graphs)
        if batch == "auto":
            batch = _engine_module.default_batch(self.device.type)
        batch = int(batch)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        self.batch = batch
        if piece_seconds == "auto":
            piece_seconds = _engine_module.default_piece_seconds(self.device.type, batch)
        self.piece_seconds = float(piece_seconds)
        if self.device.type != "cpu":
            # A GPU's first step pays for kernel plans and memory: here, with the model load.
            self.engine().warm_up()

    @property
    def sample_rate(self) -> int:
        """The model's sample rate (inputs at any rate are resampled to it and back)."""
        return int(self.df_state.sr())

    def __call__(self, audio, sample_rate: int):
        """Upstream's whole-file call: float32 audio [C, T] at any rate (a tensor) in, the
        enhanced audio [C, T] at that rate out, through ``df.io.resample`` ("sinc_fast"; soxr where
        its kernel would be huge, see ``df_mps.streaming.StreamResampler``) and
        ``df.enhance.enhance`` on the whole signal at once. Memory grows with the length."""
        import torch
        from df.enhance import enhance

        length = audio.shape[-1]
        model_sr = self.sample_rate
        x = _resample(audio, sample_rate, model_sr)
        y = enhance(self.model, self.df_state, x, pad=self.pad, atten_lim_db=self.atten_lim_db)
        y = _resample(y.to("cpu"), model_sr, sample_rate)
        # Resampling there and back can be a sample off, and --no-delay-compensation returns
        # whole hops only: the output keeps the input's length (zero-padded at the end).
        if y.shape[-1] >= length:
            return y[..., :length].contiguous()
        return torch.nn.functional.pad(y, (0, length - y.shape[-1]))

    def engine(self, batch: Optional[int] = None, piece_seconds: Optional[float] = None) -> Engine:
        """A fresh engine over this model (its own scheduling state; the model is shared)."""
        from . import graphs, precision

        piece = self.piece_seconds if piece_seconds in (None, "auto") else float(piece_seconds)
        engine = Engine(
            precision.cast_model(self.model, self.precision_choice.dtype),
            self.df_state,
            batch=batch or self.batch,
            piece_frames=_engine_module.frames_per_piece(piece, self.df_state),
            pad=self.pad,
            atten_lim_db=self.atten_lim_db,
        )
        return graphs.accelerate(engine, cuda_graphs=self.cuda_graphs)

    # -- files --
    def enhance_files(
        self,
        jobs: Iterable[Tuple[PathLike, PathLike]],
        *,
        overwrite: bool = False,
        progress: Optional[Callable[[float], None]] = None,
        piece_seconds: Optional[float] = None,
        split_long=False,
        batch: Optional[int] = None,
    ) -> Iterator[Union[FileResult, FileError]]:
        """Enhance (source, target) pairs; yields a ``FileResult`` or a ``FileError`` per file
        as each finishes (completion order, not input order). A bad file never stops the
        others; an interruption removes every temporary file. ``progress`` is called with
        seconds of audio done.

        ``split_long`` (True or a ``df_mps.split.SplitOptions``): a file that would set the
        wall time alone is cut into segments that run on several lanes and are crossfaded
        back together. Not equal to upstream's output (see ``df_mps.split``); the pairs are
        listed and probed up front."""

        engine = self.engine(batch=batch, piece_seconds=piece_seconds)
        if split_long:
            from .split import SplitOptions, SplitPlan

            options = split_long if isinstance(split_long, SplitOptions) else None
            plan = SplitPlan(jobs, batch=engine.batch, overwrite=overwrite, options=options)
            results = plan.results(engine.run(plan.jobs, progress=plan.progress(progress)))
        else:
            engine_jobs = (file_job(Path(s), Path(t), overwrite) for s, t in jobs)
            results = engine.run(engine_jobs, progress=progress)
        for result in results:
            source, target, sink_box = result.job.tag
            if result.error is not None:
                yield FileError(source, target, result.error)
                continue
            yield FileResult(
                source=source,
                target=target,
                sample_rate=result.sample_rate,
                channels=result.channels,
                frames=result.frames,
                subtype=sink_box["sink"].subtype,
                model_seconds=result.model_seconds,
            )

    def enhance_file(
        self,
        source: PathLike,
        target: PathLike,
        *,
        overwrite: bool = False,
        progress: Optional[Callable[[float], None]] = None,
        piece_seconds: Optional[float] = None,
    ) -> FileResult:
        """Enhance one file; raises ``AudioFileError`` (a one-line message) where it can't."""
        try:  # one file: as many rows as it has channels (fixed-shape steps pad to the batch)
            rows = min(self.batch, max(1, sound_info(Path(source)).channels))
        except AudioFileError:
            rows = None  # the engine reports it
        results = self.enhance_files(
            [(source, target)],
            overwrite=overwrite,
            progress=progress,
            piece_seconds=piece_seconds,
            batch=rows,
        )
        for result in results:
            if isinstance(result, FileError):
                raise AudioFileError(result.message)
            return result
        raise AssertionError("the engine returned no result")  # pragma: no cover

    # -- arrays --
    def enhance_array(self, audio, sample_rate: int) -> np.ndarray:
        """Enhance float32 audio [frames, channels] (or 1-D mono) at ``sample_rate``; returns
        the same shape. Raises ``ValueError`` for audio that can't be enhanced."""
        array = np.asarray(audio, dtype=np.float32)
        source = ArraySource(array, sample_rate)
        sink = ArraySink()
        job = Job(open=lambda: (source, sink))
        for result in self.engine(batch=min(self.batch, source.channels)).run([job]):
            if result.error is not None:
                raise ValueError(result.error)
        out = sink.result(source.channels)
        return out[:, 0] if array.ndim == 1 else out
