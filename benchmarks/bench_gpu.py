#!/usr/bin/env python
"""GPU fast paths (issue 14): CUDA graphs, half precision and torch.compile, end to end.

Every measurement runs in a fresh ``python`` child, so that graphs, compiled code and CUDA
memory of one configuration never help or hurt the next. Parts (``--parts``, in this order):

- ``batch1``: one ``--long-minutes`` file (default 10) through ``Enhancer.enhance_file`` at
  batch 1, once the model is loaded (goal: >= 500 audio-s/s on the H200), for fp32 eager,
  fp32/bf16/fp16 with graphs. Each child runs the file twice: the first run includes the graph
  capture of its shapes (``capture_s``, reported apart), the second is the steady state.
- ``corpus``: ``--files`` files of ``--seconds`` (default 64 of 30 s) through the CLI, timed by
  ``bench_engine.py``'s child (first decode to last encode; start-up, model load and graph
  capture apart), for bf16 and fp32 with graphs and fp32 eager (goal: >= 6,000 audio-s/s with
  graphs and bf16).
- ``quality``: bf16 and fp16 against fp32 through the library, with graphs: SI-SDR against
  ``clean.wav`` for the shared ``noisy_white``/``noisy_pink`` speech (goal: within 0.1 dB of
  fp32) and the max abs difference from fp32; fp32 graphs against fp32 eager; and the fp16 run's
  largest activation per layer (forward hooks, full-scale speech), to show fp16's headroom.
- ``steps``: eager against graphs against torch.compile (``--compile-modes``, via
  ``DF_MPS_COMPILE``) at each ``--step-batches`` (default 1 and 64): ``batch`` files of
  ``--step-seconds`` through ``Enhancer.enhance_files``, twice; the first run's extra time is
  the compile or capture time, counted in ``first_audio_s_per_s``.

``--deadline-s`` bounds the whole run: a part that would start after it is recorded as skipped,
and a child gets at most the time left (torch.compile's autotuning can take minutes). The JSON
is rewritten after every row, so a run cut short keeps what it measured.

Examples::

    python benchmarks/bench_gpu.py --device cuda --json h200_gpu.json
    python benchmarks/bench_gpu.py --device cpu --long-minutes 0.05 --files 2 --seconds 2 \\
        --step-batches 1,2 --step-seconds 2 --compile-modes "" --json /tmp/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_engine
from _common import (
    SHARED,
    ChildFailed,
    comma_list,
    model_dir,
    print_rows,
    run_child,
    write_json,
)

SR = 48000
PARTS = ("batch1", "corpus", "quality", "steps")


# -- children --------------------------------------------------------------------------------
def _enhancer(args, batch, precision, step):
    """An Enhancer for ``step`` ("eager", "graphs" or "compile:<mode>")."""
    if step.startswith("compile:"):
        os.environ["DF_MPS_COMPILE"] = step.split(":", 1)[1]
    else:
        os.environ.pop("DF_MPS_COMPILE", None)
    from df_mps.api import Enhancer

    return Enhancer(
        model_dir(args.model_dir),
        device=args.device,
        batch=batch,
        precision=precision,
        cuda_graphs=step == "graphs",
        threads=args.threads or None,
    )


def _recording(enhancer):
    """Keep every engine the enhancer makes (for its step stats)."""
    engines = []
    make = enhancer.engine

    def engine(*a, **k):
        made = make(*a, **k)
        engines.append(made)
        return made

    enhancer.engine = engine
    return engines


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_library(args) -> None:
    """``args.child_files``' files through enhance_files at ``args.batch``, ``args.runs`` times."""
    import soundfile as sf

    from df_mps import graphs

    t0 = time.perf_counter()
    enhancer = _enhancer(args, int(args.batch), args.precision, args.step)
    load_s = time.perf_counter() - t0
    engines = _recording(enhancer)
    files = sorted(Path(args.child_files).iterdir())
    audio = sum(sf.info(str(p)).duration for p in files)
    out = Path(args.out)
    runs = []
    for _ in range(args.runs):
        before = _stats_seconds(engines, graphs)
        _sync(args.device)
        t0 = time.perf_counter()
        jobs = [(p, out / p.name) for p in files]
        results = list(enhancer.enhance_files(jobs, overwrite=True))
        _sync(args.device)
        seconds = time.perf_counter() - t0
        bad = [str(r) for r in results if not hasattr(r, "frames")]
        if bad:
            raise SystemExit(f"failed: {bad[0]}")
        runs.append((seconds, _stats_seconds(engines, graphs) - before))
    first, first_setup = runs[0]
    steady, _ = runs[-1]
    row = {
        "step": args.step,
        "precision": enhancer.precision,
        "requested_precision": args.precision,
        "batch": enhancer.batch,
        "files": len(files),
        "audio_s": audio,
        "model_load_s": load_s,
        "first_s": first,
        "capture_or_compile_s": first_setup,
        # with the model load (Enhancer's warm-up) as well: the graphs' or compile's total
        "capture_or_compile_total_s": _stats_seconds(engines, graphs),
        "first_audio_s_per_s": audio / first,
        "steady_s": steady,
        "audio_s_per_s": audio / steady,
        "step_stats": graphs.stats(engines[-1]) if engines else None,
    }
    print(json.dumps(row))


def _stats_seconds(engines, graphs) -> float:
    if not engines:
        return 0.0
    stats = graphs.stats(engines[-1])
    return float(stats.get("capture_seconds") or stats.get("compile_seconds") or 0.0)


def child_quality(args) -> None:
    """bf16/fp16 against fp32 (graphs, library), fp32 graphs against eager, fp16 headroom."""
    import numpy as np
    import soundfile as sf
    import torch

    from df_mps import graphs, precision

    audio = Path(args.audio_dir)
    clean, sr = sf.read(str(audio / "clean.wav"), dtype="float32")
    noisy = {
        name: sf.read(str(audio / f"{name}.wav"), dtype="float32")[0][: clean.shape[0]]
        for name in ("noisy_white", "noisy_pink")
        if (audio / f"{name}.wav").is_file()
    }
    seconds = args.quality_seconds
    if seconds:
        clean = clean[: int(seconds * sr)]
        noisy = {k: v[: int(seconds * sr)] for k, v in noisy.items()}
    rows, outputs = [], {}
    graphed = "graphs" if args.device.startswith("cuda") else "eager"
    configs = [("fp32", "eager"), ("fp32", graphed), ("bf16", graphed), ("fp16", graphed)]
    for name, step in dict.fromkeys(configs):
        enhancer = _enhancer(args, 1, name, step)
        engines = _recording(enhancer)
        for clip, x in noisy.items():
            y = enhancer.enhance_array(x, sr)
            outputs[(name, step, clip)] = y
            ref = outputs[("fp32", step, clip)]  # fp32 on the same path (eager or graphs)
            eager = outputs[("fp32", "eager", clip)]
            from df_mps.testing import si_sdr as si_sdr_db

            score = si_sdr_db(y, clean[: y.shape[0]])
            rows.append(
                {
                    "precision": enhancer.precision,
                    "requested_precision": name,
                    "step": graphs.stats(engines[-1])["step"],
                    "clip": clip,
                    "si_sdr_db": score,
                    "si_sdr_minus_fp32_db": score - si_sdr_db(ref, clean[: ref.shape[0]]),
                    "max_abs_diff_vs_fp32": float(np.abs(y - ref).max()),
                    "max_abs_diff_vs_fp32_eager": float(np.abs(y - eager).max()),
                    "finite": bool(np.isfinite(y).all()),
                    # The layers half precision left in fp32 (df_mps.precision: the GRUs).
                    "fp32_islands": precision.fp32_islands(
                        precision.cast_model(enhancer.model, enhancer.precision_choice.dtype)
                    )
                    if enhancer.precision != "fp32"
                    else [],
                }
            )
    # fp16 headroom: the largest output of each layer on speech at full scale.
    enhancer = _enhancer(args, 1, "fp16", "eager")
    model = precision.cast_model(enhancer.model, torch.float16)
    peaks, nonfinite = {}, set()

    def hook(module, inputs, out):
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                name = module._bench_name
                if not torch.isfinite(t).all():
                    nonfinite.add(name)
                peaks[name] = max(peaks.get(name, 0.0), float(t.abs().max()))

    handles = []
    for name, module in model.named_modules():
        module._bench_name = name or "DfNet"
        handles.append(module.register_forward_hook(hook))
    x = next(iter(noisy.values()))
    loud = x / np.abs(x).max()
    from df_mps.engine import ArraySink, ArraySource, Engine, Job

    # The network cast to fp16 whatever the device's rule (the CPU runs it too, slowly).
    engine = Engine(model, enhancer.df_state, batch=1, piece_frames=1000)
    sink, source = ArraySink(), ArraySource(loud, sr)
    for result in engine.run([Job(open=lambda: (source, sink))]):
        assert result.ok, result.error
    for h in handles:
        h.remove()
    top = sorted(peaks.items(), key=lambda kv: -kv[1])[:8]
    headroom = {
        "output_finite": bool(np.isfinite(sink.result(1)).all()),
        "input": "noisy speech normalised to 0 dBFS peak",
        "largest_outputs": [{"layer": k, "max_abs": v} for k, v in top],
        "fp16_max": 65504.0,
        "nonfinite_layers": sorted(nonfinite),
    }
    print(json.dumps({"rows": rows, "fp16_headroom": headroom}))


# -- the parent ------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.record = {part: [] for part in PARTS}
        self.extra = {}

    def left(self) -> float:
        return self.args.deadline_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        meta = {
            "device": self.args.device,
            "deadline_s": self.args.deadline_s,
            "long_minutes": self.args.long_minutes,
            "corpus": f"{self.args.files} files of {self.args.seconds:g} s (48 kHz mono)",
            "step_seconds": self.args.step_seconds,
        }
        rows = [dict(r, part=p) for p in PARTS for r in self.record[p]]
        write_json(self.args.json, rows, meta, **self.extra)

    def child(self, argv, label: str, part: str, limit=None) -> None:
        timeout = min(self.left(), limit or self.args.deadline_s)
        if timeout < 5:
            self.record[part].append({"config": label, "skipped": "deadline"})
            self.save()
            return
        try:
            row = run_child(Path(__file__), argv, threads=self.args.threads or 4, timeout=timeout)
        except ChildFailed as exc:
            row = {"error": str(exc)}
        row = {"config": label, **row}
        if part == "quality" and "rows" in row:
            self.extra["fp16_headroom"] = row.pop("fp16_headroom", None)
            rows = row.pop("rows")
            self.record[part].extend(rows)
            print_rows(rows, "quality")
        else:
            self.record[part].append(row)
            print_rows([row], f"{part}: {label}")
        sys.stdout.flush()
        self.save()


def base_child_args(args) -> list:
    out = ["--device", args.device, "--threads", str(args.threads or 0)]
    if args.model_dir:
        out += ["--model-dir", str(args.model_dir)]
    return out


def library_args(args, files: Path, out: Path, batch, precision, step, runs=2) -> list:
    return [
        "--child",
        "library",
        "--child-files",
        str(files),
        "--out",
        str(out),
        "--batch",
        str(batch),
        "--precision",
        precision,
        "--step",
        step,
        "--runs",
        str(runs),
        *base_child_args(args),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", type=comma_list(str), default=list(PARTS))
    p.add_argument("--long-minutes", type=float, default=10.0)
    p.add_argument("--files", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--step-batches", type=comma_list(int), default=[1, 64])
    p.add_argument("--step-seconds", type=float, default=30.0)
    p.add_argument(
        "--compile-modes",
        type=lambda text: [m for m in text.split(",") if m],
        default=["reduce-overhead", "max-autotune-no-cudagraphs"],
    )
    p.add_argument("--compile-timeout", type=float, default=240.0)
    p.add_argument("--step-precisions", type=comma_list(str), default=["fp32", "bf16"])
    p.add_argument(
        "--step-kinds",
        type=comma_list(str),
        default=["eager", "graphs", "compile"],
        help="what the steps part compares (graphs on CUDA only)",
    )
    p.add_argument("--compile-precisions", type=comma_list(str), default=["fp32"])
    p.add_argument("--quality-seconds", type=float, default=0.0, help="0: the whole clips")
    p.add_argument("--deadline-s", type=float, default=480.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None, help="corpora and outputs (default: temp)")
    p.add_argument("--json", type=Path, default=None)
    # the children's own
    p.add_argument("--child", choices=("library", "quality"), help=argparse.SUPPRESS)
    p.add_argument("--child-files", help=argparse.SUPPRESS)
    p.add_argument("--audio-dir", default=str(SHARED / "audio"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--batch", default="1", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--step", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "library":
        return child_library(args)
    if args.child == "quality":
        return child_quality(args)
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        raise SystemExit(f"bench_gpu.py: unknown part(s) {unknown}: use {', '.join(PARTS)}")

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    run = Run(args)
    cuda = args.device.startswith("cuda")
    graphed = "graphs" if cuda else "eager"
    try:
        if "batch1" in args.parts:
            files = work / f"long_{args.long_minutes:g}min"
            bench_engine.make_corpus(files, [(args.long_minutes * 60, SR, 1)])
            configs = [("fp32", "eager"), ("fp32", graphed), ("bf16", graphed), ("fp16", graphed)]
            for precision, step in dict.fromkeys(configs):
                child_argv = library_args(args, files, work / "out_b1", 1, precision, step)
                run.child(child_argv, f"{precision} {step}", "batch1")
        if "corpus" in args.parts:
            files = work / f"corpus_{args.files}x{args.seconds:g}"
            bench_engine.make_corpus(files, [(args.seconds, SR, 1)] * args.files)
            for cli_args in (
                "--precision bf16",
                "--precision fp32",
                "--precision fp32 --no-cuda-graphs",
            ):
                if run.left() < 5:
                    run.record["corpus"].append({"config": cli_args, "skipped": "deadline"})
                    continue
                ns = argparse.Namespace(
                    device=args.device,
                    threads=args.threads,
                    model_dir=args.model_dir,
                    timeout=run.left(),
                    cli_args=cli_args,
                )
                try:
                    row = bench_engine.run_once(ns, files, "auto", work)
                    stats = (row.get("step_stats") or [{}])[-1]  # one store: totals
                    total = stats.get("capture_seconds") or stats.get("compile_seconds") or 0.0
                    inside = max(0.0, total - row.get("setup_at_load_s", 0.0))
                    row["capture_total_s"] = total  # with the model load and inside
                    row["capture_s"] = inside  # inside first decode to last encode
                    row["audio_s_per_s_without_capture"] = row["audio_s"] / (
                        row["process_s"] - inside
                    )
                except ChildFailed as exc:
                    row = {"error": str(exc)}
                row = {"config": cli_args, **row}
                run.record["corpus"].append(row)
                print_rows([row], f"corpus: {cli_args}")
                run.save()
        if "quality" in args.parts:
            child_argv = ["--child", "quality", "--audio-dir", args.audio_dir]
            child_argv += ["--quality-seconds", str(args.quality_seconds), *base_child_args(args)]
            run.child(child_argv, "quality", "quality")
        if "steps" in args.parts:
            # eager and graphs at every batch first, torch.compile (slow to start) last
            steps = ["eager"] * ("eager" in args.step_kinds)
            steps += ["graphs"] * ("graphs" in args.step_kinds and cuda)
            steps += [f"compile:{m}" for m in args.compile_modes if "compile" in args.step_kinds]
            for step in steps:
                compiled = step.startswith("compile")
                for batch in args.step_batches:
                    files = work / f"steps_{batch}x{args.step_seconds:g}"
                    bench_engine.make_corpus(files, [(args.step_seconds, SR, 1)] * batch)
                    for precision in args.compile_precisions if compiled else args.step_precisions:
                        limit = args.compile_timeout if compiled else None
                        child_argv = library_args(
                            args, files, work / f"out_s{batch}", batch, precision, step
                        )
                        run.child(child_argv, f"b{batch} {precision} {step}", "steps", limit)
    finally:
        run.save()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
