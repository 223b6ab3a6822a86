"""Long recordings: peak memory and real-time factor vs length, streaming vs whole file.

    python benchmarks/bench_long.py                  # 10 s, 3 min, 30 min; upstream 1 and 5 min
    python benchmarks/bench_long.py --lengths 10 1800 --repeats 5 --json long.json
    python benchmarks/bench_long.py --methods-only   # how to join pieces: carry vs overlap

Every measurement runs in a fresh child process, so each peak RSS (VmHWM) is that run's own:

- streaming: the df-mps command line (``df_mps.enhance.main``, bounded-memory mode, the default)
  on a generated 48 kHz PCM_16 file. The child first enhances a 1 s file (model load, warm-up),
  then times ``main()`` on the file: wall-clock, so reading, resampling, the model, writing and
  fsync all count. 10 s files are run ``--inner`` times per child (median). RTF = wall / audio;
  "compute RTF" counts only the stream's compute (features, model, synthesis, resampling).
- upstream: ``df.enhance.enhance()`` on the whole file in memory (what upstream's deepFilter
  does per file), timed around that call.

Streaming lengths run interleaved (10 s, 3 min, 30 min, 10 s, ...) ``--repeats`` times and the
median RTF per length is reported with the ratio to the 10 s file's. Files are generated from
the shared noisy_white/noisy_pink takes at varying gains, in a temporary directory (removed
unless --keep); a 30-minute file takes 165 MiB.

The method comparison (``--methods``, on by default) measures the two ways to join pieces on
1 minute of audio against upstream's whole-file output: carrying the model's state exactly
(df_mps.streaming) and overlapping independent pieces with left context and a crossfade.
Prints the rows; ``--json`` writes them for docs/performance.md: one row per (mode, length),
mode "streaming" or "upstream", and the method comparison as ``methods``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    SHARED,
    SR,
    ChildFailed,
    human_length,
    model_dir,
    peak_rss_mib,
    print_rows,
    run_child,
    write_json,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=float, nargs="+", default=[10, 180, 1800], metavar="S")
    p.add_argument("--upstream", type=float, nargs="*", default=[60, 300], metavar="S")
    p.add_argument("--repeats", type=int, default=3, help="child runs per streaming length")
    p.add_argument("--inner", type=int, default=5, help="runs per child for files <= 60 s")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto", help="the CLI's --device (auto: cuda, mps, cpu)")
    p.add_argument("--piece-seconds", type=float, default=None)
    p.add_argument("--methods", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--methods-only", action="store_true")
    p.add_argument("--model-dir", type=Path, help="DFN3 model directory (default: ../shared's)")
    p.add_argument("--audio-dir", type=Path, default=SHARED / "audio")
    p.add_argument("--workdir", type=Path, help="where generated files go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--json", type=Path, help="write results as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- test material --------------------------------------------------------------------------------
def takes(audio_dir: Path):
    import soundfile as sf

    white, _ = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    pink, _ = sf.read(str(audio_dir / "noisy_pink.wav"), dtype="float32")
    return white, pink


def write_program(path: Path, seconds: float, audio_dir: Path, seed: int = 0) -> Path:
    """noisy_white/noisy_pink takes one after another at random gains, PCM_16, block by block."""
    import numpy as np
    import soundfile as sf

    if path.exists() and sf.info(str(path)).frames == round(seconds * SR):
        return path
    rng = np.random.default_rng(seed)
    pair = takes(audio_dir)
    total, written, i = round(seconds * SR), 0, 0
    with sf.SoundFile(str(path), "w", SR, 1, "PCM_16") as f:
        while written < total:
            take = pair[i % 2][: total - written] * np.float32(rng.uniform(0.2, 1.6))
            f.write(np.clip(take, -1, 1))
            written += take.shape[0]
            i += 1
    return path


# -- children --------------------------------------------------------------------------------------
def child(spec: dict) -> dict:
    """One measurement in a fresh process (its own peak RSS), with df_mps's default settings."""
    return run_child(__file__, ["--child", json.dumps(spec)], spec["threads"], clean_env=True)


def child_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["mode"] == "stream":
        result = child_stream(spec)
    elif spec["mode"] == "upstream":
        result = child_upstream(spec)
    else:
        result = child_methods(spec)
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


def child_stream(spec: dict) -> dict:
    import soundfile as sf

    from df_mps import enhance as cli
    from df_mps.api import FileResult

    results = []
    run_jobs = cli._run_jobs

    def recording(*args, **kwargs):  # observe what the command did for each file
        for result in run_jobs(*args, **kwargs):
            if isinstance(result, FileResult):
                results.append(result)
            yield result

    cli._run_jobs = recording
    out_dir = Path(spec["out_dir"])
    argv = ["-o", str(out_dir), "-m", spec["model_dir"], "--threads", str(spec["threads"])]
    argv += ["--device", spec.get("device", "auto")]
    argv += ["--overwrite", "--log-level", "warning"]
    if spec.get("piece_seconds"):
        argv += ["--piece-seconds", str(spec["piece_seconds"])]
    if cli.main([spec["warmup"], *argv]) != 0:
        raise SystemExit("warm-up run failed")
    walls = []
    for _ in range(spec["inner"]):
        t0 = time.perf_counter()
        rc = cli.main([spec["file"], *argv])
        walls.append(time.perf_counter() - t0)
        if rc != 0:
            raise SystemExit(f"enhancing {spec['file']} failed")
    seconds = sf.info(spec["file"]).frames / SR
    return {
        "audio_seconds": seconds,
        "wall_seconds": statistics.median(walls),
        "model_seconds": statistics.median(r.model_seconds for r in results[1:]),
        "rtf": statistics.median(walls) / seconds,
        "runs": len(walls),
    }


def child_upstream(spec: dict) -> dict:
    import importlib

    import soundfile as sf
    import torch

    os.environ["DF_MPS_DEVICE"] = spec.get("device", "auto")  # as the CLI's --device
    importlib.import_module("df_mps")  # first: df imports on today's torchaudio through it
    from df.enhance import enhance, init_df

    model, df_state, _ = init_df(spec["model_dir"], log_file=None, log_level="ERROR")
    warm, _ = sf.read(spec["warmup"], dtype="float32")
    enhance(model, df_state, torch.from_numpy(warm)[None])
    audio, _ = sf.read(spec["file"], dtype="float32")
    t0 = time.perf_counter()
    enhance(model, df_state, torch.from_numpy(audio)[None])
    wall = time.perf_counter() - t0
    seconds = audio.shape[0] / SR
    return {"audio_seconds": seconds, "wall_seconds": wall, "rtf": wall / seconds, "runs": 1}


# -- how to join pieces: exact carry vs overlap + crossfade --------------------------------------
def overlap_enhance(model, df_state, audio, piece_s, left_s, right_s, fade_s):
    """Independent pieces through upstream's enhance(), each with ``left_s`` of audio before it
    (to warm up the GRUs and the tau = 1 s normalisation) and ``right_s`` after (lookahead),
    joined with a linear crossfade of ``fade_s``."""
    import numpy as np
    import torch
    from df.enhance import enhance

    n = audio.shape[0]
    piece, left, right, fade = (round(s * SR) for s in (piece_s, left_s, right_s, fade_s))
    out = np.zeros(n, np.float32)
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    for start in range(0, n, piece):
        stop = min(n, start + piece)
        lo, hi = max(0, start - left - fade), min(n, stop + right)
        y = enhance(model, df_state, torch.from_numpy(audio[lo:hi])[None])[0].numpy()
        if start == 0:
            out[start:stop] = y[start - lo : stop - lo]
            continue
        # The last `fade` samples before `start` fade from the previous piece to this one.
        a = start - fade
        out[a:start] = out[a:start] * (1 - ramp) + y[a - lo : start - lo] * ramp
        out[start:stop] = y[start - lo : stop - lo]
    return out


def child_methods(spec: dict) -> dict:
    import numpy as np
    import soundfile as sf
    import torch

    from df_mps.enhance import load_enhancer
    from df_mps.streaming import StreamEnhancer, model_context

    enhancer = load_enhancer(spec["model_dir"])
    model, df_state = enhancer.model, enhancer.df_state
    audio, _ = sf.read(spec["file"], dtype="float32")
    from df.enhance import enhance

    def snr(out, ref):
        err = np.sum((out.astype(np.float64) - ref) ** 2)
        return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / err))

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    ref, t_whole = timed(lambda: enhance(model, df_state, torch.from_numpy(audio)[None])[0].numpy())

    def carry():
        stream = StreamEnhancer(enhancer, sample_rate=SR, channels=1)
        block = 10 * SR
        parts = [stream.process(audio[i : i + block, None]) for i in range(0, len(audio), block)]
        return np.concatenate(parts + [stream.finish()])[:, 0]

    rows = []
    carry()  # warm-up
    out, t = timed(carry)
    rows.append(
        {"method": "carry state (df_mps.streaming)", "snr_db": snr(out, ref),
         "left_s": model_context(model)[0] * df_state.hop_size() / SR,
         "seconds": t, "max_abs": float(np.abs(out - ref).max())}
    )  # fmt: skip
    for left in spec["overlap_left"]:
        out, t = timed(
            lambda left=left: overlap_enhance(model, df_state, audio, 10.0, left, 0.1, 0.02)
        )
        rows.append(
            {"method": "overlap + crossfade", "left_s": left, "snr_db": snr(out, ref),
             "seconds": t, "max_abs": float(np.abs(out - ref).max())}
        )  # fmt: skip
    return {"audio_seconds": len(audio) / SR, "whole_seconds": t_whole, "rows": rows}


# -- the parent ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    import torch

    args.model_dir = model_dir(args.model_dir)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="df-mps-bench-long-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = {"threads": args.threads, "model_dir": str(args.model_dir), "device": args.device}
    warmup = str(write_program(workdir / "warmup_1s.wav", 1.0, args.audio_dir, seed=99))
    meta = {
        "threads": args.threads,
        "device": args.device
        if args.device != "auto"
        else ("cuda" if torch.cuda.is_available() else "cpu"),
        "repeats": args.repeats,
        "note": "streaming: the CLI's wall time per file (I/O included), after a warm-up run; "
        "upstream: df.enhance.enhance() on the whole file in memory. Peak RSS per child process.",
    }
    rows, more = [], {}
    try:
        if not args.methods_only:
            rows += bench_streaming(args, base, workdir, warmup)
            rows += bench_upstream(args, base, workdir, warmup)
        if args.methods or args.methods_only:
            src = write_program(workdir / "methods_60s.wav", 60, args.audio_dir, seed=7)
            spec = {**base, "mode": "methods", "file": str(src), "overlap_left": [1, 2, 5, 10, 20]}
            more["methods"] = child(spec)
    except ChildFailed as exc:
        print(f"bench_long: a child run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_rows(rows, f"{meta['device']}, {args.threads} thread(s), {args.repeats} child runs")
    if more:
        print_rows(more["methods"]["rows"], "Joining 10 s pieces of 1 min against the whole file")
    write_json(args.json, rows, meta, **more)
    return 0


def bench_streaming(args, base, workdir: Path, warmup: str) -> list:
    files = {
        s: str(write_program(workdir / f"program_{s:g}s.wav", s, args.audio_dir, seed=int(s)))
        for s in args.lengths
    }
    runs = {s: [] for s in args.lengths}
    for r in range(args.repeats):
        for s in args.lengths:  # interleaved, so machine noise hits every length alike
            spec = {
                **base,
                "mode": "stream",
                "file": files[s],
                "warmup": warmup,
                "out_dir": str(workdir / "out"),
                "inner": args.inner if s <= 60 else 1,
                "piece_seconds": args.piece_seconds,
            }
            result = child(spec)
            runs[s].append(result)
            print(
                f"# repeat {r + 1}/{args.repeats} {human_length(s)}: RTF {result['rtf']:.4f}, "
                f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    shortest = min(args.lengths)
    base_rtf = statistics.median(r["rtf"] for r in runs[shortest])
    for s in args.lengths:
        rtfs = [r["rtf"] for r in runs[s]]
        rows.append(
            {
                "mode": "streaming",
                "seconds": s,
                "rtf_median": statistics.median(rtfs),
                "rtf_runs": rtfs,
                "model_rtf_median": statistics.median(r["model_seconds"] / s for r in runs[s]),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[s]),
                "vs_shortest": statistics.median(rtfs) / base_rtf,
            }
        )
    return rows


def bench_upstream(args, base, workdir: Path, warmup: str) -> list:
    rows = []
    for s in args.upstream:
        src = write_program(workdir / f"program_{s:g}s.wav", s, args.audio_dir, seed=int(s))
        spec = {**base, "mode": "upstream", "file": str(src), "warmup": warmup}
        result = child(spec)
        print(f"# upstream {human_length(s)}: RTF {result['rtf']:.4f}", file=sys.stderr, flush=True)
        rows.append(
            {"mode": "upstream", "seconds": s, "rtf": result["rtf"],
             "peak_rss_mib": result["peak_rss_mib"]}
        )  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.exit(main())
