"""``df.stoi.stoi`` goes through torch.stft (complex): on a device without complex, run it on the
CPU and hand the result back on the input's device. ``df.loss`` binds it by name."""

from __future__ import annotations

import contextlib
import sys

from ..registry import Patch, Target


def _xy(x, y, fs_source):
    return x, y, fs_source


def stoi_wrapper(wrapped, instance, args, kwargs):
    from ..routing import Route, route

    x, y, fs_source = _xy(*args, **kwargs)
    if route("stoi", x.device) is not Route.CPU:
        return wrapped(*args, **kwargs)
    # While df_mps.testing emulates a complex-less CPU, "the CPU" is outside its guard.
    testing = sys.modules.get("df_mps.testing")
    host = testing.outside_guard() if testing is not None else contextlib.nullcontext()
    with host:
        result = wrapped(x.cpu(), y.cpu(), fs_source)
    return result.to(x.device)


PATCH = Patch(
    name="stoi",
    targets=[Target("df.stoi", "stoi", stoi_wrapper)],
)
