#!/usr/bin/env python
"""Where the engine makes its scheduling thread wait for the GPU (CUDA only; a diagnostic).

A host thread that waits for the device (``.item()``, a copy to pageable memory, a copy *from*
pageable memory, which CUDA runs after everything queued before it) stops queuing work: the
scheduling thread then can't read, analyse or stack the next step while the current one runs.
This runs ``--files`` files of ``--seconds`` s through ``Enhancer.enhance_files`` (after the
model load and warm-up) under ``torch.cuda.set_sync_debug_mode("warn")`` and counts the
synchronising calls by the df_mps line that made them, per thread (the I/O threads' waits for
their host copies are expected; the scheduling thread's are what this looks for).

    python benchmarks/cuda_syncs.py --files 16 --seconds 30 --json syncs.json
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

from _common import audio_path, command_line, machine, model_dir, now_iso, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--batch", default="auto")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import numpy as np
    import soundfile as sf
    import torch

    from df_mps.api import Enhancer

    if not torch.cuda.is_available():
        raise SystemExit("cuda_syncs: needs a CUDA device")
    base, sr = sf.read(str(audio_path()), dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="df-mps-syncs-"))
    need = int(args.seconds * sr)
    signal = np.tile(base, -(-need // base.shape[0]))[:need]
    inputs = []
    for k in range(args.files):
        path = work / f"in{k:03d}.wav"
        sf.write(str(path), np.roll(signal, k * 997), sr, subtype="PCM_16")
        inputs.append(path)
    enhancer = Enhancer(model_dir(), device="cuda", batch=args.batch)
    sites: collections.Counter = collections.Counter()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return original(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "df_mps" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in frames[-3:])
        sites[(threading.current_thread().name.split("_")[0], where or "?")] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        results = list(enhancer.enhance_files([(s, work / f"out{s.name}") for s in inputs]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = original
    rows = [
        {"thread": thread, "site": site, "count": count}
        for (thread, site), count in sites.most_common()
    ]
    for row in rows:
        print(f"{row['count']:6d}  {row['thread']:<12} {row['site']}")
    ok = sum(not hasattr(r, "message") for r in results)
    meta = dict(
        command=command_line(),
        date=now_iso(),
        machine=machine(),
        corpus=f"{args.files} files of {args.seconds:g} s",
        batch=enhancer.batch,
        ok=ok,
    )
    write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
