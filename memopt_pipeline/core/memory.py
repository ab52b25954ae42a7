"""Process memory budget: measure RSS, free caches, and stop a stage before the OS kills it.

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

import contextlib
import ctypes
import functools
import gc
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import psutil

from memopt_pipeline.core import gpu

if TYPE_CHECKING:
    import xgboost

GiB = 1024**3

DEFAULT_ADVICE = "raise the memory budget, lower batch_rows / max_bin, or split the data over more instances"
TIMELINE_MAX_POINTS = 2000
# cgroup v1 reports "no limit" as a huge page-aligned number (e.g. 9223372036854771712).
_CGROUP_V1_UNLIMITED = 2**60
_VMHWM_PATTERN = re.compile(rb"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


class MemoryBudgetExceeded(RuntimeError):
    """Raised at a cooperative check point when process RSS passes the abort threshold. Retryable.

    ``current_rss_bytes`` is set when the background sampler saw the over-threshold RSS
    between check points and RSS has since dropped; ``rss_bytes`` is then that sampled peak.
    """

    def __init__(
        self,
        stage: str,
        rss_bytes: int,
        budget_bytes: int,
        abort_bytes: int,
        advice: str = "",
        current_rss_bytes: int | None = None,
    ):
        self.stage = stage
        self.rss_bytes = rss_bytes
        self.budget_bytes = budget_bytes
        self.abort_bytes = abort_bytes
        self.advice = advice
        self.current_rss_bytes = current_rss_bytes
        if current_rss_bytes is None:
            observed = f"process RSS reached {rss_bytes / GiB:.2f} GiB"
        else:
            observed = (
                f"process RSS peaked at {rss_bytes / GiB:.2f} GiB between check points "
                f"({current_rss_bytes / GiB:.2f} GiB now)"
            )
        super().__init__(
            f"Stage '{stage}' exceeded its memory budget: {observed}, above the abort threshold of "
            f"{abort_bytes / GiB:.2f} GiB ({abort_bytes / budget_bytes:.0%} of the {budget_bytes / GiB:.2f} GiB "
            f"budget). The stage was stopped at a check point before the OS could kill the process, "
            f"so it can be retried. To fix: {advice or DEFAULT_ADVICE}."
        )

    def __reduce__(self):
        # The constructor takes the fields, not the message: pickle (e.g. across a process
        # pool) must rebuild from the fields.
        fields = (self.stage, self.rss_bytes, self.budget_bytes, self.abort_bytes, self.advice, self.current_rss_bytes)
        return (type(self), fields)


# --- measurements ---------------------------------------------------------------------------

_process: psutil.Process | None = None


def process_rss_bytes() -> int:
    """Current resident set size of this process."""
    global _process
    # Reuse the Process object (creating one costs more than the read itself); a forked
    # child has a new pid and must not report its parent.
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return _process.memory_info().rss


def physical_memory_bytes() -> int:
    return psutil.virtual_memory().total


def _read_limit(path: Path) -> int | None:
    """A cgroup limit file's value in bytes; None for "max", unlimited, missing or unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # cgroup v2 writes "max" for no limit
        return None
    value = int(text)
    return value if value < _CGROUP_V1_UNLIMITED else None


def _limits_along(hierarchy_root: Path, cgroup_path: str, filename: str) -> list[int]:
    """Limits found in ``filename`` from ``hierarchy_root/cgroup_path`` up to ``hierarchy_root``.

    A parent's limit caps its children, so every level counts. Inside a container with a
    cgroup namespace the path is "/" and only the root level exists, which is fine.
    """
    directory = hierarchy_root / cgroup_path.strip("/")
    limits = []
    while True:
        limit = _read_limit(directory / filename)
        if limit is not None:
            limits.append(limit)
        if directory == hierarchy_root or hierarchy_root not in directory.parents:
            return limits
        directory = directory.parent


def cgroup_memory_limit_bytes(
    proc_self_cgroup: str | os.PathLike = "/proc/self/cgroup",
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
) -> int | None:
    """Smallest cgroup memory limit that applies to this process, or None if there is none.

    cgroup v2: the ``0::<path>`` line, then ``memory.max`` at every level from
    ``<root>/<path>`` up to ``<root>``. cgroup v1 (also hybrid hosts, which list a ``0::``
    line but mount the memory controller under v1): the ``memory`` controller's path under
    ``<root>/memory``, ``memory.limit_in_bytes`` the same way. Both are read and the smallest
    limit wins; on a given host only one of them has limit files.
    """
    try:
        lines = Path(proc_self_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    v2_path: str | None = None
    v1_path = "/"  # without a memory line, a namespaced container's root is still worth reading
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path

    root = Path(cgroup_root)
    limits = _limits_along(root / "memory", v1_path, "memory.limit_in_bytes")
    if v2_path is not None:
        limits += _limits_along(root, v2_path, "memory.max")
    return min(limits) if limits else None


def available_memory_bytes() -> int:
    """Memory this process may use at most: physical RAM, capped by a cgroup limit (not free memory)."""
    physical = physical_memory_bytes()
    limit = cgroup_memory_limit_bytes()
    return physical if limit is None else min(physical, limit)


def resolve_budget_bytes(budget_gb: float | None, fraction: float = 0.6) -> int:
    """The memory budget in bytes: ``budget_gb`` GiB if given, else ``fraction`` of available memory."""
    # Comparisons are written as `not (valid)` so that NaN is rejected too.
    if not (0 < fraction <= 1):
        raise ValueError(f"budget fraction must be in (0, 1], got {fraction!r}")
    if budget_gb is None:
        return int(fraction * available_memory_bytes())
    if not (budget_gb > 0) or math.isinf(budget_gb):
        raise ValueError(
            f"memory budget must be a positive number of GiB, got {budget_gb!r}; "
            f"leave it empty to use {fraction:.0%} of available memory"
        )
    return int(budget_gb * GiB)


def kernel_peak_rss_bytes() -> int | None:
    """The kernel's peak RSS of this process (VmHWM), or None where /proc is unavailable."""
    try:
        with open("/proc/self/status", "rb") as status:
            match = _VMHWM_PATTERN.search(status.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_kernel_peak() -> bool:
    """Reset VmHWM to the current RSS ("5" > /proc/self/clear_refs); False where not permitted."""
    # "5" only resets the peak counter; it does not touch page flags like the other values.
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # no /proc, no permission, or a kernel older than 4.0
        return False
    return True


# --- cleanup ---------------------------------------------------------------------------------


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


# --- stage monitoring ------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """Fractions of the budget: above ``cleanup`` free caches, above ``abort`` stop the stage.

    ``cleanup_interval_s`` rate-limits cleanups, since gc.collect over a large heap is not free
    and a stage that legitimately sits above the cleanup line would otherwise collect at every
    check point. ``abort`` may exceed 1 to let tests (or a deliberate overshoot) pass the budget.
    """

    cleanup: float = 0.7
    abort: float = 0.9
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
        while not self._stop.wait(self._interval_s):
            rss = self._observe()
            if rss > self.abort_bytes:
                with self._lock:
                    self._unchecked_spike_rss = max(self._unchecked_spike_rss, rss)

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
        # Call through the module global so tests can monkeypatch release_memory.
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


# --- boosting callbacks ----------------------------------------------------------------------


def lightgbm_callback(monitor: StageMonitor) -> Callable[[Any], None]:
    """LightGBM callback running ``monitor.check()`` after every boosting round.

    MemoryBudgetExceeded propagates out of ``lightgbm.train`` (only EarlyStopException is
    caught there).
    """

    def check_memory(env: Any) -> None:
        monitor.check()

    # LightGBM sorts callbacks by `order`; its built-ins use 10 (logging), 20 (recording)
    # and 30 (early stopping). 0 puts the check first, so no work is done for a round that
    # has already blown the budget.
    check_memory.order = 0
    check_memory.before_iteration = False
    return check_memory


def xgboost_callback(monitor: StageMonitor) -> xgboost.callback.TrainingCallback:
    """XGBoost callback running ``monitor.check()`` after every boosting round."""
    import xgboost  # lazy: LightGBM-only runs should not pay for importing xgboost

    class MemoryCheckCallback(xgboost.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            monitor.check()
            return False  # False = keep training; stopping is done by raising

    return MemoryCheckCallback()


# -- hard cap ------------------------------------------------------------------------------


def virtual_data_bytes() -> int | None:
    """VmData (private writable mappings: heap, anonymous mmaps) from /proc/self/status."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def hard_memory_cap(budget_bytes: int, margin: float = 0.1, min_margin_bytes: int = 256 * 1024**2) -> Iterator[int | None]:
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


# -- leak detection ------------------------------------------------------------------------


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
