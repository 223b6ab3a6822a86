#!/usr/bin/env python
"""DFN3's GRU layer (256 -> 256) on CUDA: cuDNN's GRU against df_mps.gru's step kernel, each
eager and captured as a CUDA graph, per layer-step, at a few row counts; and the kernel's
largest difference from cuDNN (TF32 off, as in the engine's steps).

    python benchmarks/bench_gru.py --rows 1 16 64 --frames 1016 --json $OUT/h200_gru.json

Times are medians of ``--repeats`` replays (graphs) or calls (eager) after one warm-up, with
the device synchronised around each; per layer-step = time / (frames x layers).
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import command_line, machine, now_iso, print_rows, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--frames", type=int, default=1016)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eager-kernel", action="store_true", help="also time the kernel uncaptured")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    from df_mps import gru
    from df_mps.engine import exact_fp32

    device = torch.device("cuda")
    torch.manual_seed(0)
    module = torch.nn.GRU(256, 256, num_layers=args.layers, batch_first=True).to(device).eval()

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def graphed(fn, x, h0):
        """(replay, capture seconds) of ``fn(x, h0)`` as a CUDA graph (static x and h0)."""
        static_x, static_h = x.clone(), h0.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(static_x, static_h)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        with torch.cuda.graph(graph):
            out = fn(static_x, static_h)
        torch.cuda.synchronize()
        return (lambda: graph.replay()), time.perf_counter() - t0, out

    rows_out = []
    steps = args.frames * args.layers
    for rows in args.rows:
        x = torch.randn(rows, args.frames, 256, device=device)
        h0 = torch.randn(args.layers, rows, 256, device=device) * 0.5
        with torch.no_grad(), exact_fp32(device):

            def cudnn(x, h):
                return module(x, h)

            def kernel(x, h):
                return gru.gru_forward(module, x, h)

            ref_out, ref_h = cudnn(x, h0)
            out, h = kernel(x, h0)
            diff = max((ref_out - out).abs().max().item(), (ref_h - h).abs().max().item())
            row = {"rows": rows, "frames": args.frames, "layers": args.layers}
            row["max_abs_diff_vs_cudnn"] = diff
            row["cudnn_eager_us"] = timed(lambda x=x, h0=h0: cudnn(x, h0)) / steps * 1e6
            replay, capture, _ = graphed(cudnn, x, h0)
            row["cudnn_graph_us"] = timed(replay) / steps * 1e6
            if args.eager_kernel:
                row["kernel_eager_us"] = timed(lambda x=x, h0=h0: kernel(x, h0)) / steps * 1e6
            replay, capture, (g_out, g_h) = graphed(kernel, x, h0)
            row["kernel_graph_us"] = timed(replay) / steps * 1e6
            row["kernel_capture_s"] = capture
            row["graph_diff_vs_cudnn"] = max(
                (ref_out - g_out).abs().max().item(), (ref_h - g_h).abs().max().item()
            )
            row["kernel_over_cudnn_graph"] = row["kernel_graph_us"] / row["cudnn_graph_us"]
        rows_out.append(row)
        print_rows([row])
    meta = {"command": command_line(), "date": now_iso(), "machine": machine()}
    meta["unit"] = "microseconds per layer-step (one frame of one GRU layer, all rows)"
    write_json(args.json, rows_out, meta)


if __name__ == "__main__":
    main()
