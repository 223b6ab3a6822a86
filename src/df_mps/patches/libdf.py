"""``libdf`` (DeepFilterLib) from PyTorch, where the real one can't be imported.

DeepFilterLib has wheels only for CPython <= 3.11, and DeepFilterNet imports it at import time
(``from libdf import DF``). At ``patch()`` this puts a stand-in module into
``sys.modules["libdf"]`` whose names come from ``df_mps.dsp``:

- ``DF_MPS_LIBDF=auto`` (default): only when ``import libdf`` fails.
- ``DF_MPS_LIBDF=torch``: always (replacing an imported real one; modules that already bound
  names from it keep them, and we say so).
- ``DF_MPS_LIBDF=native``: never; a missing DeepFilterLib is reported.

The stand-in loads ``df_mps.dsp`` (and so torch) on first use, not at ``import df_mps``.
Unpatching removes it and puts back the real module if one was there.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from typing import Callable, Optional

from .._log import logger, warn_once
from ..registry import Patch, loaded_modules

SHIM_ATTR = "__df_mps_shim__"
EXPORTS = ("DF", "erb", "erb_inv", "erb_norm", "unit_norm", "unit_norm_init")


def make_module() -> types.ModuleType:
    """A ``libdf`` module whose names resolve to ``df_mps.dsp`` on first access."""
    module = types.ModuleType(
        "libdf",
        "DeepFilterLib's DSP in PyTorch, provided by df_mps (df_mps.dsp) in place of the "
        "Rust module.",
    )
    module.__spec__ = importlib.machinery.ModuleSpec("libdf", None)
    module.__all__ = list(EXPORTS)
    setattr(module, SHIM_ATTR, True)

    def __getattr__(name: str):
        if name not in EXPORTS:
            raise AttributeError(f"module 'libdf' (df_mps stand-in) has no attribute {name!r}")
        from .. import dsp

        for export in EXPORTS:
            module.__dict__[export] = getattr(dsp, export)
        return module.__dict__[name]

    def __dir__():
        return sorted(set(module.__dict__) | set(EXPORTS))

    module.__getattr__ = __getattr__
    module.__dir__ = __dir__
    return module


def is_shim(module: object) -> bool:
    return bool(getattr(module, SHIM_ATTR, False))


def _import_real() -> tuple:
    """(module, None) if the real libdf imports, else (None, reason)."""
    existing = sys.modules.get("libdf")
    if existing is not None and not is_shim(existing):
        return existing, None
    if existing is not None:
        del sys.modules["libdf"]  # a stale stand-in; ask the import system for the real one
    try:
        return importlib.import_module("libdf"), None
    except Exception as exc:  # ImportError, or a broken binary wheel
        return None, f"{type(exc).__name__}: {exc}"


def _df_modules_bound_to(real: object) -> list:
    """The loaded df modules that hold ``real`` or one of its names (bound at their import)."""
    bound = []
    for module in loaded_modules("df"):
        if (
            any(
                getattr(module, export, None) is getattr(real, export, object())
                for export in EXPORTS
            )
            or getattr(module, "libdf", None) is real
        ):
            bound.append(module.__name__)
    return sorted(bound)


def _install(previous: Optional[types.ModuleType]) -> Callable[[], None]:
    shim = make_module()
    sys.modules["libdf"] = shim

    def undo() -> None:
        if sys.modules.get("libdf") is shim:
            if previous is not None:
                sys.modules["libdf"] = previous
            else:
                del sys.modules["libdf"]

    return undo


def install() -> Optional[Callable[[], None]]:
    """``Patch.on_patch``: decide, from the settings, whether ``libdf`` comes from df_mps."""
    from .. import settings

    mode = settings.get().libdf
    if mode == "torch":
        previous = sys.modules.get("libdf")
        if is_shim(previous):
            previous = None
        if previous is not None:
            bound = _df_modules_bound_to(previous)
            if bound:
                warn_once(
                    "libdf-torch-late",
                    "df_mps: DF_MPS_LIBDF=torch, but DeepFilterNet modules imported before "
                    f"df_mps already hold DeepFilterLib's objects ({', '.join(bound)}); "
                    "df_mps's PyTorch DSP only reaches modules imported from now on. Import "
                    "df_mps before df (or use df-mps-run) for it to apply everywhere.",
                )
        logger.trace("df_mps: DF_MPS_LIBDF=torch: libdf comes from df_mps.dsp (PyTorch)")
        return _install(previous)

    real, reason = _import_real()
    if mode == "native":
        if real is None:
            warn_once(
                "libdf-native-missing",
                f"df_mps: DF_MPS_LIBDF=native, but DeepFilterLib (libdf) can't be imported "
                f"({reason}); df_mps provides no stand-in, so `import df` will fail. Install "
                "DeepFilterLib (wheels exist for CPython <= 3.11), or unset DF_MPS_LIBDF to use "
                "df_mps's PyTorch DSP.",
            )
        return None
    if real is not None:
        return None
    logger.trace(
        f"df_mps: DeepFilterLib (libdf) can't be imported ({reason}); libdf comes from "
        "df_mps.dsp (PyTorch). Set DF_MPS_LIBDF=native to require the real one."
    )
    return _install(None)


PATCH = Patch(name="libdf", on_patch=install)
