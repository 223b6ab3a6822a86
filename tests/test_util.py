"""df_mps.util: large freed buffers kept for reuse (glibc's malloc thresholds)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from df_mps import util

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the thresholds are glibc's: this is not glibc on Linux",
)

# A child that allocates, writes and frees buffers of 20-28 MiB (DFN3's largest convolution
# output is 24.5 MB for a 10 s row), and prints the page faults of the last nine.
CHILD = textwrap.dedent(
    """
    import ctypes, resource, sys
    from df_mps import util

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def cycle(size):  # as torch's CPU allocator does: malloc, every page written, free
        buffer = libc.malloc(size)
        libc.memset(buffer, 1, size)
        libc.free(buffer)

    def run(sizes):
        cycle(sizes[0])
        before = faults()
        for _ in range(3):
            for size in sizes:
                cycle(size)
        return faults() - before

    mode = sys.argv[1]
    sizes = [24 << 20, 28 << 20, 20 << 20]
    if mode == "kept":
        assert util.keep_freed_buffers()
        print(run(sizes))
    elif mode == "block":
        with util.large_buffers_kept() as applied:
            assert applied
            inside = run(sizes)
        print(inside, run(sizes))
    """
)


def child_faults(mode: str, **env) -> list:
    import os

    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    return [int(n) for n in proc.stdout.split()]


@glibc_only
@pytest.mark.subprocess
def test_freed_buffers_are_reused_without_faulting_their_pages_in_again():
    # 9 buffers of 20-28 MiB, about 55,000 pages: mapped afresh, each would fault every page.
    (faults,) = child_faults("kept")
    assert faults < 2_000, faults


@glibc_only
@pytest.mark.subprocess
def test_the_block_gives_its_memory_back_after_it():
    inside, after = child_faults("block")
    assert inside < 2_000, inside
    # glibc's thresholds again (128 KiB): each buffer is mapped afresh and faulted in.
    assert after > 40_000, after


def test_opt_out_and_other_c_libraries(monkeypatch):
    monkeypatch.setenv("DF_MPS_KEEP_FREED_BUFFERS", "0")
    assert util.keep_freed_buffers() is False
    with util.large_buffers_kept() as applied:
        assert applied is False
    monkeypatch.delenv("DF_MPS_KEEP_FREED_BUFFERS")
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    assert util.keep_freed_buffers() is False
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert util.keep_freed_buffers() is False
