"""Real-valued vs complex compute, and the shim's overhead, measured as ratios within one run.

    python benchmarks/bench_compute.py                       # CPU, 1 thread, batch 1
    python benchmarks/bench_compute.py --device cuda --batch 1 32 --features feats.pt

Measures, for each batch size, with the real DFN3 weights:
- the deep-filter op alone: upstream's complex einsum (df.multiframe.DF) vs df_mps's real kernel;
- the full DFN3 forward: DF_MPS_FORWARD_METHOD=complex (upstream's path) vs real;
- the shim: the full forward unpatched vs patched (auto route);
and the max abs difference of the outputs. Variants are timed interleaved, round-robin, and the
median of each is reported, so machine noise hits them alike. Prints the rows and, with
--json, writes them for docs/performance.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from _common import DEFAULT_AUDIO, model_dir, print_rows, synchronize, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--seconds", type=float, default=10.0, help="audio length per item")
    p.add_argument("--model-dir", type=Path, help="DFN3 model directory (default: ../shared's)")
    p.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    p.add_argument(
        "--features", type=Path, help="precomputed features (torch.save'd); else libdf computes"
    )
    p.add_argument("--save-features", type=Path, help="write the features for another machine")
    p.add_argument("--json", type=Path, help="write results as JSON")
    return p.parse_args(argv)


def timed_round_robin(variants: dict, device, repeats: int) -> dict:
    """Median seconds per variant, each call timed alone, variants interleaved."""
    for fn in variants.values():  # warm-up (allocators, kernels, caches)
        fn()
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def load_features(args):
    import torch

    if args.features:
        return torch.load(args.features, weights_only=True)
    import soundfile as sf
    from df.enhance import df_features, init_df

    model, df_state, _ = init_df(str(model_dir(args.model_dir)), log_file=None, log_level="ERROR")
    audio, sr = sf.read(str(args.audio), dtype="float32", always_2d=True)
    audio = torch.from_numpy(audio.T.copy())[:, : int(args.seconds * sr)]
    spec, erb_feat, spec_feat = df_features(audio, df_state, model.nb_df, device="cpu")
    feats = {"spec": spec, "erb_feat": erb_feat, "spec_feat": spec_feat}
    if args.save_features:
        torch.save(feats, args.save_features)
    return feats


def measure_batch(batch, feats, model, device, repeats, deep_filter_real, use, df_mps):
    """One table row: the DF op and the full forward at this batch size."""
    import torch

    df_op = model.df_op
    original_forward = type(df_op).__dict__["forward"].__wrapped__
    spec, erb_feat, spec_feat = (
        feats[k].repeat(batch, 1, 1, 1, 1)[:batch].to(device)
        if feats[k].dim() == 5
        else feats[k].repeat(batch, 1, 1, 1)[:batch].to(device)
        for k in ("spec", "erb_feat", "spec_feat")
    )
    t_frames = spec.shape[2]
    audio_seconds = batch * t_frames * 480 / 48000
    torch.manual_seed(0)
    coefs = torch.randn(batch, df_op.frame_size, t_frames, df_op.num_freqs, 2, device=device)

    def op_complex():
        return original_forward(df_op, spec.clone(), coefs)

    def op_real():
        out = spec.clone()
        out[..., : df_op.num_freqs, :] = deep_filter_real(
            out, coefs, df_op.num_freqs, df_op.frame_size, df_op.lookahead, df_op.conj
        )
        return out

    with torch.no_grad():
        op_diff = (op_real() - op_complex()).abs().max().item()
        op_t = timed_round_robin({"complex": op_complex, "real": op_real}, device, repeats)

        def fwd(method):
            def run():
                use(method)
                return model(spec.clone(), erb_feat, spec_feat)

            return run

        def fwd_unpatched():
            df_mps.unpatch()
            try:
                return model(spec.clone(), erb_feat, spec_feat)
            finally:
                df_mps.patch()

        out_c, out_r = fwd("complex")(), fwd("real")()
        model_diff = max((a - b).abs().max().item() for a, b in zip(out_c, out_r))
        model_t = timed_round_robin(
            {
                "complex": fwd("complex"),
                "real": fwd("real"),
                "auto": fwd("auto"),
                "unpatched": fwd_unpatched,
            },
            device,
            repeats,
        )
        use(None)
    return {
        "batch": batch,
        "audio_seconds": audio_seconds,
        "op_complex_ms": op_t["complex"] * 1e3,
        "op_real_ms": op_t["real"] * 1e3,
        "op_ratio": op_t["real"] / op_t["complex"],
        "op_max_abs_diff": op_diff,
        "model_complex_ms": model_t["complex"] * 1e3,
        "model_real_ms": model_t["real"] * 1e3,
        "model_ratio": model_t["real"] / model_t["complex"],
        "model_max_abs_diff": model_diff,
        "model_unpatched_ms": model_t["unpatched"] * 1e3,
        "model_patched_auto_ms": model_t["auto"] * 1e3,
        "shim_overhead_ratio": model_t["auto"] / model_t["unpatched"],
        "model_audio_s_per_s_real": audio_seconds / model_t["real"],
    }


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import df_mps
    from df_mps import settings
    from df_mps.kernels import deep_filter_real

    device = torch.device(args.device)
    feats = load_features(args)
    df_mps.patch(device=args.device)
    from df.enhance import init_df

    model, _, _ = init_df(str(model_dir(args.model_dir)), log_file=None, log_level="ERROR")
    model = model.to(device).eval()

    def use(method):
        settings.set_current(settings.get().replace(forward_method=method))

    rows = [
        measure_batch(batch, feats, model, device, args.repeats, deep_filter_real, use, df_mps)
        for batch in args.batch
    ]
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": args.threads,
        "repeats": args.repeats,
    }
    print_rows(rows, f"DFN3 forward on {meta['device']} ({meta['device_name']})")
    write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
