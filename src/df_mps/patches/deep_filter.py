"""DFN3's deep filter, ``df.multiframe.DF.forward`` (view_as_complex plus a complex einsum).

DeepFilterNet3, the default model, filters here, not in ``DfOp``; DFN2 does too when its
DFOP_METHOD is not real_unfold.
"""

from __future__ import annotations

from ..registry import Patch, Target


def _args(spec, coefs):
    return spec, coefs


def deep_filter_forward(wrapped, instance, args, kwargs):
    from ..kernels import deep_filter_real
    from ..routing import Route, route

    spec, coefs = _args(*args, **kwargs)
    if route("deep_filter", spec.device, spec.dtype) is not Route.REAL:
        return wrapped(*args, **kwargs)
    filtered = deep_filter_real(
        spec,
        coefs,
        num_freqs=instance.num_freqs,
        frame_size=instance.frame_size,
        lookahead=instance.lookahead,
        conj=instance.conj,
    )
    # Upstream writes into the spec it was given (and returns it), cloning only in training.
    if instance.training:
        spec = spec.clone()
    spec[..., : instance.num_freqs, :] = filtered
    return spec


PATCH = Patch(
    name="deep_filter",
    targets=[Target("df.multiframe", "DF.forward", deep_filter_forward)],
)
