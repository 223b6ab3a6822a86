"""Which dtype the network runs in: ``--precision fp32|bf16|fp16`` resolved for a device.

Half precision runs a copy of the network cast to that dtype (``cast_model``): every layer's
weights, the engine's windows and the GRU states it carries are in the dtype. The STFT,
features and synthesis stay fp32 (the engine casts a step's inputs to the model's dtype and its
output back with ``.float()``). Complex half doesn't exist (ComplexHalf is partial, complex
bfloat16 missing), so ``df_mps.routing`` sends every complex step of a half-precision tensor to
df-mps's real-valued kernels.

Why a cast copy and not autocast: the engine carries GRU states between pieces in the model's
dtype, and autocast leaves that dtype to each op (cuDNN's GRU under fp16 autocast wants fp16
``h0`` while the parameters stay fp32; the CPU's autocast list has no GRU at all, so the GRUs,
which are most of DFN3's time, would stay fp32). A cast copy runs every layer in one known
dtype, which is what ``tests/test_precision.py`` checks with forward hooks. Measured on the
CPU (3 s of the shared speech, 1 thread): bf16 autocast ran Conv2d and Linear in bf16 and
every GRU in fp32, max diff 1.4e-3 from fp32; the bf16 cast copy 2.6e-3; both -0.002 dB
SI-SDR against clean. Both are exact enough; the copy is the simpler to reason about.

fp16's range: on the shared speech normalised to 0 dBFS peak the largest output of any layer
is about 31 (``enc.df_conv1``), against fp16's 65,504; GRU states are bounded by tanh. The one
fp16 hazard found is DFN3's post-filter, whose eps = 1e-12 is 0 in fp16:
``df_mps.kernels.post_filter_real`` computes that gain in fp32 (``--pf`` only).

Where each dtype runs (``decide``):

- **CUDA**: fp16 everywhere; bf16 where the GPU has it (``torch.cuda.is_bf16_supported()``,
  compute capability 8.0 on).
- **MPS**: fp16 on every macOS df-mps supports; bf16 from macOS 14 (Metal has no bfloat16
  before it).
- **CPU**: bf16 only where the CPU has native bf16 dot products (x86 AVX512-BF16 or AMX, or
  an arm64 CPU that oneDNN runs bf16 on); elsewhere oneDNN emulates bf16 and it is slower than
  fp32. fp16 never: torch's CPU GRU and convolutions have no fast fp16 path on the CPUs
  DeepFilterNet runs on, so fp16 on the CPU is fp32's result, slower.

Where the device lacks the dtype, one warning says so (once per process) and fp32 runs. It
never fails.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import weakref
from typing import Optional

from . import capabilities as _caps
from ._log import warn_once

PRECISIONS = ("fp32", "bf16", "fp16")
MPS_BF16_MIN_MACOS = (14, 0)


@dataclasses.dataclass(frozen=True)
class Choice:
    requested: str
    precision: str  # what runs: the request, or "fp32" where the device lacks it
    reason: str  # why it falls back ("" where it doesn't)

    @property
    def dtype(self):
        return dtype_of(self.precision)

    @property
    def fell_back(self) -> bool:
        return self.precision != self.requested


def dtype_of(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def is_half(dtype) -> bool:
    """True for the 16-bit float dtypes (which have no complex counterpart)."""
    import torch

    return dtype in (torch.float16, torch.bfloat16)


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def cpu_has_fast_bf16() -> bool:
    """Native bf16 on this CPU: AVX512-BF16 or AMX on x86, oneDNN's bf16 on arm64."""
    import platform

    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - a private probe that moved: assume no
            pass
    if platform.machine().lower() in ("arm64", "aarch64"):
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # noqa: BLE001
            return False
    return False


def cuda_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001
        return False


def decide(
    requested: str,
    device_type: str,
    caps: _caps.Capabilities,
    *,
    cpu_bf16: bool = False,
    cuda_bf16: bool = True,
) -> Choice:
    """Pure: what runs for ``requested`` on ``device_type``."""
    check(requested)
    if requested == "fp32":
        return Choice(requested, "fp32", "")
    lacks = ""
    if device_type == "cuda":
        if requested == "bf16" and not cuda_bf16:
            lacks = "this GPU has no bfloat16 (compute capability below 8.0)"
    elif device_type == "mps":
        mac = caps.macos_version
        if requested == "bf16" and (mac is None or tuple(mac) < MPS_BF16_MIN_MACOS):
            shown = ".".join(map(str, mac)) if mac else "unknown"
            lacks = f"MPS has bfloat16 from macOS 14 (this is macOS {shown})"
    elif device_type == "cpu":
        if requested == "fp16":
            lacks = "torch has no fast fp16 GRU or convolution on the CPU"
        elif not cpu_bf16:
            lacks = "this CPU has no native bfloat16 (AVX512-BF16, AMX or arm64 bf16)"
    else:
        lacks = f"df-mps has no {requested} rule for device {device_type!r}"
    if lacks:
        return Choice(requested, "fp32", lacks)
    return Choice(requested, requested, "")


def decide_quietly(requested: str, device) -> Choice:
    """``resolve`` without the warning (for the doctor)."""
    device_type = (device if isinstance(device, str) else device.type).split(":")[0]
    return decide(
        requested,
        device_type,
        _caps.get(),
        cpu_bf16=device_type == "cpu" and cpu_has_fast_bf16(),
        cuda_bf16=device_type != "cuda" or cuda_has_bf16(),
    )


def resolve(requested: str, device) -> Choice:
    """What runs for ``requested`` on ``device`` (a torch.device or a string); where it falls
    back to fp32, one warning (once per process) says why."""
    check(requested)
    if requested == "fp32":
        return Choice(requested, "fp32", "")
    choice = decide_quietly(requested, device)
    device_type = (device if isinstance(device, str) else device.type).split(":")[0]
    if choice.fell_back:
        warn_once(
            f"precision-{requested}-{device_type}",
            f"df_mps: --precision {requested} on {device_type}: {choice.reason}; running fp32 "
            "instead (pass --precision fp32 to silence this)",
        )
    return choice


# -- the network in a dtype -------------------------------------------------------------------
_cast_lock = threading.Lock()
_casts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cast_model(model, dtype):
    """``model`` itself for float32, else a copy of it (eval mode) with every floating
    parameter and buffer in ``dtype``. The copy is kept while ``model`` lives, one per dtype."""
    import torch

    if dtype == torch.float32:
        return model
    with _cast_lock:
        per_model = _casts.setdefault(model, {})
        cast = per_model.get(dtype)
        if cast is None:
            # Captured graphs and compiled wrappers (df_mps.graphs) belong to the original.
            from .graphs import CACHE_ATTRS

            memo = {id(model.__dict__[a]): {} for a in CACHE_ATTRS if a in model.__dict__}
            cast = copy.deepcopy(model, memo).to(dtype).eval()
            per_model[dtype] = cast
        return cast


def model_dtype(model) -> Optional[object]:
    for p in model.parameters():
        return p.dtype
    return None
