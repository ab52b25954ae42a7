"""A CSV in random gene order runs through the whole graph, ingested into gene-sorted shards."""

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from memopt_pipeline.automation.local_run import materialize_pipeline
from memopt_pipeline.core.data.dataset import list_shards
from memopt_pipeline.definitions import build_resources


def test_csv_input_end_to_end(tiny_dataset, tmp_path):
    table = pa.concat_tables([pq.read_table(p) for p in list_shards(tiny_dataset)])
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    csv_path = tmp_path / "splice_sites.csv"
    pacsv.write_csv(shuffled, csv_path)

    output = tmp_path / "out"
    run_config = {
        "ops": {
            "source_dataset": {"config": {"path": str(csv_path)}},
            "instance_assignment": {"config": {"n_instances": 1}},
            "cv_folds": {"config": {"n_folds": 2}},
            "instance_model": {"config": {"max_rounds": 20, "num_threads": 2}},
            "shap_summary": {"config": {"sample_rows": 100, "chunk_rows": 50}},
        }
    }
    with dg.instance_for_test() as instance:
        collected = materialize_pipeline(instance, resources=build_resources(output_dir=str(output)), run_config=run_config, log=lambda m: None)
    source = collected["source_dataset"]
    assert source["ingested_from_csv"] is True and source["csv_rows"] == table.num_rows
    assert collected["dataset_metadata"]["rows"] == table.num_rows
    shards = list_shards(output / "artifacts" / "source_dataset" / "ingested")
    genes = [pq.read_table(p, columns=["gene_id"])["gene_id"].to_pylist() for p in shards]
    assert all(g == sorted(g) for g in genes)
    assert collected["holdout_evaluation"]["logloss"] < collected["holdout_evaluation"]["baseline_logloss"]
