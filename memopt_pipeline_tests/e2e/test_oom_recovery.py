"""A real step process SIGKILLed mid-training (what the kernel's OOM killer does, and `kill -9`).

Runs with Dagster's multiprocess executor, so every step is its own OS process, and kills
the instance_model process of one partition from outside while it trains. Expected: only that
partition's step runs again, one ladder level lower when the guard's heartbeat shows memory
near the budget (the OOM killer's evidence), at the same level when it does not; and the final
ensemble equals the one of a run that was never killed.
"""

import json
import threading
import time

import dagster as dg
import psutil
import pytest

from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.core.memory.failures import text_is_out_of_memory
from memopt_pipeline.resources.memory_guard import heartbeat_path
from memopt_pipeline_tests.checkpoint_layout import latest_value

TRAINING = {"cv_folds": {"config": {"n_folds": 2}}, "instance_model": {"config": {"max_rounds": 150, "early_stopping_rounds": 150, "learning_rate": 0.03, "num_threads": 1}}}


def _job(name):
    from memopt_pipeline.definitions import defs

    return defs.resolve_job_def(name)


def prepare_instances():
    return _job("prepare_instances")


def train_instances():
    return _job("train_instances")


def evaluate_and_explain():
    return _job("evaluate_and_explain")


def _run(instance, job_fn, run_config, partition=None):
    tags = {"dagster/partition": partition} if partition else None
    result = dg.execute_job(dg.reconstructable(job_fn), instance=instance, run_config=run_config, tags=tags)
    return result


def _pipeline(instance, dataset, kill_partition=None, evidence=False):
    prepare = _run(instance, prepare_instances, {"ops": {
        "source_dataset": {"config": {"path": str(dataset)}},
        "gene_split": {"config": {"sample_genes": 16}},
        "instance_assignment": {"config": {"n_instances": 2}},
    }})
    assert prepare.success
    train_runs = {}
    for partition in instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME):
        killer = _Killer(instance, evidence) if partition == kill_partition else None
        if killer:
            killer.start()
        train_runs[partition] = _run(instance, train_instances, {"ops": TRAINING}, partition)
        if killer:
            killer.join()
            train_runs[partition].killed = killer.killed
    final = _run(instance, evaluate_and_explain, {"ops": {"shap_summary": {"config": {"sample_rows": 100, "chunk_rows": 50}}}})
    assert final.success
    return train_runs


class _Killer(threading.Thread):
    """SIGKILLs the instance_model step process one second after that step starts. With
    ``evidence``, the step's heartbeat first says RSS was at 95% of the budget, as the guard's
    sampler would have recorded it just before a kernel OOM kill."""

    def __init__(self, instance, evidence=False):
        super().__init__(daemon=True)
        self.instance = instance
        self.evidence = evidence
        self.killed = []
        self.started_at = time.time()

    def run(self):
        deadline = time.time() + 120
        while time.time() < deadline and not self.killed:
            records = self.instance.get_event_records(
                dg.EventRecordsFilter(event_type=dg.DagsterEventType.STEP_START), limit=20, ascending=False
            )
            starts = [r for r in records if r.event_log_entry.step_key == "instance_model" and r.timestamp >= self.started_at]
            if starts:
                time.sleep(1.0)
                if self.evidence:
                    beat_file = heartbeat_path(self.instance, starts[0].event_log_entry.run_id, "instance_model")
                    beat = json.loads(beat_file.read_text())
                    beat["rss_bytes"] = int(0.95 * beat["budget_bytes"])
                    beat_file.write_text(json.dumps(beat))
                for child in psutil.Process().children(recursive=True):
                    if "spawn_main" in " ".join(child.cmdline()):
                        child.kill()
                        self.killed.append(child.pid)
                return
            time.sleep(0.1)


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    # Step processes import the definitions afresh and read the output folder from here.
    monkeypatch.setenv("MEMOPT_OUTPUT_DIR", str(tmp_path / "out"))
    return tmp_path / "out"


@pytest.fixture(scope="module")
def clean_holdout(tiny_dataset, tmp_path_factory):
    """The holdout evaluation of the same pipeline never killed: computed once for both cases
    (each pipeline is ~15 step processes, minutes on 2 cores)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MEMOPT_OUTPUT_DIR", str(tmp_path_factory.mktemp("clean") / "out"))
        with dg.instance_for_test() as instance:
            _pipeline(instance, tiny_dataset)
            return latest_value(instance, "holdout_evaluation")


# A kill without evidence is also covered, faster, by e2e/test_resume.py (a step killed far below the
# budget is retried at the same level); here it runs with the slow tests.
@pytest.mark.parametrize(
    "evidence, level",
    [(True, 1), pytest.param(False, 0, marks=pytest.mark.slow)],
    ids=["near-the-budget", "far-below-the-budget"],
)
def test_sigkilled_instance_step_reruns_only_that_partition_at_the_level_the_evidence_says(
    tiny_dataset, output_dir, clean_holdout, evidence, level
):
    with dg.instance_for_test() as instance:
        runs = _pipeline(instance, tiny_dataset, kill_partition="instance_1", evidence=evidence)
        killed_run = runs["instance_1"]
        assert killed_run.killed, "the step process was not found to kill"
        assert killed_run.success  # the step's RetryPolicy re-ran it one ladder level lower

        events = instance.get_records_for_run(killed_run.run_id).records
        crash_text = "\n".join(r.event_log_entry.user_message or "" for r in events if r.event_log_entry.step_key == "instance_model")
        assert "signal 9" in crash_text and text_is_out_of_memory(crash_text)
        step_starts = [r for r in events if r.event_log_entry.dagster_event_type in (dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_RESTARTED)]
        assert sorted(r.event_log_entry.step_key for r in step_starts) == ["cv_folds", "instance_model", "instance_model"]
        # The other partition ran once, untouched.
        materialized = instance.get_materialized_partitions(dg.AssetKey("instance_model"))
        assert materialized == {"instance_0", "instance_1"}
        killed_card = latest_value(instance, "instance_model", "instance_1")
        assert killed_card["ladder"]["level"] == level
        killed_holdout = latest_value(instance, "holdout_evaluation")

    assert killed_holdout["logloss"] == clean_holdout["logloss"]
    assert killed_holdout["per_class"] == clean_holdout["per_class"]
