"""Instance trainings side by side: the plan's limit holds across runs, in separate processes.

Each instance partition is its own run, so the limit that matters spans runs: the
``memory_heavy`` pool's slots, set from the plan, which Dagster enforces and MemoryGuard
holds on the machine too (resources/pool_slots.py: Dagster's claim can over-admit on SQLite).
The proof reads the intervals in which each training worked, and at every moment the
planned peaks of the trainings working then must add up to no more than the budget.
"""

import json

import dagster as dg
import pytest

from memopt_pipeline.assets.memory_heavy import MEMORY_POOL
from memopt_pipeline.automation.concurrency import concurrency_from_assets, memory_pool_limit
from memopt_pipeline.automation.local_run import materialize_pipeline
from memopt_pipeline.automation.partition_runs import materialize_partitions_in_processes
from memopt_pipeline.core.memory.concurrency import instance_concurrency
from memopt_pipeline.core.memory.planner import GiB, make_plan
from memopt_pipeline.definitions import build_resources
from memopt_pipeline_tests.automation.fake_instance_training import FAKE_PARTITIONS, FAKE_POOL


def _step_intervals(instance: dg.DagsterInstance, step_key: str) -> dict[str, tuple[float, float]]:
    """Partition -> (start, end) of ``step_key`` in that partition's run, from the event log."""
    intervals = {}
    for record in instance.get_run_records():
        run = record.dagster_run
        events = instance.get_records_for_run(
            run.run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
        ).records
        times = {
            e.event_log_entry.dagster_event.event_type: e.event_log_entry.timestamp
            for e in events
            if e.event_log_entry.step_key == step_key
        }
        if times:
            intervals[run.tags["dagster/partition"]] = (
                times[dg.DagsterEventType.STEP_START],
                times[dg.DagsterEventType.STEP_SUCCESS],
            )
    return intervals


def _running_at_each_start(intervals: dict[str, tuple[float, float]]) -> list[set[str]]:
    """The partitions running at each step's start; the most overlap is always at some start."""
    return [
        {key for key, (start, end) in intervals.items() if start <= moment < end}
        for moment, _ in intervals.values()
    ]


def test_the_limit_is_the_budget_over_the_largest_predicted_peak():
    plan = make_plan(dataset_rows=2_000_000, n_features=300, n_classes=3, budget_bytes=8 * GiB, baseline_bytes=GiB // 4)
    rows = {"instance_0": plan.max_rows_per_instance // 4, "instance_1": plan.max_rows_per_instance // 3}
    concurrency = instance_concurrency(plan, rows)
    assert concurrency.max_peak == plan.lightgbm_layout(plan.max_rows_per_instance // 3).predicted_peak
    assert concurrency.limit == plan.budget_bytes // concurrency.max_peak >= 2
    assert concurrency.worst_case_bytes <= plan.budget_bytes
    # An instance the plan sized to fill the budget runs alone.
    assert instance_concurrency(plan, {"instance_0": plan.max_rows_per_instance}).limit == 1


def test_memory_pool_limit_is_set_for_the_block_and_restored():
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        with memory_pool_limit(instance, 3):
            assert storage.get_concurrency_info(MEMORY_POOL).slot_count == 3
        assert MEMORY_POOL not in {pool.name for pool in storage.get_pool_limits()}
        storage.set_concurrency_slots(MEMORY_POOL, 5)  # an operator's own limit survives
        with memory_pool_limit(instance, 2):
            assert storage.get_concurrency_info(MEMORY_POOL).slot_count == 2
        assert storage.get_concurrency_info(MEMORY_POOL).slot_count == 5


def test_run_granularity_is_refused_because_direct_runs_would_not_wait():
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"granularity": "run"}}}) as instance:
        with pytest.raises(RuntimeError, match="granularity"):
            with memory_pool_limit(instance, 2):
                pass


def test_trainings_in_separate_runs_never_exceed_the_budget_together(tmp_path):
    plan = make_plan(dataset_rows=2_000_000, n_features=300, n_classes=3, budget_bytes=4 * GiB, baseline_bytes=GiB // 4)
    assignment = {
        "instances": {key: {"genes": [], "rows": plan.max_rows_per_instance // 2 - 1_000 * i} for i, key in enumerate(FAKE_PARTITIONS)}
    }
    concurrency = concurrency_from_assets(plan.to_dict(), assignment)
    assert concurrency.limit == 2  # the setup this test needs: room for two trainings, not four
    assert FAKE_POOL == MEMORY_POOL
    for folder in ("running", "done"):
        (tmp_path / folder).mkdir()
    with dg.instance_for_test() as instance:
        with memory_pool_limit(instance, concurrency.limit):
            materialize_partitions_in_processes(
                instance,
                assets_ref="memopt_pipeline_tests.automation.fake_instance_training:FAKE_ASSETS",
                selection=["fake_instance_training"],
                partition_keys=FAKE_PARTITIONS,
                resources={},
                run_config={"ops": {"fake_instance_training": {"config": {"marker_dir": str(tmp_path)}}}},
                processes=len(FAKE_PARTITIONS),  # more runs at once than the limit: only the pool holds them back
                log=lambda message: None,
            )
    intervals = {key: tuple(json.loads((tmp_path / "done" / key).read_text())) for key in FAKE_PARTITIONS}
    overlaps = _running_at_each_start(intervals)
    for running in overlaps:
        assert sum(concurrency.peaks[key] for key in running) <= concurrency.budget_bytes
    assert max(len(running) for running in overlaps) == concurrency.limit  # parallel, up to the limit


def test_materialize_pipeline_trains_instances_in_parallel_within_the_budget(tiny_dataset, tmp_path):
    run_config = {
        "ops": {
            "source_dataset": {"config": {"path": str(tiny_dataset)}},
            "gene_split": {"config": {"sample_genes": 24, "holdout_fraction": 0.25}},
            "instance_assignment": {"config": {"n_instances": 3, "overlap": 0.0}},
            "cv_folds": {"config": {"n_folds": 2}},
            "instance_model": {"config": {"max_rounds": 20, "num_threads": 1, "learning_rate": 0.3}},
            "shap_summary": {"config": {"sample_rows": 100, "chunk_rows": 50}},
        }
    }
    messages = []
    with dg.instance_for_test() as instance:
        collected = materialize_pipeline(
            instance,
            resources=build_resources(output_dir=str(tmp_path / "out")),
            run_config=run_config,
            log=messages.append,
            parallel_instances=True,
        )
        intervals = _step_intervals(instance, "instance_model")
        assert MEMORY_POOL not in {pool.name for pool in instance.event_log_storage.get_pool_limits()}  # restored
    assert set(intervals) == {"instance_0", "instance_1", "instance_2"}
    budget = collected["memory_plan"]["budget_gb"]
    peaks = {key: collected[f"instance_model [{key}]"]["predicted_peak_gb"] for key in intervals}
    limit = int(budget // max(peaks.values()))
    assert any(
        f"{min(limit, 3)} of 3 instance trainings may run at once (the budget allows {limit})" in message
        for message in messages
    )
    for running in _running_at_each_start(intervals):
        assert len(running) <= limit
        assert sum(peaks[key] for key in running) <= budget
    assert collected["holdout_evaluation"]["logloss"] < collected["holdout_evaluation"]["baseline_logloss"]
