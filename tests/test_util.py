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
# output is 24.5 MB for a 10 s row), and prints, for the last nine, the page faults they cost
# and the most bytes glibc held in mapped chunks while one was allocated, over what it held
# before (mallinfo's hblkhd: a buffer mapped afresh is there; one reused from the heap is not).
CHILD = textwrap.dedent(
    """
    import ctypes, resource, sys
    from df_mps import util

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    # struct mallinfo2 (glibc >= 2.33): ten size_t; mallinfo before it: ten int
    modern = hasattr(libc, "mallinfo2")
    field = ctypes.c_size_t if modern else ctypes.c_int
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    Info = type("Info", (ctypes.Structure,), {"_fields_": [(n, field) for n in names.split()]})
    mallinfo = libc.mallinfo2 if modern else libc.mallinfo
    mallinfo.restype = Info

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def cycle(size):  # as torch's CPU allocator does: malloc, every page written, free
        buffer = libc.malloc(size)
        libc.memset(buffer, 1, size)
        mapped = mallinfo().hblkhd
        libc.free(buffer)
        return mapped

    def run(sizes):
        cycle(sizes[0])
        before, base, mapped = faults(), mallinfo().hblkhd, 0
        for _ in range(3):
            for size in sizes:
                mapped = max(mapped, cycle(size) - base)
        return faults() - before, mapped

    mode = sys.argv[1]
    sizes = [24 << 20, 28 << 20, 20 << 20]
    if mode == "kept":
        assert util.keep_freed_buffers()
        print(*run(sizes))
    elif mode == "block":
        with util.large_buffers_kept() as applied:
            assert applied
            inside = run(sizes)
        print(*inside, *run(sizes))
    """
)


def child_run(mode: str, **env) -> list:
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
    # 9 buffers of 20-28 MiB, about 55,000 pages: mapped afresh, each would fault every page
    # (fewer, larger faults with transparent huge pages).
    faults, mapped = child_run("kept")
    assert mapped < 1 << 20, mapped  # every one reused from the heap
    assert faults < 2_000, faults


@glibc_only
@pytest.mark.subprocess
def test_the_block_gives_its_memory_back_after_it():
    inside_faults, inside_mapped, after_faults, after_mapped = child_run("block")
    assert inside_mapped < 1 << 20 and inside_faults < 2_000, (inside_mapped, inside_faults)
    # glibc's thresholds again (128 KiB): each buffer is mapped afresh, and faulted in again.
    assert after_mapped >= 20 << 20, after_mapped
    assert after_faults > inside_faults, (after_faults, inside_faults)


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
