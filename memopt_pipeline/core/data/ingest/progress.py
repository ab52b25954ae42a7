"""The ingest's progress lines and the peak of the RSS it samples at every block and shard."""

from __future__ import annotations

from typing import Callable

from memopt_pipeline.core.memory.measure import process_rss_bytes
from memopt_pipeline.core.report.progress import RowProgress
from memopt_pipeline.core.units import GiB

PROGRESS_INTERVAL_S = 5.0  # module-level so tests can lower it


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _eta_text(seconds: float) -> str:
    return f"ETA {format_duration(seconds)}"


class IngestProgress:
    """Notes and per-pass row progress for ``progress`` (may be None), and the peak RSS.

    Each pass (:meth:`phase`) reports through a :class:`RowProgress` (rows done of total,
    rows/s, ETA, RSS against the budget) at most every ``PROGRESS_INTERVAL_S``; RSS is sampled
    at every block (:meth:`advance`) and wherever :meth:`sample` is called, and
    ``peak_rss`` keeps the highest sample for ``IngestResult.peak_rss_bytes``.
    """

    def __init__(self, budget_bytes: int, progress: Callable[[str], None] | None):
        self.budget_bytes = budget_bytes
        self.progress = progress
        self.peak_rss = self._rss = process_rss_bytes()
        self._rows: RowProgress | None = None

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def sample(self) -> int:
        rss = self._rss = process_rss_bytes()
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def rss_text(self, rss: int) -> str:
        return f"RSS {rss / GiB:.2f}/{self.budget_bytes / GiB:.2f} GiB"

    def phase(self, label: str, total: int | None = None) -> None:
        """Start counting rows for a new pass of ``total`` rows (None: unknown)."""
        self._rows = None
        if self.progress is not None:
            self._rows = RowProgress(
                label, total, self.progress, budget_bytes=self.budget_bytes, every_seconds=PROGRESS_INTERVAL_S,
                rss_reader=lambda: self._rss, time_left=_eta_text,
            )

    def advance(self, rows: int) -> None:
        self.sample()
        if self._rows is not None:
            self._rows.advance(rows)
