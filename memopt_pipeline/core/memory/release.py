"""Giving freed memory back to the operating system: gc, glibc's malloc_trim, Arrow's pool, GPU caches."""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from typing import Callable

from memopt_pipeline.core.memory import gpu
from memopt_pipeline.core.memory.measure import process_rss_bytes


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on other platforms / C libraries (musl has none)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # CDLL(None): the symbols already loaded into this process, i.e. the C library in use.
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> dict:
    """Return freed memory to the OS; reports RSS before and after.

    gc.collect frees cyclic garbage; glibc keeps freed heap pages until ``malloc_trim``
    returns them; Arrow keeps its own pool (only consulted if pyarrow is already imported,
    otherwise it holds nothing); GPU caches go through :func:`gpu.release_gpu_caches`.
    ``malloc_trim`` in the result says whether it could be called on this platform;
    ``gpu_caches`` names the GPU caches released.
    """
    rss_before = process_rss_bytes()
    gc_objects = gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None:
        pyarrow.default_memory_pool().release_unused()
    gpu_caches = gpu.release_gpu_caches()
    rss_after = process_rss_bytes()
    return {
        "rss_before": rss_before,
        "rss_after": rss_after,
        "freed_bytes": max(0, rss_before - rss_after),
        "gc_objects": gc_objects,
        "malloc_trim": trim is not None,
        "gpu_caches": gpu_caches,
    }
