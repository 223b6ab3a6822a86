"""DeepFilterNet3 end to end on a GPU with df_mps's PyTorch DSP: where the time goes.

The df.enhance pipeline, with every step on the device: features (STFT, ERB and complex
features, normalisation) by ``df_mps.dsp.DF``, the DFN3 forward, and the synthesis; one copy
back to the CPU at the end. For comparison, upstream ``df.enhance.enhance`` on the same model
(its features and synthesis run on the CPU, here through the same PyTorch stand-in for libdf).
Needs only torch, deepfilternet and df_mps: DF_MPS_LIBDF=torch is forced, so DeepFilterLib is
not used even where it is installed.

    python benchmarks/h200_dsp_pipeline.py --model-dir ../shared/models/DeepFilterNet3 \\
        --audio ../shared/audio/noisy_white.wav ../shared/audio/noisy_pink.wav

Prints the rows (audio-seconds per second, and milliseconds per batch for each step), the
on-device pipeline's difference from upstream enhance(), and whether the device's inverse FFT
ignores the imaginary part of the DC and Nyquist bins (libdf does); --json writes them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _common import (
    SHARED,
    comma_list,
    model_dir,
    print_rows,
    synchronize,
    usable_device,
    write_json,
)

os.environ["DF_MPS_LIBDF"] = "torch"  # before df_mps and df are imported


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, help="DeepFilterNet3 model directory (default: ../shared's)"
    )
    parser.add_argument(
        "--audio",
        type=Path,
        nargs="+",
        default=[SHARED / "audio" / n for n in ("noisy_white.wav", "noisy_pink.wav")],
        help="wav files; a batch cycles through them",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, mps or cpu")
    parser.add_argument(
        "--batch", type=comma_list(int), default=[1, 32], help="comma-separated batch sizes"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each file")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (median)")
    parser.add_argument(
        "--skip-upstream", action="store_true", help="don't time upstream df.enhance.enhance"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON (for the docs)")
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.seconds <= 0 or args.repeat < 1:
        parser.error("--batch, --seconds and --repeat must be positive")
    args.model_dir = model_dir(args.model_dir)
    if not (args.model_dir / "config.ini").is_file():
        parser.error(f"--model-dir: no config.ini in {args.model_dir}")
    for path in args.audio:
        if not path.is_file():
            parser.error(f"--audio: no such file: {path}")
    return args


def load_batch(paths, batch: int, samples: int, sr: int):
    """[batch, samples] float32: the files in turn, each looped or cut to ``samples``."""
    import numpy as np
    import soundfile as sf

    signals = []
    for path in paths:
        audio, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
        if file_sr != sr:
            raise SystemExit(f"h200_dsp_pipeline: {path} is {file_sr} Hz; the model needs {sr} Hz")
        mono = audio[:, 0]
        signals.append(np.resize(mono, samples))  # np.resize repeats the signal to fill
    return np.stack([signals[i % len(signals)] for i in range(batch)])


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DF_MPS_DEVICE", args.device)

    import df_mps  # noqa: F401, I001  (first: patches df, installs the libdf stand-in)
    import torch
    import torch.nn.functional as F

    device = usable_device(args.device)

    import libdf
    from df.enhance import enhance, init_df
    from df.model import ModelParams

    from df_mps import dsp

    assert getattr(libdf, "__df_mps_shim__", False), "libdf is not df_mps's stand-in"

    def sync():
        synchronize(device)

    model, df_state, _ = init_df(str(args.model_dir), log_level="ERROR", log_file=None)
    model = model.to(device).eval()
    params = ModelParams()
    nb_df = getattr(model, "nb_df", getattr(model, "df_bins", params.nb_df))
    n_fft, hop = df_state.fft_size(), df_state.hop_size()
    delay = n_fft - hop
    samples = int(args.seconds * params.sr)
    # A DF of our own on the device (df_state is the same class; this one keeps its state).
    dev_df = dsp.DF(params.sr, n_fft, hop, params.nb_erb, params.min_nb_freqs)

    @torch.inference_mode()
    def on_device(audio_cpu):
        """Returns (output on the CPU, {step: seconds})."""
        times = {}
        sync()
        t0 = time.perf_counter()
        audio = audio_cpu.to(device, non_blocking=True)
        audio = F.pad(audio, (0, n_fft))  # as enhance(pad=True): compensate the STFT delay
        spec, erb_feat, spec_feat = dev_df.features(audio, nb_df)
        sync()
        t1 = time.perf_counter()
        if hasattr(model, "reset_h0"):
            model.reset_h0(batch_size=audio.shape[0], device=device)
        enhanced = model(spec.clone(), erb_feat, spec_feat)[0]
        sync()
        t2 = time.perf_counter()
        out = dev_df.synthesis(enhanced.squeeze(1))[:, delay : samples + delay]
        sync()
        t3 = time.perf_counter()
        out = out.cpu()
        t4 = time.perf_counter()
        times.update(features=t1 - t0, model=t2 - t1, synthesis=t3 - t2, copy=t4 - t3)
        return out, times

    def upstream(audio_cpu):
        sync()
        t0 = time.perf_counter()
        out = enhance(model, df_state, audio_cpu)
        sync()
        return out, {"total": time.perf_counter() - t0}

    rows, diffs = [], {}
    for batch in args.batch:
        audio_cpu = torch.from_numpy(load_batch(args.audio, batch, samples, params.sr))
        if device.type == "cuda":
            audio_cpu = audio_cpu.pin_memory()
        paths = [("on-device (df_mps.dsp)", on_device)]
        if not args.skip_upstream:
            paths.append(("upstream enhance()", upstream))
        outputs = {}
        for name, run in paths:
            run(audio_cpu)  # warm-up: cuDNN autotuning, constant caches
            runs = [run(audio_cpu) for _ in range(args.repeat)]
            outputs[name] = runs[-1][0]
            steps = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
            total = steps.get("total", sum(steps.values()))
            rows.append((name, batch, batch * args.seconds / total, total, steps))
        if len(outputs) == 2:
            a, b = outputs.values()
            diffs[batch] = float((a - b).abs().max())

    ignores = _irfft_ignores(device)
    table = [
        {
            "pipeline": name,
            "batch": batch,
            "audio_s_per_s": throughput,
            "total_ms": total * 1000,
            **{f"{k}_ms": v * 1000 for k, v in steps.items() if k != "total"},
        }
        for name, batch, throughput, total, steps in rows
    ]
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "irfft_ignores_imag_dc_nyquist": ignores,
    }
    print_rows(table, f"DeepFilterNet3, {args.seconds:g} s files, {meta['device_name']}")
    for batch, diff in diffs.items():
        print(f"batch {batch}: on-device output vs upstream enhance(): max abs diff {diff:.3g}")
    print(f"inverse FFT on {device.type} ignores imag(DC, Nyquist): {ignores}")
    diffs = {str(b): d for b, d in diffs.items()}
    write_json(args.json, table, meta, max_abs_diff_vs_upstream=diffs)
    return 0


def _irfft_ignores(device) -> bool:
    """Whether torch.fft.irfft on ``device`` drops the imaginary part of DC and Nyquist, as
    libdf does (df_mps.dsp zeroes it itself on non-CPU devices, so either way is correct)."""
    import torch

    if not __import__("df_mps").capabilities.get().supports_complex(device.type):
        return False
    spec = torch.randn(4, 481, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    clean = spec.clone()
    clean[:, 0] = clean[:, 0].real
    clean[:, -1] = clean[:, -1].real
    a = torch.fft.irfft(spec.to(device), n=960)
    b = torch.fft.irfft(clean.to(device), n=960)
    return bool((a - b).abs().max().item() == 0.0)


if __name__ == "__main__":
    sys.exit(main())
