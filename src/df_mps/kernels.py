"""Real-valued twins of DeepFilterNet's complex math: plain torch functions, no complex dtypes.

Complex numbers are carried as a trailing dimension of size 2 (re, im), as DeepFilterNet already
stores spectra. Nothing here creates float64 (MPS has none) or complex tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def deep_filter_real(
    spec: Tensor,
    coefs: Tensor,
    num_freqs: int,
    frame_size: int,
    lookahead: int = 0,
    conj: bool = False,
) -> Tensor:
    """The deep filter of ``df.multiframe.DF`` without complex dtypes.

    Args:
        spec: spectrum [B, C, T, F, 2].
        coefs: filter coefficients [B, C*frame_size, T, num_freqs, 2] (DFN3 passes
            [B, order, T, F, 2]).

    Returns:
        The filtered lowest ``num_freqs`` bins, [B, C, T, num_freqs, 2]. Each output frame t is
        sum_n spec[t - (frame_size - 1 - lookahead) + n] * coefs[n, t], a complex product written
        out in real and imaginary parts.
    """
    b, c, t = spec.shape[0], spec.shape[1], spec.shape[2]
    low = spec[..., :num_freqs, :]
    # Zero-pad the time axis as upstream's ConstantPad2d((0, 0, frame_size-1-lookahead, lookahead))
    padded = F.pad(low, (0, 0, 0, 0, frame_size - 1 - lookahead, lookahead))
    coefs = coefs.reshape(b, -1, frame_size, t, num_freqs, 2)
    c_re, c_im = coefs[..., 0], coefs[..., 1]
    if conj:
        c_im = -c_im
    out_re = torch.zeros((b, c, t, num_freqs), dtype=spec.dtype, device=spec.device)
    out_im = torch.zeros_like(out_re)
    # A short loop over the filter taps (5 for DFN3) beats materialising the unfolded
    # [B, C, T, F, N] product, and keeps peak memory at one frame-shifted view.
    for n in range(frame_size):
        s = padded[:, :, n : n + t]
        s_re, s_im = s[..., 0], s[..., 1]
        cr, ci = c_re[:, :, n], c_im[:, :, n]
        out_re += s_re * cr - s_im * ci
        out_im += s_re * ci + s_im * cr
    return torch.stack((out_re, out_im), dim=-1)


def magnitude(x: Tensor) -> Tensor:
    """|x| of a spectrum stored as [..., 2] (re, im), like ``as_complex(x).abs()``."""
    # hypot avoids overflow of re**2 + im**2 for large values, as complex abs does.
    return torch.hypot(x[..., 0], x[..., 1])
