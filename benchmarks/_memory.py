"""Peak memory of the running process, shared by the benchmark scripts."""

from __future__ import annotations

import resource
import sys


def peak_rss_mib() -> float:
    """This process's peak resident set size, in MiB."""
    # Linux: VmHWM belongs to this process's own address space, which exec() replaced, whereas
    # ru_maxrss survives exec() and can report the (forked) parent's size.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB else
