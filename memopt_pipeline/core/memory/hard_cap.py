"""Hard cap: RLIMIT_DATA a little above the budget, so a runaway native allocation fails in-process."""

from __future__ import annotations

import contextlib
from typing import Iterator

from memopt_pipeline.core.memory.measure import process_rss_bytes, virtual_data_bytes
from memopt_pipeline.core.units import MiB


@contextlib.contextmanager
def hard_memory_cap(budget_bytes: int, margin: float = 0.1, min_margin_bytes: int = 256 * MiB) -> Iterator[int | None]:
    """Cap the process's data segment (RLIMIT_DATA) a little above the budget for the block.

    A runaway native allocation then fails inside the process as MemoryError (numpy,
    pyarrow) or std::bad_alloc instead of the kernel OOM-killing the whole step. RLIMIT_DATA
    counts virtual data, which already exceeds RSS (allocator arenas, thread stacks), so the
    cap is today's virtual data plus the RSS headroom left in the budget, plus ``margin`` of
    the budget. Only the soft limit is lowered, and it is restored afterwards. Yields the cap
    in bytes, or None where the limit is unsupported (then nothing is capped).
    """
    try:
        import resource
    except ImportError:  # not POSIX
        yield None
        return
    data_now = virtual_data_bytes()
    if data_now is None:
        yield None
        return
    headroom = max(budget_bytes - process_rss_bytes(), 0)
    cap = int(data_now + headroom + max(margin * budget_bytes, min_margin_bytes))
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY and cap > hard:
        cap = hard
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield cap
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
