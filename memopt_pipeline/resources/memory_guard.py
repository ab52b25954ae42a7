"""MemoryGuard: the Dagster resource every heavy asset runs under.

It resolves the budget, opens a :class:`~memopt_pipeline.core.StageMonitor` around
the stage (background RSS sampler + cooperative check points that raise
MemoryBudgetExceeded), cleans up afterwards (gc, malloc_trim, Arrow pool, GPU caches) and
turns the measurements into numeric materialization metadata the UI can plot.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from pydantic import Field

from memopt_pipeline.core.memory.failures import exception_is_out_of_memory
from memopt_pipeline.core.memory.gpu import gpu_status

# plots imports matplotlib (~40 MB RSS): imported with the module, not lazily in metadata(),
# so that it is part of the process baseline memory_plan measures rather than appearing mid-run.
from memopt_pipeline.core.memory.hard_cap import hard_memory_cap
from memopt_pipeline.core.memory.leaks import LeakTracker
from memopt_pipeline.core.memory.limits import DEFAULT_BUDGET_FRACTION, resolve_budget_bytes
from memopt_pipeline.core.memory.measure import process_rss_bytes
from memopt_pipeline.core.memory.monitor import (
    DEFAULT_ABORT_FRACTION,
    DEFAULT_CLEANUP_FRACTION,
    StageMonitor,
    Thresholds,
)
from memopt_pipeline.core.memory.release import release_memory
from memopt_pipeline.core.report import plots
from memopt_pipeline.core.units import GiB
from memopt_pipeline.resources.pool_slots import pool_slot

# The entries MemoryGuard.metadata produces, in the order the UI shows them (after the stage's own
# metrics; assets/display.py orders every materialization's metadata by this).
MEMORY_METADATA_KEYS = (
    "peak_rss_gb",
    "budget_gb",
    "headroom_gb",
    "predicted_peak_gb",
    "plan_error_gb",
    "start_rss_gb",
    "stage_seconds",
    "cleanups",
    "peak_source",
    "gpu",
    "memory_timeline",
)

# One per process: stages of every run executed in this process (in-process runs, the CLI,
# repeated materializations in a code server) are compared with the first.
_LEAKS: LeakTracker | None = None


HEARTBEAT_FOLDER = "heartbeats"


def heartbeat_path(instance: dg.DagsterInstance, run_id: str, step_key: str) -> Path:
    """Where a step's memory guard leaves its last RSS sample (read after a SIGKILL, see
    core/memory/failures.classify_kill): beside the instance's own files."""
    return Path(instance.root_directory) / HEARTBEAT_FOLDER / f"{run_id}.{step_key}.json"


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """A SIGTERM (what SLURM and Kubernetes send before killing) stops the stage the way Ctrl-C
    does: as an interrupt, not an out-of-memory failure, so no ladder level is spent on it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class MemoryGuard(dg.ConfigurableResource):
    """Enforces a memory budget on each stage and records peak RSS against it."""

    budget_gb: float | None = Field(
        default=None,
        description="Memory budget in GiB for one step process. Empty: budget_fraction of the machine's "
        "(or container's) memory.",
    )
    budget_fraction: float = Field(
        default=DEFAULT_BUDGET_FRACTION, description="Share of available memory used as the budget when budget_gb is empty."
    )
    cleanup_fraction: float = Field(
        default=DEFAULT_CLEANUP_FRACTION, description="Above this share of the budget, free caches (gc, malloc_trim, Arrow pool)."
    )
    abort_fraction: float = Field(
        default=DEFAULT_ABORT_FRACTION,
        description="Above this share of the budget, the stage stops at its next check point with "
        "MemoryBudgetExceeded (retryable) instead of being killed by the OS.",
    )
    sample_interval_s: float = Field(default=0.1, description="Seconds between background RSS samples.")
    leak_warning_fraction: float = Field(
        default=0.2,
        description="Warn when RSS after cleanup has grown by more than this share of the budget since the "
        "first stage of this process (a leak across instances or repeated materializations).",
    )
    hard_cap: bool = Field(
        default=True,
        description="Also cap the process's data segment (RLIMIT_DATA) a little above the budget during the "
        "stage, so a runaway native allocation raises MemoryError instead of the OS killing the step.",
    )

    def budget_bytes(self) -> int:
        return resolve_budget_bytes(self.budget_gb, self.budget_fraction)

    @contextlib.contextmanager
    def stage(self, context: dg.AssetExecutionContext, name: str, advice: str = "") -> Iterator[StageMonitor]:
        """Monitor one stage; cleanup runs when it ends, whether it succeeded or failed."""
        budget = self.budget_bytes()
        if context.has_partition_key:
            name = f"{name} [{context.partition_key}]"
        monitor = StageMonitor(
            name,
            budget,
            Thresholds(cleanup=self.cleanup_fraction, abort=self.abort_fraction),
            interval_s=self.sample_interval_s,
            on_cleanup=lambda freed: context.log.info(
                f"{name}: RSS passed {self.cleanup_fraction:.0%} of the budget; cleanup freed "
                f"{freed.get('freed_bytes', 0) / GiB:.3f} GiB"
            ),
            advice=advice,
            heartbeat_path=heartbeat_path(context.instance, context.run.run_id, context.get_step_execution_context().step.key),
        )
        rss_now = process_rss_bytes()
        context.log.info(f"{name}: budget {budget / GiB:.2f} GiB, RSS now {rss_now / GiB:.2f} GiB")
        if rss_now >= monitor.abort_bytes:
            # Nothing can run: the process (imports, libraries) already uses the budget.
            raise dg.Failure(
                description=f"{name}: the process already uses {rss_now / GiB:.2f} GiB before any work, above the "
                f"abort threshold ({monitor.abort_bytes / GiB:.2f} GiB of a {budget / GiB:.2f} GiB budget). "
                f"Set the memory budget to at least {2 * rss_now / GiB:.1f} GiB.",
                allow_retries=False,
            )
        try:
            try:
                with contextlib.ExitStack() as stack:
                    stack.enter_context(stop_on_sigterm())
                    if context.op_def.pool:
                        # Dagster's pool claim can over-admit on SQLite storage (resources/pool_slots.py).
                        stack.enter_context(pool_slot(context.instance, context.op_def.pool, context.log.info))
                    if self.hard_cap:
                        cap = stack.enter_context(hard_memory_cap(budget))
                        if cap is not None:
                            context.log.debug(f"{name}: data segment capped at {cap / GiB:.2f} GiB")
                    stack.enter_context(monitor)
                    yield monitor
            except Exception as error:
                if exception_is_out_of_memory(error):
                    # Retryable: the asset's RetryPolicy re-runs the step one ladder level lower.
                    context.log.error(f"{name}: out of memory ({type(error).__name__}: {error})")
                    raise
                # Anything else would fail the same way again: no retry at a lower memory level.
                raise dg.Failure(description=f"{type(error).__name__}: {error}", allow_retries=False) from error
            finally:
                released = release_memory()
                warning = self._leak_tracker(budget).record(name, released["rss_after"])
                if warning:
                    context.log.warning(warning)
        except (KeyboardInterrupt, DagsterExecutionInterruptedError) as stop:
            # Dagster's RetryPolicy also retries interrupts, and a retry is one ladder level lower: a stop
            # signal is not a lack of memory, so it ends the step without a retry.
            raise dg.Failure(
                description=f"{name}: stopped by signal ({type(stop).__name__}), not out of memory; run again to resume",
                allow_retries=False,
            ) from None

    def _leak_tracker(self, budget: int) -> LeakTracker:
        global _LEAKS
        if _LEAKS is None:
            _LEAKS = LeakTracker(int(self.leak_warning_fraction * budget))
        return _LEAKS

    @staticmethod
    def metadata(
        monitor: StageMonitor,
        predicted_peak_bytes: int | None = None,
        timeline_path: str | Path | None = None,
    ) -> dict:
        """Numeric metadata (plottable in the UI) of a finished stage, and ``memory_timeline``: a
        markdown image of RSS over the stage against the budget and the guard's thresholds (also
        written to ``timeline_path`` as PNG when given, e.g. next to the stage's artifacts)."""
        summary = monitor.summary()
        values: dict = {
            "peak_rss_gb": float(summary["peak_rss_gb"]),
            "budget_gb": float(summary["budget_gb"]),
            "headroom_gb": float(summary["headroom_gb"]),
            "start_rss_gb": float(summary["start_rss_gb"]),
            "stage_seconds": float(summary["duration_s"]),
            "cleanups": int(summary["cleanups"]),
            "peak_source": str(summary["peak_source"]),
        }
        if predicted_peak_bytes is not None:
            predicted = predicted_peak_bytes / GiB
            values["predicted_peak_gb"] = float(predicted)
            values["plan_error_gb"] = float(summary["peak_rss_gb"] - predicted)
        title = f"{monitor.stage}: RSS against the budget"
        png = plots.memory_timeline_png(
            monitor.timeline,
            budget_bytes=monitor.budget_bytes,
            cleanup_bytes=monitor.cleanup_bytes,
            abort_bytes=monitor.abort_bytes,
            peak_bytes=monitor.peak_rss_bytes,
            predicted_peak_bytes=predicted_peak_bytes,
            title=title,
        )
        snippet = plots.save_markdown_image(png, timeline_path, title) if timeline_path else plots.markdown_image(png, title)
        values["memory_timeline"] = dg.MetadataValue.md(snippet)
        gpu = gpu_status()
        if gpu.available:
            # Without a GPU the entry would repeat the same "no GPU: ..." on every stage; memory_plan
            # says it once per run instead.
            values["gpu"] = gpu.summary()
        return values
