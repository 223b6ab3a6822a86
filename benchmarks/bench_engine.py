#!/usr/bin/env python
"""The batched engine through the command line: throughput against --batch, memory, where the
time goes.

Each run is a fresh ``python`` child that calls ``df_mps.enhance.main`` (the CLI, in-process)
on a synthesised corpus, with hooks that time the parts separately:

- ``startup_s``: interpreter start and imports (the parent's wall time minus the child's own);
- ``model_load_s``: building the ``Enhancer`` (model load, first use of the device);
- ``process_s``: from the first decode to the last encode (first ``read`` of any input to the
  last output renamed into place); ``audio_s_per_s`` is audio seconds over that;
- ``step_s``: time in the engine's batched forward steps; ``steps`` and ``rows_per_step``;
- ``peak_rss_mib``: the child's peak resident memory (VmHWM).

Modes (``--mode``):

- ``corpus``: ``--files`` files of ``--seconds`` each at every ``--batch``, ``--repeats``
  times, interleaved (b1, b4, b1, b4, ...) so a noisy machine slows both alike; the JSON has
  each batch's ratio of wall time to batch 1 within each repeat.
- ``mixed``: the same on a corpus of mixed lengths (0.3 s to 60 s), rates and channels.
- ``memory``: one ``--long-minutes`` file among ``--others`` files of 10-60 s at one batch.

Examples::

    python benchmarks/bench_engine.py --mode corpus --files 16 --seconds 60 --batch 1,4 \\
        --threads 1 --repeats 2 --json docs/data/cpu_engine.json
    python benchmarks/bench_engine.py --mode corpus --device cuda --files 64 --seconds 30 \\
        --batch 1,8,32,64,128 --json h200_engine.json
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

from _common import (
    EngineProbe,
    audio_path,
    comma_list,
    command_line,
    environment,
    machine,
    model_dir,
    now_iso,
    print_rows,
    run_child,
    write_json,
)

SR = 48000


# -- the corpus ------------------------------------------------------------------------------
def _speech(seconds: float, rate: int, channels: int, seed: int):
    """Shared speech tiled to ``seconds``, at ``rate``, as [frames, channels] float32."""
    import numpy as np
    import soundfile as sf

    base, sr = sf.read(str(audio_path()), dtype="float32")
    rng = np.random.default_rng(seed)
    source = np.concatenate([base, base[::-1] * 0.7])
    start = int(rng.integers(0, source.shape[0] // 2))
    need = int(seconds * sr) + 1
    mono = np.tile(source, -(-(start + need) // source.shape[0]) + 1)[start : start + need]
    cols = [mono, np.roll(mono, sr // 3) * 0.7][:channels]
    x = np.stack(cols, axis=1)
    if rate != sr:
        import soxr

        x = soxr.resample(x, sr, rate)
    return x[: int(seconds * rate)].astype(np.float32)


def make_corpus(directory: Path, spec) -> list:
    """Write the files of ``spec`` [(seconds, rate, channels)] as 16-bit WAV."""
    import soundfile as sf

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (seconds, rate, channels) in enumerate(spec):
        path = directory / f"f{i:04d}_{seconds:g}s_{rate}_{channels}ch.wav"
        if not path.exists():
            sf.write(str(path), _speech(seconds, rate, channels, i), rate, "PCM_16")
        paths.append(path)
    return paths


MIXED = [
    (0.3, 48000, 1),
    (0.8, 16000, 1),
    (1.5, 48000, 2),
    (2.5, 44100, 1),
    (4.0, 48000, 1),
    (6.0, 16000, 2),
    (8.0, 48000, 1),
    (10.0, 44100, 2),
    (12.5, 48000, 1),
    (20.0, 16000, 1),
    (25.0, 48000, 1),
    (30.0, 44100, 1),
    (45.0, 48000, 1),
    (60.0, 48000, 1),
    (15.0, 48000, 2),
    (5.0, 44100, 1),
]


# -- the child: the CLI in-process, timed ------------------------------------------------------
def child(args) -> None:
    t_main = time.perf_counter()
    if os.environ.get("BENCH_SWITCH_INTERVAL"):  # seconds: the GIL's hand-over interval
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    import df_mps.api as api
    from df_mps import enhance as cli

    marks = {"model_load": 0.0}
    init = api.Enhancer.__init__

    def timed_init(self, *a, **k):
        t0 = time.perf_counter()
        init(self, *a, **k)
        marks["model_load"] += time.perf_counter() - t0
        from df_mps import graphs

        # CUDA graphs captured (or code compiled) with the model load, by its warm-up
        stats = graphs.stats(self.engine())
        marks["setup_at_load"] = stats.get("capture_seconds") or stats.get("compile_seconds") or 0

    api.Enhancer.__init__ = timed_init
    if os.environ.get("BENCH_SYNC_BYTES"):  # the writer's early flushes, every N bytes (0: none)
        from df_mps import audio

        audio.AudioFileWriter.SYNC_BYTES = int(os.environ["BENCH_SYNC_BYTES"]) or 1 << 62
    files = sorted(Path(args.child_files).iterdir())
    out = Path(args.out)
    argv = [*map(str, files), "-o", str(out), "-m", str(model_dir(args.model_dir))]
    argv += ["--batch", args.batch[0], "--device", args.device, "--no-suffix", "--overwrite"]
    argv += ["--log-level", "warning", *args.cli_args.split()]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    trace = os.environ.get("BENCH_TORCH_PROFILE")  # a path: torch.profiler's top ops there
    stacks = os.environ.get("BENCH_STACKS")  # a path: where the scheduling thread's time goes
    functions = os.environ.get("BENCH_CPROFILE")  # a path: the scheduling thread's top calls
    with EngineProbe(stacks=bool(stacks)) as probe:
        if functions:
            import cProfile
            import io
            import pstats

            profile = cProfile.Profile()
            rc = profile.runcall(cli.main, argv)
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text).sort_stats("tottime")
            stats.print_stats(35)
            stats.sort_stats("cumulative").print_stats(45)
            Path(functions).write_text(text.getvalue())
        elif trace:
            import torch.profiler as tp

            activities = [tp.ProfilerActivity.CPU, tp.ProfilerActivity.CUDA]
            with tp.profile(activities=activities) as prof:
                rc = cli.main(argv)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            table += prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)
            Path(trace).write_text(table)
        else:
            rc = cli.main(argv)
    t_end = time.perf_counter()
    import soundfile as sf

    audio = sum(sf.info(str(p)).duration for p in files)
    channel_audio = sum(sf.info(str(p)).duration * sf.info(str(p)).channels for p in files)
    # Where process_s goes (the engine's DF_MPS_ENGINE_TIMELINE): before the first step (the
    # first reads and analyses), the steps, the gaps between them, after the last (the last
    # writes).
    probed = probe.result()
    process = probed["process_s"]
    if stacks and "stacks" in probed:
        Path(stacks).write_text(json.dumps(probed["stacks"], indent=1))
    engines = probe.engines
    steps = probed.get("steps", 0)
    from _common import peak_rss_mib

    from df_mps import graphs

    print(
        json.dumps(
            {
                "rc": rc,
                "in_main_s": t_end - t_main,
                "model_load_s": marks["model_load"],
                "process_s": process,
                "audio_s": audio,
                "channel_audio_s": channel_audio,
                "audio_s_per_s": audio / process,
                "rtf": process / audio,
                "step_s": probed.get("step_s", 0.0),
                "steps": steps,
                "rows_per_step": probed.get("rows_run", 0) / steps if steps else 0.0,
                "batch": engines[0].batch if engines else None,
                "phases_s": {
                    k: sum(e.timings[k] for e in engines) for k in ("windows", "forward", "after")
                },
                "peak_rss_mib": peak_rss_mib(),
                "timeline": probed["timeline"],
                # CUDA graphs or torch.compile: capture/compile seconds in all (the stats) and
                # with the model load; the rest is inside process_s.
                "step_stats": [graphs.stats(e) for e in engines],
                "setup_at_load_s": marks.get("setup_at_load", 0.0),
            }
        )
    )


def step_only(args) -> None:
    """The engine's batched step against the plain model forward on the same rows (10 s of
    speech per row, features precomputed), in this process: what the step itself costs."""
    import numpy as np
    import soundfile as sf
    import torch

    import df_mps
    from df_mps.api import Enhancer
    from df_mps.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    df_mps.patch(device=args.device)
    enhancer = Enhancer(model_dir(args.model_dir), batch=1)
    engine = Engine(enhancer.model, enhancer.df_state, batch=1, piece_frames=1000)
    audio, _ = sf.read(str(audio_path()), dtype="float32")
    dsp = engine.new_dsp()
    device = enhancer.device
    audio = np.tile(audio, 2)[: 10 * SR + 16 * 480]
    x = torch.from_numpy(audio[None].copy()).to(device)
    spec, erb, feat = dsp.features(x, engine.nb_df, alpha=engine.alpha)
    window = engine.left + engine.piece_frames + engine.right
    spec, erb, feat = (f[:, :, :window] for f in (spec, erb, feat))
    rows = []
    for batch in [int(b) for b in args.batch]:
        inputs = [f.expand(batch, *f.shape[1:]).contiguous() for f in (spec, erb, feat)]

        def plain(inputs=inputs):
            with torch.no_grad():
                enhancer.model(*(t.clone() for t in inputs))

        def step(inputs=inputs, batch=batch):
            engine.model.step(*(t.clone() for t in inputs), [False] * batch, [None] * batch)

        times = {}
        for name, fn in (("forward", plain), ("step", step)):
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name] = (time.perf_counter() - t0) / args.repeats
        row = {
            "batch": batch,
            "forward_ms": times["forward"] * 1e3,
            "step_ms": times["step"] * 1e3,
            "step_over_forward": times["step"] / times["forward"],
            "step_audio_s_per_s": batch * 10.0 / times["step"],
        }
        rows.append(row)
        print_rows([row])
    meta = {"command": command_line(), "date": now_iso(), "mode": "step", "machine": machine()}
    meta.update(device=args.device, threads=args.threads)
    write_json(args.json, rows, meta)


def run_once(args, files_dir: Path, batch, work: Path) -> dict:
    out = work / f"out_b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    child_args = ["--child", "--child-files", str(files_dir), "--out", str(out)]
    child_args += ["--batch", str(batch)]
    child_args += ["--device", args.device, "--threads", str(args.threads or 0)]
    child_args += [f"--cli-args={args.cli_args}"]
    if args.model_dir:
        child_args += ["--model-dir", str(args.model_dir)]
    t0 = time.perf_counter()
    result = run_child(Path(__file__), child_args, threads=args.threads or 4, timeout=args.timeout)
    wall = time.perf_counter() - t0
    result["wall_s"] = wall
    result["startup_s"] = wall - result["in_main_s"]
    result["requested_batch"] = batch
    return result


def _variant(text: str):
    """ "NAME:VAR=VALUE,VAR=VALUE" -> (NAME, {VAR: VALUE})."""
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("corpus", "mixed", "memory", "step"), default="corpus")
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--batch", type=comma_list(str), default=["1", "4"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--long-minutes", type=float, default=30.0)
    p.add_argument("--others", type=int, default=20)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None, help="corpus and outputs (default: temp)")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--cli-args",
        default="",
        help="more options for the CLI, e.g. '--precision bf16 --no-cuda-graphs'",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-files", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="run every batch once per variant (its environment variables set), interleaved "
        "within each repeat; e.g. torch:DF_MPS_GRU_KERNEL=0 kernel:DF_MPS_GRU_KERNEL=1",
    )
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.mode == "step":
        return step_only(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_engine_"))
    if args.mode == "corpus":
        spec = [(args.seconds, SR, 1)] * args.files
        label = f"{args.files} files of {args.seconds:g} s (48 kHz mono)"
    elif args.mode == "mixed":
        spec = MIXED
        label = f"{len(MIXED)} files of 0.3-60 s at 16/44.1/48 kHz, mono and stereo"
    else:
        others = [(10.0 + 50.0 * i / max(1, args.others - 1), SR, 1) for i in range(args.others)]
        spec = [(args.long_minutes * 60, SR, 1)] + others
        label = f"one {args.long_minutes:g} min file among {args.others} files of 10-60 s"
    files_dir = work / f"corpus_{args.mode}_{len(spec)}_{args.seconds:g}"
    make_corpus(files_dir, spec)
    rows = []
    started = now_iso()
    variants = [_variant(text) for text in args.variants] if args.variants else [(None, {})]
    for repeat in range(args.repeats):
        first = None
        for name, env in variants:
            first_batch = None
            for batch in args.batch:
                with environment(env):
                    row = run_once(args, files_dir, batch, work)
                row["repeat"] = repeat
                if name is not None:
                    row["variant"] = name
                first = first or row
                first_batch = first_batch or row
                # To the first run of this repeat (the first variant's first batch), and to
                # this variant's first batch.
                row["wall_ratio_to_first"] = row["process_s"] / first["process_s"]
                row["wall_ratio_to_variant_first"] = row["process_s"] / first_batch["process_s"]
                rows.append(row)
                print_rows([row])
                sys.stdout.flush()
    meta = {
        "command": command_line(),
        "date": started,
        "mode": args.mode,
        "corpus": label,
        "threads": args.threads,
        "device": args.device,
        "machine": machine(),
    }
    write_json(args.json, rows, meta)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
