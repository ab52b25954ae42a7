"""The downshift ladders: what a retry after an out-of-memory failure changes, level by level.

Each level keeps everything the previous one did and lowers memory further. Training
(``instance_model``):

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

Evaluation (``holdout_evaluation``, ``shap_summary``), on the same levels:

| level | prediction batches / SHAP chunks | SHAP rows explained | instance models           |
|-------|----------------------------------|---------------------|---------------------------|
| 0     | config or plan                   | config              | kept loaded if they fit   |
| 1     | 1/4                              | config              | kept loaded if they fit   |
| 2     | 1/8                              | 1/2                 | loaded one at a time      |
| 3     | 1/16                             | 1/4                 | loaded one at a time      |

Why this order: smaller batches and chunks cost only speed, and they bound what a batch
allocates (raw rows, predictions, and for SHAP rows x classes x (features + 1) doubles);
loading models one at a time costs a pass over the holdout per model (one load per model per
chunk for SHAP); fewer SHAP rows cost precision of the importances (and shrink the beeswarm
reservoir and the retry's time), so they come last. The holdout metrics always use every
holdout row: the ladder never trades away what the evaluation measures.

The level is deterministic: the run's ``memopt/ladder_level`` tag (which the out-of-memory
sensor sets when it re-runs failed partitions) plus the step's retry number, capped at the
last level. A run tagged N therefore tries N, N + 1, ... and never repeats a level below the
last; :func:`next_level_after_failure` continues from where those attempts stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LADDER_TAG = "memopt/ladder_level"
MIN_BATCH_ROWS = 256
# Below a few hundred rows the mean |SHAP| ranking of hundreds of features is mostly noise.
MIN_SHAP_ROWS = 250


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


@dataclass(frozen=True)
class EvaluationStep:
    level: int
    batch_rows_divisor: int  # holdout prediction batches and SHAP chunks
    shap_rows_divisor: int
    models_one_at_a_time: bool
    description: str


EVALUATION_LADDER = (
    EvaluationStep(0, 1, 1, False, "the plan as made"),
    EvaluationStep(1, 4, 1, False, "prediction batches and SHAP chunks 4x smaller"),
    EvaluationStep(2, 8, 2, True, "batches and chunks 8x smaller, models loaded one at a time, SHAP rows halved"),
    EvaluationStep(3, 16, 4, True, "batches and chunks 16x smaller, models loaded one at a time, SHAP rows quartered"),
)


def ladder_step(level: int) -> LadderStep:
    """The step for ``level``; levels past the end stay at the last step."""
    return LADDER[_clamp(level)]


def _clamp(level: int) -> int:
    return min(max(level, 0), MAX_LEVEL)


def _divided(value: int, divisor: int, floor: int) -> int:
    """``value // divisor``, not below ``floor`` and never above ``value`` itself."""
    return min(value, max(floor, value // divisor))


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


@dataclass(frozen=True)
class EvaluationSettings:
    """Memory-shaping settings of one evaluation attempt (holdout or SHAP), after the ladder."""

    level: int
    batch_rows: int  # rows per holdout prediction batch, or per SHAP chunk
    shap_rows: int  # rows SHAP explains (unused by the holdout evaluation)
    models_one_at_a_time: bool  # force it; below that, the ensemble decides from the models' size
    description: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_settings_for(level: int, *, batch_rows: int, shap_rows: int = 0) -> EvaluationSettings:
    """``batch_rows`` and ``shap_rows`` as configured (or planned), shrunk for ``level``; a
    lower level never raises them, and they stop at MIN_BATCH_ROWS / MIN_SHAP_ROWS unless
    configured below that."""
    step = EVALUATION_LADDER[_clamp(level)]
    return EvaluationSettings(
        level=step.level,
        batch_rows=_divided(batch_rows, step.batch_rows_divisor, MIN_BATCH_ROWS),
        shap_rows=_divided(shap_rows, step.shap_rows_divisor, MIN_SHAP_ROWS),
        models_one_at_a_time=step.models_one_at_a_time,
        description=step.description,
    )


def _tagged_level(run_tags: dict[str, str]) -> int:
    try:
        return int(run_tags.get(LADDER_TAG, 0))
    except ValueError:
        return 0


def _attempt_level(tagged_level: int, retry_number: int) -> int:
    return _clamp(tagged_level + max(retry_number, 0))


def ladder_level(retry_number: int, run_tags: dict[str, str]) -> int:
    """The level of this attempt: the run's tagged level plus the step's retry number, capped
    at MAX_LEVEL (a run the sensor tagged N retries at N + 1, N + 2, ...)."""
    return _attempt_level(_tagged_level(run_tags), retry_number)


def next_level_after_failure(tagged_level: int, failed_attempts: int) -> int | None:
    """Ladder level for re-running a step that failed out-of-memory after ``failed_attempts``
    attempts (its step retries included, each one level lower, as :func:`ladder_level` gives
    them) in a run tagged ``tagged_level``. None when those attempts already reached the last
    level: then only a bigger budget (or more instances) can help, and re-running would fail
    the same way."""
    reached = _attempt_level(tagged_level, max(failed_attempts, 1) - 1)
    if reached >= MAX_LEVEL:
        return None
    return reached + 1
