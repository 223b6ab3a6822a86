"""What ``df.io`` imports from old torchaudio, where the installed torchaudio lacks it.

deepfilternet 0.5.6's df/io.py does ``from torchaudio.backend.common import AudioMetaData``.
torchaudio 2.9 removed ``torchaudio.backend``, so ``import df`` fails there. We provide a
stand-in module only when the real one can't be imported; older torchaudio keeps its own.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types

from ..registry import Patch

SHIM_ATTR = "__df_mps_shim__"


@dataclasses.dataclass
class AudioMetaData:
    """The fields of torchaudio's old ``AudioMetaData``, which ``df.io`` reads."""

    sample_rate: int
    num_frames: int
    num_channels: int
    bits_per_sample: int = 0
    encoding: str = "UNKNOWN"


def _has_real_backend() -> bool:
    try:
        importlib.import_module("torchaudio.backend.common")
    except ImportError:
        return False
    return True


def install(torchaudio) -> object:
    if "torchaudio.backend.common" in sys.modules or _has_real_backend():
        return None
    backend = types.ModuleType("torchaudio.backend")
    common = types.ModuleType("torchaudio.backend.common")
    common.AudioMetaData = AudioMetaData
    backend.common = common
    for mod in (backend, common):
        setattr(mod, SHIM_ATTR, True)
        mod.__doc__ = "Stand-in provided by df_mps for torchaudio >= 2.9, which removed it."
    sys.modules["torchaudio.backend"] = backend
    sys.modules["torchaudio.backend.common"] = common
    had_attr = hasattr(torchaudio, "backend")
    previous = getattr(torchaudio, "backend", None)
    torchaudio.backend = backend

    def undo() -> None:
        for name in ("torchaudio.backend.common", "torchaudio.backend"):
            if getattr(sys.modules.get(name), SHIM_ATTR, False):
                del sys.modules[name]
        if had_attr:
            torchaudio.backend = previous
        elif getattr(torchaudio, "backend", None) is backend:
            del torchaudio.backend

    return undo


PATCH = Patch(name="torchaudio_compat", installers={"torchaudio": install})
