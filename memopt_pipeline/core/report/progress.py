"""Progress lines for long passes: rows done of total, rows/s, time left, RSS against budget."""

from __future__ import annotations

import time
from typing import Callable

from memopt_pipeline.core.memory.measure import process_rss_bytes
from memopt_pipeline.core.units import GiB


def seconds_left_text(seconds: float) -> str:
    return f"~{seconds:.0f} s left"


class RowProgress:
    """Call ``advance(rows)`` as work proceeds; a line is logged at most every ``every_seconds``.

    ``time_left`` turns the estimated seconds left into the line's text for them.
    """

    def __init__(
        self,
        label: str,
        total_rows: int | None,
        log: Callable[[str], None],
        *,
        budget_bytes: int | None = None,
        every_seconds: float = 10.0,
        rss_reader: Callable[[], int] = process_rss_bytes,
        clock: Callable[[], float] = time.monotonic,
        time_left: Callable[[float], str] = seconds_left_text,
    ):
        self.label = label
        self.total_rows = total_rows
        self.log = log
        self.budget_bytes = budget_bytes
        self.every_seconds = every_seconds
        self.rss_reader = rss_reader
        self.clock = clock
        self.time_left = time_left
        self.rows = 0
        self.started = self.last_logged = clock()

    def advance(self, rows: int) -> None:
        self.rows += rows
        now = self.clock()
        if now - self.last_logged >= self.every_seconds:
            self.last_logged = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else self.clock()) - self.started, 1e-9)
        rate = self.rows / elapsed
        parts = [f"{self.label}: {self.rows:,}"]
        if self.total_rows:
            parts[0] += f"/{self.total_rows:,} rows ({self.rows / self.total_rows:.0%})"
        else:
            parts[0] += " rows"
        parts.append(f"{rate:,.0f} rows/s")
        if self.total_rows and rate > 0:
            parts.append(self.time_left(max(self.total_rows - self.rows, 0) / rate))
        rss = self.rss_reader() / GiB
        parts.append(f"RSS {rss:.2f}/{self.budget_bytes / GiB:.2f} GiB" if self.budget_bytes else f"RSS {rss:.2f} GiB")
        return ", ".join(parts)
