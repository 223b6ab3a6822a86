"""``--split-long``: one long file spread across the engine's lanes, at a small cost in fidelity.

The engine runs each file in one lane, so where one file is most of the audio it sets the
wall time while the other lanes idle. With ``split_long`` such a file is cut into K segments
that run as K independent engine jobs, side by side:

- Segment k covers [s_k, s_{k+1}) of the file. Its job reads [s_k - W, s_{k+1} + F + G):
  W seconds of **warm-up** before it (the model's normalisation and GRU states settle there;
  that output is discarded), the F-second **crossfade** after it, and a G-second guard (never
  kept) so that the kept samples never see the stream-end padding or the resampler's end.
- Each job's output goes into a hidden temporary file of raw float32 next to the target (only
  [s_k, s_{k+1} + F) is kept). When all K are done, the last one to finish streams them into the
  real output through ``df_mps.api.FileSink`` (the CLI's atomic writer), crossfading
  [s_k, s_k + F) from segment k-1 to segment k, and removes them. The file gets ONE result.
- Memory stays bounded: segments stream like any job, and the assembler holds one block plus
  one crossfade.
- Disk: the segments' temporary files hold 4 bytes a sample of the file (about 690 MB per
  hour of 48 kHz mono) until the output is written.
- Any failure of a segment fails the file (one error, its first real cause), stops its other
  segments at their next read and removes every temporary file; an interruption does the same.

It is **not** bit-equal to upstream: segment 0 is exact up to the first join, but after each
join the output comes from a model that started W seconds earlier instead of at the file's
start (its GRU state differs, and a longer warm-up does not bring it back). Measured by
``benchmarks/bench_split.py`` on 60 s of speech at about 4 dB SNR: with white noise the SI-SDR
against clean stays within +0.01..+0.06 dB of the exact output's; with pink noise it moves by
-0.9..+0.2 dB, about as much as the exact output moves when the recording starts 1 s
earlier. Hence opt-in.

When is a file long? Under perfect spreading each of the engine's ``batch`` lanes carries
``share`` = (sum over files of duration x channels) / batch seconds. A file longer than its
share would set the wall time alone, so it is split into K = min(batch // channels,
ceil(duration / share), floor(duration / min_segment)) segments (K >= 2, else it runs whole):
enough to bring it to about its share, never more lanes than the batch has, and never segments
so short that the warm-up (extra work) dominates: ``min_segment`` defaults to 4 W, so the
warm-up adds at most 25 % of the file's work. Split files' segments are scheduled first (they
are the longest jobs: longest first keeps the tail short).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .api import FileSink, FileSource, file_job
from .audio import audio_info, open_audio
from .engine import Job, JobError, Result, Sink, Source, nonfinite_reason
from .errors import os_reason
from .patches.audio_io import TEMP_SUFFIX, AudioFileError

DEFAULT_WARMUP_SECONDS = 5.0
DEFAULT_FADE_SECONDS = 0.5
# Read past the crossfade: the last ~20 ms of a stream see upstream's zero end padding (and a
# resampler's end), and no kept sample should.
GUARD_SECONDS = 0.1
BLOCK_FRAMES = 1 << 16  # the assembler's block


@dataclasses.dataclass(frozen=True)
class SplitOptions:
    """How long files are split. ``min_segment_seconds`` None: 4 x ``warmup_seconds`` (at least
    2 x the fade). ``crossfade``: "linear" (the segments are the same speech, so their sum
    keeps its level) or "equal-power"."""

    warmup_seconds: float = DEFAULT_WARMUP_SECONDS
    fade_seconds: float = DEFAULT_FADE_SECONDS
    min_segment_seconds: Optional[float] = None
    crossfade: str = "linear"

    def __post_init__(self):
        if not self.warmup_seconds >= 0:
            raise ValueError(f"warmup_seconds must be >= 0, not {self.warmup_seconds}")
        if not self.fade_seconds >= 0:
            raise ValueError(f"fade_seconds must be >= 0, not {self.fade_seconds}")
        if self.min_segment_seconds is not None and not self.min_segment_seconds > 0:
            raise ValueError(f"min_segment_seconds must be > 0, not {self.min_segment_seconds}")
        if self.crossfade not in ("linear", "equal-power"):
            raise ValueError(f"crossfade must be 'linear' or 'equal-power', not {self.crossfade!r}")

    @property
    def min_segment(self) -> float:
        if self.min_segment_seconds is not None:
            return max(self.min_segment_seconds, 2 * self.fade_seconds)
        return max(4 * self.warmup_seconds, 2 * self.fade_seconds, 1.0)


def segment_count(
    seconds: float, channels: int, share: float, batch: int, min_segment: float
) -> int:
    """How many segments a file of ``seconds`` x ``channels`` is run as (1: whole); ``share``
    is the lane-seconds each of the ``batch`` lanes would carry under perfect spreading."""
    if seconds <= share or channels < 1:
        return 1
    k = min(batch // channels, math.ceil(seconds / share), math.floor(seconds / min_segment))
    return k if k >= 2 else 1


def segment_bounds(frames: int, k: int) -> List[int]:
    """K + 1 frame positions: segment i is [bounds[i], bounds[i + 1])."""
    return [round(i * frames / k) for i in range(k + 1)]


def crossfade_weights(frames: int, kind: str) -> Tuple[np.ndarray, np.ndarray]:
    """(fade-out, fade-in) weights over ``frames``, as float32 columns."""
    t = (np.arange(frames, dtype=np.float64) + 0.5) / max(frames, 1)
    if kind == "equal-power":
        fade_in, fade_out = np.sin(t * np.pi / 2), np.cos(t * np.pi / 2)
    else:
        fade_in, fade_out = t, 1.0 - t
    return fade_out.astype(np.float32)[:, None], fade_in.astype(np.float32)[:, None]


class Abandoned(JobError):
    """A segment stopped because another segment of its file failed (not the file's cause)."""


@dataclasses.dataclass(frozen=True)
class SegmentTag:
    """The ``Job.tag`` of a segment job."""

    file: SplitFile
    index: int


# -- one split file ---------------------------------------------------------------------------
class SplitFile:
    """The K segment jobs of one file, their temporary files and their assembly."""

    def __init__(self, source: Path, target: Path, overwrite: bool, info, k: int, options):
        self.source, self.target, self.overwrite = source, target, overwrite
        self.sample_rate = int(info.samplerate)
        self.channels = int(info.channels)
        self.frames = int(info.frames)
        self.options = options
        rate = self.sample_rate
        self.warmup = round(options.warmup_seconds * rate)
        self.fade = round(options.fade_seconds * rate)
        self.guard = round(GUARD_SECONDS * rate)
        self.bounds = segment_bounds(self.frames, k)
        self.k = k
        self.lock = threading.Lock()
        self.temps: List[Optional[str]] = [None] * k
        self.done = [False] * k  # committed segments
        self.results: List[Optional[Result]] = [None] * k
        self.failed = False
        self.closed = False  # cleaned up: no new temporary files
        self.sink: Optional[FileSink] = None  # the assembled output, once committed

    # geometry
    def read_range(self, i: int) -> Tuple[int, int]:
        start = max(0, self.bounds[i] - self.warmup)
        stop = self.bounds[i + 1] if i == self.k - 1 else self.bounds[i + 1] + self.fade
        return start, min(self.frames, stop + (0 if i == self.k - 1 else self.guard))

    def keep_range(self, i: int) -> Tuple[int, int]:
        last = i == self.k - 1
        return self.bounds[i], self.frames if last else self.bounds[i + 1] + self.fade

    def read_frames(self) -> int:
        return sum(b - a for a, b in map(self.read_range, range(self.k)))

    def jobs(self) -> List[Job]:
        return [
            Job(open=lambda i=i: self.open_segment(i), tag=SegmentTag(self, i))
            for i in range(self.k)
        ]

    # engine side (the engine's threads)
    def open_segment(self, i: int) -> Tuple[Source, Sink]:
        try:
            if self.failed:
                raise Abandoned(f"'{self.source}': another segment failed")
            self._check_target()
            source = SegmentSource(self, *self.read_range(i))
            try:
                sink = SegmentSink(self, i, source.start, *self.keep_range(i))
            except BaseException:
                source.close()
                raise
            return source, sink
        except BaseException:
            self.fail()
            raise

    def _check_target(self) -> None:
        source, target = self.source, self.target
        same = os.path.realpath(source) == os.path.realpath(target)
        with contextlib.suppress(OSError):
            same = same or os.path.samefile(source, target)
        if same:
            raise AudioFileError(f"'{source}': the output path is the input file itself; refused")
        if not self.overwrite and os.path.lexists(target):
            raise AudioFileError(f"'{target}': output exists (use --overwrite to replace it)")
        if target.is_dir():
            raise AudioFileError(f"'{target}': the output path is a directory")

    def new_temp(self, i: int) -> str:
        with self.lock:
            if self.closed or self.failed:
                raise Abandoned(f"'{self.source}': another segment failed")
            self.target.parent.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(
                prefix="." + self.target.name + ".",
                suffix=f".part{i}{TEMP_SUFFIX}",
                dir=self.target.parent,
            )
            os.close(fd)
            self.temps[i] = path
            return path

    def segment_done(self, i: int) -> None:
        """Segment ``i`` is in its temporary file; the last one assembles the output."""
        with self.lock:
            if self.failed:
                raise Abandoned(f"'{self.source}': another segment failed")
            self.done[i] = True
            last = all(self.done)
        if last:
            self.assemble()

    def fail(self) -> None:
        with self.lock:
            self.failed = True
        self.cleanup()

    def cleanup(self) -> None:
        """Remove every temporary file (after success, failure or an interruption)."""
        with self.lock:
            self.closed = True
            temps, self.temps = self.temps, [None] * self.k
        for path in temps:
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    # the assembly (in the I/O thread of the last segment to finish)
    def assemble(self) -> None:
        reader = FileSource(self.source)
        try:
            sink = FileSink(reader, self.target, self.overwrite)
        finally:
            reader.close()
        try:
            fade_out, fade_in = crossfade_weights(self.fade, self.options.crossfade)
            tail = None
            for i in range(self.k):
                lo, hi = self.keep_range(i)
                with open(self.temps[i], "rb") as f:
                    left = hi - lo
                    if tail is not None:
                        head = self._read(f, self.fade, i)
                        sink.write(tail * fade_out + head * fade_in)
                        left -= self.fade
                    body = left - (self.fade if i < self.k - 1 else 0)
                    while body > 0:
                        n = min(body, BLOCK_FRAMES)
                        sink.write(self._read(f, n, i))
                        body -= n
                    tail = self._read(f, self.fade, i) if i < self.k - 1 else None
                    if f.read(1):
                        raise AudioFileError(f"'{self.source}': segment {i} is longer than planned")
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        self.sink = sink

    def _read(self, f, frames: int, i: int) -> np.ndarray:
        data = np.fromfile(f, dtype="<f4", count=frames * self.channels)
        if data.size != frames * self.channels:
            raise AudioFileError(f"'{self.source}': segment {i} is shorter than planned")
        return data.reshape(frames, self.channels)

    # results
    def add_result(self, result: Result) -> Optional[Result]:
        """Collect a segment's result; the file's one result once all K are in."""
        self.results[result.job.tag.index] = result
        if any(r is None for r in self.results):
            return None
        self.cleanup()
        seconds = sum(r.model_seconds for r in self.results)
        errors = [r for r in self.results if r.error is not None]
        real = [r for r in errors if not isinstance(r.exception, Abandoned)]
        box = {"sink": self.sink} if self.sink is not None else {}
        job = Job(open=_no_open, tag=(self.source, self.target, box))
        if errors or self.sink is None:
            first = (real or errors or [None])[0]
            error = first.error if first is not None else f"'{self.source}': not assembled"
            return Result(job, 0, 0, 0, seconds, error=error, exception=first and first.exception)
        return Result(job, self.frames, self.sample_rate, self.channels, seconds)


def _no_open():  # pragma: no cover - a file result's job is never opened
    raise RuntimeError("a split file's result job is not a job to run")


class SegmentSource(Source):
    """Frames [start, stop) of the file, read through soundfile seeks."""

    def __init__(self, split: SplitFile, start: int, stop: int):
        import soundfile as sf

        self.split, self.start, self.stop = split, start, stop
        self.path = split.source
        self.sample_rate, self.channels = split.sample_rate, split.channels
        try:
            self._file = open_audio(self.path)
            self._file.seek(start)
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as exc:
            raise AudioFileError(f"'{self.path}': not a readable audio file ({exc})") from None
        self.pos = start

    def read(self, frames: int) -> np.ndarray:
        import soundfile as sf

        from .streaming import BadAudioError

        if self.split.failed:
            raise Abandoned(f"'{self.path}': another segment failed")
        n = max(0, min(frames, self.stop - self.pos))
        try:
            data = self._file.read(frames=n, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
            raise AudioFileError(
                f"'{self.path}': read failed at {self.pos / self.sample_rate:.2f} s ({exc})"
            ) from None
        except OSError as exc:  # open_audio's reader of a WAV without a length
            raise AudioFileError(
                f"'{self.path}': read failed at {self.pos / self.sample_rate:.2f} s "
                f"({os_reason(exc)})"
            ) from None
        if data.shape[0] < n:
            raise AudioFileError(
                f"'{self.path}': ends at {(self.pos + data.shape[0]) / self.sample_rate:.2f} s, "
                f"before the {self.split.frames / self.sample_rate:.2f} s its header gives"
            )
        bad = nonfinite_reason(data, self.pos, self.sample_rate)
        if bad is not None:
            raise BadAudioError(f"'{self.path}': {bad}")
        self.pos += data.shape[0]
        return data

    def close(self) -> None:
        self._file.close()


class SegmentSink(Sink):
    """The kept part [keep_lo, keep_hi) of a segment's output (which starts at ``start``), as
    raw float32 in a hidden temporary file next to the target."""

    def __init__(self, split: SplitFile, index: int, start: int, keep_lo: int, keep_hi: int):
        self.split, self.index = split, index
        self.path = split.new_temp(index)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in commit/abort
        self.pos, self.keep_lo, self.keep_hi = start, keep_lo, keep_hi
        self.kept = 0

    def write(self, samples: np.ndarray) -> None:
        n = samples.shape[0]
        lo, hi = max(0, self.keep_lo - self.pos), min(n, self.keep_hi - self.pos)
        self.pos += n
        if hi > lo:
            try:
                self._file.write(np.ascontiguousarray(samples[lo:hi], dtype="<f4").tobytes())
            except OSError as exc:
                raise AudioFileError(
                    f"'{self.split.target}': can't write a temporary file: {exc.strerror or exc}"
                ) from None
            self.kept += hi - lo

    def commit(self) -> None:
        self._file.close()
        if self.kept != self.keep_hi - self.keep_lo:
            raise AudioFileError(
                f"'{self.split.source}': segment {self.index} gave {self.kept} frames, "
                f"not {self.keep_hi - self.keep_lo}"
            )
        self.split.segment_done(self.index)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        self.split.fail()


# -- planning and running ---------------------------------------------------------------------
class SplitPlan:
    """Engine jobs for (source, target) pairs, long files split; ``results`` turns the engine's
    results back into one per file and removes every temporary file, whatever happens."""

    def __init__(
        self,
        pairs: Iterable[Tuple[Path, Path]],
        *,
        batch: int,
        overwrite: bool,
        options: Optional[SplitOptions] = None,
    ):
        options = options or SplitOptions()
        pairs = [(Path(s), Path(t)) for s, t in pairs]
        infos = [_probe(s) for s, _ in pairs]
        lane_seconds = sum(i.frames / i.samplerate * i.channels for i in infos if i is not None)
        share = lane_seconds / batch
        self.files: List[SplitFile] = []
        whole: List[Job] = []
        self.nominal = self.processed = 0.0
        for (source, target), info in zip(pairs, infos):
            k = 1
            if info is not None:
                seconds = info.frames / info.samplerate
                self.nominal += seconds
                k = segment_count(seconds, info.channels, share, batch, options.min_segment)
            if k < 2 or not _seekable(source):
                whole.append(file_job(source, target, overwrite))
                self.processed += info.frames / info.samplerate if info is not None else 0.0
                continue
            split = SplitFile(source, target, overwrite, info, k, options)
            self.files.append(split)
            self.processed += split.read_frames() / split.sample_rate
        # Split files first: their segments are the longest jobs.
        self.jobs: List[Job] = [job for f in self.files for job in f.jobs()] + whole

    def progress(self, progress: Optional[Callable[[float], None]]):
        """``progress`` in seconds of the files' own audio (warm-up and overlap not counted)."""
        if progress is None or not self.processed:
            return progress
        ratio = self.nominal / self.processed
        return lambda seconds: progress(seconds * ratio)

    def results(self, engine_results: Iterator[Result]) -> Iterator[Result]:
        try:
            for result in engine_results:
                tag = result.job.tag
                if isinstance(tag, SegmentTag):
                    merged = tag.file.add_result(result)
                    if merged is not None:
                        yield merged
                else:
                    yield result
        finally:
            # Stop the engine first (its threads may still be writing), then clean up.
            close = getattr(engine_results, "close", None)
            if close is not None:
                close()
            for split in self.files:
                split.cleanup()


def _probe(path: Path):
    """soundfile's info where ``path`` is audio with samples; None otherwise (it then runs as
    a whole file, which reports what is wrong with it)."""
    try:
        info = audio_info(path)
    except Exception:  # noqa: BLE001 - reported when the file is enhanced
        return None
    if info.frames <= 0 or info.samplerate <= 0 or info.channels <= 0:
        return None
    return info


def _seekable(path: Path) -> bool:
    try:
        with open_audio(path) as f:
            return bool(f.seekable())
    except Exception:  # noqa: BLE001
        return False


__all__: Sequence[str] = (
    "DEFAULT_FADE_SECONDS",
    "DEFAULT_WARMUP_SECONDS",
    "SplitOptions",
    "SplitPlan",
    "crossfade_weights",
    "segment_bounds",
    "segment_count",
)
