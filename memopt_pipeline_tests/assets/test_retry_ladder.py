"""Out-of-memory in a heavy stage is retried one ladder level lower; other errors are not retried."""

import dagster as dg
import pytest

from memopt_pipeline.assets import ALL_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
from memopt_pipeline.assets import training as training_assets
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.definitions import build_resources


@pytest.fixture
def prepared(tiny_dataset, tmp_path):
    run_config = {
        "ops": {
            "source_dataset": {"config": {"path": str(tiny_dataset)}},
            "gene_split": {"config": {"sample_genes": 12}},
        }
    }
    with dg.instance_for_test() as instance:
        resources = build_resources(output_dir=str(tmp_path / "out"))
        dg.materialize(ALL_ASSETS, selection=PREPARE_ASSETS, instance=instance, resources=resources, run_config=run_config)
        yield instance, resources


def _train(instance, resources):
    partition = instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)[0]
    return dg.materialize(
        ALL_ASSETS, selection=INSTANCE_ASSETS, instance=instance, resources=resources, partition_key=partition,
        run_config={"ops": {"cv_folds": {"config": {"n_folds": 2}}, "instance_model": {"config": {"max_rounds": 5, "num_threads": 2}}}},
        raise_on_error=False,
    )


def test_out_of_memory_is_retried_at_the_next_ladder_level(prepared, monkeypatch):
    instance, resources = prepared
    real_train = training_assets.train_instance
    attempts = []

    def train_that_runs_out_of_memory_once(*args, **kwargs):
        attempts.append(kwargs["batch_rows"])
        if len(attempts) == 1:
            raise MemoryError("simulated: Unable to allocate 997. MiB")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training_assets, "train_instance", train_that_runs_out_of_memory_once)
    result = _train(instance, resources)
    assert result.success
    assert len(attempts) == 2 and attempts[1] < attempts[0]  # level 1: batches 4x smaller
    materialization = result.asset_materializations_for_node("instance_model")[0]
    assert materialization.metadata["ladder_level"].value == 1
    assert result.get_step_failure_events() == []


def test_other_errors_fail_once_without_retry(prepared, monkeypatch):
    instance, resources = prepared
    attempts = []

    def train_with_a_bug(*args, **kwargs):
        attempts.append(1)
        raise ValueError("label out of range")

    monkeypatch.setattr(training_assets, "train_instance", train_with_a_bug)
    result = _train(instance, resources)
    assert not result.success
    assert len(attempts) == 1
    failure = result.get_step_failure_events()[0]
    assert "label out of range" in failure.step_failure_data.error.to_string()


def test_last_ladder_level_trains_on_xgboost_external_memory(prepared):
    """The OOM sensor re-runs failed partitions with the ladder tag; level 3 moves bins to disk."""
    from memopt_pipeline.core.memory.ladder import LADDER_TAG, MAX_LEVEL

    instance, resources = prepared
    partition = instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)[0]
    result = dg.materialize(
        ALL_ASSETS, selection=INSTANCE_ASSETS, instance=instance, resources=resources, partition_key=partition,
        tags={LADDER_TAG: str(MAX_LEVEL)},
        run_config={"ops": {"cv_folds": {"config": {"n_folds": 2}}, "instance_model": {"config": {"max_rounds": 5, "num_threads": 1}}}},
    )
    metadata = result.asset_materializations_for_node("instance_model")[0].metadata
    assert metadata["ladder_level"].value == MAX_LEVEL
    assert metadata["backend"].value == "xgboost" and metadata["external_memory"].value is True
    assert metadata["max_bin"].value == 63
