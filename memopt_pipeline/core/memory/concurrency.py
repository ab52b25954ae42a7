"""How many instance trainings may run at once, and how much memory each one's container needs.

Both follow from the memory plan: every instance's training has a predicted peak
(:meth:`MemoryPlan.lightgbm_layout` of its rows: the layout instance_model picks; binned rows
on disk for the external-memory strategy). On one machine, trainings running side by side must fit the budget together, so
at most ``floor(budget / largest predicted peak)`` of them run at once (at least one: a
single training is what the plan was sized for). On a cluster each training gets its own
container, sized from its own predicted peak plus a margin.

The peaks are per step process and include that process's baseline (imports, allocator),
which the plan measured; processes that only orchestrate (a parent that launches the runs)
are not in them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from memopt_pipeline.core.memory.planner import MemoryPlan
from memopt_pipeline.core.units import MiB

# The MemoryGuard's hard cap (RLIMIT_DATA) sits at its budget plus max(10%, 256 MiB); a
# container limit must sit above that, so that an overrun ends as a retryable MemoryError
# inside the step rather than as a kernel OOM kill of the container.
CONTAINER_LIMIT_MIN_HEADROOM_BYTES = 512 * MiB


def predicted_instance_peak(plan: MemoryPlan, rows: int) -> int:
    """Predicted peak RSS of training one instance of ``rows`` rows under ``plan``."""
    if rows < 0:
        raise ValueError(f"an instance cannot have {rows} rows")
    if plan.strategy == "external_memory":
        # The binned rows live on disk: RAM holds per-row state, histograms, one batch and one page.
        return plan.external_memory_training_peak(rows)
    # What instance_model will hold: the layout it picks by headroom (at least the least-memory one).
    return plan.lightgbm_layout(rows).predicted_peak


@dataclass(frozen=True)
class InstanceConcurrency:
    """How many instance trainings fit the budget side by side."""

    budget_bytes: int
    peaks: dict[str, int]  # instance (partition key) -> predicted training peak in bytes
    limit: int  # trainings that may run at once

    @property
    def max_peak(self) -> int:
        return max(self.peaks.values())

    @property
    def worst_case_bytes(self) -> int:
        """The most that ``limit`` trainings running together are predicted to hold."""
        return sum(sorted(self.peaks.values(), reverse=True)[: self.limit])

    def describe(self) -> str:
        # The limit may exceed the number of instances (a small plan on a big budget): say
        # how many will actually run together, and what the budget would allow.
        together = min(self.limit, len(self.peaks))
        return (
            f"{together} of {len(self.peaks)} instance trainings may run at once (the budget allows {self.limit}): "
            f"budget {self.budget_bytes / 2**30:.2f} GiB / largest predicted peak {self.max_peak / 2**30:.2f} GiB"
        )


def instance_concurrency(plan: MemoryPlan, instance_rows: Mapping[str, int]) -> InstanceConcurrency:
    """``floor(budget / largest predicted instance peak)``, at least 1, for the given instances.

    The largest peak bounds every instance's, so any ``limit`` of them running together stay
    within the budget. A single instance predicted above the budget still gets a limit of 1
    (running it alone is the plan's own premise; its MemoryGuard stops it if it overruns).
    """
    if not instance_rows:
        raise ValueError("no instances: materialize instance_assignment first")
    peaks = {key: predicted_instance_peak(plan, rows) for key, rows in instance_rows.items()}
    limit = max(1, plan.budget_bytes // max(peaks.values()))
    return InstanceConcurrency(budget_bytes=plan.budget_bytes, peaks=peaks, limit=int(limit))


@dataclass(frozen=True)
class ContainerMemory:
    """Memory of one step's container, in bytes."""

    request: int  # what the scheduler reserves: the predicted peak plus the margin
    limit: int  # the kernel's hard ceiling, above the step's own guard and hard cap
    guard_budget: int  # the MemoryGuard budget the step must run with (= request)


def container_memory(peak_bytes: int, margin: float) -> ContainerMemory:
    """Request ``peak * (1 + margin)``; limit ``request * (1 + margin)``, at least request + 512 MiB.

    The step's MemoryGuard budget is the request: the guard stops the step cleanly at 90% of
    it (a retryable failure, one memory-ladder level lower), i.e. only when the step overruns
    its prediction by more than ``0.9 * (1 + margin) - 1``. Its hard cap sits a little above
    the budget, so the limit leaves room above the request for the cap to fire first.
    """
    if peak_bytes <= 0:
        raise ValueError(f"a predicted peak must be positive, got {peak_bytes} bytes")
    if not 0.0 <= margin <= 4.0:
        raise ValueError(f"the memory margin is a share of the predicted peak in [0, 4], got {margin}")
    request = math.ceil(peak_bytes * (1.0 + margin))
    limit = max(math.ceil(request * (1.0 + margin)), request + CONTAINER_LIMIT_MIN_HEADROOM_BYTES)
    return ContainerMemory(request=request, limit=limit, guard_budget=request)
