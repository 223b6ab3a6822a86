#!/usr/bin/env python
"""Where the CPU's batched step goes: each top-level part of DFN3 (the encoder's convs and its
GRU, the ERB and DF decoders' GRUs and convs), timed with forward hooks, at batch 1 of 10 s
pieces (the engine's --batch 1) and at batch 4 of 2.5 s pieces (its --batch 4 on the CPU),
the same frames x rows, interleaved ``--repeats`` times, with the GRUs as the engine runs them
(df-mps's C kernel where it builds) and freed buffers kept for reuse as the command line keeps
them (``df_mps.util.keep_freed_buffers``; ``--glibc-malloc`` leaves glibc's malloc as it is).
It says why --batch 4 buys little on the CPU: the convolutions cost the same per frame and row
at any batch, and only the GRUs' hidden products share work between rows.

Then the whole step without hooks at other rows x piece lengths (``--pieces``): whether
shorter pieces, whose convolution outputs (64 channels x 96 bins x frames, 25 MB a row at
10 s) would stay in the processor's caches, make up for their context frames and the more
calls per second of audio.

    python benchmarks/cpu_step_parts.py --threads 1 --repeats 5 --json docs/data/cpu_step_parts.json
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

from _common import audio_path, command_line, machine, model_dir, now_iso, write_json

PARTS = (
    "enc.erb",
    "enc.df",
    "enc.emb_gru",
    "erb_dec.emb_gru",
    "erb_dec.conv",
    "df_dec.df_gru",
    "df_dec.other",
)


def part_of(name: str):
    """The PARTS entry a module of DFN3 belongs to (top-level children only), or None."""
    if name.count(".") != 1:
        return None
    if name.startswith("enc.erb_conv"):
        return "enc.erb"
    if name.startswith(("enc.df_conv", "enc.df_fc_emb")):
        return "enc.df"
    if name in ("enc.emb_gru", "erb_dec.emb_gru", "df_dec.df_gru"):
        return name
    if name.startswith("erb_dec."):
        return "erb_dec.conv"
    if name.startswith("df_dec."):
        return "df_dec.other"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--pieces",
        default="1x1000,1x500,1x250,1x125,2x250,4x250,4x125,4x62",
        help="rows x piece frames for the whole-step table (the first is its reference)",
    )
    p.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (default: keep freed buffers, as the CLI does)",
    )
    args = p.parse_args()

    import numpy as np
    import soundfile as sf
    import torch

    torch.set_num_threads(args.threads)
    import df_mps
    from df_mps.api import Enhancer
    from df_mps.engine import Engine
    from df_mps.util import keep_freed_buffers

    buffers_kept = False if args.glibc_malloc else keep_freed_buffers()

    df_mps.patch(device="cpu")
    enhancer = Enhancer(model_dir(args.model_dir), batch=1, device="cpu")
    audio, sr = sf.read(str(audio_path()), dtype="float32")
    x = torch.from_numpy(np.tile(audio, 2)[: 10 * sr + 16 * 480][None].copy())
    spent = collections.Counter()
    started = {}
    modules = dict(enhancer.model.named_modules())
    hooks = []
    for name, module in modules.items():
        part = part_of(name)
        if part is None:
            continue
        hooks.append(
            module.register_forward_pre_hook(
                lambda m, a, n=name: started.__setitem__(n, time.perf_counter())
            )
        )
        hooks.append(
            module.register_forward_hook(
                lambda m, a, o, n=name, part=part: spent.update(
                    {part: time.perf_counter() - started[n]}
                )
            )
        )
    configs = {}
    for rows, piece in ((1, 1000), (4, 250)):
        engine, inputs, _ = step_setup(enhancer, Engine, x, rows, piece, warm_up=1)
        configs[(rows, piece)] = (engine, inputs)
    runs = collections.defaultdict(list)
    for _ in range(args.repeats):
        for (rows, piece), (engine, inputs) in configs.items():
            spent.clear()
            t0 = time.perf_counter()
            run_steps(engine, inputs, rows, 1000 // piece)  # 1,000 frames of every row
            total = time.perf_counter() - t0
            # per 1,000 frames of one row
            runs[(rows, piece)].append(
                {"total": total / rows, **{k: v / rows for k, v in spent.items()}}
            )
    out = []
    for part in ("total", *PARTS):
        b1 = statistics.median(r.get(part, 0.0) for r in runs[(1, 1000)])
        b4 = statistics.median(r.get(part, 0.0) for r in runs[(4, 250)])
        out.append(
            {
                "part": part,
                "batch1_ms": b1 * 1e3,
                "batch4_ms": b4 * 1e3,
                "batch4_over_batch1": b4 / b1 if b1 else None,
            }
        )
        print(
            f"{part:18s} batch 1 (10 s pieces) {b1 * 1e3:7.1f} ms   "
            f"batch 4 (2.5 s) {b4 * 1e3:7.1f} ms   ratio {b4 / b1 if b1 else float('nan'):.2f}"
        )
    for hook in hooks:  # the whole step, as the engine runs it
        hook.remove()
    pieces = whole_steps(enhancer, Engine, x, args.pieces, args.repeats)
    meta = {
        "command": command_line(),
        "date": now_iso(),
        "machine": machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "freed_buffers_kept": buffers_kept,
        "unit": "ms per 1,000 frames (10 s) of one row, median of the repeats",
    }
    write_json(args.json, out, meta, pieces=pieces)


def step_setup(enhancer, Engine, x, rows: int, piece: int, warm_up: int):
    """(an engine of ``rows`` x ``piece`` frames, its step's inputs: the features of ``x``
    for every row, the window's frame count), after ``warm_up`` steps."""
    engine = Engine(enhancer.model, enhancer.df_state, batch=rows, piece_frames=piece)
    spec, erb, feat = engine.new_dsp().features(x, engine.nb_df, alpha=engine.alpha)
    window = engine.left + piece + engine.right
    inputs = [
        f[:, :, :window].expand(rows, f.shape[1], window, *f.shape[3:]).contiguous()
        for f in (spec, erb, feat)
    ]
    run_steps(engine, inputs, rows, warm_up)
    return engine, inputs, window


def run_steps(engine, inputs, rows: int, steps: int) -> None:
    """``steps`` engine steps on (copies of) ``inputs``, no row at a stream's start or end."""
    for _ in range(steps):
        engine.model.step(*(t.clone() for t in inputs), [False] * rows, [None] * rows)


def whole_steps(enhancer, Engine, x, configs: str, repeats: int) -> list:
    """ms per 1,000 frames of one row of the whole step (no hooks), for each ROWSxFRAMES in
    ``configs``, interleaved ``repeats`` times after 3 warm-up steps each; medians."""
    setups = {}
    for text in configs.split(","):
        rows, piece = (int(v) for v in text.lower().split("x"))
        setups[(rows, piece)] = step_setup(enhancer, Engine, x, rows, piece, warm_up=3)
    times = collections.defaultdict(list)
    for _ in range(repeats):  # as the per-part table steps (outside inference mode)
        for (rows, piece), (engine, inputs, _) in setups.items():
            steps = max(1, 1000 // piece)
            t0 = time.perf_counter()
            run_steps(engine, inputs, rows, steps)
            times[(rows, piece)].append((time.perf_counter() - t0) / (rows * steps * piece))
    first = statistics.median(next(iter(times.values())))
    out = []
    for (rows, piece), values in times.items():
        per_frame = statistics.median(values)
        window = setups[(rows, piece)][2]
        out.append(
            {
                "rows": rows,
                "piece_frames": piece,
                "window_frames": window,
                "ms_per_1000_frames_row": per_frame * 1e6,
                "over_first": per_frame / first,
            }
        )
        print(
            f"{rows} x {piece:4d} frames (window {window}): {per_frame * 1e6:6.1f} ms per 1,000 "
            f"frames of a row, {per_frame / first:.3f} of the first"
        )
    return out


if __name__ == "__main__":
    main()
