#!/usr/bin/env bash
# The H200 runs behind docs/performance.md and the issue notes (device tool, not CI), in parts,
# one or more per call:
#   bash benchmarks/h200_session.sh engine ray   # batched engine corpus; Ray vs the batched CLI
#   bash benchmarks/h200_session.sh realtime     # real-time streams
#   bash benchmarks/h200_session.sh gpu suite    # precision and CUDA graphs; the test suite
#   REPEATS=1 bash benchmarks/h200_session.sh sync rayprobe   # early write flushes A/B; Ray probed
#   REPEATS=2 bash benchmarks/h200_session.sh variants pipediag   # $VARIANTS A/B; the stream CLI into a closed pipe
#   bash benchmarks/h200_session.sh compilemodes  # torch.compile's CUDA modes alone (about 9 min)
# Everything written to $OUT comes back as one archive, $OUT/all.tgz (the device tool brings
# back at most 8 files).
# Expects: .whl/ (cp312 wheels: deepfilternet 0.5.6, loguru, soundfile, cffi, pycparser,
# appdirs, platformdirs, soxr), .whlray/ (a slimmed ray wheel and its missing deps, for the
# ray part: `python benchmarks/bench_ray.py --slim-ray-wheel WHEEL DIR`), .devcarry/
# (models/DeepFilterNet3, audio/*.wav), and $OUT. The machine has Python 3.12, torch 2.11
# CUDA, no DeepFilterLib (df_mps.dsp stands in).
set -uo pipefail
parts=("${@:-engine}")
wheels=(.whl/*.whl)
[[ " ${parts[*]} " =~ " "(ray|rayprobe|suite)" " ]] && [ -d .whlray ] && wheels+=(.whlray/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 DF_MPS_SHARED=$PWD/.devcarry
M=.devcarry/models/DeepFilterNet3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"
# corpus_variants NAME VARIANT...: the corpus through the CLI, fp32 and bf16, in the given
# bench_engine.py --variants, interleaved within each of REPEATS repeats; $OUT/NAME_<prec>.json.
corpus_variants() {
  local name=$1; shift
  for prec in fp32 bf16; do
    extra=""; [ $prec = bf16 ] && extra="--precision bf16"
    (cd benchmarks && timeout 200 python3 bench_engine.py --mode corpus --device cuda --files 64 \
      --seconds 30 --batch 64 --threads 4 --repeats "${REPEATS:-1}" --cli-args "$extra" \
      --variants "$@" --json "$OUT/${name}_$prec.json" > /dev/null 2>&1)
    python3 -c "import json; [print('$prec', r['variant'], round(r['audio_s_per_s']), 'load', round(r['model_load_s'], 2), json.dumps({k: round(v, 3) for k, v in r['timeline'].items() if k not in ('steps', 'device_lag_at_step_end_s')})) for r in json.load(open('$OUT/${name}_$prec.json'))['rows']]"
  done
}
for part in "${parts[@]}"; do
  echo "== $part"
  case $part in
  engine)
    (cd benchmarks && timeout 240 python3 bench_engine.py --mode corpus --device cuda --files 64 \
      --seconds 30 --batch 64,128,16,1 --threads 4 --json "$OUT/h200_engine.json" 2>&1 | grep -v INFO | cut -c1-160)
    python3 -c "import json; [print(r['batch'], round(r['audio_s_per_s']), json.dumps(r['timeline'])[:400]) for r in json.load(open('$OUT/h200_engine.json'))['rows']]" ;;
  profile)
    # The batch-64 corpus run again: the scheduling thread's calls (cProfile), torch's ops,
    # and with 8 I/O threads.
    cd benchmarks
    BENCH_CPROFILE=$OUT/cprofile_b64.txt timeout 100 python3 bench_engine.py --mode corpus --device cuda \
      --files 64 --seconds 30 --batch 64 --threads 4 --json "$OUT/profile_b64.json" 2>&1 | grep -v INFO | cut -c1-160
    head -60 "$OUT/cprofile_b64.txt"
    BENCH_TORCH_PROFILE=$OUT/torch_b64.txt timeout 100 python3 bench_engine.py --mode corpus --device cuda \
      --files 64 --seconds 30 --batch 64 --threads 4 --json "$OUT/profile_torch_b64.json" > /dev/null 2>&1
    head -45 "$OUT/torch_b64.txt" | cut -c1-200
    DF_MPS_ENGINE_IO_THREADS=8 timeout 100 python3 bench_engine.py --mode corpus --device cuda \
      --files 64 --seconds 30 --batch 64 --threads 4 --json "$OUT/io8_b64.json" 2>&1 | grep -v INFO | cut -c1-160
    cd .. ;;
  timeline)
    # batch 64 at pieces of 10 s (the default), 5 s and 15 s: where the time goes, host and device.
    for p in 10 5 15; do
      (cd benchmarks && timeout 100 python3 bench_engine.py --mode corpus --device cuda \
        --files 64 --seconds 30 --batch 64 --threads 4 --cli-args "--piece-seconds $p" \
        --json "$OUT/tl_p$p.json" 2>&1 | grep -v INFO | cut -c1-160 | tail -1)
      python3 -c "import json; r=json.load(open('$OUT/tl_p$p.json'))['rows'][0]; print('piece', $p, round(r['audio_s_per_s']), json.dumps(r['timeline']))"
    done
    (cd benchmarks && BENCH_SWITCH_INTERVAL=0.0005 timeout 100 python3 bench_engine.py --mode corpus --device cuda \
      --files 64 --seconds 30 --batch 64 --threads 4 --json "$OUT/tl_si.json" 2>&1 | grep -v INFO | cut -c1-160 | tail -1)
    python3 -c "import json; r=json.load(open('$OUT/tl_si.json'))['rows'][0]; print('switch 0.5 ms', round(r['audio_s_per_s']), json.dumps(r['timeline']))" ;;
  corpus)
    # The corpus through the CLI, fp32 (the default) and bf16: audio-s/s and the timeline.
    for cfg in fp32 bf16; do
      extra=""; [ $cfg = bf16 ] && extra="--precision bf16"
      (cd benchmarks && timeout 150 python3 bench_engine.py --mode corpus --device cuda --files 64 \
        --seconds 30 --batch 64 --threads 4 --repeats "${REPEATS:-1}" --cli-args "$extra" --json "$OUT/corpus_$cfg.json" 2>&1 | grep -v INFO | cut -c1-160 | tail -1)
      python3 -c "import json; [print('$cfg', round(r['audio_s_per_s']), json.dumps({k: round(v, 3) for k, v in r['timeline'].items() if k not in ('steps', 'device_lag_at_step_end_s')})) for r in json.load(open('$OUT/corpus_$cfg.json'))['rows']]"
    done ;;
  sync)
    # The writer's early flushes (the default) against none (BENCH_SYNC_BYTES=0: each file
    # flushed only at its commit).
    corpus_variants sync early-sync: commit-only:BENCH_SYNC_BYTES=0 ;;
  variants)
    # The configurations $VARIANTS names (bench_engine.py --variants; default: large freed
    # buffers kept for reuse, the default, against glibc's own behaviour).
    corpus_variants variants ${VARIANTS:-kept: returned:DF_MPS_KEEP_FREED_BUFFERS=0} ;;
  pipediag)
    # test_realtime's closed-pipe case by hand (it ran out of the suite's time on an H100,
    # while the CLI still built its compiled hop before its first output; it now builds it
    # in the background): the real-time CLI into `head -c 1000`, with a cold cache, then a
    # warm one (the cold run's background build may still be going: `ps` shows it). A run still
    # going after 170 s (cold) or 60 s (warm) is aborted, and faulthandler prints every
    # thread's stack.
    python3 -c "import numpy as np; (np.random.default_rng(0).standard_normal(96000) * 0.1).astype('<f4').tofile('/tmp/in.raw')"
    for run in cold warm; do
      t0=$(date +%s.%N); limit=170; [ $run = warm ] && limit=60
      DF_MPS_CACHE_DIR=/tmp/pipediag OMP_NUM_THREADS=1 PYTHONFAULTHANDLER=1 timeout -s ABRT $limit \
        python3 -m df_mps.realtime -m $M --block 4800 --log-level debug < /tmp/in.raw \
        2> "$OUT/pipediag_$run.err" | head -c 1000 > /dev/null
      echo "$run: rc ${PIPESTATUS[0]}, $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
      ps ax -ww -o pid=,etime=,command= | grep "[d]f_mps.hopgraph" | cut -c1-120
      grep -v "INFO\|DEBUG" "$OUT/pipediag_$run.err" | tail -25 | cut -c1-200
    done ;;
  cudatests)
    # The CUDA-only tests (graphs, precision, the engine on CUDA).
    DF_MPS_TEST_DEVICE=cuda timeout "${CUDA_TESTS_TIMEOUT:-240}" python3 -m pytest -q -rs -p no:cacheprovider \
      tests/test_cuda_graphs.py tests/test_precision.py tests/test_engine.py \
      -k "not memory" > "$OUT/cudatests.txt" 2>&1; tail -15 "$OUT/cudatests.txt" ;;
  rayprobe)
    # Ray against the plain CLI path, with the engine's timeline, stacks, threads and garbage
    # collections inside the plain run and inside the actor's batch (bench_ray.py --probe).
    timeout 300 python3 benchmarks/bench_ray.py --device cuda --model-dir $M --audio-dir .devcarry/audio \
      --files 64 --seconds 30 --threads 4 --workers 1 --gpus-per-worker 1 --probe \
      --json "$OUT/h200_ray_probe.json" > "$OUT/bench_ray_probe.log" 2>&1; tail -3 "$OUT/bench_ray_probe.log"
    python3 - "$OUT/h200_ray_probe.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
show = lambda p: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in (p.get("timeline") or {}).items() if k not in ("steps", "device_lag_at_step_end_s")}
for name in ("plain", "plain_after"):
    p = d[name]; print(name, round(p["audio_s_per_s"]), "span", round(p["span_s"], 3), show(p["probe"]), "gc", p["probe"].get("gc"), p["probe"].get("threads"))
for run in d["ray"]:
    print("ray", round(run["audio_s_per_s"]), "span", round(run["span_s"], 3), "ratio", round(run.get("ratio_to_plain", 0), 3))
    for p in run.get("probes", []):
        print("  actor", show(p), "gc", p.get("gc"), p.get("threads"), p.get("environment"), p.get("thread"), p.get("affinity"))
        for span, top in (p.get("stacks") or {}).items():
            print("   ", span, str(top)[:600])
for name in ("plain",):
    for span, top in (d[name]["probe"].get("stacks") or {}).items():
        print("  plain", span, str(top)[:600])
PY
    ;;
  stacks)
    # Where the scheduling thread and the I/O threads spend the corpus run, by span (before the
    # first step, in steps, between steps, after the last): benchmarks/stack_sampler.py.
    (cd benchmarks && BENCH_STACKS=$OUT/stacks_b64.json timeout 100 python3 bench_engine.py --mode corpus \
      --device cuda --files 64 --seconds 30 --batch 64 --threads 4 --json "$OUT/stacks_run.json" 2>&1 | grep -v INFO | cut -c1-160 | tail -1)
    python3 benchmarks/stack_sampler.py "$OUT/stacks_b64.json" 6 ;;
  syncs)
    (cd benchmarks && timeout 120 python3 cuda_syncs.py --files 64 --seconds 30 --json "$OUT/cuda_syncs.json" 2>&1 | grep -v INFO | tail -25)
    for n in 8 16; do
      (cd benchmarks && DF_MPS_ENGINE_IO_THREADS=$n timeout 100 python3 bench_engine.py --mode corpus --device cuda \
        --files 64 --seconds 30 --batch 64 --threads 4 --json "$OUT/io${n}_b64.json" 2>&1 | grep -v INFO | cut -c1-160)
      python3 -c "import json; r=json.load(open('$OUT/io${n}_b64.json'))['rows'][0]; print($n, round(r['audio_s_per_s']), json.dumps(r['timeline']))"
    done ;;
  ray)
    timeout 300 python3 benchmarks/bench_ray.py --device cuda --model-dir $M --audio-dir .devcarry/audio \
      --files 64 --seconds 30 --threads 4 --workers 1 --gpus-per-worker 1 \
      --json "$OUT/h200_ray.json" > "$OUT/bench_ray.log" 2>&1; tail -15 "$OUT/bench_ray.log" ;;
  realtime)
    timeout 150 python3 benchmarks/bench_realtime.py gpu --device cuda --streams 1 \
      --json "$OUT/h200_realtime_streams.json" 2>&1 | grep -v INFO | tail -20 ;;
  gpu)
    DF_MPS_DEVICE=cuda python3 -m df_mps doctor > "$OUT/doctor_gpu.txt" 2>&1
    timeout 270 python3 benchmarks/bench_gpu.py --device cuda --deadline-s 240 --json "$OUT/h200_gpu.json" 2>&1 | grep -v "| INFO" | tail -40 ;;
  compilemodes)
    # torch.compile's two CUDA modes alone, with the time the gpu part's deadline did not
    # leave them (max-autotune-no-cudagraphs was skipped on 2026-12-02): its steps part only.
    timeout 580 python3 benchmarks/bench_gpu.py --device cuda --parts steps --step-kinds compile \
      --compile-modes max-autotune-no-cudagraphs,reduce-overhead --step-batches 1,64 \
      --compile-timeout 270 --deadline-s 560 --json "$OUT/h200_compile_modes.json" 2>&1 | grep -v "| INFO" | tail -20 ;;
  final)
    # The corpus through the CLI (fp32 and bf16), the CUDA tests, then the whole suite: in
    # parallel, then its failures again one at a time (xdist workers share a cache and a cwd).
    (cd benchmarks && timeout 60 python3 bench_engine.py --mode corpus --device cuda --files 64 \
      --seconds 30 --batch 64 --threads 4 --json "$OUT/final_fp32.json" 2>&1 | grep -v INFO | cut -c1-160 | tail -1)
    (cd benchmarks && timeout 60 python3 bench_engine.py --mode corpus --device cuda --files 64 \
      --seconds 30 --batch 64 --threads 4 --cli-args "--precision bf16" --json "$OUT/final_bf16.json" 2>&1 | grep -v INFO | cut -c1-160 | tail -1)
    for f in final_fp32 final_bf16; do python3 -c "import json; r=json.load(open('$OUT/$f.json'))['rows'][0]; print('$f', round(r['audio_s_per_s']), json.dumps({k: v for k, v in r['timeline'].items() if k != 'steps'}))"; done
    DF_MPS_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graphs.py tests/test_precision.py tests/test_engine.py -k "not memory" 2>&1 | tail -4
    timeout 130 python3 -m pytest -q -n 8 --dist loadfile -o cache_dir=/tmp/pc 2>&1 | tail -8
    timeout 60 python3 -m pytest -q --lf -o cache_dir=/tmp/pc 2>&1 | tail -4 ;;
  suite)
    # The whole suite (the CPU default) in five shards of whole files, and the CUDA tests
    # (DF_MPS_TEST_DEVICE=cuda) beside them, all at once, each with its own cache and temp
    # directories (the fresh-interpreter and docs tests of one shard never meet another's).
    # -v to files: each test's result is there even where the call's time runs out.
    # As an installed df-mps would be: on every interpreter's path (the launcher's and the
    # patching tests' children set PYTHONPATH of their own), and the upstream model cache
    # that DeepFilterNet's own download fills (the README's examples name the model).
    site=$(python3 -c "import site; print(site.getsitepackages()[0])")
    printf '/tmp/site\n%s\n' "$PWD/src" > "$site/df_mps_h200.pth"
    mkdir -p ~/.cache/DeepFilterNet && cp -r $M ~/.cache/DeepFilterNet/
    mkdir -p /tmp/shardcuda/cache /tmp/shardcuda/tmp
    DF_MPS_CACHE_DIR=/tmp/shardcuda/cache TMPDIR=/tmp/shardcuda/tmp DF_MPS_TEST_DEVICE=cuda \
      timeout "${SUITE_TIMEOUT:-420}" python3 -m pytest -v -rfEs -p no:cacheprovider tests/test_cuda_graphs.py \
      tests/test_precision.py tests/test_engine.py -k "not memory" > "$OUT/suite_cuda.txt" 2>&1 &
    # test_realtime alone, with more time (REALTIME_TIMEOUT): its compiled-hop tests build
    # packages cold (it ran out of 290 s in a shard with others on 2026-12-02, and of 320 s
    # alone on 2026-12-08, at its fourth build, the closed-pipe CLI's own; since 2026-12-08
    # the CLI builds in the background and the module builds three packages: 150 s on 2 cores).
    shards=("test_realtime"
      "test_ray test_engine test_split test_dfop test_audio test_audit"
      "test_enhance_cli test_streaming test_compute test_launcher test_cuda_graphs test_routing"
      "test_patching test_docs test_models test_dsp test_precision test_audio_io"
      "test_capabilities test_kernels test_device test_mps_hardware test_doctor test_gru test_util")
    for k in 0 1 2 3 4; do
      files=$(for f in ${shards[$k]}; do echo tests/$f.py; done)
      mkdir -p /tmp/shard$k/cache /tmp/shard$k/tmp
      limit=${SUITE_TIMEOUT:-420}; [ $k = 0 ] && limit=${REALTIME_TIMEOUT:-520}
      DF_MPS_CACHE_DIR=/tmp/shard$k/cache TMPDIR=/tmp/shard$k/tmp timeout "$limit" \
        python3 -m pytest -v -rfEs -p no:cacheprovider --durations=8 $files > "$OUT/suite_$k.txt" 2>&1 &
    done
    wait
    for k in cuda 0 1 2 3 4; do echo "-- shard $k"; grep -E "FAILED|ERROR" "$OUT/suite_$k.txt" | grep -v "^tests.*PASSED" | head -20; tail -2 "$OUT/suite_$k.txt"; done
    n=$(ls tests/test_*.py | wc -l); m=$(echo ${shards[@]} | wc -w); echo "test files: $n, in shards: $m" ;;
  esac
done
# The device tool brings back at most 8 files: everything in one archive.
(cd "$OUT" && tar czf /tmp/all.tgz . && find . -mindepth 1 -delete && mv /tmp/all.tgz all.tgz)
ls -la "$OUT"
