"""``get_device`` in every module that bound it by name.

Upstream's get_device never picks MPS, and raises when no config is loaded. df.utils defines it;
ten more modules copy it with ``from ... import get_device``; the registry finds them all,
and they share one wrapper.
"""

from __future__ import annotations

from ..registry import Patch, Target


def get_device_wrapper(wrapped, instance, args, kwargs):
    from ..routing import choose_device

    return choose_device()


PATCH = Patch(
    name="device",
    # df.utils defines it; the registry gives the wrapper to every module that bound it by name.
    targets=[Target("df.utils", "get_device", get_device_wrapper)],
)
