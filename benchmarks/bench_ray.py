"""Ray Data (df_mps.ray) against the plain (batched) command line, on one corpus, in one run.

    python benchmarks/bench_ray.py --device cuda --files 128 --seconds 30 --json h200_ray.json
    python benchmarks/bench_ray.py --device cuda --workers 1 2 --gpus-per-worker 1 0.5 ...
    python benchmarks/bench_ray.py --device cpu --files 8 --seconds 2 --threads 1   # a smoke run

What is measured, in this order, in one process:

- plain: what ``df-mps-enhance`` does without ``--ray``: one batched ``Enhancer`` (the CLI's
  defaults: batch 64 on CUDA, CUDA graphs), ``enhance_files`` over the corpus (continuous
  batching, atomic writes), timed from the call to the last file on disk. The model load is
  reported apart (``load_s``). Each plain run is a fresh Python process, as a
  ``df-mps-enhance`` run is (and an actor is); it runs before Ray and again after
  (``plain_after``); Ray's ``ratio_to_plain`` is to their mean, ``ratio_to_faster_plain`` to
  the faster.
- ray: ``df_mps.ray.run_on_ray`` on the same files into another directory, once per
  ``--workers`` entry (paired with ``--gpus-per-worker``). Each row carries when its worker
  started and finished the file, so the span is first decode to last encode, the same count
  as the plain one. Ray's start-up (cluster, actor processes, model loads) is the time from the
  call to the first file's start (``startup_s``); ``wall_s`` is the call's whole time.

Throughput is audio seconds per wall second over that span; ``ratio_to_plain`` is Ray's over
the plain loop's (issue 17's goal: >= 0.9 with one GPU actor). With several ``--workers``
entries, ``scaling_efficiency`` is throughput(N) / (N x throughput of the first entry), which
is only multi-GPU scaling where each actor has a GPU of its own (``--gpus-per-worker 1`` on a
machine with N GPUs): actors sharing one GPU measure sharing, and the JSON says which.
Every Ray output is compared with the plain one (``max_abs_diff``).

The corpus: ``--files`` files of ``--seconds`` s, cut from the shared noisy takes at varying
gains, PCM_16, 48 kHz mono (``--mixed``: rates 48/44.1/16 kHz and mono/stereo in turn), in a
temporary directory (``--workdir`` to keep it).

On the H200 (Python 3.12, no network): Ray travels as wheels, with the ones df-mps needs there
(deepfilternet --no-deps, loguru, soundfile, appdirs). Ray's cp312 wheel (2.52.1: 72 MB, 2.60:
79 MB) is over the device tool's 64 MiB, so it travels slimmed (36.5 MiB; the jar and the
dashboard's web client left out); jsonschema and its needs are the only Ray requirements the
image lacks (pandas, pyarrow, fsspec, msgpack, click, protobuf, pyyaml, requests are there):

    W="--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64"
    python -m pip download --no-deps $W -d /tmp/raywhl ray==2.52.1
    python benchmarks/bench_ray.py --slim-ray-wheel /tmp/raywhl/ray-2.52.1-cp312-*.whl .whl
    python -m pip download --no-deps $W -d .whl jsonschema==4.26.0 \\
        jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1

and there (one command: one GPU actor, then two actors sharing the GPU):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/bench_ray.py --device cuda \\
        --model-dir .devcarry/models/DeepFilterNet3 --audio-dir .devcarry/audio \\
        --files 128 --seconds 30 --threads 4 --workers 1 2 --gpus-per-worker 1 0.5 \\
        --json $OUT/h200_ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("DF_MPS_SHARED", REPO.parent / "shared"))
MIXED = [(48000, 1), (44100, 2), (16000, 1), (48000, 2)]


# Ray's wheel is larger than the device tool carries (64 MiB): these parts serve no Python job
# (the Java worker's jar, the dashboard's web client, which runs with include_dashboard=False).
SLIM_DROP = ("ray/jars/", "ray/dashboard/client/build/")


def slim_ray_wheel(wheel: Path, out_dir: Path) -> Path:
    """A copy of Ray's wheel without SLIM_DROP, its RECORD rewritten to match; same name."""
    import zipfile

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    if target.resolve() == wheel.resolve():
        raise SystemExit("--slim-ray-wheel: the output directory holds the input wheel")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(SLIM_DROP):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(SLIM_DROP)).encode()
            dst.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return target


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cpu, mps or auto (default cuda)")
    p.add_argument("--files", type=int, default=128)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each file")
    p.add_argument("--mixed", action="store_true", help="mixed rates and channels")
    p.add_argument("--threads", type=int, default=4, help="torch threads, plain and per actor")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="Ray actors, per run")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        nargs="+",
        default=None,
        help="each run's GPU share per actor (default 1 on cuda); one value or one per --workers",
    )
    p.add_argument("--batch", type=int, default=None, help="files per Ray batch (default auto)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    p.add_argument("--no-plain", action="store_true", help="skip the plain runs (no ratio)")
    p.add_argument(
        "--probe",
        action="store_true",
        help="where the time goes inside the plain run and inside each actor's batch: the "
        "engine's timeline, the scheduling thread's stacks, the process's threads (_common."
        "EngineProbe); in the JSON as 'probe' (plain) and 'probes' (one per actor batch)",
    )
    p.add_argument("--plain-child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("inputs", nargs="*", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=DEFAULT_SHARED / "models" / "DeepFilterNet3")
    p.add_argument("--audio-dir", type=Path, default=DEFAULT_SHARED / "audio")
    p.add_argument("--workdir", type=Path, help="where the corpus and outputs go (kept)")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument(
        "--slim-ray-wheel",
        nargs=2,
        type=Path,
        metavar=("WHEEL", "OUT_DIR"),
        help="only write a copy of Ray's WHEEL without its Java jar and dashboard web client "
        "into OUT_DIR (to fit the device tool's 64 MiB), then exit",
    )
    return p.parse_args(argv)


def make_corpus(root: Path, files: int, seconds: float, audio_dir: Path, mixed: bool) -> list:
    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    white, sr = sf.read(str(audio_dir / "noisy_white.wav"), dtype="float32")
    pink, _ = sf.read(str(audio_dir / "noisy_pink.wav"), dtype="float32")
    take = np.concatenate([white, pink])
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    n = int(seconds * sr)
    for i in range(files):
        rate, channels = MIXED[i % len(MIXED)] if mixed else (sr, 1)
        start = int(rng.integers(0, len(take)))
        idx = (start + np.arange(n)) % len(take)  # wraps round the two takes
        parts = [take[idx] * rng.uniform(0.3, 1.0) for _ in range(channels)]
        x = torch.from_numpy(np.stack(parts).astype(np.float32))
        if rate != sr:
            x = AF.resample(x, sr, rate)
        path = root / f"f{i:04d}_{rate}_{channels}ch.wav"
        sf.write(str(path), np.clip(x.numpy().T, -1, 1), rate, subtype="PCM_16")
        paths.append(path)
    return paths


def run_plain(inputs, out: Path, args) -> dict:
    """``plain_in_this_process`` in a fresh Python process, as each ``df-mps-enhance`` run is
    one (an actor is one too): its JSON line back."""
    import subprocess

    child = [sys.executable, str(Path(__file__).resolve()), "--plain-child", str(out)]
    child += ["--device", args.device, "--threads", str(args.threads), "--model-dir"]
    child += [str(args.model_dir), *(["--probe"] if args.probe else []), "--"]
    child += list(map(str, inputs))
    done = subprocess.run(child, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"bench_ray: the plain run failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def plain_in_this_process(inputs, out: Path, args) -> dict:
    """What ``df-mps-enhance`` does without ``--ray``: one batched ``Enhancer`` (the CLI's
    defaults for the device), then ``enhance_files`` over the whole corpus, the model load
    timed apart; the span runs from the call to the last file on disk (each result comes once
    its output is renamed into place)."""
    import torch

    from df_mps.api import Enhancer, FileError

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    enhancer = Enhancer(args.model_dir, device=None if args.device == "auto" else args.device)
    load_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    audio = model = 0.0
    errors = []
    probe = _probe(args.probe)
    start = time.perf_counter()
    with probe:
        for result in enhancer.enhance_files([(src, out / src.name) for src in inputs]):
            if isinstance(result, FileError):
                errors.append(result.message)
            else:
                audio += result.audio_seconds
                model += result.model_seconds
    span = time.perf_counter() - start
    extra = {"probe": probe.result()} if args.probe else {}
    return dict(
        **extra,
        load_s=load_s,
        span_s=span,
        audio_s=audio,
        audio_s_per_s=audio / span,
        rtf=model / audio,
        device=str(enhancer.device),
        batch=enhancer.batch,
        threads=args.threads,
        errors=errors[:5],
    )


def _probe(on: bool):
    """An ``EngineProbe`` (with stacks) where ``on``, else a context that does nothing."""
    import contextlib

    if not on:
        probe = contextlib.nullcontext()
        probe.result = dict
        return probe
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import EngineProbe

    return EngineProbe(stacks=True)


PROBE_DIR_ENV = "BENCH_RAY_PROBE_DIR"  # where each probed actor batch writes its JSON


def _probed_actor_class():
    """``df_mps.ray.EnhanceFiles`` with each batch run inside an ``EngineProbe``, its result
    written to $BENCH_RAY_PROBE_DIR (the local cluster's actors share this file system). Made
    here, in the driver's script, so that Ray ships it by value to the actors."""
    from df_mps.ray import EnhanceFiles

    class ProbedEnhanceFiles(EnhanceFiles):
        def __call__(self, batch):
            import threading

            sys.path.insert(0, os.environ["BENCH_RAY_BENCHMARKS"])
            from _common import EngineProbe

            with EngineProbe(stacks=True) as probe:
                rows = super().__call__(batch)
            result = probe.result()
            result["pid"] = os.getpid()
            names = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "LD_PRELOAD", "MALLOC_ARENA_MAX")
            result["environment"] = {k: os.environ.get(k) for k in names}
            result["switch_interval"] = sys.getswitchinterval()
            result["affinity"] = len(os.sched_getaffinity(0))
            result["thread"] = threading.current_thread().name
            path = Path(os.environ[PROBE_DIR_ENV]) / f"probe_{os.getpid()}_{time.time_ns()}.json"
            path.write_text(json.dumps(result))
            return rows

    return ProbedEnhanceFiles


def run_ray(inputs, out: Path, args, workers: int, gpus_per_worker) -> dict:
    import df_mps.ray as df_ray
    from df_mps.ray import run_on_ray

    probe_dir = None
    original = df_ray.EnhanceFiles
    if args.probe:
        probe_dir = Path(tempfile.mkdtemp(prefix="df-mps-ray-probe."))
        os.environ[PROBE_DIR_ENV] = str(probe_dir)
        os.environ["BENCH_RAY_BENCHMARKS"] = str(Path(__file__).resolve().parent)
        df_ray.EnhanceFiles = _probed_actor_class()
    out.mkdir(parents=True, exist_ok=True)
    options = dict(model=str(args.model_dir), device=args.device, threads=args.threads)
    t0 = time.time()
    try:
        rows = list(
            run_on_ray(
                [(src, out / src.name) for src in inputs],
                workers=workers,
                enhancer_options=options,
                files_per_batch=args.batch,
                num_cpus=args.num_cpus,
                gpus_per_worker=gpus_per_worker,
            )
        )
    finally:
        df_ray.EnhanceFiles = original
    wall = time.time() - t0
    probes = []
    if probe_dir is not None:
        probes = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("probe_*.json"))]
        shutil.rmtree(probe_dir, ignore_errors=True)
        os.environ.pop(PROBE_DIR_ENV, None)
    status = {}
    for row in rows:
        status[row["status"]] = status.get(row["status"], 0) + 1
    ok = [row for row in rows if row["status"] == "ok"]
    first = min(row["started"] for row in ok)
    last = max(row["finished"] for row in ok)
    audio = sum(row["audio_seconds"] for row in ok)
    return dict(
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        startup_s=first - t0,
        span_s=last - first,
        wall_s=wall,
        audio_s=audio,
        audio_s_per_s=audio / (last - first),
        rtf=sum(row["model_seconds"] for row in ok) / audio,
        status=status,
        actors=sorted({row["worker"] for row in rows}),
        devices=sorted({row["device"] for row in rows}),
        errors=[row["error"] for row in rows if row["status"] == "error"][:5],
        **({"probes": probes} if args.probe else {}),
    )


def max_abs_diff(a_dir: Path, b_dir: Path, names) -> float:
    import numpy as np
    import soundfile as sf

    worst = 0.0
    for name in names:
        a, _ = sf.read(str(a_dir / name), dtype="float32", always_2d=True)
        b, _ = sf.read(str(b_dir / name), dtype="float32", always_2d=True)
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
    return worst


def environment(args) -> dict:
    import numpy as np
    import torch

    info = dict(
        python=platform.python_version(),
        platform=platform.platform(),
        cpus=os.cpu_count(),
        torch=torch.__version__,
        numpy=np.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    )
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plain_child is not None:
        print(json.dumps(plain_in_this_process(args.inputs, args.plain_child, args)))
        return 0
    if args.slim_ray_wheel:
        target = slim_ray_wheel(*args.slim_ray_wheel)
        print(f"{target} ({target.stat().st_size / 2**20:.1f} MiB)")
        return 0
    shares = args.gpus_per_worker or [None]
    if len(shares) not in (1, len(args.workers)):
        print("--gpus-per-worker: give one value or one per --workers entry", file=sys.stderr)
        return 2
    shares = shares * len(args.workers) if len(shares) == 1 else shares
    root = args.workdir or Path(tempfile.mkdtemp(prefix="df-mps-bench-ray."))
    try:
        t0 = time.perf_counter()
        inputs = make_corpus(root / "in", args.files, args.seconds, args.audio_dir, args.mixed)
        print(
            f"corpus: {len(inputs)} file(s) of {args.seconds:g} s in {root / 'in'} "
            f"({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
        names = [p.name for p in inputs]
        result = dict(
            environment=environment(args),
            corpus=dict(files=len(inputs), seconds_each=args.seconds, mixed=args.mixed),
            counted="first decode to last encode; model loads and Ray start-up apart",
        )
        if not args.no_plain:
            result["plain"] = run_plain(inputs, root / "plain", args)
            print(f"plain: {json.dumps(result['plain'])}", file=sys.stderr)
        runs = []
        for workers, share in zip(args.workers, shares):
            out = root / f"ray_w{workers}_g{share}"
            run = run_ray(inputs, out, args, workers, share)
            if "plain" in result:
                run["max_abs_diff_vs_plain"] = max_abs_diff(out, root / "plain", names)
            print(f"ray: {json.dumps(run)}", file=sys.stderr)
            runs.append(run)
        if not args.no_plain:
            # Again after Ray, so drift shows; Ray's ratio is to the mean of the two (each a
            # fresh process with its model load, as an actor is) and to the faster one.
            result["plain_after"] = run_plain(inputs, root / "plain_after", args)
            print(f"plain again: {json.dumps(result['plain_after'])}", file=sys.stderr)
            both = [result[k]["audio_s_per_s"] for k in ("plain", "plain_after")]
            for run in runs:
                run["ratio_to_plain"] = run["audio_s_per_s"] / (sum(both) / 2)
                run["ratio_to_faster_plain"] = run["audio_s_per_s"] / max(both)
        base = runs[0]
        for run in runs:
            scale = run["workers"] / base["workers"]
            run["scaling_efficiency"] = run["audio_s_per_s"] / (scale * base["audio_s_per_s"])
            gpus = len(result["environment"].get("gpus", []))
            own_gpu = (run["gpus_per_worker"] or 1) >= 1 and run["workers"] <= gpus
            run["one_gpu_per_actor"] = bool(args.device == "cuda" and own_gpu)
        result["ray"] = runs
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
