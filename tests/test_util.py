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

# A child that allocates buffers of 20-28 MiB together (DFN3's largest convolution output is
# 24.5 MB for a 10 s row, and a forward holds several such), writes and frees them, four
# times, and prints for the last three the page faults they cost and the most bytes glibc
# held in mapped chunks while they were allocated, over what it held before (mallinfo's
# hblkhd: a buffer mapped afresh is there; one reused from the heap is not).
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

    def cycle(sizes):  # as a forward on the CPU does: buffers alive together, written, freed
        buffers = [libc.malloc(size) for size in sizes]
        for buffer, size in zip(buffers, sizes):
            libc.memset(buffer, 1, size)
        mapped = mallinfo().hblkhd
        for buffer in buffers:
            libc.free(buffer)
        return mapped

    def run(sizes):
        cycle(sizes)  # the heap (or glibc's moving threshold) grown to them
        before, base, mapped = faults(), mallinfo().hblkhd, 0
        for _ in range(3):
            mapped = max(mapped, cycle(sizes) - base)
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
            kept = mallinfo().arena  # the heap, the freed buffers still in it
        print(*inside, kept, mallinfo().arena)
    """
)


# What would change the child's malloc or make df-mps leave it alone (util._mallopt).
MALLOC_ENV = ("DF_MPS_KEEP_FREED_BUFFERS", "LD_PRELOAD", "GLIBC_TUNABLES", *util._USER_MALLOC_ENV)


def child_run(mode: str) -> list:
    import os

    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return [int(n) for n in proc.stdout.split()]


@glibc_only
@pytest.mark.subprocess
def test_freed_buffers_are_reused_without_faulting_their_pages_in_again():
    # 9 buffers of 20-28 MiB, about 55,000 pages: glibc, left as it is, gives the top of its
    # heap back when they are freed together (and maps some afresh), and the next ones fault
    # their pages in again.
    faults, mapped = child_run("kept")
    assert mapped < 1 << 20, mapped  # every one reused from the heap
    assert faults < 2_000, faults


@glibc_only
@pytest.mark.subprocess
def test_the_block_gives_its_memory_back_after_it():
    faults, mapped, heap_inside, heap_after = child_run("block")
    assert mapped < 1 << 20 and faults < 2_000, (mapped, faults)
    assert heap_inside >= 28 << 20  # the largest buffer, freed, kept in the heap
    assert heap_after < heap_inside - (20 << 20), (heap_inside, heap_after)  # given back


class SpyMalloc:
    """Stands in for glibc's mallopt and malloc_trim (util._mallopt): records the calls."""

    def __init__(self, accepts: bool = True):
        self.calls, self.accepts = [], accepts

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return int(self.accepts)

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def spy(monkeypatch):
    spy = SpyMalloc()
    monkeypatch.setattr(util, "_mallopt", lambda: (spy.mallopt, spy.malloc_trim))
    monkeypatch.setattr(util, "_kept_for_process", False)
    return spy


KEEP = [("mallopt", -3, 32 << 20), ("mallopt", -1, 1 << 30)]
AFTER = [("mallopt", -3, 32 << 20), ("mallopt", -1, 64 << 20), ("malloc_trim", 0)]


def test_nested_and_overlapping_blocks_apply_once_and_restore_once(spy):
    with util.large_buffers_kept() as outer:
        assert outer and spy.calls == KEEP
        with util.large_buffers_kept() as inner:
            assert inner and spy.calls == KEEP
        assert spy.calls == KEEP
    assert spy.calls == KEEP + AFTER
    # Two threads' blocks that overlap, the first to enter leaving first: one restore, at the
    # last exit.
    spy.calls.clear()
    first, second = util.large_buffers_kept(), util.large_buffers_kept()
    assert first.__enter__() and second.__enter__()
    first.__exit__(None, None, None)
    assert spy.calls == KEEP
    second.__exit__(None, None, None)
    assert spy.calls == KEEP + AFTER


def test_a_refused_setting_is_not_reported_or_restored(spy):
    spy.accepts = False
    with util.large_buffers_kept() as outer:
        with util.large_buffers_kept() as inner:
            assert outer is False and inner is False
    assert spy.calls == KEEP[:1]  # refused at the first: nothing else set, nothing restored


def test_a_process_wide_setting_outlives_the_blocks(spy):
    assert util.keep_freed_buffers()
    with util.large_buffers_kept() as applied:
        assert applied
    assert spy.calls == KEEP  # the block neither set nor restored anything


def test_opt_out_and_other_c_libraries(monkeypatch):
    for name in MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(util, "_kept_for_process", False)
    for name, value in (
        ("DF_MPS_KEEP_FREED_BUFFERS", "0"),
        ("MALLOC_TRIM_THRESHOLD_", "1000000"),  # the user's own settings for glibc's malloc
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1000000"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),  # another malloc
    ):
        monkeypatch.setenv(name, value)
        assert util._mallopt() is None, name
        assert util.keep_freed_buffers() is False
        with util.large_buffers_kept() as applied:
            assert applied is False
        monkeypatch.delenv(name)
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    assert util.keep_freed_buffers() is False
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert util.keep_freed_buffers() is False


def test_prune_unused_removes_only_stale_matches_and_their_companions(tmp_path):
    import os
    import time

    old, recent, keep, other = (tmp_path / n for n in ("k-old.so", "k-new.so", "k-keep.so", "x.so"))
    marker = tmp_path / "k-old.so.ok"
    for path in (old, recent, keep, other, marker):
        path.write_bytes(b"")
    stale = time.time() - 31 * 86400
    for path in (old, keep, other):
        os.utime(path, (stale, stale))
    util.prune_unused(
        tmp_path, "k-*.so", keep, 30, companions=lambda p: [p.with_name(p.name + ".ok")]
    )
    assert not old.exists() and not marker.exists()
    assert recent.exists() and keep.exists() and other.exists()
