"""DFN3's ``--pf`` post-filter: ``as_complex(spec_e).abs()`` inside ``DfNet.forward``.

The post-filter is the last step of the forward, computed from its output and its input spectrum.
Where the route is real, we run upstream's forward with the post-filter switched off and apply
the same formula with real-valued magnitudes.
"""

from __future__ import annotations

import threading
import weakref

from ..registry import Patch, Target

# Switching post_filter off and on again must not race with another thread's call on the
# same model, so calls that take the real route hold a per-model lock.
_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _lock_for(model) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.Lock()
        return lock


def _spec_arg(spec, *args, **kwargs):
    return spec


def dfnet_forward(wrapped, instance, args, kwargs):
    from ..kernels import post_filter_real
    from ..routing import Route, route

    if not getattr(instance, "post_filter", False):
        return wrapped(*args, **kwargs)
    spec = _spec_arg(*args, **kwargs)
    if route("post_filter", spec.device, spec.dtype) is not Route.REAL:
        return wrapped(*args, **kwargs)
    with _lock_for(instance):
        instance.post_filter = False
        try:
            spec_e, m, lsnr, df_coefs = wrapped(*args, **kwargs)
        finally:
            instance.post_filter = True
    return post_filter_real(spec_e, spec, instance.post_filter_beta), m, lsnr, df_coefs


PATCH = Patch(
    name="post_filter",
    targets=[Target("df.deepfilternet3", "DfNet.forward", dfnet_forward)],
)
