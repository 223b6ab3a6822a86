"""Throughput of df_mps's PyTorch DSP (df_mps.dsp) against DeepFilterLib (libdf).

What is timed is what DeepFilterNet's enhance() needs around the model: STFT analysis, the
ERB and complex features with their exponential-mean normalisation, and the synthesis of a
spectrum back to audio. Throughput is audio-seconds processed per second of wall time.

    python benchmarks/bench_dsp.py                       # CPU, 1 thread, batch 1 and 32
    python benchmarks/bench_dsp.py --device cuda --batch 1,32,128

libdf runs only on the CPU and one channel at a time; it is timed where it is installed
(Python <= 3.11) and the device is the CPU. Prints the rows; --json writes them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import comma_list, print_rows, synchronize, usable_device, write_json

SR, FFT, HOP, NB_ERB, MIN_ERB, NB_DF = 48000, 960, 480, 32, 2, 96  # DeepFilterNet3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument(
        "--batch", type=comma_list(int), default=[1, 32], help="comma-separated batch sizes"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each signal")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds to time each row")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON (for the docs)")
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.seconds <= 0:
        parser.error("--batch sizes and --seconds must be positive")
    return args


def timed(run, args: tuple, device: torch.device, min_time: float) -> float:
    """Seconds per ``run(*args)``: one warm-up call, then repeat until min_time has passed."""
    run(*args)
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while True:
        run(*args)
        synchronize(device)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and calls >= 2:
            return elapsed / calls


def torch_dsp_round(audio: torch.Tensor, dsp_df) -> None:
    spec, erb_feat, spec_feat = dsp_df.features(audio, NB_DF)
    dsp_df.synthesis(spec.squeeze(-4))


def real_libdf():
    """The real DeepFilterLib module, or None (absent, or df_mps's stand-in)."""
    try:
        import libdf
    except ImportError:
        return None
    return None if getattr(libdf, "__df_mps_shim__", False) else libdf


def libdf_round(audio: np.ndarray, libdf, df, alpha: float) -> None:
    # What df.enhance.df_features and enhance() call, in the same order.
    spec = df.analysis(audio)
    libdf.erb_norm(libdf.erb(spec, df.erb_widths()), alpha)
    libdf.unit_norm(spec[..., :NB_DF], alpha)
    df.synthesis(spec)


def row(implementation: str, device: str, batch: int, audio_seconds: float, seconds: float):
    return {
        "implementation": implementation,
        "device": device,
        "batch": batch,
        "audio_s_per_s": audio_seconds / seconds,
        "ms_per_batch": seconds * 1000,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = usable_device(args.device)

    from df_mps import dsp

    libdf = real_libdf() if device.type == "cpu" else None
    alpha = dsp.norm_alpha(SR, HOP)
    samples = int(args.seconds * SR)
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        audio = (rng.standard_normal((batch, samples)) * 0.1).astype(np.float32)
        audio_seconds = batch * samples / SR
        audio_t = torch.from_numpy(audio).to(device)
        dsp_df = dsp.DF(SR, FFT, HOP, NB_ERB, MIN_ERB)
        t_torch = timed(torch_dsp_round, (audio_t, dsp_df), device, args.min_time)
        if libdf is not None:
            lib_df = libdf.DF(SR, FFT, HOP, NB_ERB, MIN_ERB)
            t_lib = timed(libdf_round, (audio, libdf, lib_df, alpha), device, args.min_time)
            rows.append(row("libdf (Rust)", "cpu", batch, audio_seconds, t_lib))
        rows.append(row("df_mps.dsp", str(device), batch, audio_seconds, t_torch))

    if libdf is None and device.type == "cpu":
        print("bench_dsp: DeepFilterLib is not installed here; only df_mps.dsp is timed.")
    meta = {"device": str(device), "threads": args.threads, "seconds": args.seconds}
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    print_rows(rows, f"DSP round trip, {args.seconds:g} s signals, {args.threads} thread(s)")
    write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
