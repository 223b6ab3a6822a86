"""DFN1/DFN2's ``df.modules.DfOp``: route ``complex_strided`` to upstream's ``real_unfold``.

``DfOp.set_forward`` stores the chosen method as the instance attribute ``forward``, and DFN1
wraps the DfOp in ``torch.jit.script``. So the method is chosen when set_forward runs, for the
device get_device() picks (scripting then compiles the real method), and an eager DfOp that kept
complex_strided is still routed per call.
"""

from __future__ import annotations

from ..registry import Patch, Target


def _method_arg(method):
    return method


def set_forward(wrapped, instance, args, kwargs):
    from ..routing import Route, choose_device, route

    method = _method_arg(*args, **kwargs)
    if method == "complex_strided" and route("dfop", choose_device()) is Route.REAL:
        return wrapped("real_unfold")
    return wrapped(*args, **kwargs)


def _spec_arg(spec, *args, **kwargs):
    return spec


def forward_complex_strided(wrapped, instance, args, kwargs):
    from ..routing import Route, route

    if route("dfop", _spec_arg(*args, **kwargs).device) is Route.REAL:
        return instance.forward_real_unfold(*args, **kwargs)
    return wrapped(*args, **kwargs)


PATCH = Patch(
    name="dfop",
    targets=[
        Target("df.modules", "DfOp.set_forward", set_forward),
        Target("df.modules", "DfOp.forward_complex_strided", forward_complex_strided),
    ],
)
