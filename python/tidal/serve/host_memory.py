"""Returning freed host memory to the operating system while serving.

Every engine step allocates and frees host tensors whose sizes follow the batch (logits, sampling
buffers, step inputs). glibc's malloc keeps such freed memory in its heaps (its mmap threshold
rises after large frees, so later large blocks come from the heap too), and a long-running server's
RSS then climbs although the memory in use does not: measured on the CPU engine over 2,600 requests,
the bytes malloc has in use stayed at 119 MiB while its free-but-kept bytes grew from 6 to 200 MiB
and RSS by the same. ``malloc_trim(0)`` hands those pages back (7-8 ms there; RSS then stayed within
4 MiB over the same requests); the engine calls it when it goes idle and every 10 s while busy.
It gives back only free memory: growth in the bytes in use (bench/RESULTS.md, "Soak") is another matter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time


def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HostMemoryTrimmer:
    """Calls ``malloc_trim(0)`` at most every ``busy_interval_s`` seconds while the engine works,
    and once when it goes idle (at least ``idle_interval_s`` after the last trim; an engine idle
    since its last trim is not trimmed again)."""

    def __init__(self, busy_interval_s: float = 10.0, idle_interval_s: float = 1.0):
        self._trim = _malloc_trim()
        self.busy_interval_s = busy_interval_s
        self.idle_interval_s = idle_interval_s
        self._last = time.monotonic()
        self._trimmed_idle = True  # nothing to give back before the first step
        self.num_trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe_trim(self, idle: bool) -> bool:
        """Trims if the interval for this state has passed; True when it did."""
        if self._trim is None or (idle and self._trimmed_idle):
            return False
        self._trimmed_idle &= idle
        if time.monotonic() - self._last < (self.idle_interval_s if idle else self.busy_interval_s):
            return False
        self._trim(0)
        self._last = time.monotonic()
        self._trimmed_idle = idle
        self.num_trims += 1
        return True
