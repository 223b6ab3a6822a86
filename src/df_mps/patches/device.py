"""``get_device`` in every module that bound it by name.

Upstream's get_device never picks MPS, and raises when no config is loaded. df.utils defines it;
ten more modules copy it with ``from ... import get_device``. All bindings share one wrapper.
"""

from __future__ import annotations

from ..registry import Patch, Target

ORIGIN = ("df.utils", "get_device")

# df.utils first: the others import it, so its hook runs before theirs.
BINDING_MODULES = (
    "df.utils",
    "df.modules",
    "df.enhance",
    "df.deepfilternet",
    "df.deepfilternet2",
    "df.deepfilternet3",
    "df.deepfilternetmf",
    "df.logger",
    "df.loss",
    "df.train",
    "df.evaluation_utils",
)


def get_device_wrapper(wrapped, instance, args, kwargs):
    from ..routing import choose_device

    return choose_device()


PATCH = Patch(
    name="device",
    targets=[Target(m, "get_device", get_device_wrapper, origin=ORIGIN) for m in BINDING_MODULES],
)
