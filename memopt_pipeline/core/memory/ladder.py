"""The downshift ladder: what a retry after an out-of-memory failure changes, level by level.

Each level keeps everything the previous one did and lowers memory further:

| level | batches        | max_bin | histogram pool | bin sample | data structure                 |
|-------|----------------|---------|----------------|------------|--------------------------------|
| 0     | plan           | plan    | unbounded      | plan       | LightGBM in-memory bins        |
| 1     | 1/4 of plan    | plan    | unbounded      | 1/2        | LightGBM in-memory bins        |
| 2     | 1/8 of plan    | <= 63   | 64 MiB         | 1/4        | LightGBM in-memory bins        |
| 3     | plan           | <= 63   | 64 MiB         | 1/4        | XGBoost external memory (disk) |

Why this order: smaller batches cost only speed (except at level 3: every external-memory
batch becomes one page on disk that each boosting round walks, so small batches make each
round slow - measured 27 s per round with 2.8k-row pages on 1.1M rows - while the binned
pages themselves stay on disk; level 3 goes back to the plan's batch size); fewer bins and a capped histogram pool cost
a little accuracy; external memory costs the most speed but holds almost nothing in RAM.
The level is deterministic: max(step retry number, the run's ``memopt/ladder_level`` tag,
which the out-of-memory sensor sets when it re-runs failed partitions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LADDER_TAG = "memopt/ladder_level"
MIN_BATCH_ROWS = 256


@dataclass(frozen=True)
class LadderStep:
    level: int
    batch_rows_divisor: int
    max_bin_cap: int | None
    histogram_pool_mb: float | None
    bin_sample_divisor: int
    external_memory: bool
    description: str


LADDER = (
    LadderStep(0, 1, None, None, 1, False, "the plan as made"),
    LadderStep(1, 4, None, None, 2, False, "batches 4x smaller, bin sample halved"),
    LadderStep(2, 8, 63, 64.0, 4, False, "batches 8x smaller, max_bin <= 63, histogram pool 64 MiB, bin sample 1/4"),
    LadderStep(3, 1, 63, 64.0, 4, True, "XGBoost external memory (ExtMemQuantileDMatrix on disk), plan-sized pages, max_bin <= 63"),
)
MAX_LEVEL = LADDER[-1].level


def ladder_step(level: int) -> LadderStep:
    """The step for ``level``; levels past the end stay at the last step."""
    return LADDER[min(max(level, 0), MAX_LEVEL)]


@dataclass(frozen=True)
class TrainingSettings:
    """Memory-shaping settings of one training attempt, after the ladder is applied."""

    level: int
    batch_rows: int
    max_bin: int
    bin_sample_rows: int
    histogram_pool_mb: float | None
    external_memory: bool
    description: str

    def to_dict(self) -> dict:
        return asdict(self)


def settings_for(level: int, *, batch_rows: int, max_bin: int, bin_sample_rows: int) -> TrainingSettings:
    step = ladder_step(level)
    return TrainingSettings(
        level=step.level,
        batch_rows=max(MIN_BATCH_ROWS, batch_rows // step.batch_rows_divisor),
        max_bin=min(max_bin, step.max_bin_cap) if step.max_bin_cap else max_bin,
        bin_sample_rows=max(1_000, bin_sample_rows // step.bin_sample_divisor),
        histogram_pool_mb=step.histogram_pool_mb,
        external_memory=step.external_memory,
        description=step.description,
    )


def ladder_level(retry_number: int, run_tags: dict[str, str]) -> int:
    try:
        tagged = int(run_tags.get(LADDER_TAG, 0))
    except ValueError:
        tagged = 0
    return min(max(retry_number, tagged, 0), MAX_LEVEL)


def next_level_after_failure(tagged_level: int, failed_attempts: int) -> int | None:
    """Ladder level for re-running a step that failed out-of-memory after ``failed_attempts``
    attempts (its step retries included, each one level lower) in a run tagged ``tagged_level``.
    None when those attempts already reached the last level: then only a bigger budget (or
    more instances) can help, and re-running would fail the same way."""
    reached = min(tagged_level + max(failed_attempts, 1) - 1, MAX_LEVEL)
    if reached >= MAX_LEVEL:
        return None
    return reached + 1
