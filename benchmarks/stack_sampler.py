"""Where one thread spends its wall time: a sampling profiler in the same process.

A daemon thread reads the target thread's Python stack (``sys._current_frames``) every
``interval`` seconds and keeps (time, frames). ``summary(spans)`` counts the samples that fall
in each named span of time (for the engine: before its first step, in steps, between steps,
after its last) by the innermost df_mps frame and the innermost frame of all, so a wait in C
(a CUDA copy, a lock, an event) shows up at the Python line that made it. py-spy would do
this from outside; the H200 machine has no py-spy and no network.

A sample needs the GIL: time the target spends holding it inside C shows up at the line of
that C call, but a stretch where the sampler can't get the GIL shows as missing samples (the
summary reports the expected against the taken counts).
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple


def _where(frame, limit: int = 40) -> Tuple[str, str]:
    """(innermost df_mps frame, innermost frame) of a stack, as 'file:line function'."""
    leaf = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
    ours = "-"
    f = frame
    while f is not None and limit:
        name = f.f_code.co_filename
        if "/df_mps/" in name:
            ours = f"{name.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"
            break
        f, limit = f.f_back, limit - 1
    return ours, leaf


class StackSampler:
    def __init__(
        self,
        thread_id: Optional[int] = None,
        interval: float = 0.0005,
        groups: Sequence[str] = ("df-mps-read", "df-mps-write"),
    ):
        self.thread_id = thread_id if thread_id is not None else threading.get_ident()
        self.interval = interval
        self.groups = tuple(groups)  # thread-name prefixes sampled too, each as one group
        self.samples: List[Tuple[float, str, str]] = []
        self.group_samples: Dict[str, List[Tuple[float, str, str]]] = {g: [] for g in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> StackSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            frames = sys._current_frames()
            now = time.perf_counter()
            frame = frames.get(self.thread_id)
            if frame is not None:
                self.samples.append((now, *_where(frame)))
            if self.groups:
                for thread in threading.enumerate():
                    for group in self.groups:
                        if thread.name.startswith(group) and thread.ident in frames:
                            self.group_samples[group].append((now, *_where(frames[thread.ident])))
            del frame, frames
            time.sleep(self.interval)

    def summary(self, spans: Dict[str, Sequence[Tuple[float, float]]], top: int = 12) -> dict:
        """Per span name: seconds covered, samples taken, and the top (df_mps frame, leaf)
        pairs with their share of the samples and the seconds that share stands for; the
        thread groups' samples (all their threads together) under "<group>: <span>"."""
        out = self._summary(self.samples, spans, top)
        for group, samples in self.group_samples.items():
            for name, value in self._summary(samples, spans, top).items():
                out[f"{group}: {name}"] = value
        return out

    def _summary(self, samples, spans, top: int) -> dict:
        out = {}
        for name, intervals in spans.items():
            counts: collections.Counter = collections.Counter()
            seconds = sum(b - a for a, b in intervals)
            for t, ours, leaf in samples:
                if any(a <= t < b for a, b in intervals):
                    counts[(ours, leaf)] += 1
            taken = sum(counts.values())
            out[name] = {
                "seconds": round(seconds, 4),
                "samples": taken,
                "expected_samples": int(seconds / self.interval),
                "top": [
                    {
                        "df_mps": ours,
                        "leaf": leaf,
                        "share": round(n / taken, 3),
                        "seconds": round(seconds * n / taken, 4),
                    }
                    for (ours, leaf), n in counts.most_common(top)
                ]
                if taken
                else [],
            }
        return out


if __name__ == "__main__":  # print a summary file: stack_sampler.py SUMMARY.json [TOP]
    import json
    from pathlib import Path

    top_n = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    for span, value in json.loads(Path(sys.argv[1]).read_text()).items():
        taken, expected = value["samples"], value["expected_samples"]
        print(f"{span}: {value['seconds']} s, {taken}/{expected} samples")
        for e in value["top"][:top_n]:
            print(f"   {e['seconds']:8.4f} s {e['share']:6.1%}  {e['df_mps']}  <  {e['leaf']}")
