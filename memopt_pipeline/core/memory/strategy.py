"""One model or an ensemble: which strategy trains rows that do not fit one in-memory model.

:func:`choose_strategy` is given how many rows one in-memory instance may hold (the memory
plan's sizing, :func:`memopt_pipeline.core.memory.planner.make_plan`) and answers with the
strategy and why, from measured time and quality: every row is trained once either way, external
memory's rounds are slower, and an ensemble of too-small instances loses quality.
"""

from __future__ import annotations

import math

MIN_INSTANCE_ROWS = 1_000  # below this a model is not worth training: the plan fails instead
# Below this many rows per instance an ensemble loses more than 0.5% holdout logloss against one
# model of all rows: on 2.0M training rows x 338 features, k = 2, 4, 8 instances of 1.10M, 551k and
# 275k rows cost -0.09%, -0.08% and +0.31%, k = 16 of 138k rows +1.24%; the 0.5% line crosses at
# about 247k rows (benchmarks/ensemble_size.py; table in benchmarks/README.md).
MIN_ENSEMBLE_INSTANCE_ROWS = 250_000
# XGBoost external memory's seconds per round against the same model in memory (QuantileDMatrix),
# with plan-sized pages (benchmarks/external_memory.py: 0.82 s vs 0.50 s on 428k rows x 338).
EXTERNAL_MEMORY_TIME_FACTOR = 1.65


def ensemble_split(dataset_rows: int, max_rows: int) -> tuple[int, int]:
    """(instances, rows per instance) when ``dataset_rows`` rows are split into instances of at
    most ``max_rows`` (> 0) rows each."""
    k = math.ceil(dataset_rows / max_rows)
    return k, math.ceil(dataset_rows / k)


def choose_strategy(
    *, dataset_rows: int, max_rows: int, external_fits: bool, min_ensemble_instance_rows: int = MIN_ENSEMBLE_INSTANCE_ROWS
) -> tuple[str, str]:
    """(strategy, why) for ``dataset_rows`` rows when one in-memory model may hold ``max_rows``.

    - all rows fit one model: ``in_memory``;
    - k = ceil(rows / max_rows) instances: the ensemble trains every row once, about the time
      of one in-memory model, against ``EXTERNAL_MEMORY_TIME_FACTOR`` times that for one
      external-memory model; so the ensemble, unless its instances would hold fewer than
      ``min_ensemble_instance_rows`` rows (measured to lose more than 0.5% holdout logloss)
      and external memory fits (``external_fits``): then ``external_memory``, one model of
      all rows at the quality of an in-memory one. 0 turns the quality rule off;
    - no in-memory instance of ``MIN_INSTANCE_ROWS`` rows fits: ``external_memory`` when it fits.
    The caller raises PlanError when the answer is an instance that does not fit.
    """
    slower = f"about {EXTERNAL_MEMORY_TIME_FACTOR:g}x the time per round of an in-memory model"
    if max_rows >= max(dataset_rows, MIN_INSTANCE_ROWS):
        return "in_memory", f"all {dataset_rows:,} rows fit one in-memory model"
    if max_rows < MIN_INSTANCE_ROWS:
        return ("external_memory" if external_fits else "multi_instance"), (
            f"no in-memory instance of {MIN_INSTANCE_ROWS:,} rows fits the budget; one external-memory model of all rows "
            f"({slower})" if external_fits else "neither an in-memory instance nor external memory fits the budget"
        )
    k, per_instance = ensemble_split(dataset_rows, max_rows)
    ensemble = f"{k} in-memory instances of about {per_instance:,} rows"
    if per_instance >= min_ensemble_instance_rows:
        rule = f"at least {min_ensemble_instance_rows:,} rows per instance" if min_ensemble_instance_rows else "rule off"
        return "multi_instance", (
            f"{ensemble}: about the time of one in-memory model, expected within 0.5% of its holdout logloss "
            f"({rule}); one external-memory model would take {slower}"
        )
    if external_fits:
        return "external_memory", (
            f"{ensemble} would each hold fewer than {min_ensemble_instance_rows:,} rows, where an ensemble was measured "
            f"to lose more than 0.5% holdout logloss; one external-memory model of all rows instead ({slower})"
        )
    return "multi_instance", (
        f"{ensemble}, fewer than {min_ensemble_instance_rows:,} rows each (expect more than 0.5% holdout logloss lost "
        "against one model), because external memory does not fit the budget either"
    )
