"""holdout_evaluation and shap_summary retry an out-of-memory failure one evaluation ladder level lower."""

import dagster as dg
import pytest

from memopt_pipeline.assets import (
    ALL_ASSETS,
    INSTANCE_ASSETS,
    PREPARE_ASSETS,
    ensemble_model,
    holdout_evaluation,
    shap_summary,
)
from memopt_pipeline.assets import evaluation as evaluation_assets
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.core.memory.errors import MemoryBudgetExceeded
from memopt_pipeline.core.memory.ladder import LADDER_TAG
from memopt_pipeline.core.memory.monitor import StageMonitor
from memopt_pipeline.core.units import GiB
from memopt_pipeline.definitions import build_resources

EVALUATION_CONFIG = {
    "ops": {
        "holdout_evaluation": {"config": {"batch_rows": 4_096}},
        "shap_summary": {"config": {"sample_rows": 1_200, "chunk_rows": 2_000}},
    }
}


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """Everything up to ensemble_model, materialized once for the module."""
    resources = build_resources(output_dir=str(tmp_path_factory.mktemp("out")))
    with dg.instance_for_test() as instance:
        prepare = {
            "ops": {
                "source_dataset": {"config": {"path": str(tiny_dataset)}},
                "gene_split": {"config": {"sample_genes": 30, "holdout_fraction": 0.25}},
                "instance_assignment": {"config": {"n_instances": 1}},
            }
        }
        dg.materialize(ALL_ASSETS, selection=PREPARE_ASSETS, instance=instance, resources=resources, run_config=prepare)
        train = {"ops": {"cv_folds": {"config": {"n_folds": 2}}, "instance_model": {"config": {"max_rounds": 5, "num_threads": 1}}}}
        for partition in instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME):
            dg.materialize(
                ALL_ASSETS, selection=INSTANCE_ASSETS, instance=instance, resources=resources, partition_key=partition,
                run_config=train,
            )
        dg.materialize(ALL_ASSETS, selection=[ensemble_model], instance=instance, resources=resources)
        yield instance, resources


def _out_of_memory_once(real, calls: list):
    def stage_work(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise MemoryBudgetExceeded("simulated", 2 * GiB, GiB, int(0.9 * GiB))
        return real(*args, **kwargs)

    return stage_work


def _evaluate(trained, monkeypatch, tags=None):
    instance, resources = trained
    holdout_calls, shap_calls = [], []
    monkeypatch.setattr(evaluation_assets, "evaluate_holdout", _out_of_memory_once(evaluation_assets.evaluate_holdout, holdout_calls))
    monkeypatch.setattr(evaluation_assets, "chunked_shap", _out_of_memory_once(evaluation_assets.chunked_shap, shap_calls))
    result = dg.materialize(
        ALL_ASSETS, selection=[holdout_evaluation, shap_summary], instance=instance, resources=resources,
        run_config=EVALUATION_CONFIG, tags=tags, raise_on_error=False,
    )
    assert result.success
    assert result.get_step_failure_events() == []
    metadata = {
        name: {k: v.value for k, v in result.asset_materializations_for_node(name)[0].metadata.items()}
        for name in ("holdout_evaluation", "shap_summary")
    }
    return holdout_calls, shap_calls, metadata


def test_evaluation_retried_after_running_out_of_memory_runs_at_level_1_with_smaller_settings(trained, monkeypatch):
    holdout_calls, shap_calls, metadata = _evaluate(trained, monkeypatch)

    assert [call["batch_rows"] for call in holdout_calls] == [4_096, 1_024]  # level 1: batches 4x smaller
    holdout = metadata["holdout_evaluation"]
    assert holdout["ladder_level"] == 1 and holdout["batch_rows"] == 1_024
    # The metrics over all holdout rows run the stage's memory check.
    checkpoint = holdout_calls[1]["checkpoint"]
    assert isinstance(checkpoint.__self__, StageMonitor) and checkpoint.__name__ == "check"
    assert holdout["models_loaded_one_at_a_time"] is False

    assert [(call["sample_rows"], call["chunk_rows"]) for call in shap_calls] == [(1_200, 2_000), (1_200, 500)]
    shap = metadata["shap_summary"]
    assert shap["ladder_level"] == 1 and shap["chunk_rows"] == 500
    assert shap["shap_rows"] == shap["shap_rows_configured"] == 1_200 and shap["shap_rows_reduced"] is False


def test_a_run_tagged_at_level_1_retries_at_level_2_with_fewer_shap_rows(trained, monkeypatch):
    holdout_calls, shap_calls, metadata = _evaluate(trained, monkeypatch, tags={LADDER_TAG: "1"})

    assert [call["batch_rows"] for call in holdout_calls] == [1_024, 512]  # levels 1 then 2, no level repeated
    assert metadata["holdout_evaluation"]["ladder_level"] == 2
    assert metadata["holdout_evaluation"]["models_loaded_one_at_a_time"] is True

    assert [call["sample_rows"] for call in shap_calls] == [1_200, 600]
    shap = metadata["shap_summary"]
    assert shap["ladder_level"] == 2 and shap["chunk_rows"] == 256
    assert shap["shap_rows"] == 600 and shap["shap_rows_configured"] == 1_200 and shap["shap_rows_reduced"] is True
    assert shap["models_loaded_one_at_a_time"] is True
