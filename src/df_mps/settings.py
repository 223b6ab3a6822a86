"""The user's settings, as one frozen snapshot.

Sources, strongest first: keywords to ``df_mps.patch()``, environment variables, and (for the
forward method only) a ``[df_mps]`` section in the model's config.ini, read at decision time
because the model's config is loaded after df_mps.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Mapping, Optional

from ._log import warn_once

FORWARD_METHODS = ("auto", "real", "complex")
LIBDF_MODES = ("auto", "torch", "native")
DEVICES = ("auto", "cuda", "mps", "cpu")

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")

ENV_VARS = {
    "DF_MPS_DISABLE": "1 makes `import df_mps` patch nothing",
    "DF_MPS_DEVICE": "device for get_device(): auto, cuda, mps, cpu (or e.g. cuda:1)",
    "DF_MPS_FORWARD_METHOD": "auto, real (real-valued math on every device) or complex",
    "DF_MPS_PROBE_COMPLEX": "1 probes MPS for complex support at run time, not by macOS version",
    "DF_MPS_LIBDF": "auto, torch (PyTorch DSP instead of DeepFilterLib) or native",
    "DF_MPS_CACHE_DIR": "df_mps's cache (default: platform user cache dir + df-mps); models/ in it",
    "DF_MPS_COMPILE": "torch.compile mode for the engine's step (reduce-overhead, "
    "max-autotune-no-cudagraphs, default); unset: CUDA graphs on CUDA, else eager",
    "DF_MPS_REALTIME_COMPILE": "auto, 1 or 0: RealtimeEnhancer's compiled hop (default auto: "
    "on the CPU where a C++ compiler exists)",
    "DF_MPS_GRU_KERNEL": "0 runs torch's GRUs in the engine on the CPU instead of df-mps's C "
    "kernel",
    "DF_MPS_KEEP_FREED_BUFFERS": "0 leaves glibc's malloc as it is in the command line and Ray "
    "actors (by default they keep freed buffers of up to 32 MiB for reuse)",
    "PYTORCH_ENABLE_MPS_FALLBACK": "1: ops with no MPS kernel run on the CPU (read at import)",
    "DEVICE": "DeepFilterNet's own device override (same as [train] DEVICE in config.ini)",
}


class SettingsError(ValueError):
    """A setting has a value df_mps does not know."""


@dataclasses.dataclass(frozen=True)
class Settings:
    disabled: bool = False
    device: Optional[str] = None  # None or "auto": cuda, then mps, then cpu
    forward_method: Optional[str] = None  # None: not set here; config.ini or "auto" decides
    probe_mps_complex: bool = False
    libdf: str = "auto"

    def __post_init__(self) -> None:
        if self.forward_method is not None and self.forward_method not in FORWARD_METHODS:
            raise SettingsError(
                f"forward_method must be one of {', '.join(FORWARD_METHODS)}, "
                f"not {self.forward_method!r}"
            )
        if self.libdf not in LIBDF_MODES:
            raise SettingsError(
                f"libdf must be one of {', '.join(LIBDF_MODES)}, not {self.libdf!r}"
            )
        if self.device is not None:
            kind = self.device.split(":")[0]
            if kind not in DEVICES:
                raise SettingsError(
                    f"device must be one of {', '.join(DEVICES)} (or cuda:N), not {self.device!r}"
                )

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides) -> Settings:
        env = os.environ if environ is None else environ
        values = {
            "disabled": env.get("DF_MPS_DISABLE", "").strip().lower() in TRUE_WORDS,
            "device": _env_choice(env, "DF_MPS_DEVICE", DEVICES, allow_index=True),
            "forward_method": _env_choice(env, "DF_MPS_FORWARD_METHOD", FORWARD_METHODS),
            "probe_mps_complex": env.get("DF_MPS_PROBE_COMPLEX", "").strip().lower() in TRUE_WORDS,
            "libdf": _env_choice(env, "DF_MPS_LIBDF", LIBDF_MODES) or "auto",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _env_choice(env, name, choices, allow_index=False) -> Optional[str]:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    kind = raw.split(":")[0] if allow_index else raw
    if kind in choices:
        return raw
    warn_once(
        f"bad-env-{name}",
        f"df_mps: {name}={raw!r} is not one of {', '.join(choices)}; "
        f"df_mps ignores it and uses 'auto'. Set {name} to one of those values.",
    )
    return None


_current: Optional[Settings] = None
_lock = threading.Lock()


def get() -> Settings:
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = Settings.from_env()
    return _current


def set_current(settings: Settings) -> Settings:
    global _current
    with _lock:
        _current = settings
    return settings


def refresh(**overrides) -> Settings:
    """Rebuild from the environment (plus keyword overrides)."""
    return set_current(Settings.from_env(**overrides))


def config_forward_method() -> Optional[str]:
    """``forward_method`` from a ``[df_mps]`` section of the loaded DeepFilterNet config, if any.

    Reads the parser directly: DeepFilterNet's ``config()`` would add the section and mark the
    config modified, and it raises when no config is loaded yet.
    """
    import sys

    cfg_mod = sys.modules.get("df.config")
    parser = getattr(getattr(cfg_mod, "config", None), "parser", None)
    if parser is None or not parser.has_option("df_mps", "forward_method"):
        return None
    value = parser.get("df_mps", "forward_method").strip().lower()
    if value in FORWARD_METHODS:
        return value
    warn_once(
        f"bad-config-forward-method-{value}",
        f"df_mps: config.ini [df_mps] forward_method={value!r} is not one of "
        f"{', '.join(FORWARD_METHODS)}; df_mps uses 'auto'. Fix the value in config.ini.",
    )
    return None


def config_device() -> Optional[str]:
    """DeepFilterNet's own device setting: env var DEVICE, else config.ini [train] DEVICE."""
    import sys

    env = os.environ.get("DEVICE", "").strip()
    if env:
        return env
    cfg_mod = sys.modules.get("df.config")
    parser = getattr(getattr(cfg_mod, "config", None), "parser", None)
    if parser is None:
        return None
    for option in ("device", "DEVICE"):
        if parser.has_option("train", option):
            return parser.get("train", option).strip() or None
    return None
