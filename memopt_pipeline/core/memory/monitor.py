"""The stage monitor: sample RSS beside the work, clean up, and stop a stage before the OS kills it.

The design follows dask/distributed's ``worker_memory.py``: thresholds are fractions of a
byte budget, RSS is read through an injectable function so tests are deterministic, and a
background sampler runs beside the work. Unlike a dask worker this process cannot spill or
pause, so the two thresholds are:

* ``cleanup`` - free what can be freed without losing work (gc, ``malloc_trim``, Arrow pool,
  GPU caches);
* ``abort``   - raise :class:`MemoryBudgetExceeded` at the next cooperative check point. An
  exception at a point of our choosing leaves a retryable, explainable failure, whereas an
  OOM kill loses the process, its logs and the reason.

Check points are explicit (:meth:`StageMonitor.check`, called per batch and per boosting
round) because only the thread doing the work can stop it cleanly; the sampler thread only
observes. No Dagster import here: a Dagster resource wraps this module.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# release_memory, reset_kernel_peak and kernel_peak_rss_bytes are called through this
# module's globals so that tests can replace them here.
from memopt_pipeline.core.memory.errors import MemoryBudgetExceeded
from memopt_pipeline.core.memory.measure import kernel_peak_rss_bytes, process_rss_bytes, reset_kernel_peak
from memopt_pipeline.core.memory.release import release_memory
from memopt_pipeline.core.units import GiB

TIMELINE_MAX_POINTS = 2000
HEARTBEAT_INTERVAL_S = 1.0
# Fractions of the budget: the defaults of Thresholds and of the MemoryGuard resource.
DEFAULT_CLEANUP_FRACTION = 0.7
DEFAULT_ABORT_FRACTION = 0.9


@dataclass(frozen=True)
class Thresholds:
    """Fractions of the budget: above ``cleanup`` free caches, above ``abort`` stop the stage.

    ``cleanup_interval_s`` rate-limits cleanups, since gc.collect over a large heap is not free
    and a stage that legitimately sits above the cleanup line would otherwise collect at every
    check point. ``abort`` may exceed 1 to let tests (or a deliberate overshoot) pass the budget.
    """

    cleanup: float = DEFAULT_CLEANUP_FRACTION
    abort: float = DEFAULT_ABORT_FRACTION
    cleanup_interval_s: float = 1.0

    def __post_init__(self):
        if not (0 < self.cleanup < self.abort <= 1.5):
            raise ValueError(
                f"memory thresholds need 0 < cleanup < abort <= 1.5 (fractions of the budget), "
                f"got cleanup={self.cleanup!r}, abort={self.abort!r}"
            )
        if not (self.cleanup_interval_s >= 0):
            raise ValueError(f"cleanup_interval_s must be >= 0, got {self.cleanup_interval_s!r}")


class StageMonitor:
    """Watches one pipeline stage: a background sampler thread (interval_s, default 0.1) records
    RSS (bounded timeline, at most TIMELINE_MAX_POINTS (t, rss) points by decimation), tracks the
    peak, and check() is the cooperative check point called from batch loops and boosting callbacks.

    Use as a context manager; a monitor is single-use. ``use_kernel_peak`` makes the peak
    include the kernel's VmHWM, which catches spikes shorter than the sampling interval; it
    is only meaningful with the default ``rss_reader`` (VmHWM is this process's peak) and is
    used only if the peak could be reset on entry, since otherwise VmHWM would include memory
    used before the stage. Monitors of nested or concurrent stages share the one VmHWM counter,
    so an inner stage's reset lowers the outer stage's kernel reading (the sampler peak still
    holds).

    Spike policy: if the sampler saw RSS above the abort threshold since the last check,
    check() raises only if RSS (after any cleanup) is still above the *cleanup* threshold. A
    spike that has fully receded was transient and survived, and aborting would throw the
    work away; it still shows in the peak and the summary (negative headroom). A spike
    followed by RSS that stays high means the next such transient starts from a high base,
    so the stage stops while the failure is still clean and retryable.
    """

    def __init__(
        self,
        stage: str,
        budget_bytes: int,
        thresholds: Thresholds = Thresholds(),
        *,
        interval_s: float = 0.1,
        rss_reader: Callable[[], int] = process_rss_bytes,
        use_kernel_peak: bool = True,
        sampler: bool = True,
        on_cleanup: Callable[[dict], None] | None = None,
        advice: str = "",
        heartbeat_path: str | Path | None = None,
    ):
        if not (budget_bytes > 0):
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
        if not (interval_s > 0):
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self.stage = stage
        self.budget_bytes = int(budget_bytes)
        self.thresholds = thresholds
        self.cleanup_bytes = int(thresholds.cleanup * budget_bytes)
        self.abort_bytes = int(thresholds.abort * budget_bytes)
        self.advice = advice
        self._interval_s = interval_s
        self._rss_reader = rss_reader
        self._use_kernel_peak = use_kernel_peak
        self._sampler_enabled = sampler
        self._on_cleanup = on_cleanup
        # The last RSS sample, rewritten about once a second: if the process is SIGKILLed, the
        # file is the evidence that says whether memory was the reason (failures.classify_kill).
        self._heartbeat_path = Path(heartbeat_path) if heartbeat_path else None
        self._last_heartbeat = -math.inf

        # Written by both the sampler thread and check(): guarded by _lock.
        self._lock = threading.Lock()
        self._peak_sampled = 0
        self._last_rss = 0
        self._unchecked_spike_rss = 0  # highest sampler reading above abort since the last check()
        self._timeline: list[tuple[float, int]] = []
        self._timeline_stride = 1
        self._observations = 0

        self._start_time: float | None = None
        self._end_time: float | None = None
        self._start_rss = 0
        self._kernel_peak_active = False
        self._kernel_peak_at_exit: int | None = None
        self._last_cleanup_time = -math.inf
        self._cleanups = 0
        self._freed_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def __enter__(self) -> StageMonitor:
        if self._start_time is not None:
            raise RuntimeError(f"StageMonitor for stage '{self.stage}' was already started; use a new one")
        self._kernel_peak_active = self._use_kernel_peak and reset_kernel_peak()
        self._start_time = time.monotonic()
        self._start_rss = self._observe()
        if self._sampler_enabled:
            self._thread = threading.Thread(
                target=self._sample_until_stopped, name=f"rss-sampler[{self.stage}]", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._observe()
        if self._kernel_peak_active:
            # VmHWM keeps growing with whatever runs after the stage: freeze it now.
            self._kernel_peak_at_exit = kernel_peak_rss_bytes()
        self._end_time = time.monotonic()
        # Returning None lets any exception from the stage propagate.

    def _sample_until_stopped(self) -> None:
        self._write_heartbeat(self._last_rss)
        while not self._stop.wait(self._interval_s):
            rss = self._observe()
            if rss > self.abort_bytes:
                with self._lock:
                    self._unchecked_spike_rss = max(self._unchecked_spike_rss, rss)
            self._write_heartbeat(rss)

    def _write_heartbeat(self, rss: int) -> None:
        now = time.monotonic()
        if self._heartbeat_path is None or now - self._last_heartbeat < HEARTBEAT_INTERVAL_S:
            return
        self._last_heartbeat = now
        beat = {
            "pid": os.getpid(),
            "stage": self.stage,
            "rss_bytes": rss,
            "peak_rss_bytes": self._peak_sampled,
            "budget_bytes": self.budget_bytes,
            "cleanup_bytes": self.cleanup_bytes,
            "abort_bytes": self.abort_bytes,
            "time": time.time(),
        }
        try:
            self._heartbeat_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._heartbeat_path.with_name(self._heartbeat_path.name + ".tmp")
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, self._heartbeat_path)
        except OSError:  # evidence is best effort: never fail a stage over it
            pass

    def _observe(self) -> int:
        """Read RSS once and record it in the peak and the timeline."""
        rss = self._rss_reader()
        now = time.monotonic()
        with self._lock:
            self._last_rss = rss
            self._peak_sampled = max(self._peak_sampled, rss)
            # Bounded timeline: when full, drop every other point and record half as often,
            # so a long stage keeps an evenly spaced, fixed-size history. The peak is tracked
            # separately and never lost to decimation.
            if self._observations % self._timeline_stride == 0:
                self._timeline.append((now - self._start_time, rss))
                if len(self._timeline) >= TIMELINE_MAX_POINTS:
                    self._timeline = self._timeline[::2]
                    self._timeline_stride *= 2
            self._observations += 1
        return rss

    # -- check point

    def check(self) -> None:
        """Cooperative check point: clean up above the cleanup threshold, raise above abort.

        Raises MemoryBudgetExceeded when RSS is above the abort threshold after cleanup, or
        when the sampler saw RSS above it since the last check and RSS is still above the
        cleanup threshold (see the class docstring). Costs one RSS read when below cleanup.
        """
        if self._start_time is None or self._end_time is not None:
            raise RuntimeError(f"check() outside the 'with StageMonitor(...)' block of stage '{self.stage}'")
        rss = self._observe()
        with self._lock:
            spike_rss, self._unchecked_spike_rss = self._unchecked_spike_rss, 0

        if rss > self.cleanup_bytes and time.monotonic() - self._last_cleanup_time >= self.thresholds.cleanup_interval_s:
            rss = self._cleanup(rss)

        if rss > self.abort_bytes:
            raise MemoryBudgetExceeded(self.stage, rss, self.budget_bytes, self.abort_bytes, self.advice)
        if spike_rss and rss > self.cleanup_bytes:
            raise MemoryBudgetExceeded(
                self.stage, spike_rss, self.budget_bytes, self.abort_bytes, self.advice, current_rss_bytes=rss
            )

    def _cleanup(self, rss_before: int) -> int:
        result = release_memory()
        self._last_cleanup_time = time.monotonic()
        rss_after = self._observe()
        self._cleanups += 1
        # Freed memory as seen by this monitor's reader, so it agrees with the thresholds.
        self._freed_bytes += max(0, rss_before - rss_after)
        if self._on_cleanup is not None:
            self._on_cleanup(result)
        return rss_after

    # -- results

    def _peak_and_source(self) -> tuple[int, str]:
        with self._lock:
            sampled = self._peak_sampled
        if self._end_time is not None:
            kernel = self._kernel_peak_at_exit
        else:
            kernel = kernel_peak_rss_bytes() if self._kernel_peak_active else None
        if kernel is not None and kernel >= sampled:
            return kernel, "kernel_hwm"
        return sampled, "sampler"

    @property
    def peak_rss_bytes(self) -> int:
        return self._peak_and_source()[0]

    @property
    def start_rss_bytes(self) -> int:
        return self._start_rss

    @property
    def timeline(self) -> list[tuple[float, int]]:
        """(seconds since start, RSS bytes) of samples and check points; a copy."""
        with self._lock:
            return list(self._timeline)

    @property
    def cleanups(self) -> int:
        return self._cleanups

    @property
    def freed_bytes(self) -> int:
        return self._freed_bytes

    def summary(self) -> dict[str, Any]:
        """JSON-able stage report in GiB and seconds; while the stage runs, "end" means now."""
        if self._start_time is None:
            raise RuntimeError(f"summary() of stage '{self.stage}' before it started")
        peak, source = self._peak_and_source()
        end_time = self._end_time if self._end_time is not None else time.monotonic()
        with self._lock:
            last_rss = self._last_rss
        return {
            "stage": self.stage,
            "budget_gb": self.budget_bytes / GiB,
            "peak_rss_gb": peak / GiB,
            "headroom_gb": (self.budget_bytes - peak) / GiB,
            "start_rss_gb": self._start_rss / GiB,
            "end_rss_gb": last_rss / GiB,
            "duration_s": end_time - self._start_time,
            "cleanups": self._cleanups,
            "cleanup_freed_gb": self._freed_bytes / GiB,
            "peak_source": source,
            "abort_threshold_gb": self.abort_bytes / GiB,
        }
