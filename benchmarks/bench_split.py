"""``--split-long``: what the warm-up W and the crossfade cost in quality, and what splitting buys.

    python benchmarks/bench_split.py                          # CPU, 60 s, white and pink noise
    python benchmarks/bench_split.py --json docs/data/split.json
    python benchmarks/bench_split.py --device cuda --batch 64 --seconds 600 --json split_h200.json

Speech with a known clean reference: ../shared's clean.wav varied (reversed, rolled, at other
gains) and tiled to ``--seconds``, plus the noise of noisy_white.wav or noisy_pink.wav (noisy
minus clean), rolled against it. Each row enhances that one file through
``Enhancer.enhance_files`` into a real output file, once exact (``split_long`` off) and then
split into ``--segments`` segments (10 s each at 60 s, as in issue 12's measurement) with
each (warm-up, fade, crossfade kind) asked for: the W grid at the default fade, then the fade
grid and both crossfade kinds at the default W. Reported per row: SI-SDR against clean, its
difference from the exact output's, the split output's SI-SDR against the exact output (how
close it stays), the largest sample difference from exact, and the wall time of the call
(model loaded, so it is decode to encode). Rows "auto" use the default options, where the
segment count comes from the lanes (``--batch``). Rows "exact, lead-in" are the exact mode on
the file with ``--lead-ins`` seconds of the same noise before it (cut from the output): how
much the exact output itself moves with where the recording starts, the yardstick for the
split rows' differences.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, SHARED, comma_list, model_dir, print_rows, write_json

from df_mps.testing import made_speech, si_sdr

sys.path.insert(0, str(REPO / "src"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--segments", type=int, default=6, help="segments of the grid rows")
    p.add_argument("--warmups", type=comma_list(float), default=[0, 1, 2, 5, 10])
    p.add_argument("--fades", type=comma_list(float), default=[0.05, 0.2, 0.5, 1.0])
    p.add_argument("--noises", type=comma_list(str), default=["white", "pink"])
    p.add_argument("--seeds", type=comma_list(int), default=[0], help="made speech to average")
    p.add_argument(
        "--lead-ins",
        type=comma_list(float),
        default=[1, 5],
        help="exact rows with S seconds of noise before the file (cut from the output): how "
        "much the exact output itself depends on where the recording starts",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--audio-dir", type=Path, default=SHARED / "audio")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def enhance_once(enhancer, src: Path, target: Path, options):
    """(output samples, wall seconds) of one ``enhance_files`` call; the output is removed."""
    import soundfile as sf

    t0 = time.perf_counter()
    (result,) = enhancer.enhance_files([(src, target)], split_long=options)
    wall = time.perf_counter() - t0
    if not hasattr(result, "frames"):
        raise SystemExit(f"bench_split: {result}")
    out, _ = sf.read(str(target), dtype="float32")
    target.unlink()
    return out, wall


def main(argv=None) -> int:
    args = parse_args(argv)
    import soundfile as sf
    import torch

    from df_mps.api import Enhancer
    from df_mps.split import DEFAULT_FADE_SECONDS, DEFAULT_WARMUP_SECONDS, SplitOptions, SplitPlan

    torch.set_num_threads(args.threads)
    batch = args.batch if args.batch == "auto" else int(args.batch)
    enhancer = Enhancer(model_dir(args.model), device=args.device, batch=batch)
    # The grid's segments each take a lane: a batch of --segments rows.
    grid_enhancer = Enhancer(model_dir(args.model), device=args.device, batch=args.segments)
    min_segment = args.seconds / args.segments * 0.999  # exactly --segments segments
    grid = [(w, DEFAULT_FADE_SECONDS, "linear") for w in args.warmups]
    grid += [
        (DEFAULT_WARMUP_SECONDS, f, kind)
        for f in args.fades
        for kind in ("linear", "equal-power")
        if (f, kind) != (DEFAULT_FADE_SECONDS, "linear")
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for noise, seed in [(n, s) for n in args.noises for s in args.seeds]:
            noisy, clean, sr = made_speech(args.audio_dir, noise, args.seconds, seed)
            src = Path(tmp) / f"{noise}.wav"
            sf.write(str(src), noisy, sr, "FLOAT")

            def run(name, options, runner=enhancer, src=src, noise=noise):
                return enhance_once(runner, src, Path(tmp) / f"{noise}_{name}.wav", options)

            exact, exact_wall = run("exact", False)
            exact_db = si_sdr(exact, clean)
            rows.append({"noise": noise, "seed": seed, "mode": "exact", "batch": enhancer.batch,
                         "segments": 1, "noisy_db":
                         round(si_sdr(noisy, clean), 2), "si_sdr_db": round(exact_db, 3),
                         "wall_s": round(exact_wall, 2)})  # fmt: skip
            for lead in args.lead_ins:
                pre = np.roll(noisy - clean, 12345)[: int(lead * sr)]
                longer = Path(tmp) / f"{noise}_lead.wav"
                sf.write(str(longer), np.concatenate([pre, noisy]), sr, "FLOAT")
                out, wall = enhance_once(enhancer, longer, Path(tmp) / "lead_out.wav", False)
                db = si_sdr(out[len(pre) :], clean)
                rows.append({"noise": noise, "seed": seed, "mode": "exact, lead-in",
                             "batch": enhancer.batch, "segments": 1, "lead_in_s": lead,
                             "si_sdr_db": round(db, 3), "delta_db": round(db - exact_db, 3),
                             "vs_exact_db": round(si_sdr(out[len(pre) :], exact), 1),
                             "wall_s": round(wall, 2)})  # fmt: skip
            cases = [("grid", SplitOptions(w, f, min_segment, kind)) for w, f, kind in grid]
            cases.append(("auto", SplitOptions()))
            for mode, options in cases:
                runner = grid_enhancer if mode == "grid" else enhancer
                plan = SplitPlan([(src, Path(tmp) / "x.wav")], batch=runner.batch,
                                 overwrite=True, options=options)  # fmt: skip
                k = plan.files[0].k if plan.files else 1
                out, wall = run(mode, options, runner)
                db = si_sdr(out, clean)
                rows.append({
                    "noise": noise, "seed": seed, "mode": mode, "batch": runner.batch,
                    "segments": k,
                    "warmup_s": options.warmup_seconds, "fade_s": options.fade_seconds,
                    "crossfade": options.crossfade, "si_sdr_db": round(db, 3),
                    "delta_db": round(db - exact_db, 3),
                    "vs_exact_db": round(si_sdr(out, exact), 1),
                    "max_diff": float(f"{np.abs(out - exact).max():.3g}"),
                    "wall_s": round(wall, 2),
                })  # fmt: skip
                print_rows(rows[-1:])
    meta = {
        "seconds": args.seconds,
        "device": str(enhancer.device),
        "batch": enhancer.batch,
        "threads": args.threads,
    }
    print_rows(rows, f"--split-long on {args.seconds:g} s of made speech (batch {enhancer.batch})")
    write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
