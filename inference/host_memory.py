"""glibc malloc settings for XLA:CPU's per-call scratch.

XLA:CPU allocates one temporary buffer per program run (every intermediate of the step: activations,
the [S, V] logits, the sampler's work arrays). At 64 rows of the default model that buffer is larger than
glibc's largest dynamic mmap threshold (32 MB), so every call maps it afresh and the kernel zeroes each
page on first touch, then unmaps it on free: measured 8 ms of a 49 ms W8A8 decode step at 64 sequences
(BENCHMARKS.md, issue 12), and the greedy sampler alone 9.4 -> 2.6 ms. Raising the mmap and trim
thresholds lets freed scratch stay in the heap and be reused without faults, the same reason vLLM's CPU
backend preloads tcmalloc.

The cost: freed memory up to `TRIM_THRESHOLD` stays in the process instead of going back to the OS (its
peak, not its growth: reused memory is not counted twice). Process-wide, so it is applied once, only on
the CPU backend, only under glibc, and never over the user's own MALLOC_*_ / GLIBC_TUNABLES settings;
RIDGELINE_CPU_MALLOC=0 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# Allocations up to this size come from the heap (above it, still mmap).
MMAP_THRESHOLD = 1 << 30
# Free memory at the heap's top kept before returning it to the OS.
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_applied: bool | None = None


def keep_scratch_mapped() -> bool:
    """Applies the thresholds once per process; True if they are in effect (now or from before)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("RIDGELINE_CPU_MALLOC", "1") == "0" or any(v in os.environ for v in _USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success.
    _applied = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _applied
