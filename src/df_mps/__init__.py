"""df-mps: DeepFilterNet on Apple-Silicon GPUs (MPS) and on today's PyTorch stack.

``import df_mps`` patches DeepFilterNet in place (unless ``DF_MPS_DISABLE=1``), before or after
``import df``. ``unpatch()`` puts every original object back.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from typing import Optional

from . import settings as _settings
from ._log import logger, warn_once
from .registry import REGISTRY

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "is_patched", "init_df", "__version__"]

_lock = threading.Lock()
_loaded = False


def _load_patches() -> None:
    global _loaded
    if _loaded:
        return
    from .patches import PATCH_MODULES

    for name in PATCH_MODULES:
        try:
            module = importlib.import_module(f".patches.{name}", __name__)
            REGISTRY.add(module.PATCH)
        except Exception as exc:  # a broken patch module must not break the others
            warn_once(
                f"patch-module-{name}",
                f"df_mps: patch module '{name}' failed to load ({exc!r}); it is skipped.",
            )
    _loaded = True


def patch(
    *,
    forward_method: Optional[str] = None,
    device: Optional[str] = None,
    probe_mps_complex: Optional[bool] = None,
    libdf: Optional[str] = None,
) -> None:
    """Patch DeepFilterNet. Idempotent; keywords override environment variables."""
    with _lock:
        current = _settings.get()
        _settings.set_current(
            current.replace(
                forward_method=forward_method,
                device=device,
                probe_mps_complex=probe_mps_complex,
                libdf=libdf,
            )
        )
        _load_patches()
        REGISTRY.patch()


def unpatch() -> None:
    """Restore every original DeepFilterNet object. Idempotent."""
    with _lock:
        REGISTRY.unpatch()


def is_patched() -> bool:
    return REGISTRY.active


def __getattr__(name: str):
    # Lazy: df_mps.init_df pulls in torch and df, which `import df_mps` must not.
    if name == "init_df":
        from .models import init_df

        return init_df
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _set_mps_fallback(platform=None, environ=None, torch_imported=None) -> str:
    """PYTORCH_ENABLE_MPS_FALLBACK is read once, at `import torch`: set it before, or say so.

    Returns what it did: "set", "warned" or "nothing". The arguments exist for tests.
    """
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    torch_imported = "torch" in sys.modules if torch_imported is None else torch_imported
    if platform != "darwin" or "PYTORCH_ENABLE_MPS_FALLBACK" in environ:
        return "nothing"
    if not torch_imported:
        environ["PYTORCH_ENABLE_MPS_FALLBACK"] = "1"
        logger.trace("df_mps: set PYTORCH_ENABLE_MPS_FALLBACK=1 before torch was imported")
        return "set"
    warn_once(
        "mps-fallback-late",
        "df_mps: torch was imported before df_mps, so PYTORCH_ENABLE_MPS_FALLBACK can no "
        "longer be set (torch reads it at import). Ops without an MPS kernel will raise "
        "instead of running on the CPU. Import df_mps before torch, or run "
        "`export PYTORCH_ENABLE_MPS_FALLBACK=1` before starting Python.",
    )
    return "warned"


def _activate_on_import() -> None:
    if _settings.get().disabled:
        logger.trace("df_mps: DF_MPS_DISABLE is set; nothing patched")
        return
    _set_mps_fallback()
    try:
        patch()
    except Exception as exc:  # importing df_mps must never fail because of a patch
        warn_once(
            "patch-on-import",
            f"df_mps: patching failed ({exc!r}); DeepFilterNet runs unpatched. "
            "Run `python -m df_mps doctor` and report the output.",
        )


_activate_on_import()
