"""Materialization metadata people can scan: rounded floats, metrics before memory before long entries."""

import math

import dagster as dg
import numpy as np
import pytest

from memopt_pipeline.assets import (
    ALL_ASSETS,
    cv_folds,
    dataset_metadata,
    gene_split,
    instance_assignment,
    memory_plan,
    source_dataset,
)
from memopt_pipeline.assets.display import display_metadata, round_significant
from memopt_pipeline.core.memory import gpu
from memopt_pipeline.definitions import build_resources
from memopt_pipeline.resources.memory_guard import MEMORY_METADATA_KEYS


def test_floats_keep_four_significant_digits_and_stay_numbers():
    shown = display_metadata({
        "logloss": 0.11789723507198042,
        "acceptor_best_f1": 0.8800000000000001,
        "stage_seconds": 1234.5678,
        "tiny": 1.23456e-7,
        "nan": float("nan"),
        "inf": float("inf"),
        "numpy": np.float32(0.333333343),
        "rows": 123_456_789,
        "numpy_rows": np.int64(7),
        "passed": True,
        "wrapped": dg.MetadataValue.float(2.718281828),
        "weights": dg.MetadataValue.json({"instance_0": 0.3333333333, "folds": [1, 0.6666666666]}),
    })
    assert shown["logloss"] == 0.1179 and isinstance(shown["logloss"], float)
    assert shown["acceptor_best_f1"] == 0.88
    assert shown["stage_seconds"] == 1235.0 and shown["tiny"] == 1.235e-7
    assert math.isnan(shown["nan"]) and shown["inf"] == math.inf
    assert shown["numpy"] == 0.3333 and type(shown["numpy"]) is float
    assert shown["rows"] == 123_456_789 and type(shown["numpy_rows"]) is int
    assert shown["passed"] is True
    assert shown["wrapped"] == dg.MetadataValue.float(2.718)
    assert shown["weights"].data == {"instance_0": 0.3333, "folds": [1, 0.6667]}


def test_entries_are_ordered_metrics_memory_short_long():
    shown = display_metadata({
        "dataset_path": dg.MetadataValue.path("/data/x"),
        "memory_timeline": dg.MetadataValue.md("![timeline](data:image/png;base64,AAAA)"),
        "backend": "lightgbm",
        "cleanups": 0,
        "peak_rss_gb": 0.5,
        "ladder_settings": "level 2: " + "smaller batches, " * 5,
        "logloss": 0.2,
        "budget_gb": 14.0,
        "fold_metrics": dg.MetadataValue.md("| fold |"),
        "rows": 10,
        "external_memory": False,
    })
    assert list(shown) == [
        "logloss", "rows",  # metrics, in the asset's order
        "peak_rss_gb", "budget_gb", "cleanups", "memory_timeline",  # memory, in MEMORY_METADATA_KEYS order
        "backend", "external_memory",  # short values
        "dataset_path", "ladder_settings", "fold_metrics",  # long entries, in the asset's order
    ]


@pytest.fixture(scope="module")
def materialized(tiny_dataset, tmp_path_factory):
    """The latest materialization's metadata of the cheap assets, read back from the instance's
    storage (the order the UI gets), on a machine without a GPU."""
    assert not gpu.gpu_status().available  # the test machines have none
    output = tmp_path_factory.mktemp("out")
    prepare_config = {
        "ops": {
            "source_dataset": {"config": {"path": str(tiny_dataset)}},
            "instance_assignment": {"config": {"n_instances": 2}},
        }
    }
    resources = build_resources(output_dir=str(output))
    with dg.instance_for_test() as instance:
        prepare = [source_dataset, dataset_metadata, memory_plan, gene_split, instance_assignment]
        assert dg.materialize(
            ALL_ASSETS, selection=prepare, instance=instance, resources=resources, run_config=prepare_config
        ).success
        assert dg.materialize(
            ALL_ASSETS, selection=[cv_folds], partition_key="instance_0", instance=instance, resources=resources,
            run_config={"ops": {"cv_folds": {"config": {"n_folds": 2}}}},
        ).success
        metadata = {}
        for asset in [*prepare, cv_folds]:
            record = instance.fetch_materializations(asset.key, limit=1).records[0]
            metadata[asset.key.to_user_string()] = record.asset_materialization.metadata
        yield metadata


def test_materialized_floats_are_rounded(materialized):
    floats = [
        (asset, key, entry.value)
        for asset, metadata in materialized.items()
        for key, entry in metadata.items()
        if isinstance(entry, dg.FloatMetadataValue)
    ]
    assert {"peak_rss_gb", "stage_seconds", "sampled_share_of_genes"} <= {key for _, key, _ in floats}
    unrounded = [(a, k, v) for a, k, v in floats if not math.isnan(v) and v != round_significant(v)]
    assert not unrounded


def test_materialized_metadata_reads_metrics_then_memory_then_long_entries(materialized):
    keys = list(materialized["dataset_metadata"])
    memory = [k for k in keys if k in MEMORY_METADATA_KEYS]
    assert keys == [
        "rows", "genes", "features", "shards_with_missing_features", "raw_float32_gb", "disk_gb",
        *memory,
        "classes", "excluded_columns", "path",
    ]
    assert memory == [k for k in MEMORY_METADATA_KEYS if k in memory] and memory[0] == "peak_rss_gb"
    assert memory[-1] == "memory_timeline"


def test_fold_class_counts_name_the_classes(materialized, tiny_metadata):
    table = materialized["cv_folds"]["fold_class_counts"].value
    header = table.splitlines()[0]
    assert header == "| " + " | ".join(["fold", "rows", *map(str, tiny_metadata.classes)]) + " |"
    assert "n_class_" not in table


def test_no_gpu_is_said_once_in_the_plan_not_on_every_stage(materialized):
    assert "gpu" not in materialized["dataset_metadata"]
    assert materialized["memory_plan"]["gpu"].value.startswith("no GPU: ")
