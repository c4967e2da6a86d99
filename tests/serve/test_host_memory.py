"""Freed host memory goes back to the operating system: the trimmer's schedule (busy: at most every
interval; idle: once, then not again until the engine has worked), malloc_trim really lowering RSS
after the kind of frees a step leaves behind, and the engine trimming when it goes idle."""

import ctypes
import sys

import pytest

import tidal
from tidal.serve import host_memory
from tidal.serve.host_memory import HostMemoryTrimmer
from tiny_models import assert_pool_whole, build_model


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(host_memory.time, "monotonic", clock)
    return clock


def _trimmer(clock, calls: list) -> HostMemoryTrimmer:
    trimmer = HostMemoryTrimmer(busy_interval_s=10.0, idle_interval_s=1.0)
    trimmer._trim = lambda pad: calls.append((clock.now, pad)) or 1
    return trimmer


def test_busy_trims_at_most_every_interval(clock):
    calls = []
    trimmer = _trimmer(clock, calls)
    for _ in range(25):  # 25 busy steps, 1 s apart
        clock.now += 1.0
        trimmer.maybe_trim(idle=False)
    assert [t for t, _ in calls] == [110.0, 120.0] and all(pad == 0 for _, pad in calls)
    assert trimmer.num_trims == 2


def test_idle_trims_once_after_work(clock):
    calls = []
    trimmer = _trimmer(clock, calls)
    clock.now += 10.0
    assert not trimmer.maybe_trim(idle=True)  # nothing was done since start: nothing to give back
    assert trimmer.maybe_trim(idle=False)
    clock.now += 0.5
    assert not trimmer.maybe_trim(idle=True)  # too soon after the last trim
    clock.now += 0.6
    assert trimmer.maybe_trim(idle=True)
    for _ in range(5):  # idle steps after that: no more trims
        clock.now += 2.0
        assert not trimmer.maybe_trim(idle=True)
    assert trimmer.maybe_trim(idle=False)  # work again (10 s since the last trim: a busy trim), then idle
    clock.now += 2.0
    assert trimmer.maybe_trim(idle=True)
    assert [round(t, 1) for t, _ in calls] == [110.0, 111.1, 121.1, 123.1]


@pytest.mark.skipif(not HostMemoryTrimmer().available, reason="needs glibc's malloc_trim")
def test_malloc_trim_gives_freed_heap_back():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    base = rss_mib()
    blocks = []
    for _ in range(3000):  # 64 KiB each, under the mmap threshold: from the heap
        p = libc.malloc(64 << 10)
        ctypes.memset(p, 1, 64 << 10)
        blocks.append(p)
    for p in blocks[:-1]:  # the last one pins the top of the heap: free() alone cannot shrink it
        libc.free(p)
    held = rss_mib()
    assert held - base > 150, (base, held)
    assert HostMemoryTrimmer(busy_interval_s=0)._trim(0) == 1
    assert rss_mib() - base < 0.2 * (held - base), (base, held, rss_mib())
    libc.free(blocks[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_engine_trims_when_it_goes_idle(tmp_path):
    build_model(str(tmp_path))
    llm = tidal.LLM(str(tmp_path), device="cpu", block_size=4, num_kv_blocks=64)
    trimmer = llm.engine._host_memory
    trimmer.idle_interval_s = 0.0
    before = trimmer.num_trims
    llm.generate([[0, 5, 6, 7], [0, 8, 9]], tidal.SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert trimmer.num_trims == before + 1
    assert_pool_whole(llm)
