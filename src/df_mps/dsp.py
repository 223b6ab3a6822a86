"""DeepFilterLib's DSP (the Rust ``libdf`` module) in PyTorch.

DeepFilterLib ships wheels only for CPython <= 3.11, and every DeepFilterNet model module does
``from libdf import DF`` at import time. This module is a drop-in replacement for what
DeepFilterNet uses from it: ``DF`` (analysis, synthesis, ERB widths, ...), ``erb``, ``erb_inv``,
``erb_norm``, ``unit_norm`` and ``unit_norm_init``. ``patches/libdf.py`` installs it as
``libdf`` where the real one can't be imported (or where ``DF_MPS_LIBDF=torch`` asks for it).

Semantics follow libdf 0.5.6 (libDF/src/lib.rs, transforms.rs, pyDF/src/lib.rs):

- Window: the Vorbis window ``sin(pi/2 * sin^2(pi * (n + 0.5) / N))``, computed in double and
  rounded to float32. Analysis multiplies each spectrum by
  ``wnorm = 1 / sum(w^2) * hop / fft_size``; synthesis is an unnormalised inverse real FFT,
  windowed, then overlap-added.
- Streaming state: analysis keeps the last ``fft_size - hop`` input samples, synthesis the
  overlap-add tail. ``reset=True`` (libdf's default) clears both before the call, exactly as
  libdf does; ``reset=False`` continues from the previous call. Input beyond a whole number of
  hops is dropped, as in libdf.
- ``erb``: mean power per ERB band, ``10*log10(x + 1e-10)`` if ``db``.
- ``erb_norm``: exponential mean ``s = x*(1-a) + s*a`` then ``(x - s) / 40``, state initialised
  to ``linspace(-60, -90)`` dB over the bands. ``unit_norm``: ``s = |x|*(1-a) + s*a``,
  ``x / sqrt(s)``, state initialised to ``linspace(0.001, 0.0001)`` over the bins.

Deliberate differences (documented, none affects DeepFilterNet):

- libdf keeps ONE streaming state per DF object, shared by all channels, so ``reset=False``
  with more than one channel mixes channels; here each channel (each row of the leading
  dimensions) has its own state. For mono input the two agree.
- libdf's ``erb_norm`` overwrites its input array and ``synthesis`` overwrites its input
  spectrum (Rust works in place); here inputs are never modified.
- ``erb_norm``/``unit_norm`` take a keyword ``return_state=True`` that also returns the state
  after the last frame (libdf copies the state and drops it), for chunked processing.

Beyond libdf, every function also takes torch tensors on any device, with any number of
leading (batch/channel) dimensions, and returns tensors on that device: feature extraction can
run on the GPU with a single copy at the end. numpy in gives numpy out, as libdf does.
``DF.features`` computes the three model inputs exactly as ``df.enhance.df_features`` does.

Devices without complex dtypes (MPS below macOS 14; ``routing.route("stft", device)`` decides): the
spectrum is kept in the real layout ``[..., F, 2]`` (re, im) throughout, and the FFTs become real
matrix products (``rfft_real``: a two-step Cooley-Tukey DFT, 120 x 8 points for fft_size 960; the
inverse is one windowed DFT matrix), built in float64 on the CPU and stored as float32. We chose
matrix products over a CPU round trip because they keep the whole pipeline on the device; they cost
a few hundred flops per sample, far below the model itself, and match libdf as closely as torch.fft
does (measured: analysis 7e-9 absolute, features 2e-6). On devices with complex support,
``torch.fft`` is used, and results are viewed as complex only at the API boundary. float64 is never
used on a device.

The recursive exponential means are computed with a parallel prefix scan over time (log2(T)
element-wise steps) instead of a loop over frames, so a batch on the GPU costs a handful of
kernel launches; the result agrees with libdf's frame loop to float32 rounding.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import routing
from ._log import warn_once

__all__ = [
    "DF",
    "erb",
    "erb_inv",
    "erb_norm",
    "unit_norm",
    "unit_norm_init",
    "erb_fb_widths",
    "vorbis_window",
    "norm_alpha",
    "MEAN_NORM_INIT",
    "UNIT_NORM_INIT",
]

MEAN_NORM_INIT = (-60.0, -90.0)  # libDF: MEAN_NORM_INIT, dB, first and last ERB band
UNIT_NORM_INIT = (0.001, 0.0001)  # libDF: UNIT_NORM_INIT, first and last frequency bin
ERB_NORM_DIVISOR = 40.0  # libDF band_mean_norm_erb
DB_EPS = 1e-10

ArrayLike = Union[np.ndarray, Tensor]
F32 = np.float32


# -- constants, exactly as libDF computes them ----------------------------------------------------
def _freq2erb(freq_hz: np.float32) -> np.float32:
    return F32(9.265) * np.log1p(F32(freq_hz) / (F32(24.7) * F32(9.265)))


def _erb2freq(n_erb: np.float32) -> np.float32:
    return F32(24.7) * F32(9.265) * (np.exp(F32(n_erb) / F32(9.265)) - F32(1.0))


def erb_fb_widths(sr: int, fft_size: int, nb_bands: int, min_nb_freqs: int = 1) -> np.ndarray:
    """Number of frequency bins per ERB band (libDF ``erb_fb``), computed in float32 like Rust."""
    return _erb_fb_widths(int(sr), int(fft_size), int(nb_bands), int(min_nb_freqs)).copy()


@functools.lru_cache(maxsize=32)
def _erb_fb_widths(sr: int, fft_size: int, nb_bands: int, min_nb_freqs: int) -> np.ndarray:
    # Cached: the engine makes DFs per job and per step (a Python loop over the bands each).
    if nb_bands < 1:
        raise ValueError(f"nb_bands must be >= 1, not {nb_bands}")
    with np.errstate(all="ignore"):
        freq_width = F32(sr) / F32(fft_size)
        erb_low = _freq2erb(F32(0.0))
        erb_high = _freq2erb(F32(sr // 2))
        step = (erb_high - erb_low) / F32(nb_bands)
        widths = []
        prev_freq = 0  # last frequency bin of the previous band
        freq_over = 0  # bins already given to previous bands to meet min_nb_freqs
        for i in range(1, nb_bands + 1):
            f = _erb2freq(erb_low + F32(i) * step)
            # Rust's f32::round rounds half away from zero; exact in float64 for a float32.
            fb = int(math.floor(float(f / freq_width) + 0.5))
            nb_freqs = fb - prev_freq - freq_over
            if nb_freqs < min_nb_freqs:
                freq_over = min_nb_freqs - nb_freqs
                nb_freqs = min_nb_freqs
            else:
                freq_over = 0
            widths.append(nb_freqs)
            prev_freq = fb
    widths[-1] += 1  # fft_size / 2 + 1 bins
    too_large = sum(widths) - (fft_size // 2 + 1)
    if too_large > 0:
        widths[-1] -= too_large
    if widths[-1] < 1 or sum(widths) != fft_size // 2 + 1:
        raise ValueError(
            f"{nb_bands} ERB bands with at least {min_nb_freqs} bins each do not fit into "
            f"{fft_size // 2 + 1} frequency bins; use fewer bands or a larger fft_size"
        )
    return np.asarray(widths, dtype=np.uint64)


def vorbis_window(fft_size: int) -> np.ndarray:
    """libDF's analysis/synthesis window, float32."""
    half = fft_size // 2
    n = np.arange(fft_size, dtype=np.float64)
    sin = np.sin(0.5 * np.pi * (n + 0.5) / half)
    return np.sin(0.5 * np.pi * sin * sin).astype(np.float32)


def _window_norm(window: np.ndarray, hop_size: int, fft_size: int) -> float:
    # Rust: 1_f32 / window.iter().map(|x| x * x).sum::<f32>() * hop as f32 / fft as f32,
    # a sequential float32 sum (np.cumsum is sequential too).
    total = np.cumsum(window * window, dtype=np.float32)[-1]
    return float(F32(F32(F32(1.0) / total) * F32(hop_size)) / F32(fft_size))


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    # ndarray's Array1::linspace: start + step * i with step = (end - start) / (n - 1), in f32.
    if n == 1:
        return np.asarray([start], dtype=np.float32)
    step = (F32(end) - F32(start)) / F32(n - 1)
    return (F32(start) + step * np.arange(n, dtype=np.float32)).astype(np.float32)


def unit_norm_init(num_freq_bins: int) -> np.ndarray:
    """Initial ``unit_norm`` state, shape [1, num_freq_bins] (as libdf)."""
    return _linspace_f32(UNIT_NORM_INIT[0], UNIT_NORM_INIT[1], num_freq_bins)[None, :]


def mean_norm_init(num_bands: int) -> np.ndarray:
    """Initial ``erb_norm`` state, shape [1, num_bands], in dB."""
    return _linspace_f32(MEAN_NORM_INIT[0], MEAN_NORM_INIT[1], num_bands)[None, :]


def norm_alpha(sr: int, hop_size: int, tau: float = 1.0) -> float:
    """The exponential-mean factor DeepFilterNet uses (``df.utils.get_norm_alpha``)."""
    alpha_exact = math.exp(-(hop_size / sr) / tau)
    precision, alpha = 3, 1.0
    while alpha >= 1.0:
        alpha = round(alpha_exact, precision)
        precision += 1
    return alpha


# -- input / output conversion --------------------------------------------------------------------
def _supports_complex(device: torch.device) -> bool:
    # The one decision point: "upstream" means torch.fft with complex tensors, "real" the real
    # DFT matrices (MPS before macOS 14, or DF_MPS_FORWARD_METHOD=real).
    return routing.route("stft", device) is routing.Route.UPSTREAM


def _real_tensor(x: ArrayLike, what: str) -> Tuple[Tensor, bool]:
    """A float32 tensor (same device) and whether the caller gave numpy."""
    if isinstance(x, Tensor):
        if x.is_complex():
            raise TypeError(f"{what}: expected a real-valued signal, got {x.dtype}")
        return (x if x.dtype == torch.float32 else x.to(torch.float32)), False
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise TypeError(f"{what}: expected a real-valued array, got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), True


def _spectrum_ri(x: ArrayLike, what: str) -> Tuple[Tensor, bool, bool]:
    """A spectrum as a real [..., F, 2] float32 tensor, whether the caller gave numpy, and
    whether it was complex.

    Accepts complex arrays/tensors [..., F] or real ones in the (re, im) layout [..., F, 2].
    """
    if isinstance(x, Tensor):
        if x.is_complex():
            if x.dtype != torch.complex64:
                x = x.to(torch.complex64)
            return torch.view_as_real(x.resolve_conj()), False, True
        if x.ndim == 0 or x.shape[-1] != 2:
            raise ValueError(
                f"{what}: a real tensor must be in the (re, im) layout [..., F, 2], "
                f"got shape {tuple(x.shape)}"
            )
        return (x if x.dtype == torch.float32 else x.to(torch.float32)), False, False
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        arr = np.ascontiguousarray(arr, dtype=np.complex64)
        return torch.view_as_real(torch.from_numpy(arr)), True, True
    if arr.ndim == 0 or arr.shape[-1] != 2:
        raise ValueError(
            f"{what}: expected a complex array [..., F] or a real one [..., F, 2], "
            f"got {arr.dtype} of shape {arr.shape}"
        )
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), True, False


def _ri_out(ri: Tensor, numpy_out: bool, as_real: Optional[bool], what: str) -> ArrayLike:
    """Return a [..., F, 2] spectrum as the caller expects it."""
    if numpy_out:
        arr = ri.detach().cpu().contiguous().numpy()
        return arr if as_real else arr.view(np.complex64)[..., 0]
    if as_real:
        return ri
    if not _supports_complex(ri.device):
        if as_real is None:
            warn_once(
                f"dsp-no-complex-{what}-{ri.device.type}",
                f"df_mps: {what} ran on {ri.device.type}, which holds no complex tensors "
                "(MPS before macOS 14); it returns the real (re, im) layout [..., F, 2] instead "
                "of a complex tensor. Pass as_real=True to ask for that layout explicitly.",
            )
            return ri
        raise ValueError(
            f"{what}: {ri.device.type} holds no complex tensors here; use as_real=True"
        )
    return torch.view_as_complex(ri.contiguous())


def _real_out(x: Tensor, numpy_out: bool) -> ArrayLike:
    return x.detach().cpu().contiguous().numpy() if numpy_out else x


# -- per-device constants -------------------------------------------------------------------------
class _Constants:
    """Tensors derived from the DF parameters, cached per device (built once, float64 on CPU)."""

    def __init__(self) -> None:
        self._cache: Dict[Tuple, Tensor] = {}
        self._lock = threading.Lock()

    def get(self, key: Tuple, device: torch.device, build) -> Tensor:
        full_key = (*key, str(device))
        tensor = self._cache.get(full_key)
        if tensor is None:
            value = build()
            tensor = torch.from_numpy(np.ascontiguousarray(value)).to(device)
            if type(tensor) is not Tensor:
                return tensor  # made while tracing (torch.export's fake tensors): not kept
            with self._lock:
                self._cache[full_key] = tensor
        return tensor


_CONSTANTS = _Constants()


def _widths_tuple(erb_fb: Union[ArrayLike, Sequence[int]]) -> Tuple[int, ...]:
    if isinstance(erb_fb, Tensor):
        erb_fb = erb_fb.detach().cpu().numpy()
    widths = tuple(int(w) for w in np.asarray(erb_fb).reshape(-1))
    if not widths or min(widths) < 1:
        raise ValueError(f"ERB widths must be positive integers, got {widths}")
    return widths


def _erb_matrix(widths: Tuple[int, ...], device: torch.device) -> Tensor:
    """[F * 2, E]: 1/width where bin f (its re and its im row) is in band e.

    Applied to the squared (re, im) layout, one matrix product gives the mean power per band
    (Rust multiplies each term by k = 1/width too); no complex dtype and no size-2 reduction.
    """

    def build():
        matrix = np.zeros((sum(widths), 2, len(widths)), dtype=np.float32)
        start = 0
        for band, width in enumerate(widths):
            matrix[start : start + width, :, band] = F32(1.0) / F32(width)
            start += width
        return matrix.reshape(-1, len(widths))

    return _CONSTANTS.get(("erb_matrix", widths), device, build)


def _bin_to_band(widths: Tuple[int, ...], device: torch.device) -> Tensor:
    return _CONSTANTS.get(
        ("bin_to_band", widths),
        device,
        lambda: np.repeat(np.arange(len(widths), dtype=np.int64), widths),
    )


# -- the exponential mean, as a parallel scan -----------------------------------------------------
def _exp_mean(x: Tensor, state: Tensor, alpha: float) -> Tensor:
    """s_t = x_t * (1 - a) + s_{t-1} * a over dim -2 of x [..., T, F]; state [..., F] is s_{-1}.

    Returns s for every frame, [..., T, F]. Hillis-Steele scan: log2(T) element-wise steps.
    """
    a32 = F32(alpha)
    one_minus = float(F32(1.0) - a32)  # Rust computes (1 - alpha) in float32
    steps = x.shape[-2]
    y = x * one_minus
    spare = torch.empty_like(y) if steps > 1 else y
    shift = 1
    while shift < steps:
        decay = float(F32(float(a32) ** shift))
        spare[..., :shift, :] = y[..., :shift, :]
        torch.add(y[..., shift:, :], y[..., :-shift, :], alpha=decay, out=spare[..., shift:, :])
        y, spare = spare, y
        shift *= 2
    # a^(t+1) for t < T; cached per alpha for the next power of two >= T, so chunked
    # streaming with varying chunk lengths reuses one tensor.
    length = 1 << max(steps - 1, 0).bit_length()
    powers = _CONSTANTS.get(
        ("decay_powers", float(a32), length),
        x.device,
        lambda: (float(a32) ** np.arange(1, length + 1, dtype=np.float64)).astype(np.float32),
    )
    return y + powers[:steps, None] * state.unsqueeze(-2)


def _prepare_state(
    state: Optional[ArrayLike], init: np.ndarray, lead: Tuple[int, ...], device: torch.device
) -> Tensor:
    if state is None:
        # Cached on the device: a copy from pageable host memory waits for the device's queue
        # (torch syncs the stream after it), which would stall the engine's scheduling thread
        # behind the running step at every stream's start.
        values = np.ascontiguousarray(init[0], dtype=np.float32)
        init_t = _CONSTANTS.get(("state_init", values.tobytes()), device, lambda: values)
        return init_t.expand(*lead, init.shape[-1])
    state_t = state if isinstance(state, Tensor) else torch.from_numpy(np.asarray(state))
    state_t = state_t.to(device=device, dtype=torch.float32)
    if state_t.shape[-1] != init.shape[-1]:
        raise ValueError(
            f"state has {state_t.shape[-1]} entries per channel, the input {init.shape[-1]}"
        )
    try:
        return state_t.expand(*lead, init.shape[-1]) if lead else state_t.reshape(-1)
    except RuntimeError:
        raise ValueError(
            f"state of shape {tuple(state_t.shape)} does not fit input channels {lead}"
        ) from None


# -- module-level functions (libdf's interface) ---------------------------------------------------
def erb(input: ArrayLike, erb_fb: Union[ArrayLike, Sequence[int]], db: bool = True) -> ArrayLike:
    """ERB band energies of a spectrum: [..., T, F] complex (or [..., T, F, 2]) -> [..., T, E]."""
    ri, numpy_out, _ = _spectrum_ri(input, "erb")
    return _real_out(_erb_ri(ri, _widths_tuple(erb_fb), db), numpy_out)


def _erb_ri(ri: Tensor, widths: Tuple[int, ...], db: bool = True) -> Tensor:
    if ri.shape[-2] != sum(widths):
        raise ValueError(
            f"erb: spectrum has {ri.shape[-2]} bins, the ERB widths sum to {sum(widths)}"
        )
    bands = torch.matmul((ri * ri).flatten(-2), _erb_matrix(widths, ri.device))
    if db:
        bands = torch.log10(bands + DB_EPS) * 10.0
    return bands


def erb_inv(input: ArrayLike, erb_fb: Union[ArrayLike, Sequence[int]]) -> ArrayLike:
    """Spread band values to their frequency bins: [..., E] -> [..., F]."""
    x, numpy_out = _real_tensor(input, "erb_inv")
    widths = _widths_tuple(erb_fb)
    if x.shape[-1] != len(widths):
        raise ValueError(
            f"Number of erb bands do not match with input: {x.shape[-1]}, {len(widths)}"
        )
    return _real_out(x.index_select(-1, _bin_to_band(widths, x.device)), numpy_out)


def erb_norm(
    erb: ArrayLike,
    alpha: float,
    state: Optional[ArrayLike] = None,
    *,
    return_state: bool = False,
):
    """Exponential mean normalisation of ERB features [..., T, E] (dB), as libdf.

    ``state`` [..., E] continues from an earlier call; ``return_state=True`` also returns the
    state after the last frame (numpy or tensor, as the input).
    """
    x, numpy_out = _real_tensor(erb, "erb_norm")
    out, new_state = _erb_norm_t(x, alpha, state)
    if return_state:
        return _real_out(out, numpy_out), _real_out(new_state, numpy_out)
    return _real_out(out, numpy_out)


def _erb_norm_t(x: Tensor, alpha: float, state: Optional[ArrayLike]) -> Tuple[Tensor, Tensor]:
    init = mean_norm_init(x.shape[-1])
    s0 = _prepare_state(state, init, tuple(x.shape[:-2]), x.device)
    if x.shape[-2] == 0:
        return x.clone(), s0.clone()
    s = _exp_mean(x, s0, alpha)
    return (x - s) / ERB_NORM_DIVISOR, s[..., -1, :]


def unit_norm(
    spec: ArrayLike,
    alpha: float,
    state: Optional[ArrayLike] = None,
    *,
    return_state: bool = False,
):
    """Unit normalisation of a complex spectrum [..., T, F] (or [..., T, F, 2]), as libdf."""
    ri, numpy_out, was_complex = _spectrum_ri(spec, "unit_norm")
    out, new_state = _unit_norm_ri(ri, alpha, state)
    # Same layout back: complex for complex input, (re, im) for the real layout.
    result = _ri_out(out, numpy_out, not was_complex, "unit_norm")
    if return_state:
        return result, _real_out(new_state, numpy_out)
    return result


def _unit_norm_ri(ri: Tensor, alpha: float, state: Optional[ArrayLike]) -> Tuple[Tensor, Tensor]:
    init = unit_norm_init(ri.shape[-2])
    s0 = _prepare_state(state, init, tuple(ri.shape[:-3]), ri.device)
    if ri.shape[-3] == 0:
        return ri.clone(), s0.clone()
    magnitude = torch.hypot(ri[..., 0], ri[..., 1])  # num_complex's norm() is hypot
    s = _exp_mean(magnitude, s0, alpha)
    return ri / torch.sqrt(s).unsqueeze(-1), s[..., -1, :]


# -- a real FFT without complex dtypes ----------------------------------------------------------
def _dft_factors(n: int) -> Optional[Tuple[int, int]]:
    """n = n1 * n2 for the two-step DFT, or None (direct DFT) where n has no useful divisor.

    The first step (n1 points, real input) is long and the second (n2 points, complex) short:
    measured against float64, that order is as accurate as an FFT, while a short first step
    or the direct 960-term DFT loses a few bits on bins far below the frame's peak.
    """
    target = 4.0 * math.sqrt(n)
    divisors = [d for d in range(2, n // 2 + 1) if n % d == 0]
    if not divisors:
        return None
    n1 = min(divisors, key=lambda d: abs(math.log(d / target)))
    return n1, n // n1


def _rfft_step_matrices(n: int, n1: int, n2: int):
    # Step 1: n1-point real DFT, [n1, n1 * 2] with (re, im) interleaved per output k1.
    i1 = np.arange(n1)
    angle = 2.0 * np.pi * (np.outer(i1, i1) % n1) / n1
    first = np.stack([np.cos(angle), -np.sin(angle)], axis=-1).reshape(n1, 2 * n1)
    # Step 2, per k1: twiddle exp(-2 pi i i2 k1 / n) and n2-point DFT, as the real form of a
    # complex matrix: [k1, (i2, re/im in), (k2, re/im out)].
    k1 = np.arange(n1)[:, None, None]
    i2 = np.arange(n2)[None, :, None]
    k2 = np.arange(n2)[None, None, :]
    angle = 2.0 * np.pi * ((i2 * k1 + n1 * i2 * k2) % n) / n
    cos, sin = np.cos(angle), -np.sin(angle)
    second = np.zeros((n1, n2, 2, n2, 2))
    second[:, :, 0, :, 0] = cos
    second[:, :, 0, :, 1] = sin
    second[:, :, 1, :, 0] = -sin
    second[:, :, 1, :, 1] = cos
    return first.astype(np.float32), second.reshape(n1, 2 * n2, 2 * n2).astype(np.float32)


def rfft_real(frames: Tensor) -> Tensor:
    """``view_as_real(torch.fft.rfft(frames))`` with real tensors only: [..., N] -> [..., F, 2].

    Two matrix-product steps (Cooley-Tukey with n = n2 * i1 + i2, k = k1 + n1 * k2), so no
    complex dtype is ever created; for N = 960 that is 120 x 8 points, ~270 flops per sample.
    """
    n = frames.shape[-1]
    n_freqs = n // 2 + 1
    lead = tuple(frames.shape[:-1])
    rows = math.prod(lead)
    factors = _dft_factors(n)
    if factors is None:
        basis = _CONSTANTS.get(("rdft_direct", n), frames.device, lambda: _direct_rdft(n))
        return torch.matmul(frames, basis).unflatten(-1, (n_freqs, 2))
    n1, n2 = factors
    first = _CONSTANTS.get(
        ("rdft_step1", n), frames.device, lambda: _rfft_step_matrices(n, n1, n2)[0]
    )
    second = _CONSTANTS.get(
        ("rdft_step2", n), frames.device, lambda: _rfft_step_matrices(n, n1, n2)[1]
    )
    z = frames.reshape(rows, n1, n2).transpose(1, 2)  # [rows, i2, i1]
    y = torch.matmul(z, first).view(rows, n2, n1, 2)  # [rows, i2, k1, re/im]
    y = y.permute(2, 0, 1, 3).reshape(n1, rows, 2 * n2)  # [k1, rows, (i2, re/im)]
    spec = torch.bmm(y, second).view(n1, rows, n2, 2)  # [k1, rows, k2, re/im]
    spec = spec.permute(1, 2, 0, 3).reshape(rows, n, 2)[:, :n_freqs]  # k = k2 * n1 + k1
    return spec.reshape(*lead, n_freqs, 2)


def _direct_rdft(n: int) -> np.ndarray:
    i, k = np.arange(n), np.arange(n // 2 + 1)
    angle = 2.0 * np.pi * (np.outer(i, k) % n) / n  # exact reduction before float64 trig
    return np.stack([np.cos(angle), -np.sin(angle)], axis=-1).reshape(n, -1).astype(np.float32)


# -- DF -------------------------------------------------------------------------------------------
class DF:
    """libdf's ``DF``: STFT analysis/synthesis with DeepFilterNet's window and ERB bands.

    ``analysis`` and ``synthesis`` take numpy arrays (as libdf, numpy comes back) or torch
    tensors on any device with any leading dimensions (tensors come back on that device).
    """

    def __init__(
        self,
        sr: int,
        fft_size: int,
        hop_size: int,
        nb_bands: Optional[int] = 32,
        min_nb_erb_freqs: Optional[int] = 1,
    ) -> None:
        sr, fft_size, hop_size = int(sr), int(fft_size), int(hop_size)
        if hop_size < 1 or fft_size < 2 or hop_size * 2 > fft_size:
            raise ValueError(
                f"DF needs 1 <= hop_size <= fft_size / 2, got fft_size={fft_size}, "
                f"hop_size={hop_size}"
            )
        self._sr = sr
        self._fft_size = fft_size
        self._hop_size = hop_size
        self._freq_size = fft_size // 2 + 1
        nb_bands = 32 if nb_bands is None else int(nb_bands)
        min_nb = 1 if min_nb_erb_freqs is None else int(min_nb_erb_freqs)
        self._erb = erb_fb_widths(sr, fft_size, nb_bands, min_nb)
        self._window = vorbis_window(fft_size)
        self._wnorm = _window_norm(self._window, hop_size, fft_size)
        self._key = (fft_size, hop_size)
        # Streaming memories, one row per channel: None means zeros.
        self._analysis_mem: Optional[Tensor] = None
        self._synthesis_mem: Optional[Tensor] = None
        self._erb_norm_state: Optional[Tensor] = None
        self._unit_norm_state: Optional[Tensor] = None

    # libdf's accessors
    def sr(self) -> int:
        return self._sr

    def fft_size(self) -> int:
        return self._fft_size

    def hop_size(self) -> int:
        return self._hop_size

    def nb_erb(self) -> int:
        return len(self._erb)

    def erb_widths(self) -> np.ndarray:
        return self._erb.copy()

    def fft_window(self) -> np.ndarray:
        return self._window.copy()

    def reset(self) -> None:
        """Forget the analysis/synthesis memories and the feature-normalisation states."""
        self._analysis_mem = None
        self._synthesis_mem = None
        self._erb_norm_state = None
        self._unit_norm_state = None

    def __repr__(self) -> str:
        return (
            f"df_mps.dsp.DF(sr={self._sr}, fft_size={self._fft_size}, "
            f"hop_size={self._hop_size}, nb_bands={self.nb_erb()})"
        )

    # -- constants on a device -------------------------------------------------------------
    def _window_t(self, device: torch.device) -> Tensor:
        return _CONSTANTS.get(("window", self._fft_size), device, lambda: self._window)

    def _scaled_window_t(self, device: torch.device) -> Tensor:
        """The window times wnorm (libdf scales after the FFT; the same up to rounding)."""
        return _CONSTANTS.get(
            ("scaled_window", *self._key),
            device,
            lambda: (self._window.astype(np.float64) * self._wnorm).astype(np.float32),
        )

    def _inverse_basis(self, device: torch.device) -> Tensor:
        """[F*2, N]: unnormalised inverse real DFT (as realfft), then the window."""

        def build():
            n, k = np.arange(self._fft_size), np.arange(self._freq_size)
            angle = 2.0 * np.pi * (np.outer(k, n) % self._fft_size) / self._fft_size
            weight = np.full(self._freq_size, 2.0)
            weight[0] = 1.0
            if self._fft_size % 2 == 0:
                weight[-1] = 1.0
            w = self._window.astype(np.float64)[None, :]
            cos = np.cos(angle) * weight[:, None] * w
            sin = -np.sin(angle) * weight[:, None] * w
            sin[0] = 0.0  # realfft ignores the imaginary part of DC and Nyquist
            if self._fft_size % 2 == 0:
                sin[-1] = 0.0
            return np.stack([cos, sin], axis=1).reshape(-1, self._fft_size).astype(np.float32)

        return _CONSTANTS.get(("inv_basis", *self._key), device, build)

    # -- streaming memories ----------------------------------------------------------------
    @staticmethod
    def _memory(mem: Optional[Tensor], lead, length: int, like: Tensor, what: str) -> Tensor:
        if mem is None:
            return like.new_zeros((*lead, length))
        if tuple(mem.shape[:-1]) != tuple(lead):
            raise ValueError(
                f"DF.{what}(reset=False): the input has channels {tuple(lead)} but the carried "
                f"state has {tuple(mem.shape[:-1])}; call reset() or pass reset=True"
            )
        return mem.to(like.device)

    # -- the streaming state, to stack many streams into one call -------------------------
    def stream_state(self, channels: int, nb_df: int, device: torch.device) -> Dict[str, Tensor]:
        """The streaming memories of ``channels`` channels on ``device``: the carried ones, or
        what a first call would start from (zeros; the norms' initial values). Stack several
        DFs' states along dim 0, ``set_stream_state`` them on one DF, and one ``features`` or
        ``synthesis`` call then serves all their streams; split the state back afterwards."""
        hop_mem = (channels, self._fft_size - self._hop_size)

        def carried(mem, make) -> Tensor:
            if mem is None:
                return make()
            return mem.to(device)

        return {
            "analysis": carried(self._analysis_mem, lambda: torch.zeros(hop_mem, device=device)),
            "synthesis": carried(self._synthesis_mem, lambda: torch.zeros(hop_mem, device=device)),
            "erb_norm": carried(
                self._erb_norm_state,
                lambda: _prepare_state(None, mean_norm_init(len(self._erb)), (channels,), device),
            ),
            "unit_norm": carried(
                self._unit_norm_state,
                lambda: _prepare_state(None, unit_norm_init(nb_df), (channels,), device),
            ),
        }

    def set_stream_state(self, state: Dict[str, Tensor]) -> None:
        """Carry on from ``state`` (as ``stream_state`` returns it; keys left out are kept)."""
        self._analysis_mem = state.get("analysis", self._analysis_mem)
        self._synthesis_mem = state.get("synthesis", self._synthesis_mem)
        self._erb_norm_state = state.get("erb_norm", self._erb_norm_state)
        self._unit_norm_state = state.get("unit_norm", self._unit_norm_state)

    # -- analysis --------------------------------------------------------------------------
    def analysis(self, input: ArrayLike, reset: bool = True, *, as_real: Optional[bool] = None):
        """Time signal [..., T] -> spectrum [..., T // hop, F] (complex64).

        numpy in: numpy complex64 out (libdf). Tensor in: a complex tensor on its device, or
        the real layout [..., T', F, 2] with ``as_real=True`` (the default on a device without
        complex dtypes).
        """
        x, numpy_out = _real_tensor(input, "analysis")
        if x.ndim == 0:
            raise ValueError("analysis: expected a signal [..., T], got a scalar")
        if reset:
            self.reset()
        ri = self._analysis_ri(x)
        return _ri_out(ri, numpy_out, as_real, "DF.analysis")

    def _analysis_ri(self, x: Tensor) -> Tensor:
        n, hop = self._fft_size, self._hop_size
        lead = tuple(x.shape[:-1])
        frames_n = x.shape[-1] // hop
        mem = self._memory(self._analysis_mem, lead, n - hop, x, "analysis")
        padded = torch.cat([mem, x[..., : frames_n * hop]], dim=-1)
        self._analysis_mem = padded[..., padded.shape[-1] - (n - hop) :].clone()
        frames = padded.unfold(-1, n, hop)  # [..., T', N]
        # libdf scales by wnorm after the FFT; scaling the window instead saves a pass and
        # differs by float32 rounding only.
        frames = frames * self._scaled_window_t(x.device)
        if _supports_complex(x.device):
            return torch.view_as_real(torch.fft.rfft(frames, dim=-1))
        return rfft_real(frames)

    # -- synthesis -------------------------------------------------------------------------
    def synthesis(self, input: ArrayLike, reset: bool = True) -> ArrayLike:
        """Spectrum [..., T, F] (complex, or real [..., T, F, 2]) -> signal [..., T * hop]."""
        ri, numpy_out, _ = _spectrum_ri(input, "synthesis")
        if ri.ndim < 3:
            raise ValueError(f"synthesis: expected a spectrum [..., T, F], got {tuple(ri.shape)}")
        if ri.shape[-2] != self._freq_size:
            raise ValueError(
                f"synthesis: spectrum has {ri.shape[-2]} bins, fft_size {self._fft_size} "
                f"needs {self._freq_size}"
            )
        if reset:
            self.reset()
        return _real_out(self._synthesis_ri(ri), numpy_out)

    def _synthesis_ri(self, ri: Tensor) -> Tensor:
        n, hop = self._fft_size, self._hop_size
        lead, steps = tuple(ri.shape[:-3]), ri.shape[-3]
        if _supports_complex(ri.device):
            if ri.device.type != "cpu":
                # realfft ignores the imaginary part of DC and Nyquist. So does pocketfft (the
                # CPU); other backends' inverse FFTs are not documented to, so zero it there.
                ri = ri.clone()
                ri[..., 0, 1] = 0.0
                if n % 2 == 0:
                    ri[..., -1, 1] = 0.0
            spec = torch.view_as_complex(ri if ri.stride(-2) == 2 else ri.contiguous())
            frames = torch.fft.irfft(spec, n=n, dim=-1, norm="forward")
            window = self._window_t(ri.device)  # applied during the overlap-add below
        else:
            frames = torch.matmul(ri.flatten(-2), self._inverse_basis(ri.device))
            window = None  # part of the inverse basis
        mem = self._memory(self._synthesis_mem, lead, n - hop, frames, "synthesis")
        # Windowed overlap-add: frame t starts at t * hop. Cut each frame into K hop-long
        # pieces; piece m of frame t lands on output hop t + m.
        pieces = -(-n // hop)
        if pieces * hop != n:
            frames = torch.nn.functional.pad(frames, (0, pieces * hop - n))
            if window is not None:
                window = torch.nn.functional.pad(window, (0, pieces * hop - n))
        frames = frames.unflatten(-1, (pieces, hop))  # [..., T, K, hop]
        if window is not None:
            window = window.view(pieces, hop)
        out = frames.new_empty((*lead, steps + pieces - 1, hop))
        if window is None:
            out[..., :steps, :] = frames[..., 0, :]
        else:
            torch.mul(frames[..., 0, :], window[0], out=out[..., :steps, :])
        out[..., steps:, :] = 0.0
        for m in range(1, pieces):
            target = out[..., m : m + steps, :]
            if window is None:
                target += frames[..., m, :]
            else:
                target.addcmul_(frames[..., m, :], window[m])
        out = out.flatten(-2)
        out[..., : n - hop] += mem
        self._synthesis_mem = out[..., steps * hop : steps * hop + n - hop].clone()
        return out[..., : steps * hop]

    # -- features (df.enhance.df_features) ---------------------------------------------------
    def features(
        self,
        audio: Tensor,
        nb_df: int,
        alpha: Optional[float] = None,
        reset: bool = True,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The model inputs for ``audio`` [..., T], on its device, without complex dtypes.

        Returns (spec [..., 1, T', F, 2], erb_feat [..., 1, T', E], spec_feat
        [..., 1, T', nb_df, 2]), exactly as ``df.enhance.df_features``; ``alpha`` defaults to
        DeepFilterNet's norm_tau = 1 s. ``reset=False`` continues the analysis memory and both
        normalisation states from the previous call, for chunked streaming.
        """
        x, _ = _real_tensor(audio, "features")
        if alpha is None:
            alpha = norm_alpha(self._sr, self._hop_size)
        if reset:
            self.reset()
        ri = self._analysis_ri(x)
        erb_db = _erb_ri(ri, tuple(int(w) for w in self._erb), db=True)
        erb_feat, self._erb_norm_state = _erb_norm_t(erb_db, alpha, self._erb_norm_state)
        spec_feat, self._unit_norm_state = _unit_norm_ri(
            ri[..., :nb_df, :], alpha, self._unit_norm_state
        )
        return ri.unsqueeze(-4), erb_feat.unsqueeze(-3), spec_feat.unsqueeze(-4)
