#!/usr/bin/env bash
# The H200 runs behind docs/performance.md and the issue notes (device tool, not CI).
# Expects: .whl/ (deepfilternet 0.5.6, wrapt, loguru, soundfile, tqdm, appdirs wheels for
# cp312), .devcarry/ (models/DeepFilterNet3, audio/*.wav, features_white.pt made here by
# `python benchmarks/bench_compute.py --save-features .devcarry/features_white.pt`), and $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 DF_MPS_SHARED=$PWD/.devcarry
M=.devcarry/models/DeepFilterNet3
A=.devcarry/audio
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys, torch, torchaudio; print(sys.version.split()[0], torch.__version__, torchaudio.__version__)"
DF_MPS_DEVICE=cuda python3 -m df_mps doctor > "$OUT/doctor.txt" 2>&1; tail -25 "$OUT/doctor.txt"
python3 benchmarks/bench_compute.py --device cuda --batch 1 32 --threads 4 --repeats 20 \
  --features .devcarry/features_white.pt --model-dir $M --json "$OUT/h200_compute.json" 2>&1 | grep -v "| INFO"
python3 benchmarks/h200_dsp_pipeline.py --model-dir $M --audio $A/noisy_white.wav $A/noisy_pink.wav \
  --batch 1,8,32,128 --repeat 5 --json "$OUT/h200_pipeline.json" 2>&1 | grep -v "| INFO"
python3 benchmarks/bench_dsp.py --device cuda --batch 1,32,128 --json "$OUT/h200_dsp.json"
python3 -m df_mps.enhance --device cuda --log-level warning -m $M $A/noisy_white.wav -o "$OUT/"
DF_MPS_FORWARD_METHOD=real python3 -m df_mps.enhance --device cuda --log-level warning --no-suffix \
  -m $M $A/noisy_white.wav -o "$OUT/real/"
ls -la "$OUT" "$OUT/real"
