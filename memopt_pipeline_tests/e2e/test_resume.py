"""Never lose finished work: `memopt run` killed, signalled or run twice, as users do it.

Every test drives `python -m memopt_pipeline.cli run` in a process of its own on the tiny
dataset (2 instances, 2 folds) and reads the experiment's own Dagster instance afterwards.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest

from memopt_pipeline.automation.resume import latest_record
from memopt_pipeline.core.memory.ladder import LADDER_TAG
from memopt_pipeline.core.storage import file_sha256
from memopt_pipeline_tests.e2e.memopt_process import (
    FIRST_INSTANCE_TRAINING,
    SECOND_INSTANCE_TRAINING,
    MemoptProcess,
    experiment_instance,
    latest_value,
    materialization_counts,
    memopt_args,
    run_memopt,
    runs_of,
    wait_gone,
)

ALL_STAGES = [
    "source_dataset", "dataset_metadata", "memory_plan", "gene_split", "feature_screening", "instance_assignment",
    "cv_folds [instance_0]", "instance_model [instance_0]", "cv_folds [instance_1]", "instance_model [instance_1]",
    "ensemble_model", "holdout_evaluation", "shap_summary", "run_report",
]


def model_hashes(output: Path) -> dict[str, str]:
    return {
        p: file_sha256(latest_value(output, "instance_model", p)["model_path"]) for p in ("instance_0", "instance_1")
    }


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> Path:
    """One uninterrupted run: what every interrupted one must end up equal to."""
    folder = tmp_path_factory.mktemp("reference")
    output = folder / "out"
    rc, text = run_memopt(memopt_args(tiny_dataset, output), folder / "run.log", folder)
    assert rc == 0, text[-3000:]
    return output


def test_a_second_run_reuses_every_stage_and_materializes_nothing(tiny_dataset, reference, tmp_path):
    before = materialization_counts(reference)
    rc, text = run_memopt(memopt_args(tiny_dataset, reference), tmp_path / "again.log", tmp_path)
    assert rc == 0, text[-3000:]
    assert f"reused {len(ALL_STAGES)} stage(s)" in text and "ran 0 stage(s)" in text
    assert materialization_counts(reference) == before
    assert all(count == 1 for stage, count in before.items() if stage in ALL_STAGES), before


def _assert_resumed_like_the_reference(output: Path, reference: Path, counts_before_resume: dict[str, int]) -> None:
    counts = materialization_counts(output)
    # No stage that had completed before the kill was materialized again.
    for stage, count in counts_before_resume.items():
        assert counts.get(stage) == count, (stage, counts_before_resume, counts)
    assert all(counts.get(stage) >= 1 for stage in ALL_STAGES), counts
    # The same seed gives the same models and the same holdout metrics as the uninterrupted run.
    assert model_hashes(output) == model_hashes(reference)
    resumed, uninterrupted = latest_value(output, "holdout_evaluation"), latest_value(reference, "holdout_evaluation")
    assert resumed["logloss"] == pytest.approx(uninterrupted["logloss"], rel=1e-9)


def test_kill_9_while_the_second_instance_trains_then_resume(tiny_dataset, reference, tmp_path):
    output = tmp_path / "out"
    first = MemoptProcess(memopt_args(tiny_dataset, output), tmp_path / "killed.log", tmp_path)
    first.wait_for(SECOND_INSTANCE_TRAINING)
    time.sleep(0.3)  # inside instance_model [instance_1] (it trains for a few seconds on this data)
    first.kill_main()  # the memopt process only; its training step may live on for a moment
    counts_before = materialization_counts(output)
    assert "instance_model [instance_0]" in counts_before

    started = time.monotonic()  # at once, as a user would
    rc, text = run_memopt(memopt_args(tiny_dataset, output), tmp_path / "resumed.log", tmp_path)
    assert rc == 0, text[-3000:]
    assert "was left unfinished" in text  # the dead run was found and marked failed, its slot freed
    assert "instance_model [instance_0]: reused" in text
    print(f"resume after kill -9 in instance_model [instance_1]: {time.monotonic() - started:.1f} s")
    counts_before.pop("instance_model [instance_1]", None)  # the orphaned step may have finished it
    _assert_resumed_like_the_reference(output, reference, counts_before)
    assert not [r.run_id for r in runs_of(output) if not r.is_finished]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_during_training_stops_within_10_s_without_a_ladder_step(tiny_dataset, signum, tmp_path):
    output = tmp_path / "out"
    process = MemoptProcess(memopt_args(tiny_dataset, output), tmp_path / "stopped.log", tmp_path)
    process.wait_for(FIRST_INSTANCE_TRAINING)
    time.sleep(0.5)
    children = process.descendants()
    rc, seconds = process.signal_and_time(signum)
    print(f"{signal.Signals(signum).name}: memopt run exited {rc} after {seconds:.1f} s")
    assert rc != 0 and seconds <= 10, (rc, seconds, process.output()[-2000:])
    assert "stopped by signal" in process.output()
    wait_gone(children, timeout_s=10)
    runs = runs_of(output)
    assert not any(LADDER_TAG in r.tags for r in runs)
    with experiment_instance(output) as instance:
        retries = [
            e for r in runs for e in instance.all_logs(r.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
        ]
        assert not retries, "a stop signal must not spend a ladder level"
        assert not instance.event_log_storage.get_concurrency_info("memory_heavy").claimed_slots
    if signum == signal.SIGTERM:  # and the run can be resumed
        rc, text = run_memopt(memopt_args(tiny_dataset, output), tmp_path / "resumed.log", tmp_path)
        assert rc == 0, text[-3000:]
        assert "source_dataset: reused" in text


def test_a_step_killed_far_below_the_budget_is_not_out_of_memory(tiny_dataset, tmp_path):
    output = tmp_path / "out"
    process = MemoptProcess(memopt_args(tiny_dataset, output), tmp_path / "run.log", tmp_path)
    process.wait_for(FIRST_INSTANCE_TRAINING)
    time.sleep(0.5)
    heartbeats = list((output / ".dagster" / "heartbeats").glob("*.instance_model.json"))
    assert heartbeats, "the guard leaves a heartbeat beside the step"
    import json

    step = psutil.Process(json.loads(heartbeats[0].read_text())["pid"])
    step.send_signal(signal.SIGKILL)  # e.g. `kill -9` by hand or a node drain, not the OOM killer
    rc = process.wait()
    text = process.output()
    assert rc == 0, text[-3000:]
    assert "killed, not out of memory" in text and "retrying once at the same level" in text
    assert not any(r.tags.get(LADDER_TAG, "0") != "0" for r in runs_of(output))
    with experiment_instance(output) as instance:
        record = latest_record(instance, "instance_model", "instance_0")
        assert record.asset_materialization.metadata["ladder_level"].value == 0


def test_two_experiments_at_once_keep_their_own_runs_and_partitions(tiny_dataset, tmp_path):
    one_instance = memopt_args(tiny_dataset, tmp_path / "a")
    one_instance[one_instance.index("--instances") + 1] = "1"
    a = MemoptProcess(one_instance, tmp_path / "a.log", tmp_path)
    b = MemoptProcess(memopt_args(tiny_dataset, tmp_path / "b"), tmp_path / "b.log", tmp_path)
    assert a.wait() == 0, a.output()[-3000:]
    assert b.wait() == 0, b.output()[-3000:]
    with experiment_instance(tmp_path / "a") as instance_a, experiment_instance(tmp_path / "b") as instance_b:
        assert instance_a.get_dynamic_partitions("instances") == ["instance_0"]
        assert sorted(instance_b.get_dynamic_partitions("instances")) == ["instance_0", "instance_1"]
        runs_a = {r.run_id for r in instance_a.get_runs()}
        runs_b = {r.run_id for r in instance_b.get_runs()}
    assert runs_a and runs_b and not runs_a & runs_b
    assert str(tmp_path / "a") in latest_value(tmp_path / "a", "run_report")["report_path"]
    assert str(tmp_path / "b") in latest_value(tmp_path / "b", "run_report")["report_path"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at",
    ["dataset_metadata: budget", FIRST_INSTANCE_TRAINING, "holdout_evaluation: budget", "shap_summary"],
)
def test_kill_9_at_several_points_then_resume(tiny_dataset, reference, kill_at, tmp_path):
    output = tmp_path / "out"
    first = MemoptProcess(memopt_args(tiny_dataset, output), tmp_path / "killed.log", tmp_path)
    first.wait_for(kill_at)
    wait_gone(first.kill_main())
    counts_before = materialization_counts(output)
    rc, text = run_memopt(memopt_args(tiny_dataset, output), tmp_path / "resumed.log", tmp_path)
    assert rc == 0, text[-3000:]
    _assert_resumed_like_the_reference(output, reference, counts_before)


@pytest.mark.slow
def test_kill_9_at_20_random_moments(tiny_dataset, reference, tmp_path):
    output = tmp_path / "out"
    rng = random.Random(12)
    for attempt in range(20):
        process = MemoptProcess(memopt_args(tiny_dataset, output), tmp_path / f"run{attempt}.log", tmp_path)
        time.sleep(rng.uniform(2, 40))
        if process.process.poll() is not None:
            break
        wait_gone(process.kill_main())
    rc, text = run_memopt(memopt_args(tiny_dataset, output), tmp_path / "final.log", tmp_path)
    assert rc == 0, text[-3000:]
    assert model_hashes(output) == model_hashes(reference)
    assert latest_value(output, "holdout_evaluation")["logloss"] == pytest.approx(
        latest_value(reference, "holdout_evaluation")["logloss"], rel=1e-9
    )


def _planned(reference: Path, args: list[str], force: bool = False) -> dict[str, str]:
    """What a `memopt run` with ``args`` would do on the reference experiment (nothing is run)."""
    import argparse

    from memopt_pipeline import cli
    from memopt_pipeline.assets import FINALIZE_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
    from memopt_pipeline.automation.resume import ResumePlanner
    from memopt_pipeline.resources import MemoryGuard

    parser = argparse.ArgumentParser()
    cli._add_run_arguments(parser)
    parsed = parser.parse_args(args[1:])
    with experiment_instance(reference) as instance:
        planner = ResumePlanner(
            instance, [*PREPARE_ASSETS, *INSTANCE_ASSETS, *FINALIZE_ASSETS], ops_config=cli._run_config(parsed)["ops"],
            memory_guard=MemoryGuard(budget_gb=parsed.budget_gb), output_dir=reference, force=force,
        )
        for assets in (PREPARE_ASSETS, INSTANCE_ASSETS, FINALIZE_ASSETS):
            for assets_def in assets:
                partitions = ["instance_0", "instance_1"] if assets_def.partitions_def else [None]
                for partition in partitions:
                    planner.decide(assets_def.key.to_user_string(), partition)
    return {d.label: ("reuse" if d.reuse else d.reason) for d in planner.decisions}


def test_changing_max_rounds_makes_training_and_what_follows_stale_not_the_dataset_stages(tiny_dataset, reference):
    args = memopt_args(tiny_dataset, reference)
    assert set(_planned(reference, args).values()) == {"reuse"}
    args[args.index("--max-rounds") + 1] = "41"
    planned = _planned(reference, args)
    stale = {stage for stage, decision in planned.items() if decision != "reuse"}
    assert stale == {"instance_model [instance_0]", "instance_model [instance_1]", "ensemble_model",
                     "holdout_evaluation", "shap_summary", "run_report"}, planned
    assert planned["instance_model [instance_0]"] == "config changed"
    args[args.index("--budget-gb") + 1] = "5"  # a new budget changes the plan, and everything after it
    stale = {stage for stage, decision in _planned(reference, args).items() if decision != "reuse"}
    assert stale == set(ALL_STAGES) - {"source_dataset", "dataset_metadata", "gene_split"}  # the split needs no plan
    assert set(_planned(reference, memopt_args(tiny_dataset, reference), force=True).values()) == {"--force"}
