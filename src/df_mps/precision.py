"""Which dtype the network runs in: ``--precision fp32|bf16|fp16`` resolved for a device.

Half precision runs a copy of the network cast to that dtype (``cast_model``): every layer's
weights and the engine's windows are in the dtype, except the recurrent layers (DFN3's three
``nn.GRU``, five GRU layers), which stay fp32 with the original weights (``fp32_islands``):
each takes its input in fp32 and gives its output sequence back in the dtype, and its hidden
state stays fp32, also where the engine carries it between pieces. The STFT, features and
synthesis stay fp32 (the engine casts a step's inputs to the model's dtype and its output back
with ``.float()``). Complex half doesn't exist (ComplexHalf is partial, complex bfloat16
missing), so ``df_mps.routing`` sends every complex step of a half-precision tensor to
df-mps's real-valued kernels.

Why the GRUs stay fp32 (issue 14): a GRU runs its recurrence 100 times a second, and in half
precision its gates and hidden state are rounded at every step (bf16 keeps 8 bits of
mantissa), the error carried on through thousands of steps; that was where bf16 lost.
Measured on the CPU (10 s of the shared speech at 5 dB SNR, one piece, 1 thread; SI-SDR
against clean minus fp32's, and the waveform's max abs difference from fp32), white / pink
noise:

- every layer bf16: -0.018 / +0.283 dB, 3.2e-3 / 6.5e-3 (the H200 measured -0.007 / +0.195);
- bf16 with the GRUs fp32 (this policy): -0.007 / +0.028 dB, 1.4e-3 / 1.6e-3;
- fp16, every layer: -0.002 / +0.042 dB, 3.8e-4 / 1.0e-3; with the GRUs fp32: +0.0001 /
  -0.0002 dB, 2.6e-4 / 2.1e-4.

The same audio scaled by 0.9 to 1.1 (other roundings of it) gave bf16 with the GRUs fp32
+0.020 to +0.056 dB on pink (every layer bf16: +0.18 to +0.39). The CPU rounds each layer's
output as a GPU does, but its kernels accumulate in their own order: a GPU's figures differ
a little (the H200's, every layer bf16, are above).

Everything else was tried in fp32 one piece at a time (the input features and spectrum, the
mask, the ERB decoder's last conv, the DF coefficients' layers and the DF stage, the whole ERB
or DF decoder): with the encoder's GRU in bf16 none brought pink below +0.28 dB. The encoder's
GRU (its output feeds both decoders) matters most, then the DF decoder's; the policy keeps
every recurrent layer, the rule that needs no layer names. With the GRUs fp32, the rest of
the encoder in fp32 too would take pink to +0.001 dB, but the encoder's convolutions are most
of the bf16 work left, for a shift of +0.03 dB (at most +0.056 over the gains above). The
GRUs' input projections could stay bf16 only in a GRU written out step by step, far slower
than the fused one. What remains (1.4e-3) is bf16's own: fp32 math on weights rounded to bf16
already differs by 7.6e-4.
The cost on that CPU (AVX512-BF16; batch 4 of 2.5 s pieces): 40 s of audio in 1.40 s instead
of 1.29 s (fp32: 1.85 s). On a GPU a GRU step at these sizes is bound by latency more than by
arithmetic, so fp32 should cost little there; unmeasured.

Why a cast copy and not autocast: the engine carries GRU states between pieces, and autocast
leaves the dtypes to each op (cuDNN's GRU under fp16 autocast wants fp16 ``h0`` while the
parameters stay fp32; the CPU's autocast list has no GRU at all). A cast copy runs each layer
in one known dtype, which is what ``tests/test_precision.py`` checks with forward hooks.

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
    """``model`` itself for float32, else a copy of it (eval mode) in ``dtype``: every floating
    parameter and buffer in ``dtype`` except the recurrent layers' (``fp32_islands``), which
    keep the original fp32 weights. The copy is kept while ``model`` lives, one per dtype."""
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
            for name in fp32_islands(cast):
                _keep_fp32(cast.get_submodule(name), model.get_submodule(name), dtype)
            per_model[dtype] = cast
        return cast


def fp32_islands(model) -> list:
    """The modules of ``model`` that half precision leaves in fp32: its recurrent layers
    (every ``torch.nn.RNNBase``; DFN3's five GRU layers in three ``nn.GRU``)."""
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.RNNBase)]


def _keep_fp32(module, original, dtype) -> None:
    """``module`` (a recurrent layer of a cast copy) back in fp32 with ``original``'s weights,
    taking its inputs in fp32 and giving its output sequence in ``dtype``; its hidden state
    stays fp32 (the engine carries it so between pieces)."""
    import torch

    module.to(torch.float32)
    module.load_state_dict(original.state_dict())  # the exact weights, not bf16's rounding
    module.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)
    module.register_forward_hook(_OutputTo(dtype))


def _to_fp32(x):
    import torch

    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _inputs_to_fp32(module, args, kwargs):
    return tuple(_to_fp32(a) for a in args), {k: _to_fp32(v) for k, v in kwargs.items()}


class _OutputTo:
    """Forward hook of an fp32 recurrent layer: (output, state) -> (output in the network's
    dtype, state in fp32). A class, not a closure, so that a cast copy deep-copies and
    pickles."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __call__(self, module, args, out):
        output, state = out
        return output.to(self.dtype), state


def model_dtype(model) -> Optional[object]:
    """The dtype the network runs in: its parameters' outside the fp32 islands (the first
    such parameter's), else its first parameter's."""
    import torch

    islands = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.RNNBase) for p in m.parameters()
    }
    first = None
    for p in model.parameters():
        if id(p) not in islands:
            return p.dtype
        if first is None:
            first = p
    return None if first is None else first.dtype
