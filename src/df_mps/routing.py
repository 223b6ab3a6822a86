"""The one decision: how a computation runs, given a device, capabilities and settings.

Patches ask this module; they never decide on their own.
"""

from __future__ import annotations

import enum
from typing import Optional

from . import capabilities as _caps
from . import settings as _settings
from ._log import warn_once
from .precision import is_half


class Route(str, enum.Enum):
    UPSTREAM = "upstream"  # DeepFilterNet's own code, unchanged (complex math where it uses it)
    REAL = "real"  # df_mps's real-valued kernel, same result without complex dtypes
    CPU = "cpu"  # upstream's code on a CPU copy, result moved back to the input's device


# What each patched step does where complex dtypes can't be used. STOI goes through
# torch.stft, which has no real-valued twin here, so it moves to the CPU.
OPS = {
    "deep_filter": Route.REAL,  # df.multiframe.DF.forward (DFN3)
    "post_filter": Route.REAL,  # DFN3 --pf magnitude in DfNet.forward
    "dfop": Route.REAL,  # df.modules.DfOp complex_strided (DFN1, DFN2)
    "stoi": Route.CPU,  # df.stoi.stoi
    "stft": Route.REAL,  # df_mps.dsp's STFT on device tensors: real DFT matrices, no torch.fft
}


def forward_method(settings: _settings.Settings, config_method: Optional[str]) -> str:
    return settings.forward_method or config_method or "auto"


def decide(
    op: str,
    device_type: str,
    caps: _caps.Capabilities,
    settings: _settings.Settings,
    config_method: Optional[str] = None,
    *,
    half: bool = False,
) -> Route:
    """Pure: the route for ``op`` on a tensor of ``device_type`` (``half``: of a 16-bit float
    dtype)."""
    fallback = OPS[op]
    if half and fallback is Route.REAL:
        # Complex half doesn't exist (complex bfloat16 not at all, ComplexHalf in part): a
        # half-precision network (df_mps.precision) takes the real-valued kernels everywhere.
        return Route.REAL
    method = forward_method(settings, config_method)
    if method == "complex":
        return Route.UPSTREAM
    if method == "real":
        # STOI has no real path; "real" means "no complex on the device", i.e. the CPU.
        return fallback if device_type != "cpu" or fallback is Route.REAL else Route.UPSTREAM
    if caps.supports_complex(device_type):
        return Route.UPSTREAM
    # (Emulation marks the CPU itself as complex-less; its CPU route then means "off the
    # emulated device", see df_mps.testing.outside_guard.)
    return fallback


def route(op: str, device, dtype=None) -> Route:
    """The route for ``op`` on ``device`` (a torch.device or a string), with current state;
    ``dtype``: the tensor's, where it matters (half precision routes real)."""
    device_type = device if isinstance(device, str) else device.type
    return decide(
        op,
        device_type.split(":")[0],
        _caps.get(),
        _settings.get(),
        _settings.config_forward_method(),
        half=dtype is not None and is_half(dtype),
    )


def choose_device_name(
    caps: _caps.Capabilities,
    settings: _settings.Settings,
    config_device: Optional[str] = None,
) -> str:
    """Pure: which device get_device() returns. DF_MPS_DEVICE, then DeepFilterNet's config, then
    cuda, mps, cpu in that order of preference."""
    for source, requested in (("DF_MPS_DEVICE", settings.device), ("config", config_device)):
        if not requested or requested == "auto":
            continue
        kind = requested.split(":")[0]
        if kind == "cuda" and not caps.cuda_available:
            _warn_unavailable(source, requested, "CUDA is not available")
            continue
        if kind == "mps" and not caps.mps_available:
            why = "this process runs under Rosetta" if caps.rosetta else "MPS is not available"
            _warn_unavailable(source, requested, why)
            continue
        return requested
    if caps.cuda_available:
        return "cuda:0"
    if caps.mps_available:
        return "mps"
    return "cpu"


def _warn_unavailable(source: str, requested: str, why: str) -> None:
    warn_once(
        f"device-unavailable-{source}-{requested}",
        f"df_mps: {source} asks for device {requested!r}, but {why}; df_mps picks the best "
        f"available device instead. Set DF_MPS_DEVICE=auto (or cpu) to silence this.",
    )


def choose_device():
    """The torch.device that DeepFilterNet's get_device() returns while df_mps is active."""
    import torch

    return torch.device(choose_device_name(_caps.get(), _settings.get(), _settings.config_device()))
