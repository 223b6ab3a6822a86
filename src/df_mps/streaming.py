"""Enhance recordings of any length in bounded memory, piece by piece, at constant speed.

Upstream's ``df.enhance.enhance`` runs the whole file through the model at once: memory grows
by about 550 MB per minute of audio and the time per second of audio grows with the length. Here
the audio streams from disk and back in blocks, and the model runs on pieces of
``piece_seconds`` (10 s by default) whose results join exactly: the output equals upstream's
whole-file output to float32 rounding, for any length.

How the pieces join (DeepFilterNet's state, carried across pieces)
------------------------------------------------------------------
The pieces run through ``df_mps.engine`` (see its docstring for the batched step):

- STFT analysis and synthesis, and the two exponential feature normalisations (tau = 1 s), run
  continuously over the whole stream (``df_mps.dsp.DF`` with ``reset=False``, one state per
  channel), so the model sees exactly the features it would see for the whole file.
- The recurrent layers (every ``torch.nn.GRU``/RNN in the model: DeepFilterNet3 has three
  GRUs) continue from their hidden state at the end of the previous piece, and hand back the
  outputs they computed for the frames before the piece (the left context, below) from the
  previous piece.
- The convolutions look a few frames back (DeepFilterNet3: 2 frames in the input layers, 4 more
  in the deep-filter pathway) and ahead (``conv_lookahead``, ``df_lookahead``: 2 frames). So
  each piece is run with some frames of context before and after it, and only the piece's own
  frames are kept: every kept frame then has all its inputs, as in the whole-file run.
  ``model_context(model)`` bounds the context from the model's time paddings and kernels
  (DeepFilterNet3: 10 frames before, 6 after; it needs 6 and 2). The context costs
  16 / 1000 frames, under 2% extra compute at 10 s pieces.

Why carry the state rather than overlap independent pieces: DeepFilterNet3's GRUs forget
slowly. Measured on 1 minute of audio in 10 s pieces (benchmarks/bench_long.py), pieces run
independently through upstream's ``enhance()`` with 1, 5, 10 and 20 s of left context and a
crossfade come within 23.5, 28.6, 29.0 and 34.9 dB of the whole-file output, at 1.1 to 3 times
the compute; carrying the state gives 117 dB (float32 rounding) at under 2% extra compute.

Upstream's zero padding at the start and end of the file is reproduced exactly: the first
piece's frames before the start read as each layer's own zero padding, and the frames after
the (padded) end are zeros. Resampling
(inputs not at the model's 48 kHz) streams too: ``StreamResampler`` applies torchaudio's sinc
kernel (upstream's ``df.io.resample`` "sinc_fast" settings) block by block with the kernel's
context, so it equals resampling the whole signal; for rates whose kernel would be huge
(22,051 Hz: 4.2 GB) it streams through soxr instead (see ``StreamResampler``). Channels are the
model's batch dimension, as upstream. The output keeps the input's length, rate and channels.

Peak memory is the process baseline (torch and the model: about 0.75 GiB with a CUDA build of
torch) plus a few hundred MB for one piece, whatever the length.

Use
---
::

    from df_mps.api import Enhancer
    from df_mps.streaming import enhance_stream

    enhancer = Enhancer()                             # DeepFilterNet3
    enhance_stream(enhancer, None, "podcast.flac", "podcast_enhanced.flac", progress=True)

    # Or, with a model and DF state from df.enhance.init_df:
    model, df_state, _ = init_df()
    enhance_stream(model, df_state, "in.wav", "out.wav", overwrite=True)

    # Blocks from anywhere ([frames, channels] float32, as soundfile reads them):
    for out_block in enhance_blocks(enhancer, None, blocks, sample_rate=44100):
        ...

    # Or push blocks yourself:
    stream = StreamEnhancer(model, df_state, sample_rate=16000, channels=1)
    out = [stream.process(block) for block in blocks] + [stream.finish()]

Each ``StreamEnhancer`` holds its own state, so streams on one model may interleave; steps on
one model are serialised by a lock (a step switches the model's recurrent modules while it
runs). For many files at once, ``df_mps.api.Enhancer.enhance_files`` batches them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Tuple, Union

import numpy as np

from .audio import (
    AudioFileError,
)
from .engine import DEFAULT_PIECE_SECONDS, frames_per_piece
from .util import PathLike, quiet_resample_rename

if TYPE_CHECKING:
    from libdf import DF
    from torch import nn

    from .api import Enhancer

__all__ = [
    "DEFAULT_PIECE_SECONDS",
    "BadAudioError",
    "StreamEnhancer",
    "MAX_SINC_KERNEL_VALUES",
    "StreamResampler",
    "StreamResult",
    "enhance_blocks",
    "enhance_stream",
    "model_context",
    "sinc_kernel_values",
]


class BadAudioError(AudioFileError):
    """A readable file whose samples can't be enhanced (none, NaN, Inf)."""


# -- resampling, block by block ------------------------------------------------------------------
# torchaudio's kernel holds new * (2 * width + orig) float32 values, where orig / new is the rate
# ratio in lowest terms: 35 for 44.1 -> 48 kHz, 1e9 (4.2 GB) for 22,051 -> 48 kHz. Up to this many
# values (16 MiB) the kernel is used; past it the stream goes through soxr.
MAX_SINC_KERNEL_VALUES = 1 << 22


def sinc_kernel_values(orig_sr: int, new_sr: int, method: str = "sinc_fast") -> int:
    """How many values torchaudio's resampling kernel for ``orig_sr`` -> ``new_sr`` holds."""
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    params = _resample_params(method)
    # As torchaudio.functional._get_sinc_resample_kernel computes them.
    base = min(orig, new) * params.get("rolloff", 0.99)
    width = math.ceil(params.get("lowpass_filter_width", 6) * orig / base)
    return new * (2 * width + orig)


class StreamResampler:
    """Resampling fed in blocks, in bounded memory for every pair of rates.

    Which path a pair of rates takes:

    - torchaudio's sinc kernel with the parameters of upstream's ``df.io.resample(method=...)``
      (default "sinc_fast": 16 zero crossings; a Kaiser window with torchaudio 2.11, see
      ``__init__``) wherever the kernel holds at most ``MAX_SINC_KERNEL_VALUES`` (4 Mi) values.
      This path matches upstream exactly (tests/test_streaming.py). It covers every rate whose
      ratio to 48 kHz reduces to small numbers: 8, 11.025, 12, 16, 22.05, 24, 32, 37.8, 44.1,
      47.25, 47.952, 50, 64, 88.2, 96, 176.4, 192, 352.8, 384, 705.6 and 768 kHz among them.
    - python-soxr's streaming resampler (``soxr.ResampleStream``, quality "HQ") past that size:
      rates that share almost no factor with the other rate, such as 22,051 Hz or 47,999 Hz
      (torchaudio's kernel for 22,051 -> 48 kHz alone would take 4.2 GB), and 44,056 Hz (33 Mi
      values). Upstream has no such path (its kernel exhausts memory); the result is soxr's,
      which differs from torchaudio's sinc by less than the filters' own ripple.

    ``process(x)`` takes [C, n] float32 tensors and returns the output samples that are ready;
    ``finish()`` returns the rest, so that the total is ``ceil(n_total * new_sr / orig_sr)``
    samples, as torchaudio's, on either path.
    """

    def __init__(self, orig_sr: int, new_sr: int, method: str = "sinc_fast"):
        g = math.gcd(int(orig_sr), int(new_sr))
        self.orig_sr, self.new_sr = int(orig_sr), int(new_sr)
        self._orig, self._new = self.orig_sr // g, self.new_sr // g
        self._kernel, self._width = None, 0
        self._soxr = None
        self.uses_sinc_kernel = self.identity or self.fits_sinc_kernel(orig_sr, new_sr, method)
        if not self.identity and self.uses_sinc_kernel:
            import torch
            from torchaudio.transforms import Resample

            # dtype float32: the kernel torchaudio.functional.resample builds for float32 audio.
            # Upstream's parameters as they are: torchaudio (2.11 here) warns about the old name
            # "sinc_interpolation" and then builds a Kaiser window for it, not the Hann window
            # the warning promises. df.io.resample gets that kernel, so it is the one to match.
            with quiet_resample_rename():
                resampler = Resample(
                    self.orig_sr, self.new_sr, dtype=torch.float32, **_resample_params(method)
                )
            self._kernel = resampler.kernel
            self._width = int(resampler.width)
        self._buffer = None  # input from global sample (steps_done * orig - width) on
        self._in_total = 0
        self._out_total = 0

    @staticmethod
    def fits_sinc_kernel(orig_sr: int, new_sr: int, method: str = "sinc_fast") -> bool:
        """Whether ``orig_sr`` -> ``new_sr`` takes torchaudio's kernel (equal to upstream)."""
        return sinc_kernel_values(orig_sr, new_sr, method) <= MAX_SINC_KERNEL_VALUES

    @property
    def identity(self) -> bool:
        return self.orig_sr == self.new_sr

    def process(self, x):
        if self.identity:
            return x
        if not self.uses_sinc_kernel:
            return self._soxr_chunk(x, last=False)
        import torch

        if self._buffer is None:
            # torchaudio pads the signal with `width` zeros in front.
            self._buffer = x.new_zeros((x.shape[0], self._width))
        self._buffer = torch.cat([self._buffer, x], dim=-1)
        self._in_total += x.shape[-1]
        return self._run()

    def finish(self):
        if self.identity:
            return None
        if not self.uses_sinc_kernel:
            if self._soxr is None:
                return None
            return self._soxr_chunk(self._soxr_zeros, last=True)
        import torch

        if self._buffer is None:
            return None
        # ... and with `width + orig` zeros behind.
        tail = self._buffer.new_zeros((self._buffer.shape[0], self._width + self._orig))
        self._buffer = torch.cat([self._buffer, tail], dim=-1)
        out = self._run()
        target = -(-self._in_total * self._new // self._orig)  # ceil
        keep = target - (self._out_total - out.shape[-1])
        self._out_total = target
        return out[..., :keep]

    def _soxr_chunk(self, x, last: bool):
        import soxr
        import torch

        if self._soxr is None:
            self._soxr = soxr.ResampleStream(
                self.orig_sr, self.new_sr, x.shape[0], dtype="float32", quality="HQ"
            )
            self._soxr_zeros = x.new_zeros((x.shape[0], 0))
        self._in_total += x.shape[-1]
        frames = np.ascontiguousarray(x.detach().cpu().numpy().T, dtype=np.float32)
        out = self._soxr.resample_chunk(frames, last=last)
        y = torch.from_numpy(np.ascontiguousarray(out.T)).to(x.device)
        if last:
            # soxr ends on round(n * ratio); give torchaudio's count, ceil(n * ratio).
            target = -(-self._in_total * self._new // self._orig)
            keep = target - self._out_total
            if y.shape[-1] < keep:
                y = torch.nn.functional.pad(y, (0, keep - y.shape[-1]))
            y = y[..., : max(keep, 0)]
        self._out_total += y.shape[-1]
        return y

    def _run(self):
        import torch

        span = 2 * self._width + self._orig
        length = self._buffer.shape[-1]
        steps = (length - span) // self._orig + 1 if length >= span else 0
        channels = self._buffer.shape[0]
        if steps == 0:
            return self._buffer.new_zeros((channels, 0))
        used = self._buffer[:, None, : (steps - 1) * self._orig + span]
        out = torch.nn.functional.conv1d(used, self._kernel, stride=self._orig)
        out = out.transpose(1, 2).reshape(channels, steps * self._new)
        self._buffer = self._buffer[:, steps * self._orig :].clone()
        self._out_total += out.shape[-1]
        return out


def _resample_params(method: str) -> dict:
    from df.io import get_resample_params

    return dict(get_resample_params(method))


# -- carrying recurrent state across pieces ------------------------------------------------------
def model_context(model) -> Tuple[int, int]:
    """(frames before, frames after) a piece must be run with so that its own frames get all
    their inputs: an upper bound on how far the model's non-recurrent layers look back and
    ahead in time, summed over every layer (any path through the model is at most that).

    DeepFilterNet shifts and pads time explicitly: causal convolutions follow a
    ``ConstantPad2d`` of (kernel - 1, 0) frames, the lookahead is a (-n, n) pad, the deep
    filter pads (order - 1 - lookahead, lookahead). So the paddings on the time axis (dim -2 of
    its 4-D tensors, -3 of 5-D ones) give the bound, plus any time padding inside a
    convolution. Recurrent layers don't count: their state is carried.
    """
    from torch import nn

    before = after = 0
    for module in model.modules():
        if isinstance(module, nn.ConstantPad2d):
            top, bottom = module.padding[2], module.padding[3]
        elif isinstance(module, nn.ConstantPad3d):
            top, bottom = module.padding[4], module.padding[5]
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            span = (module.kernel_size[0] - 1) * module.dilation[0]
            pad = module.padding[0] if not isinstance(module.padding, str) else 0
            if module.padding == "same":
                pad = span // 2
            if isinstance(module, nn.ConvTranspose2d):
                top, bottom = span - pad, pad
            elif pad:  # a convolution without its own time padding is paired with a pad
                top, bottom = pad, span - pad
            else:
                continue
        else:
            continue
        before += max(int(top), 0)
        after += max(int(bottom), 0)
    return before, after


# -- the public stream ---------------------------------------------------------------------------
def _unpack(model, df_state, pad, atten_lim_db):
    """(model, df_state, pad, atten_lim_db) from a df_mps ``Enhancer`` or a model + DF."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "df_state"):
        df_state = df_state if df_state is not None else model.df_state
        pad = getattr(model, "pad", True) if pad is None else pad
        if atten_lim_db is None:
            atten_lim_db = getattr(model, "atten_lim_db", None)
        model = inner
    if df_state is None:
        raise TypeError("df_state is required with a bare model (or pass a df_mps Enhancer)")
    return model, df_state, (True if pad is None else pad), atten_lim_db


def _engine(model, df_state, *, batch, pad, atten_lim_db, piece_seconds, context_frames=None):
    from .engine import Engine

    model, df_state, pad, atten_lim_db = _unpack(model, df_state, pad, atten_lim_db)
    if not piece_seconds > 0:
        raise ValueError(f"piece_seconds must be positive, not {piece_seconds}")
    return Engine(
        model,
        df_state,
        batch=batch,
        piece_frames=frames_per_piece(piece_seconds, df_state),
        pad=pad,
        atten_lim_db=atten_lim_db,
        context=context_frames,
    )


class StreamEnhancer:
    """DeepFilterNet over a stream of audio blocks at any sample rate, in bounded memory.

    ``model`` is a df_mps ``Enhancer`` (``df_mps.api.Enhancer``; its ``pad`` and
    ``atten_lim_db`` are the defaults) or a DeepFilterNet model with its ``df_state`` (as
    ``df.enhance.init_df`` returns them). ``process(block)`` takes float32 samples
    [frames, channels] (soundfile's layout) at ``sample_rate`` and returns the enhanced samples
    that are ready, [frames', channels]; ``finish()`` returns the rest. Over the whole stream
    the output has exactly as many frames as the input and equals what upstream's
    ``enhance()`` returns for the whole signal (resampled to the model's rate and back with
    ``df.io.resample`` where ``sample_rate`` differs), to float32 rounding.

    It is one job of ``df_mps.engine``, driven from the caller's thread, its channels the rows
    of each forward. ``piece_seconds``: how much the model runs on at once (memory and speed;
    the result does not depend on it). ``context_frames``: (before, after) frames each piece
    runs with, default ``model_context(model)``. ``seconds`` accumulates the time spent
    computing (resampling, features, model, synthesis).
    """

    def __init__(
        self,
        model: Union[Enhancer, nn.Module],
        df_state: Optional[DF] = None,
        *,
        sample_rate: int,
        channels: int,
        pad: Optional[bool] = None,
        atten_lim_db: Optional[float] = None,
        piece_seconds: float = DEFAULT_PIECE_SECONDS,
        context_frames: Optional[Tuple[int, int]] = None,
    ):
        if sample_rate <= 0 or channels <= 0:
            raise ValueError(f"invalid stream: {sample_rate} Hz, {channels} channel(s)")
        engine = _engine(
            model,
            df_state,
            batch=int(channels),
            pad=pad,
            atten_lim_db=atten_lim_db,
            piece_seconds=piece_seconds,
            context_frames=context_frames,
        )
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.model_rate = engine.df_spec.sr
        self._stream = engine.stream(self.sample_rate, self.channels)
        self.frames_in = 0
        self.frames_out = 0
        self._finished = False

    @property
    def seconds(self) -> float:
        return self._stream.seconds

    def process(self, block: np.ndarray) -> np.ndarray:
        if self._finished:
            raise RuntimeError("StreamEnhancer: process() after finish()")
        block = np.asarray(block, dtype=np.float32)
        if block.ndim == 1:
            block = block[:, None]
        if block.ndim != 2 or block.shape[1] != self.channels:
            raise ValueError(
                f"expected a block [frames, {self.channels}], got shape {tuple(block.shape)}"
            )
        self.frames_in += block.shape[0]
        return self._count(self._stream.push(block))

    def finish(self) -> np.ndarray:
        if self._finished:
            raise RuntimeError("StreamEnhancer: finish() called twice")
        self._finished = True
        return self._count(self._stream.finish())

    def _count(self, out: np.ndarray) -> np.ndarray:
        self.frames_out += out.shape[0]
        return out


def enhance_blocks(
    model: Union[Enhancer, nn.Module],
    df_state: Optional[DF],
    blocks: Iterable[np.ndarray],
    *,
    sample_rate: int,
    channels: Optional[int] = None,
    **options,
) -> Iterator[np.ndarray]:
    """Enhanced blocks for ``blocks`` ([frames, channels] float32 each): a generator over a
    ``StreamEnhancer`` (``options`` go to it). The output blocks don't line up with the input
    blocks, but their concatenation has the input's length."""
    stream = None
    for block in blocks:
        block = np.asarray(block, dtype=np.float32)
        if block.ndim == 1:
            block = block[:, None]
        if stream is None:
            stream = StreamEnhancer(
                model,
                df_state,
                sample_rate=sample_rate,
                channels=channels or block.shape[1],
                **options,
            )
        out = stream.process(block)
        if out.shape[0]:
            yield out
    if stream is not None:
        out = stream.finish()
        if out.shape[0]:
            yield out


# -- files ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class StreamResult:
    sample_rate: int
    channels: int
    frames: int
    subtype: str  # what was written
    model_seconds: float  # resampling, features, model and synthesis: what upstream times


def enhance_stream(
    model: Union[Enhancer, nn.Module],
    df_state: Optional[DF],
    source: PathLike,
    target: PathLike,
    *,
    overwrite: bool = False,
    pad: Optional[bool] = None,
    atten_lim_db: Optional[float] = None,
    piece_seconds: float = DEFAULT_PIECE_SECONDS,
    progress: Union[bool, Callable[[int], object]] = False,
) -> StreamResult:
    """Enhance the audio file ``source`` into ``target``, streaming both, in bounded memory.

    ``model``/``df_state``: a df_mps ``Enhancer`` (``df_state`` None) or a model and its DF
    state. The output has the input's rate, channels, length and, where the format allows,
    sample format (as ``df_mps.enhance``). ``target`` is written to a temporary file in its
    directory and renamed into place when complete; it is never ``source``, and an existing
    ``target`` is replaced only with ``overwrite``. ``progress``: True for a tqdm bar in
    seconds of audio, or a callable given the number of input frames read after each block.

    Raises ``AudioFileError`` (one-line message) for a file that can't be read or written and
    ``BadAudioError`` for one without samples or with NaN/Inf (no output is left behind).
    """
    from .api import file_job, sound_info

    source, target = Path(source), Path(target)
    engine = _engine(
        model,
        df_state,
        batch=max(1, sound_info(source).channels),
        pad=pad,
        atten_lim_db=atten_lim_db,
        piece_seconds=piece_seconds,
    )
    with contextlib.ExitStack() as stack:
        bar = _progress_bar(progress, sound_info(source), source, stack)
        job = file_job(source, target, overwrite, on_read=bar)
        for result in engine.run([job]):
            if result.exception is not None:
                raise result.exception
            if result.error is not None:  # pragma: no cover - every failure has its exception
                raise AudioFileError(result.error)
            return StreamResult(
                sample_rate=result.sample_rate,
                channels=result.channels,
                frames=result.frames,
                subtype=job.tag[2]["sink"].subtype,
                model_seconds=result.model_seconds,
            )
    raise AssertionError("the engine returned no result")  # pragma: no cover


def _progress_bar(progress, info, source: Path, stack: contextlib.ExitStack):
    """A callable taking frames done, or None."""
    if callable(progress):
        return progress
    if not progress:
        return None
    import sys

    from tqdm import tqdm

    rate = float(info.samplerate)
    known = info.frames > 0
    bar = stack.enter_context(
        tqdm(
            total=round(info.frames / rate, 1) if known else None,
            unit="s",
            desc=source.name,
            leave=False,
            disable=None,
            file=sys.stderr,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]"
            if known
            else None,
        )
    )
    return lambda frames: bar.update(frames / rate)
