"""DFN3's ``--pf`` post-filter: ``as_complex(spec_e).abs()`` inside ``DfNet.forward``.

The post-filter is the last step of the forward, and its only complex op is the magnitude
``as_complex(x).abs()``: ``df.deepfilternet3`` uses its ``as_complex`` binding for nothing else.
Where the route is real, that binding returns a stand-in whose ``abs()`` is the real-valued
magnitude, so upstream's own post-filter math runs with real tensors only.

The registry gives the ``as_complex`` wrapper to every binding of ``df.utils.as_complex`` in
the package (``df.enhance`` uses it for real complex spectra), so the stand-in is returned only
inside ``DfNet.forward``: a wrapper on it sets a context variable for the call, per thread and
per task, and ``as_complex`` outside a DFN3 forward is upstream's.

Nothing on the model is switched: an earlier version turned ``post_filter`` off around the call
and lost the post-filter in concurrent calls on one model. The route is decided per call from the
tensor's device, so concurrent calls need no lock.
"""

from __future__ import annotations

import contextvars

from ..registry import Patch, Target

# True while this thread (or task) runs DfNet.forward: where as_complex means the post-filter's.
_in_dfn3_forward: contextvars.ContextVar = contextvars.ContextVar(
    "df_mps_in_dfn3_forward", default=False
)


class _RealMagnitude:
    """What ``as_complex(x)`` stands for on the real route: only its ``abs()`` is ever taken."""

    __slots__ = ("ri",)

    def __init__(self, ri) -> None:
        self.ri = ri

    def abs(self):
        import torch

        from ..kernels import magnitude

        # In fp32 for half tensors: the post-filter's eps (1e-12) is 0 in fp16, where the
        # mask of a silent bin would become 0/0 (NaN).
        ri = self.ri.float() if self.ri.dtype in (torch.float16, torch.bfloat16) else self.ri
        return magnitude(ri)

    def __getattr__(self, name):
        # A future upstream that used as_complex for more than the magnitude would land here.
        raise AttributeError(
            f"df_mps: the real post-filter route supports as_complex(x).abs() only, not .{name}"
        )


def dfnet_forward(wrapped, instance, args, kwargs):
    token = _in_dfn3_forward.set(True)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _in_dfn3_forward.reset(token)


def as_complex_in_dfn3(wrapped, instance, args, kwargs):
    import torch

    from ..routing import Route, route

    if not _in_dfn3_forward.get():  # another module's binding (df.enhance's): upstream's
        return wrapped(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    if torch.is_complex(x) or route("post_filter", x.device, x.dtype) is not Route.REAL:
        return wrapped(*args, **kwargs)
    if x.shape[-1] != 2:  # the check upstream's as_complex makes
        raise ValueError(f"Last dimension need to be of length 2 (re + im), but got {x.shape}")
    return _RealMagnitude(x)


PATCH = Patch(
    name="post_filter",
    targets=[
        Target("df.deepfilternet3", "DfNet.forward", dfnet_forward),
        Target("df.deepfilternet3", "as_complex", as_complex_in_dfn3),
    ],
)
