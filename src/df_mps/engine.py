"""The one place that runs the model: lanes with continuous batching.

DeepFilterNet3's three GRUs step through every 10 ms frame, so a forward at batch 1 is bound by
launch and dispatch cost on every device (most of all on MPS, which has no fused GRU). The
engine therefore runs many streams through one forward:

- A **lane** is one channel of one stream (a file, an array, a live stream) at the model's
  rate. It carries what a whole-file run would have in memory at that point: its share of the
  job's STFT/normalisation state (one ``df_mps.dsp.DF`` per job, a row per channel), the hidden
  state of every recurrent module, and the last few outputs of each recurrent module (the left
  context of the next piece).
- A **step** takes the next piece of ``piece_frames`` frames from up to ``batch`` lanes, each
  with ``left`` frames of context before it and ``right`` after (``model_context``), stacks
  them into one ``[rows, 1, left + piece + right, ...]`` batch, and runs one forward. Every
  piece has that one shape: a stream's last piece is zero-padded, and a stream's first piece
  gets ``left`` frames of zeros in front.
- **Exactness.** A lane's output equals the whole-file output of upstream's ``enhance()`` to
  float32 rounding, whatever the batch. Two things make the fixed shape exact:
    * Frames before a stream's start must look like the zero padding upstream's convolutions
      add at frame 0. For a lane on its first piece the raw inputs before frame 0 are zero,
      and a forward pre-hook on every time-padding layer zeroes that layer's input before
      frame 0, so every convolution sees exactly its own padding there (zeroing only the
      model's input would not do: a convolution of zeros plus a bias is not zero).
    * Recurrent modules start from the lane's carried state at the piece's first frame
      (zeros on a first piece), and hand back the previous piece's outputs for the left
      context (``_StepContext``). Padded frames after a stream's end only reach frames that
      are dropped: DeepFilterNet3 is causal once its explicit lookahead pads are applied, and
      the zero-padded frames right after the end are exactly those pads' zeros.
  Nothing in DeepFilterNet mixes batch rows in eval mode.
- **Continuous batching.** When a stream ends its lanes are freed and the next job's lanes take
  them at once, as a serving scheduler refills a slot when a sequence finishes.
- **Keeping the device busy.** Decoding and resampling run in a small thread pool a piece
  ahead of each job (a job's first read covers its first piece and that piece's right
  context); resampling back, quantising and writing run there too, in order per job. On the
  CPU the STFT analysis and synthesis run in that pool as well; on a GPU they run stacked on
  the scheduling thread, one call for all the step's jobs. A step waits while a running job's
  next piece is still being read or analysed (off the CPU a step costs the same whatever its
  rows), then runs. Off the CPU a step has one of two shapes, made at the warm-up with the
  model load (with their CUDA graphs, the DSP's FFT plans and pinned host buffers): the full
  piece, and a short piece for the 2 frames that upstream's end padding leaves after files
  whose length is a whole number of pieces. About ``batch`` × piece of audio is in flight.

``Engine.run(jobs)`` yields a result per job as each finishes. ``df_mps.api.Enhancer`` is its
public face.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import os
import threading
import time
import types
import weakref
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .precision import model_dtype

# One GRU step costs about the same at batch 1 as at batch 64 on a GPU: these are the batch
# sizes `--batch auto` picks (rows of one forward). CPU: docs/performance.md's CPU batch table
# (batch 4 gives 1.3-1.5x the throughput of batch 1; more buys little on few cores and costs
# memory). CUDA: measured on an H200 (benchmarks/bench_engine.py). MPS: unmeasured, see
# DEFAULT_BATCH_NOTE.
DEFAULT_BATCH = {"cpu": 4, "cuda": 64, "mps": 16}
DEFAULT_BATCH_NOTE = (
    "MPS: 16 is a choice, not a measurement. torch has no fused GRU for MPS, so each of the "
    "5,000 GRU steps per 10 s is about 10 dispatches whatever the batch: rows share that cost. "
    "Unified memory makes 16 rows of 10 s pieces (about 3 GB of activations) affordable on a "
    "16 GB Mac, where 64 would not be."
)
# 10 s pieces: measured on one CPU thread, DeepFilterNet3 costs 0.31 ms per frame for pieces of
# 500-1000 frames and 0.35-0.39 ms for 2000-8000 (larger intermediates fall out of the caches),
# and a 1000-frame piece adds ~0.2 GB to the process's peak memory.
DEFAULT_PIECE_SECONDS = 10.0


def default_batch(device_type: str) -> int:
    return DEFAULT_BATCH.get(device_type, DEFAULT_BATCH["cpu"])


def default_piece_seconds(device_type: str, batch: int) -> float:
    """10 s pieces, except on the CPU, where rows x piece stays about 10 s of frames: the
    step's intermediates then stay in the caches. Measured at 1 thread (bench_engine.py
    --mode step): batch 4 of 2.5 s pieces ran 1.5x the audio-s/s of batch 1 of 10 s, batch 4
    of 10 s pieces no faster than batch 1."""
    if device_type != "cpu":
        return DEFAULT_PIECE_SECONDS
    return max(1.0, DEFAULT_PIECE_SECONDS / max(1, batch))


def frames_per_piece(piece_seconds: float, df_state) -> int:
    """The model frames (hops of ``df_state``) in a piece of ``piece_seconds``: at least one."""
    hop, rate = int(df_state.hop_size()), int(df_state.sr())
    return max(1, round(float(piece_seconds) * rate / hop))


# -- what a job is --------------------------------------------------------------------------
class JobError(Exception):
    """A job that can't be enhanced; the message is one line for the user."""


class BadSamples(JobError):
    """Input without samples, or with NaN/Inf (sources name the file; arrays don't)."""


@dataclasses.dataclass
class Result:
    """What the engine reports for one finished job."""

    job: Job
    frames: int  # input frames enhanced
    sample_rate: int
    channels: int
    model_seconds: float  # this job's share of the step and DSP time
    error: Optional[str] = None  # one line, where the job failed
    exception: Optional[BaseException] = None  # what failed it

    @property
    def ok(self) -> bool:
        return self.error is None


class Source:
    """Audio in: ``info()`` then ``read(frames)`` blocks [frames, channels] float32 until a
    short (or empty) block. Runs in an I/O thread. Raise ``JobError`` for bad audio."""

    sample_rate: int
    channels: int

    def read(self, frames: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class Sink:
    """Audio out: ``write(samples)`` [frames, channels] float32 in order, then ``commit()``;
    ``abort()`` on any failure or interruption (it must leave nothing behind)."""

    def write(self, samples: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


class ArraySource(Source):
    def __init__(self, audio: np.ndarray, sample_rate: int):
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim == 1:
            audio = audio[:, None]
        if audio.ndim != 2 or audio.shape[1] == 0:
            raise ValueError(f"expected audio [frames, channels], got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise ValueError("audio contains NaN or Inf samples")
        if audio.shape[0] == 0:
            raise ValueError("audio has no samples")
        self.audio = audio
        self.sample_rate = int(sample_rate)
        self.channels = int(audio.shape[1])
        self._pos = 0

    def read(self, frames: int) -> np.ndarray:
        block = self.audio[self._pos : self._pos + frames]
        self._pos += block.shape[0]
        return block


class ArraySink(Sink):
    def __init__(self):
        self.parts: List[np.ndarray] = []

    def write(self, samples: np.ndarray) -> None:
        self.parts.append(samples)

    def result(self, channels: int) -> np.ndarray:
        if not self.parts:
            return np.zeros((0, channels), np.float32)
        return np.concatenate(self.parts)


@dataclasses.dataclass
class Job:
    """One stream through the engine. ``open()`` (run in the engine's thread) returns the
    source and sink; ``tag`` is the caller's (a path pair, an index)."""

    open: Callable[[], Tuple[Source, Sink]]
    tag: object = None


# -- the model, batched ---------------------------------------------------------------------
def model_context(model) -> Tuple[int, int]:
    from .streaming import model_context as context

    return context(model)


@contextlib.contextmanager
def exact_fp32(device):
    """cuDNN's convolutions and RNNs in full fp32 while a step runs.

    torch lets cuDNN use TF32 for fp32 convolutions and RNNs by default (10-bit mantissa), and
    which algorithm runs depends on the batch size: a file's output would then change with the
    batch it rode in, by about 3e-5 (measured on an H200). The contract is 1e-5, and DFN3's
    convolutions are small, so exactness costs little. This switch is process-wide while the
    step runs.
    """
    import torch

    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = []
    for part in (getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None)):
        if part is not None and hasattr(part, "fp32_precision"):
            saved.append((part, "fp32_precision", part.fp32_precision))
            part.fp32_precision = "ieee"
    if not saved:
        saved.append((cudnn, "allow_tf32", cudnn.allow_tf32))
        cudnn.allow_tf32 = False
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _time_padding_layers(model):
    """(module, time dim) for every layer that pads time before a convolution: where a first
    piece's frames before the stream's start must read as zeros."""
    from torch import nn

    layers = []
    for module in model.modules():
        if isinstance(module, nn.ConstantPad2d) and module.padding[2] > 0:
            layers.append((module, -2))
        elif isinstance(module, nn.ConstantPad3d) and module.padding[4] > 0:
            layers.append((module, -3))
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            pad = module.padding[0] if not isinstance(module.padding, str) else 0
            if module.padding == "same" or pad:
                layers.append((module, -2))
    return layers


class _StepContext:
    """One step's switches on the model: carried recurrent state and start-of-stream masks.

    While a step runs, each recurrent module's ``forward`` starts the piece's frames
    [left, left + piece) from the rows' carried states, continues through the lookahead frames
    from there (state not kept), and returns the previous piece's outputs for the left context.
    """

    def __init__(self, model, left: int, piece: int):
        import torch

        if isinstance(model, torch.jit.ScriptModule):
            raise ValueError(
                "the engine needs an eager (not TorchScript) model: its recurrent state is "
                "carried between pieces"
            )
        self.recurrent = [m for m in model.modules() if isinstance(m, torch.nn.RNNBase)]
        self.padding = _time_padding_layers(model)
        self.left, self.piece = left, piece
        # Per step: inputs (stacked per row) and outputs (to split per row).
        self.h0: List[object] = []
        self.history: List[object] = []
        self.new_h: List[object] = [None] * len(self.recurrent)
        self.new_history: List[object] = [None] * len(self.recurrent)
        self.mask = None
        # Made once, so that each step installs the same functions (torch.compile guards on
        # them; a new closure per step would recompile per step).
        self._forwards = [self._forward(index) for index in range(len(self.recurrent))]
        self._maskers = {dim: self._masker(dim) for dim in (-2, -3)}
        # What runs a recurrent module on a piece: its class's forward (torch's GRU), or
        # df_mps.gru's C kernel on the CPU.
        self.recurrence: Optional[Callable] = None

    @contextlib.contextmanager
    def active(self, h0: List[object], history: List[object], mask, piece: int):
        self.h0, self.history, self.mask, self.piece = h0, history, mask, piece
        saved, hooks = [], []
        try:
            for index, module in enumerate(self.recurrent):
                saved.append((module, module.__dict__.get("forward")))
                module.forward = types.MethodType(self._forwards[index], module)
            if mask is not None:
                for module, dim in self.padding:
                    hooks.append(module.register_forward_pre_hook(self._maskers[dim]))
            yield self
        finally:
            for hook in hooks:
                hook.remove()
            for module, original in saved:
                if original is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = original
            self.h0, self.history, self.mask = [], [], None

    def _masker(self, dim: int):
        def hook(module, args):
            x = args[0]
            mask = self.mask
            if x.shape[dim] != mask.shape[1]:
                raise RuntimeError(
                    f"{type(module).__name__}: expected {mask.shape[1]} frames on dim {dim}, got "
                    f"{x.shape[dim]}"
                )
            shape = [1] * x.ndim
            shape[0] = x.shape[0]
            shape[dim] = x.shape[dim]
            return (x * mask.view(shape).to(x.dtype), *args[1:])

        return hook

    def _forward(self, index: int):
        import torch

        ctx = self

        def forward(self_, x, hx=None):
            time_dim = 1 if self_.batch_first else 0
            left, piece = ctx.left, ctx.piece
            cls_forward = ctx.recurrence or type(self_).forward
            out_piece, state = cls_forward(self_, x.narrow(time_dim, left, piece), ctx.h0[index])
            ctx.new_h[index] = state
            # A piece shorter than the left context is a stream's last: no next piece.
            ctx.new_history[index] = (
                out_piece.narrow(time_dim, piece - left, left) if piece >= left else None
            )
            parts = [ctx.history[index].to(out_piece.dtype), out_piece] if left else [out_piece]
            rest = x.shape[time_dim] - left - piece
            if rest > 0:
                out_rest, state = cls_forward(self_, x.narrow(time_dim, left + piece, rest), state)
                parts.append(out_rest)
            return torch.cat(parts, time_dim), state

        return forward


class BatchedModel:
    """DeepFilterNet run on ``[rows, 1, left + piece + right, ...]`` windows, rows independent.

    ``step(windows)`` takes per row (spec, erb_feat, spec_feat, fresh, state) and returns the
    enhanced spectrum of each row's piece frames plus the rows' new states. A row's state is
    (hidden states, output histories), one entry per recurrent module; ``None`` is the state
    at a stream's start.
    """

    def __init__(self, model, *, piece_frames: int, context: Optional[Tuple[int, int]] = None):
        import torch

        self.model = model.eval()
        self.left, self.right = context if context is not None else model_context(model)
        self.piece = int(piece_frames)
        if self.left > self.piece:
            raise ValueError(
                f"pieces of {self.piece} frames are shorter than the {self.left}-frame left context"
            )
        self.window = self.left + self.piece + self.right
        self.tail = _bucket(1, self.piece)  # the short shape: the smallest last-piece bucket
        self.device = next(model.parameters()).device
        self.dtype = model_dtype(model)
        self._ctx = _StepContext(model, self.left, self.piece)
        self._lock = threading.Lock()
        self._shapes = []
        for module in self._ctx.recurrent:
            dirs = 2 if module.bidirectional else 1
            out = module.proj_size or module.hidden_size
            self._shapes.append(
                (
                    (module.num_layers * dirs, module.hidden_size),
                    (out * dirs,),
                    module.batch_first,
                    # A recurrent layer's own dtype: in half precision the GRUs stay fp32
                    # (df_mps.precision), and so do the states carried between pieces.
                    next(module.parameters()).dtype,
                )
            )
        if any(isinstance(m, torch.nn.LSTM) for m in self._ctx.recurrent):
            raise ValueError("the engine carries GRU/RNN states; LSTMs are not supported")
        # The GRUs through df_mps.gru's C kernel on the CPU where it builds, else torch's.
        from . import gru

        self.use_recurrence(gru.recurrence(self.device.type, self._ctx.recurrent))

    @property
    def recurrent(self) -> list:
        """The network's recurrent modules (DFN3: three ``nn.GRU``)."""
        return self._ctx.recurrent

    @property
    def recurrence(self) -> Optional[Callable]:
        """What runs the recurrent modules in a step: None for their own forward."""
        return self._ctx.recurrence

    def use_recurrence(self, forward: Optional[Callable]) -> None:
        """Run every recurrent module as ``forward(module, x, h0) -> (output, state)`` in
        the steps (``df_mps.gru.gru_forward``), or by its own forward again (None)."""
        self._ctx.recurrence = forward

    def _stack_states(self, states: Sequence[Optional[tuple]]):
        import torch

        h0, history = [], []
        for index, ((layers, hidden), (out,), batch_first, dtype) in enumerate(self._shapes):
            hs, hist = [], []
            for state in states:
                if state is None:
                    hs.append(torch.zeros((layers, 1, hidden), device=self.device, dtype=dtype))
                    shape = (1, self.left, out) if batch_first else (self.left, 1, out)
                    hist.append(torch.zeros(shape, device=self.device, dtype=dtype))
                else:
                    hs.append(state[0][index])
                    hist.append(state[1][index])
            h0.append(torch.cat(hs, dim=1))
            history.append(torch.cat(hist, dim=0 if batch_first else 1))
        return h0, history

    def step(self, spec, erb_feat, spec_feat, fresh: Sequence[bool], states, piece=None):
        """spec [R, 1, W, F, 2], erb_feat [R, 1, W, E], spec_feat [R, 1, W, Fdf, 2] on the
        model's device, W = left + piece + right (``piece`` defaults to ``self.piece``; a
        shorter one only where every row is on its stream's last piece). Returns (enhanced
        spec [R, piece, F, 2], lsnr [R, piece], new states)."""
        piece = int(piece or self.piece)
        rows = spec.shape[0]
        mask = self.start_mask(fresh, piece) if any(fresh) else None
        h0, history = self._stack_states(states)
        enhanced, lsnr, new_h, new_history = self.forward_stacked(
            spec, erb_feat, spec_feat, h0, history, mask, piece
        )
        return enhanced, lsnr, self.split_states(new_h, new_history, rows)

    # The step in parts, for df_mps.graphs (a captured step has static inputs and outputs).
    def start_mask(self, fresh: Sequence[bool], piece: int):
        """[rows, window] float32: 0 on the left context of rows at a stream's start, else 1."""
        import torch

        valid = torch.ones((len(fresh), self.left + piece + self.right), device=self.device)
        for r, is_fresh in enumerate(fresh):
            if is_fresh:
                valid[r, : self.left] = 0.0
        return valid

    def stack_states(self, states: Sequence[Optional[tuple]]):
        """Rows' states stacked per recurrent module: (h0 list, history list)."""
        return self._stack_states(states)

    def forward_stacked(self, spec, erb_feat, spec_feat, h0, history, mask, piece: int):
        """One forward on stacked inputs: (enhanced [R, piece, F, 2], lsnr [R, piece], new
        hidden states, new histories), one entry per recurrent module in the lists."""
        import torch

        ctx = self._ctx
        with self._lock, torch.no_grad(), exact_fp32(self.device):
            with ctx.active(h0, history, mask, piece):
                out = self.model(spec, erb_feat, spec_feat)
                new_h, new_history = list(ctx.new_h), list(ctx.new_history)
        keep = slice(self.left, self.left + piece)
        enhanced = out[0][:, 0, keep]
        lsnr = out[2][:, keep, 0] if out[2].ndim == 3 else out[2][:, keep]
        return enhanced, lsnr, new_h, new_history

    def split_states(self, new_h, new_history, rows: int) -> List[tuple]:
        """Per-row states from stacked ones."""
        out = []
        for r in range(rows):
            hs = [h[:, r : r + 1] for h in new_h]
            hist = []
            for h, (_, _, batch_first, _) in zip(new_history, self._shapes):
                if h is None:
                    hist.append(None)
                else:
                    hist.append(h[r : r + 1] if batch_first else h[:, r : r + 1])
            out.append((hs, hist))
        return out

    def warm_up(self, rows: int, freq_bins: int, erb_bands: int, df_bins: int) -> None:
        """One step on zeros for ``rows`` rows at the full piece and at the shortest last
        piece: the device's first-use costs (kernel plans, allocator growth) are paid here,
        once, not by the first files."""
        warm_up_steps(self.step, self, rows, freq_bins, erb_bands, df_bins)


def warm_up_steps(step, batched, rows, freq_bins, erb_bands, df_bins) -> None:
    """``step`` (``batched.step`` or a stand-in for it, df_mps.graphs) on zeros for ``rows``
    fresh rows at ``batched``'s full piece and at the shortest last piece (the smallest
    bucket, the fixed shape's other shape), then a wait for the device."""
    import torch

    pieces = (batched.piece, batched.tail)
    for piece in dict.fromkeys(pieces):
        window = batched.left + piece + batched.right
        zeros = dict(device=batched.device, dtype=batched.dtype)
        step(
            torch.zeros((rows, 1, window, freq_bins, 2), **zeros),
            torch.zeros((rows, 1, window, erb_bands), **zeros),
            torch.zeros((rows, 1, window, df_bins, 2), **zeros),
            [True] * rows,
            [None] * rows,
            piece,
        )
    if batched.device.type == "cuda":
        torch.cuda.synchronize(batched.device)


def nonfinite_reason(data: np.ndarray, start: int, rate: int) -> Optional[str]:
    """Why samples [n, channels] that follow ``start`` frames of a stream at ``rate`` Hz can't
    be enhanced (the time of the first frame with NaN or Inf), or None where all are finite."""
    if not data.shape[0] or np.isfinite(data).all():
        return None
    first = start + int(np.argmin(np.isfinite(data).all(axis=1)))
    return f"contains NaN or Inf sample(s) (first at {first / rate:.2f} s)"


# -- a job in flight ------------------------------------------------------------------------
class _Active:
    """A job whose lanes are in the engine: its source and sink, DSP state and buffers."""

    def __init__(self, engine: Engine, job: Job, source: Source, sink: Sink):
        import torch

        from .streaming import StreamResampler

        self.engine, self.job, self.source, self.sink = engine, job, source, sink
        self.rate, self.channels = int(source.sample_rate), int(source.channels)
        if self.rate <= 0 or self.channels <= 0:
            raise JobError(f"invalid stream: {self.rate} Hz, {self.channels} channel(s)")
        spec = engine.df_spec
        # Our own DFs (torch, a streaming state per channel, on the model's device): libdf's
        # DF shares one state between channels, and the caller's df_state stays untouched.
        self.analysis = engine.new_dsp()
        self.synthesis = engine.new_dsp()
        self.to_model = StreamResampler(self.rate, spec.sr)
        self.from_model = StreamResampler(spec.sr, self.rate)
        self.block = max(1, round(engine.piece_frames * spec.hop * self.rate / spec.sr))
        # The first read also covers the first piece's right context (and the resampler's
        # delay): a piece needs ``piece + right`` frames, so a read of one piece's samples
        # would leave every job one read short of its first step.
        extra = engine.first_read_frames - engine.piece_frames
        extra += 0 if self.to_model.identity else 2 * engine.piece_frames // 16
        self.first_block = self.block + max(1, round(extra * spec.hop * self.rate / spec.sr))
        self.remainder = torch.zeros((self.channels, 0))
        self.features: Optional[Tuple] = None  # frames from self.base on, on the device
        self.base = 0
        self.frames = 0  # frames analysed
        self.done = 0  # frames enhanced
        self.ended = False  # all input read and analysed (with upstream's end padding)
        self.frames_in = 0  # input frames at the input rate
        self.frames_out = 0
        self.samples_model_in = 0  # samples at the model rate
        self.samples_model_out = 0
        self.skip = spec.fft - spec.hop if engine.pad else 0
        self.states: List[Optional[tuple]] = [None] * self.channels
        self.pending_lanes: List[int] = []  # lanes still to run the current piece
        self.piece_out: List[Optional[object]] = [None] * self.channels
        self.reading: Optional[cf.Future] = None
        self.unanalysed: Optional[tuple] = None  # (signal, last) read, not yet analysed
        self.writes: Deque[Callable[[], None]] = collections.deque()
        self.writing: Optional[cf.Future] = None
        self.write_lock = threading.Lock()
        self.seconds = 0.0
        self.failed: Optional[str] = None
        self.exception: Optional[BaseException] = None
        self.committed = False
        self.finish_queued = False
        self.finished: Optional[cf.Future] = None

    # -- reading (I/O thread) --
    def read_block(self):
        """Read the next block and ``ingest`` it (I/O thread); analyse it there too where the
        engine says so. Returns (whole-hop signal or features, last, analysed)."""
        wanted = self.first_block if self.frames_in == 0 else self.block
        data = self.source.read(wanted)
        samples, last = self.ingest(data, last=data.shape[0] < wanted)
        signal = self.whole_hops(samples)
        if self.engine.dsp_in_io:
            t0 = time.perf_counter()
            features = self.features_of(signal)
            self.seconds += time.perf_counter() - t0
            return features, last, True
        if signal is not None:
            # Pinned and on its way to the device from here: the scheduling thread then stacks
            # device tensors (a batch of 10 s pieces is 120 MB to copy twice on the host).
            signal = _to_device(signal, self.engine.model.device)
        return signal, last, False

    def ingest(self, data: np.ndarray, last: bool):
        """Check and resample input samples [n, channels]; returns (samples at the model's
        rate, with upstream's end padding after the last block, last)."""
        import torch

        t0 = time.perf_counter()
        bad = nonfinite_reason(data, self.frames_in, self.rate)
        if bad is not None:
            raise BadSamples(bad)
        n = int(data.shape[0])
        x = torch.from_numpy(np.ascontiguousarray(data.T))
        parts = [self.to_model.process(x)] if n else []
        if last and not self.to_model.identity:
            rest = self.to_model.finish()
            if rest is not None:
                parts.append(rest)
        self.frames_in += n
        if last and self.frames_in == 0:
            raise BadSamples("has no audio samples")
        y = torch.cat(parts, dim=-1) if parts else torch.zeros((self.channels, 0))
        self.samples_model_in += y.shape[-1]
        if last and self.engine.pad:
            # Upstream pads the audio with fft_size zeros at the end.
            y = torch.cat([y, torch.zeros((self.channels, self.engine.df_spec.fft))], dim=-1)
        self.seconds += time.perf_counter() - t0
        return y, last

    def whole_hops(self, x):
        """The whole hops of the carried remainder and ``x`` [C, n] (CPU), or None; the rest
        is carried to the next call."""
        import torch

        x = torch.cat([self.remainder, x.to(torch.float32)], dim=-1)
        hop = self.engine.df_spec.hop
        whole = (x.shape[-1] // hop) * hop
        self.remainder = x[..., whole:].clone()
        return x[..., :whole] if whole else None

    def features_of(self, signal):
        """The model's features of a whole-hop signal [C, n], on the model's device."""
        if signal is None:
            return None
        signal = _to_device(signal, self.engine.model.device)
        engine = self.engine
        return self._by_groups(
            self.analysis,
            signal,
            lambda dsp, x: dsp.features(x, engine.nb_df, alpha=engine.alpha, reset=False),
        )

    def _by_groups(self, df, x, run):
        """``run(df, x)``, in groups of ``batch`` channels where the job is wider than the
        batch: the DSP's intermediates then stay those of ``batch`` channels, whatever the
        channel count (each group on a scratch DF holding its rows of ``df``'s state)."""
        import torch

        engine = self.engine
        group = engine.batch
        if self.channels <= group:
            return run(df, x)
        device = engine.model.device
        state = df.stream_state(self.channels, engine.nb_df, device)
        outputs, states = [], []
        for lo in range(0, self.channels, group):
            scratch = engine.new_dsp()
            scratch.set_stream_state({k: v[lo : lo + group] for k, v in state.items()})
            outputs.append(run(scratch, x[lo : lo + group]))
            rows = min(group, self.channels - lo)
            states.append(scratch.stream_state(rows, engine.nb_df, device))
        df.set_stream_state({k: torch.cat([st[k] for st in states]) for k in state})
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outputs))
        return torch.cat(outputs)

    def analyse(self, x):
        """Features (on the model's device) for model-rate samples [C, n], or None."""
        return self.features_of(self.whole_hops(x))

    def take_block(self) -> None:
        """A finished read: its features appended, or its signal left for ``analyse_many``
        (scheduling thread)."""
        payload, last, analysed = self.reading.result()
        self.reading = None
        if analysed:
            self.add_features(payload, last)
        else:
            self.unanalysed = (payload, last)

    def add_features(self, features, last: bool) -> None:
        import torch

        if features is not None:
            if self.features is None:
                self.features = features
            else:
                self.features = tuple(
                    torch.cat([old, new], dim=2) for old, new in zip(self.features, features)
                )
            self.frames += features[0].shape[2]
        self.ended = last

    # -- scheduling (scheduling thread) --
    def needs_input(self) -> bool:
        """Keep about one piece beyond the next one analysed, so the device never waits for a
        read; a job wider than the batch keeps just the next one (its features, a few MB a
        channel, would otherwise grow with the channel count)."""
        if self.ended or self.reading is not None or self.unanalysed is not None:
            return False
        engine = self.engine
        ahead = engine.piece_frames if self.channels <= engine.batch else 0
        return self.frames - self.done < engine.piece_frames + engine.right + ahead

    def piece_ready(self) -> bool:
        engine = self.engine
        if self.pending_lanes:
            return True
        if self.finish_queued or self.done >= self.frames and self.ended:
            return False
        if self.frames - self.done >= engine.piece_frames + engine.right:
            return True
        return self.ended and self.done < self.frames

    def start_piece(self) -> None:
        if not self.pending_lanes:
            self.pending_lanes = list(range(self.channels))
            self.piece_out = [None] * self.channels

    def piece_frames(self) -> int:
        """Frames the next piece keeps: a full piece, or what is left of an ended stream."""
        remaining = self.frames - self.done
        if self.ended and remaining <= self.engine.piece_frames:
            return remaining
        return self.engine.piece_frames

    def window(self, lane: int, piece: int):
        """The lane's (spec, erb_feat, spec_feat) over [done - left, done + piece + right),
        zero outside the analysed frames."""
        import torch

        engine = self.engine
        lo = self.done - engine.left
        hi = lo + engine.left + piece + engine.right
        out = []
        for f in self.features:
            row = f[lane : lane + 1]
            a, b = max(lo, self.base), min(hi, self.frames)
            part = row[:, :, a - self.base : b - self.base]
            before, after = a - lo, hi - b
            if before or after:
                shape = list(part.shape)
                pieces = []
                if before:
                    shape[2] = before
                    pieces.append(part.new_zeros(shape))
                pieces.append(part)
                if after:
                    shape[2] = after
                    pieces.append(part.new_zeros(shape))
                part = torch.cat(pieces, dim=2)
            out.append(part)
        return out

    def fresh(self) -> bool:
        return self.done == 0

    def lane_done(self, lane: int, enhanced, state) -> None:
        self.states[lane] = state
        self.piece_out[lane] = enhanced
        self.pending_lanes.remove(lane)
        if not self.pending_lanes:
            self._piece_done()

    def _piece_done(self) -> None:
        import torch

        engine = self.engine
        keep = min(engine.piece_frames, self.frames - self.done)
        enhanced = torch.cat(self.piece_out, dim=0)[:, :keep]
        if engine.lim is not None:
            lo = self.done - self.base
            spec = self.features[0][:, 0, lo : lo + keep]
            enhanced = spec * engine.lim + enhanced * (1 - engine.lim)
        self.piece_out = [None] * self.channels
        self.done += keep
        # Keep the frames the next piece needs as its left context.
        drop = max(0, self.done - engine.left - self.base)
        if drop:
            self.features = tuple(f[:, :, drop:] for f in self.features)
            self.base += drop
        final = self.ended and self.done >= self.frames
        if final:
            self.finish_queued = True
        if engine.dsp_in_io:
            self.queue_write(lambda spec=enhanced: self._synthesise(spec, final=final))
            if final:
                self.queue_write(self._commit)
        else:
            # Synthesised with the step's other jobs (``synthesise_many``, which queues the
            # commit after the last write), on this thread.
            engine.to_synthesise.append((self, enhanced, final))

    # -- writing (I/O thread, in order per job) --
    def queue_write(self, task: Callable[[], None]) -> None:
        if self.engine.write_pool is None:  # driven synchronously (``Engine.stream``)
            task()
            return
        with self.write_lock:
            self.writes.append(task)
            if self.writing is None:
                self.writing = self.engine.write_pool.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self.write_lock:
                if not self.writes or self.failed or self.engine.interrupted:
                    self.writes.clear()
                    self.writing = None
                    return
                task = self.writes.popleft()
            try:
                task()
            except Exception as exc:  # noqa: BLE001 - reported as the job's failure
                self.fail(exc)
            except BaseException as exc:  # an interruption: the scheduling thread re-raises it
                self.engine.interrupted = exc
                self.fail(exc)

    def _synthesise(self, spec, final: bool) -> None:
        t0 = time.perf_counter()
        samples = self._by_groups(
            self.synthesis, spec, lambda dsp, x: dsp.synthesis(x, reset=False)
        )
        samples = _finish_host_copy(_start_host_copy(samples))
        self._deliver(samples, final)
        self.seconds += time.perf_counter() - t0

    def _deliver(self, samples, final: bool) -> None:
        if self.skip:
            cut = min(self.skip, samples.shape[-1])
            samples = samples[..., cut:]
            self.skip -= cut
        self._emit(samples, final=final)

    def _emit(self, samples, final: bool = False) -> None:
        import torch

        # Upstream returns the input's length with delay compensation, whole hops without.
        if final:
            hop = self.engine.df_spec.hop
            target = (
                self.samples_model_in if self.engine.pad else (self.samples_model_in // hop) * hop
            )
        else:
            target = None
        if target is not None:
            room = max(0, target - self.samples_model_out)
            samples = samples[..., :room]
        self.samples_model_out += samples.shape[-1]
        y = self.from_model.process(samples)
        if final and not self.from_model.identity:
            tail = self.from_model.finish()
            if tail is not None:
                y = torch.cat([y, tail], dim=-1)
        room = self.frames_in - self.frames_out
        out = y[..., :room].T.numpy()
        if final and out.shape[0] < room:
            out = np.concatenate([out, np.zeros((room - out.shape[0], self.channels), np.float32)])
        self.frames_out += out.shape[0]
        if out.shape[0]:
            self.sink.write(np.ascontiguousarray(out, dtype=np.float32))

    def _commit(self) -> None:
        self.sink.commit()
        self.committed = True

    def fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = _describe(exc)
            self.exception = exc

    def is_done(self) -> bool:
        """Committed or failed, with no I/O left in flight."""
        if self.reading is not None and not self.reading.done():
            return False
        with self.write_lock:
            idle = self.writing is None
        return idle and (self.committed or self.failed is not None)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.source.close()
        if not self.committed:
            with contextlib.suppress(Exception):
                self.sink.abort()


def _to_device(x, device):
    if x.device == device:
        return x
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def analyse_many(engine: Engine, items: List[_Active]) -> None:
    """Analyse the read signals of ``items`` in as few ``features`` calls as their lengths
    allow: the jobs' DSP states stacked along the channel dim, one call, split back. Off the
    CPU each call has one of a few shapes (``Engine.dsp_rows``, ``Engine.dsp_length``)."""
    import torch

    groups: Dict[int, List[Tuple[_Active, int]]] = collections.defaultdict(list)
    hop = engine.df_spec.hop
    for item in items:
        signal, last = item.unanalysed
        if signal is None:
            item.unanalysed = None
            item.add_features(None, last)
            continue
        length = signal.shape[-1]
        if last:
            # A last read's length is its file's own: padded with zeros to a common one (its
            # frames past the end are dropped; nothing after it uses its DSP state).
            length = engine.dsp_length(length)
        groups[length].append((item, signal.shape[-1] // hop))
    device = engine.model.device
    for length, group in groups.items():
        t0 = time.perf_counter()
        items_ = [item for item, _ in group]
        rows = sum(item.channels for item in items_)
        spare = engine.dsp_rows(rows) - rows
        signals = torch.cat([_pad_to(item.unanalysed[0], length, -1) for item in items_])
        signals = _pad_to(signals, rows + spare, 0)
        dsp = _stacked(engine, items_, "analysis", spare)
        features = dsp.features(
            _to_device(signals, device), engine.nb_df, alpha=engine.alpha, reset=False
        )
        parts = _unstack(engine, items_, dsp, "analysis")
        share = (time.perf_counter() - t0) / len(group)
        for (item, lo, hi), (_, frames) in zip(parts, group):
            _, last = item.unanalysed
            item.unanalysed = None
            item.add_features(tuple(f[lo:hi, :, :frames] for f in features), last)
            item.seconds += share


def _pad_to(x, size: int, dim: int):
    """``x`` with zeros after it along ``dim`` up to ``size`` (``x`` itself where it is that
    long): the padding of the stacked DSP's rows, last reads and last pieces."""
    import torch

    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    pad = [0, 0] * (x.ndim - dim % x.ndim)
    pad[-1] = extra  # F.pad's pairs run from the last dim backwards
    return torch.nn.functional.pad(x, pad)


def synthesise_many(engine: Engine) -> None:
    """Synthesise the pieces the last step finished, one ``synthesis`` call per length (off
    the CPU, of a few shapes: a last piece is padded to the step's full or short length, its
    samples past the end dropped by ``_emit``); the copy to the host is waited for in each
    job's writer."""
    import torch

    groups: Dict[int, list] = collections.defaultdict(list)
    for entry in engine.to_synthesise:
        frames = entry[1].shape[1]
        if entry[2] and engine.fixed_shape:  # a final piece: the step's shape it ran at
            frames = engine.fixed_step_frames(frames)
        groups[frames].append(entry)
    engine.to_synthesise = []
    for frames, group in groups.items():
        t0 = time.perf_counter()
        items = [item for item, _, _ in group]
        rows = sum(item.channels for item in items)
        spare = engine.dsp_rows(rows) - rows
        specs = torch.cat([_pad_to(spec, frames, 1) for _, spec, _ in group])
        dsp = _stacked(engine, items, "synthesis", spare)
        samples = dsp.synthesis(_pad_to(specs, rows + spare, 0), reset=False)
        copy = _start_host_copy(samples)
        parts = _unstack(engine, items, dsp, "synthesis")
        share = (time.perf_counter() - t0) / len(group)
        for (item, _, final), (_, lo, hi) in zip(group, parts):
            item.seconds += share
            item.queue_write(
                lambda item=item, lo=lo, hi=hi, final=final, copy=copy: item._deliver(
                    _finish_host_copy(copy)[lo:hi], final
                )
            )
            if final:
                item.queue_write(item._commit)


def _stacked(engine: Engine, items: List[_Active], which: str, spare: int = 0):
    """A scratch DF carrying the stacked ``which`` ("analysis" or "synthesis") states, and
    a stream's initial state for ``spare`` more rows (padding to a common shape)."""
    import torch

    device = engine.model.device
    states = [
        getattr(item, which).stream_state(item.channels, engine.nb_df, device) for item in items
    ]
    if spare:
        states.append(engine.initial_dsp_state(spare))
    dsp = engine.new_dsp()
    dsp.set_stream_state({k: torch.cat([st[k] for st in states], dim=0) for k in states[0]})
    return dsp


def _unstack(engine: Engine, items: List[_Active], dsp, which: str):
    """Hand each item its rows of the scratch DF's state; yields (item, first row, end)."""
    state = dsp.stream_state(
        sum(item.channels for item in items), engine.nb_df, engine.model.device
    )
    parts, lo = [], 0
    for item in items:
        hi = lo + item.channels
        getattr(item, which).set_stream_state({k: v[lo:hi] for k, v in state.items()})
        parts.append((item, lo, hi))
        lo = hi
    return parts


def _warm_pinned_memory(floats: int, blocks: int = 5) -> None:
    """Allocate and free ``blocks`` pinned buffers of ``floats`` float32s: torch's pinned
    (host) allocator keeps freed blocks for reuse, and a step's copies (a batch of read
    signals to the device, a batch of synthesised pieces back) then take cached blocks
    instead of calling cudaHostAlloc, which took about 15 ms for each block of 128 MB on the
    H200 and waited in the scheduling thread. Five: about two steps' copies in flight each
    way, while the writes of a step's pieces keep its host buffer."""
    import torch

    held = [torch.empty(floats, dtype=torch.float32, pin_memory=True) for _ in range(blocks)]
    del held


def _start_host_copy(x):
    """Start copying ``x`` to the CPU: from CUDA into pinned memory, asynchronously."""
    import torch

    if x.device.type != "cuda":
        return x.to("cpu"), None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _finish_host_copy(copy):
    """The host tensor of ``_start_host_copy``, once its copy (only) is complete."""
    host, done = copy
    if done is not None:
        done.synchronize()
    return host


def _describe(exc: BaseException) -> str:
    """One line for the user: a job's own errors as they are, anything else with its type."""
    from .audio import AudioFileError

    text = " ".join(str(exc).split())
    if isinstance(exc, (JobError, AudioFileError)):
        return text or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        where = f"'{exc.filename}': " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclasses.dataclass(frozen=True)
class DfSpec:
    sr: int
    fft: int
    hop: int
    nb: int
    erb_widths: np.ndarray


class Engine:
    """Runs jobs through one model, ``batch`` rows per forward."""

    def __init__(
        self,
        model,
        df_state,
        *,
        batch: int,
        piece_frames: int,
        pad: bool = True,
        atten_lim_db: Optional[float] = None,
        io_threads: Optional[int] = None,
        context: Optional[Tuple[int, int]] = None,
        dsp_in_io: Optional[bool] = None,
    ):
        from df.enhance import ModelParams
        from df.utils import get_norm_alpha

        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        self.batch = int(batch)
        self.model = BatchedModel(model, piece_frames=piece_frames, context=context)
        self.piece_frames = self.model.piece
        self.left, self.right, self.window = self.model.left, self.model.right, self.model.window
        self.df_spec = DfSpec(
            sr=int(df_state.sr()),
            fft=int(df_state.fft_size()),
            hop=int(df_state.hop_size()),
            nb=int(df_state.nb_erb()),
            erb_widths=np.asarray(df_state.erb_widths(), dtype=np.uint64),
        )
        params = ModelParams()
        self._min_nb_freqs = int(getattr(params, "min_nb_freqs", 1) or 1)
        probe = self.new_dsp()
        if not np.array_equal(np.asarray(probe.erb_widths()), self.df_spec.erb_widths):
            raise ValueError("df_mps.dsp's ERB bands differ from the model's df_state")
        nb_df = getattr(model, "nb_df", getattr(model, "df_bins", None))
        self.nb_df = int(nb_df if nb_df is not None else params.nb_df)
        self.alpha = get_norm_alpha(False)
        self.pad = pad
        self.lim = None
        if atten_lim_db is not None and abs(atten_lim_db) > 0:
            self.lim = 10 ** (-abs(atten_lim_db) / 20)
        # Threads per I/O pool, reads and writes (DF_MPS_ENGINE_IO_THREADS overrides). On the CPU
        # they share the cores with the step: 2-4. Off it the step leaves the cores free, and
        # a batch's files all start and end together (64 reads, 64 encodes and fsyncs): on the
        # H200's 16 cores, 8 threads gave 1.3x the audio-s/s of 4 (h200_session.sh profile).
        io_threads = io_threads or int(os.environ.get("DF_MPS_ENGINE_IO_THREADS") or 0)
        most = 4 if self.model.device.type == "cpu" else 8
        self.io_threads = io_threads or max(2, min(most, os.cpu_count() or 2))
        # Where the STFT analysis and synthesis run: on the CPU, in the I/O threads, beside
        # the step; on a GPU, on the scheduling thread, so that one thread launches all the
        # device's kernels (I/O threads launching kernels too contend for the GIL with the
        # step's thousands of launches).
        device_type = self.model.device.type
        if dsp_in_io is None:  # DF_MPS_ENGINE_DSP=io|step: either path on any device (tests)
            choice = os.environ.get("DF_MPS_ENGINE_DSP", "")
            dsp_in_io = choice == "io" if choice in ("io", "step") else device_type == "cpu"
        self.dsp_in_io = bool(dsp_in_io)
        self.to_synthesise: list = []  # (job, enhanced piece, final) for synthesise_many
        # Off the CPU every step has one shape (see _step); DF_MPS_ENGINE_FIXED=0|1 overrides.
        fixed = os.environ.get("DF_MPS_ENGINE_FIXED", "")
        self.fixed_shape = fixed == "1" if fixed in ("0", "1") else device_type != "cpu"
        self.tail_frames = self.model.tail  # the short shape (see _step)
        # Frames at the model's rate that a job's first read covers: its first piece, that
        # piece's right context and a few frames' margin (_Active.first_block, the warm-ups).
        self.first_read_frames = self.piece_frames + self.right + 4
        self._idle: Dict[tuple, list] = {}
        self._initial_states: Dict[int, dict] = {}  # rows -> a stream's initial DSP state
        self.timings = collections.Counter()  # seconds per phase of the step
        self.profile = os.environ.get("DF_MPS_ENGINE_PROFILE") == "1"
        # DF_MPS_ENGINE_TIMELINE=1: (start, end, rows, piece) per step, for a benchmark's
        # timeline (no device syncs added: a step's end is when its work is queued); on CUDA
        # also timing events recorded on the stream at those points (``device_timeline``).
        timeline = os.environ.get("DF_MPS_ENGINE_TIMELINE") == "1"
        self.step_log: Optional[List[Tuple[float, float, int, int]]] = [] if timeline else None
        self._step_events: List[tuple] = []
        # Reads and writes in pools of their own: a write first waits for its step's copy
        # off the device, and reads queued behind a step's writes would hold up the next
        # step (measured on the H200: about 120 ms between steps, whatever the piece length).
        self.pool: Optional[cf.ThreadPoolExecutor] = None  # reads
        self.write_pool: Optional[cf.ThreadPoolExecutor] = None
        self.interrupted: Optional[BaseException] = None  # raised in an I/O thread
        self.steps = 0
        self.step_seconds = 0.0
        self.rows_run = 0

    def fixed_step_frames(self, frames: int) -> int:
        """Off the CPU, the frames a step of pieces at most ``frames`` long runs at: the short
        shape where they fit it, else the full piece (see ``_step``)."""
        return self.tail_frames if frames <= self.tail_frames else self.piece_frames

    # -- the stacked DSP's shapes --
    def dsp_rows(self, rows: int) -> int:
        """Rows a stacked analysis or synthesis of ``rows`` rows runs at: off the CPU the next
        power of two up to the batch, the spare rows on a stream's initial state. cuFFT
        builds a plan per shape, each on the scheduling thread: on the H200 the analyses of
        reads arriving in groups of every size took 0.2 s of a 0.7 s corpus run."""
        if not self.fixed_shape or rows >= self.batch:
            return rows
        return min(self.batch, 1 << max(rows - 1, 0).bit_length())

    def dsp_length(self, samples: int) -> int:
        """Samples a job's last read is analysed at (zeros after its end): the shortest
        regular read length that holds it, off the CPU."""
        if self.fixed_shape:
            for frames in (self.piece_frames, self.first_read_frames):
                if samples <= frames * self.df_spec.hop:
                    return frames * self.df_spec.hop
        return samples

    def initial_dsp_state(self, rows: int):
        """A stream's initial DSP state for ``rows`` rows on the device (cached: padding)."""
        if rows not in self._initial_states:
            state = self.new_dsp().stream_state(rows, self.nb_df, self.model.device)
            self._initial_states[rows] = state
        return self._initial_states[rows]

    def _idle_rows(self, rows: int, piece: int, like):
        """Zero windows for ``rows`` idle rows (kept: the same tensors every step)."""
        key = (rows, piece)
        if key not in self._idle:
            self._idle[key] = [part.new_zeros((rows, *part.shape[1:])) for part in like]
        return self._idle[key]

    def warm_up(self) -> None:
        """Pay the device's first-use costs for this engine's batch (see BatchedModel), and
        on CUDA fill the pinned-memory cache with blocks the size of a step's copies."""
        key = (self.batch, self.piece_frames)
        warmed = _WARMED.setdefault(self.model.model, set())
        if key not in warmed:
            spec = self.df_spec
            self.model.warm_up(self.batch, spec.fft // 2 + 1, spec.nb, self.nb_df)
            if self.model.device.type == "cuda":
                _warm_pinned_memory(self.batch * self.first_read_frames * spec.hop)
                # And a mono read's block for each job twice over: a read's pinned block is
                # free again only once its copy, queued behind the running step, is done
                # (allocating them took the I/O threads 0.2 s of a 0.7 s corpus run).
                _warm_pinned_memory(self.first_read_frames * spec.hop, blocks=2 * self.batch)
            if not self.dsp_in_io:
                self._warm_up_dsp()
            warmed.add(key)

    def _warm_up_dsp(self) -> None:
        """The stacked analysis and synthesis (``analyse_many``, ``synthesise_many``) once on
        zeros at each of their shapes (``dsp_rows`` x ``dsp_length``): FFT plans (cuFFT builds
        one per shape) and the features' constants are made here, not between the steps of
        real audio."""
        import torch

        spec, device = self.df_spec, self.model.device
        dsp = self.new_dsp()
        buckets = sorted({self.dsp_rows(rows) for rows in range(1, self.batch + 1)})
        for rows in buckets:
            for frames in (self.first_read_frames, self.piece_frames):
                dsp.features(
                    torch.zeros((rows, frames * spec.hop), device=device),
                    self.nb_df,
                    alpha=self.alpha,
                    reset=True,
                )
            for frames in (self.piece_frames, self.tail_frames):
                dsp.synthesis(
                    torch.zeros((rows, frames, spec.fft // 2 + 1, 2), device=device),
                    reset=True,
                )
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def new_dsp(self):
        from . import dsp

        spec = self.df_spec
        return dsp.DF(
            sr=spec.sr,
            fft_size=spec.fft,
            hop_size=spec.hop,
            nb_bands=spec.nb,
            min_nb_erb_freqs=self._min_nb_freqs,
        )

    # -- one stream, pushed block by block, no threads --
    def stream(self, sample_rate: int, channels: int) -> PushStream:
        """A stream whose blocks the caller pushes (``df_mps.streaming.StreamEnhancer``)."""
        return PushStream(self, sample_rate, channels)

    # -- the loop --
    def run(self, jobs: Iterable[Job], progress: Optional[Callable[[float], None]] = None):
        """Yield a ``Result`` per job as each finishes (completion order). ``progress`` is
        called with seconds of input audio whose pieces were enhanced."""
        pending = iter(jobs)
        active: List[_Active] = []
        waiting: Optional[_Active] = None  # opened, waiting for enough free rows
        exhausted = False
        self.pool = cf.ThreadPoolExecutor(self.io_threads, thread_name_prefix="df-mps-read")
        self.write_pool = cf.ThreadPoolExecutor(self.io_threads, thread_name_prefix="df-mps-write")
        try:
            while True:
                # Refill free rows with new jobs (continuous batching). A job wider than the
                # batch runs alone, its channels taking turns.
                while self._free_rows(active) > 0:
                    if waiting is None:
                        job = None if exhausted else next(pending, None)
                        if job is None:
                            exhausted = True
                            break
                        started = self._start(job)
                        if isinstance(started, Result):
                            yield started
                            continue
                        waiting = started
                    if active and waiting.channels > self._free_rows(active):
                        break
                    active.append(waiting)
                    waiting = None
                if self.interrupted is not None:
                    raise self.interrupted
                # Finished jobs out, failed jobs cleaned up.
                for item in list(active):
                    if (item.failed is not None or item.committed) and item.is_done():
                        active.remove(item)
                        item.close()
                        yield self._result(item)
                if not active:
                    if exhausted and waiting is None:
                        return
                    continue
                # Reads: one block ahead per job.
                for item in active:
                    if item.failed is None and item.reading is not None and item.reading.done():
                        try:
                            item.take_block()
                        except Exception as exc:  # noqa: BLE001 - this job's failure
                            item.fail(exc)
                    if item.failed is None and item.needs_input():
                        item.reading = self.pool.submit(item.read_block)
                unanalysed = [i for i in active if i.unanalysed is not None and i.failed is None]
                if unanalysed:
                    analyse_many(self, unanalysed)
                rows = self._pick_rows(active)
                if rows and (len(rows) >= self._wanted_rows(active) or not self._coming(active)):
                    self._step(rows, progress)
                else:
                    # Fuller batches first: lanes whose next piece is being read or analysed
                    # join this step (off the CPU a step costs the same whatever its rows).
                    self._wait(active)
        finally:
            if waiting is not None:
                active.append(waiting)
            for item in active:
                item.failed = item.failed or "interrupted"
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.write_pool.shutdown(wait=True, cancel_futures=True)
            for item in active:
                item.close()
            self.pool = self.write_pool = None

    def device_timeline(self) -> List[Tuple[float, float]]:
        """With DF_MPS_ENGINE_TIMELINE on CUDA: per step, when the device reached its start and
        its end, in ``time.perf_counter`` seconds (the first step's start taken as reached
        when it was queued). Waits for the device."""
        import torch

        if not self._step_events:
            return []
        torch.cuda.synchronize(self.model.device)
        anchor_cpu, anchor, _ = self._step_events[0]
        return [
            (
                anchor_cpu + anchor.elapsed_time(started) / 1000,
                anchor_cpu + anchor.elapsed_time(ended) / 1000,
            )
            for _, started, ended in self._step_events
        ]

    def _free_rows(self, active: List[_Active]) -> int:
        return self.batch - sum(item.channels for item in active)

    def _start(self, job: Job):
        try:
            source, sink = job.open()
        except BaseException as exc:  # noqa: BLE001 - one bad job never stops the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            return Result(job, 0, 0, 0, 0.0, error=_describe(exc), exception=exc)
        try:
            return _Active(self, job, source, sink)
        except BaseException as exc:  # noqa: BLE001
            with contextlib.suppress(Exception):
                sink.abort()
            if isinstance(exc, KeyboardInterrupt):
                raise
            return Result(job, 0, 0, 0, 0.0, error=_describe(exc), exception=exc)

    def _result(self, item: _Active) -> Result:
        return Result(
            item.job,
            frames=item.frames_in,
            sample_rate=item.rate,
            channels=item.channels,
            model_seconds=item.seconds,
            error=item.failed,
            exception=item.exception,
        )

    def _pick_rows(self, active: List[_Active]) -> List[Tuple[_Active, int]]:
        rows: List[Tuple[_Active, int]] = []
        for item in active:
            if item.failed is not None or item.features is None or not item.piece_ready():
                continue
            item.start_piece()
            for lane in item.pending_lanes:
                if len(rows) >= self.batch:
                    return rows
                rows.append((item, lane))
        return rows

    def _phase(self, name: str, since: float) -> float:
        """Add the time since ``since`` to phase ``name`` (after the device's queued work, where
        DF_MPS_ENGINE_PROFILE=1 asks for exact phase times); returns now."""
        if self.profile and self.model.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[name] += now - since
        return now

    def _wanted_rows(self, active: List[_Active]) -> int:
        """Rows that could step now or once their read is in: lanes of running jobs."""
        lanes = sum(
            item.channels
            for item in active
            if item.failed is None and not item.finish_queued and not item.committed
        )
        return min(self.batch, lanes)

    @staticmethod
    def _coming(active: List[_Active]) -> bool:
        """Whether a running job's next piece is on its way: its input is still being read
        or analysed (a read that just finished counts until its piece is analysed, or the
        step would leave that job's rows out and run part-empty)."""
        return any(
            not item.ended and not item.piece_ready()
            for item in active
            if item.failed is None and not item.finish_queued
        )

    def _wait(self, active: List[_Active]) -> None:
        futures = [item.reading for item in active if item.reading is not None]
        futures += [item.writing for item in active if item.writing is not None]
        if futures:
            cf.wait(futures, timeout=0.5, return_when=cf.FIRST_COMPLETED)
        else:
            time.sleep(0.001)

    def _step(self, rows: List[Tuple[_Active, int]], progress) -> None:
        import torch

        t0 = time.perf_counter()
        timed = self.step_log is not None and self.model.device.type == "cuda"
        if timed:
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        if self.fixed_shape:
            # Two shapes, ever, both made at the warm-up: ``batch`` rows of a full piece, idle
            # rows on zeros, or of the shortest bucket where every row is on a last piece that
            # short. A GPU builds kernel plans (cuDNN, MPSGraph) per input shape, at up to
            # 150 ms of CPU a convolution on an H200: a new shape costs seconds, an idle row
            # almost nothing. The short shape is for the ends of files in step with each other
            # (equal lengths): upstream's end padding leaves a 2-frame piece after a length
            # that is a whole number of pieces, which the full shape would run as a full step.
            piece = self.fixed_step_frames(max(item.piece_frames() for item, _ in rows))
        else:
            # The CPU pays per frame and row: the full piece, unless every row is on its
            # stream's last, shorter piece (a few bucketed lengths).
            piece = _bucket(max(item.piece_frames() for item, _ in rows), self.piece_frames)
        windows = [item.window(lane, piece) for item, lane in rows]
        fresh = [item.fresh() for item, _ in rows]
        states = [item.states[lane] for item, lane in rows]
        idle = self.batch - len(rows) if self.fixed_shape else 0
        if idle > 0:
            windows.append(self._idle_rows(idle, piece, windows[0]))
            fresh += [True] * idle
            states += [None] * idle
        spec, erb_feat, spec_feat = (torch.cat(parts, dim=0) for parts in zip(*windows))
        t1 = self._phase("windows", t0)
        enhanced, _lsnr, new_states = self.model.step(
            spec.to(self.model.device, self.model.dtype),
            erb_feat.to(self.model.device, self.model.dtype),
            spec_feat.to(self.model.device, self.model.dtype),
            fresh,
            states,
            piece,
        )
        enhanced = enhanced.float()
        t2 = self._phase("forward", t1)
        share = (t2 - t0) / len(rows)
        audio = 0.0
        for r, (item, lane) in enumerate(rows):
            item.seconds += share
            before = item.done
            item.lane_done(lane, enhanced[r : r + 1], new_states[r])
            if item.done != before:
                audio += (item.done - before) * self.df_spec.hop / self.df_spec.sr
        if self.to_synthesise:
            synthesise_many(self)
        self._phase("after", t2)
        t3 = time.perf_counter()
        seconds = t3 - t0
        if self.step_log is not None:
            self.step_log.append((t0, t3, len(rows), piece))
            if timed:
                ended = torch.cuda.Event(enable_timing=True)
                ended.record()
                self._step_events.append((t0, started, ended))
        self.steps += 1
        self.rows_run += len(rows)
        self.step_seconds += seconds
        if progress is not None and audio:
            progress(audio)


_WARMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> warmed shapes


def _bucket(frames: int, full: int) -> int:
    """``frames`` rounded up to a power of two (at least 16), at most ``full``."""
    return min(full, max(16, 1 << max(0, int(frames) - 1).bit_length()))


class _PushSource(Source):
    def __init__(self, sample_rate: int, channels: int):
        self.sample_rate, self.channels = int(sample_rate), int(channels)


class PushStream:
    """One job driven by its caller: ``push(block)`` returns the enhanced samples that are
    complete, ``finish()`` the rest; the steps run on the caller's thread, ``channels`` rows
    per forward."""

    def __init__(self, engine: Engine, sample_rate: int, channels: int):
        self.engine = engine
        self.sink = ArraySink()
        self.item = _Active(engine, Job(open=None), _PushSource(sample_rate, channels), self.sink)

    def push(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        item = self.item
        samples, last = item.ingest(block, last)
        item.add_features(item.analyse(samples), last)
        while True:
            rows = self.engine._pick_rows([item])
            if not rows:
                break
            self.engine._step(rows, None)
        parts, self.sink.parts = self.sink.parts, []
        if not parts:
            return np.zeros((0, item.channels), np.float32)
        return np.concatenate(parts)

    def finish(self) -> np.ndarray:
        return self.push(np.zeros((0, self.item.channels), np.float32), last=True)

    @property
    def seconds(self) -> float:
        return self.item.seconds
