"""Leak tracking: RSS after cleanup that keeps growing across the stages of one process."""

from __future__ import annotations

from memopt_pipeline.core.units import GiB


class LeakTracker:
    """Flags RSS that keeps growing across stages of one process after cleanup.

    Each stage reports the RSS left after its cleanup. Compared with the first such reading
    in this process, growth beyond ``threshold_bytes`` means memory is not given back
    between instances or repeated materializations: a leak, or a cache that grows without
    bound. The first reading is the floor; every later one is compared with it.
    """

    def __init__(self, threshold_bytes: int):
        self.threshold_bytes = threshold_bytes
        self.first: tuple[str, int] | None = None
        self.readings: list[tuple[str, int]] = []

    def record(self, stage: str, rss_after_cleanup: int) -> str | None:
        """Remember this reading; return a warning with the numbers when growth passes the threshold."""
        self.readings.append((stage, rss_after_cleanup))
        if self.first is None:
            self.first = (stage, rss_after_cleanup)
            return None
        first_stage, first_rss = self.first
        growth = rss_after_cleanup - first_rss
        if growth <= self.threshold_bytes:
            return None
        return (
            f"possible memory leak: after cleanup RSS is {rss_after_cleanup / GiB:.2f} GiB after {stage}, "
            f"{growth / GiB:.2f} GiB more than after {first_stage} ({first_rss / GiB:.2f} GiB) "
            f"over {len(self.readings)} stages in this process (threshold {self.threshold_bytes / GiB:.2f} GiB)"
        )
