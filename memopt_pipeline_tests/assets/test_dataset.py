"""The dataset stages hand their memory guard's check to the ingest, the re-shard and the scan;
a Parquet input that streams badly is re-sharded once, a well-formed one used as it is."""

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from memopt_pipeline.assets import ALL_ASSETS, dataset_metadata, source_dataset
from memopt_pipeline.assets import dataset as dataset_assets
from memopt_pipeline.core.data.dataset import list_shards
from memopt_pipeline.core.memory.monitor import StageMonitor
from memopt_pipeline.definitions import build_resources


def _recording(real, stages: list):
    """``real``, noting the stage whose monitor's check it was given as ``checkpoint``."""

    def call(*args, checkpoint=None, **kwargs):
        assert isinstance(getattr(checkpoint, "__self__", None), StageMonitor) and checkpoint.__name__ == "check"
        stages.append(checkpoint.__self__.stage)
        return real(*args, checkpoint=checkpoint, **kwargs)

    return call


def test_csv_ingest_and_the_scan_run_the_guards_check(tiny_dataset, tmp_path, monkeypatch):
    csv_path = tmp_path / "rows.csv"
    pacsv.write_csv(pa.concat_tables([pq.read_table(p) for p in list_shards(tiny_dataset)]), csv_path)
    stages = []
    monkeypatch.setattr(dataset_assets, "ingest_csv", _recording(dataset_assets.ingest_csv, stages))
    monkeypatch.setattr(dataset_assets, "scan_dataset", _recording(dataset_assets.scan_dataset, stages))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ALL_ASSETS, selection=[source_dataset, dataset_metadata], instance=instance,
            resources=build_resources(output_dir=str(tmp_path / "out")),
            run_config={"ops": {"source_dataset": {"config": {"path": str(csv_path)}}}},
        )
    assert result.success
    assert stages == ["csv_ingest", "dataset_metadata"]


def _materialize(instance, tmp_path, path):
    return dg.materialize(
        ALL_ASSETS, selection=[source_dataset, dataset_metadata], instance=instance,
        resources=build_resources(output_dir=str(tmp_path / "out")),
        run_config={"ops": {"source_dataset": {"config": {"path": str(path)}}}},
    )


def _source_metadata(instance) -> dict:
    record = instance.fetch_materializations(source_dataset.key, limit=1).records[0]
    return {key: entry.value for key, entry in record.asset_materialization.metadata.items()}


def test_a_pandas_parquet_file_is_resharded_once_and_well_formed_shards_are_used_as_they_are(
    tiny_dataset, tmp_path, monkeypatch
):
    rows = 140_000  # one row group (pandas writes up to 1,048,576 rows a group): over the 131,072 limit
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "gene_id": [f"ENSG{i:05d}" for i in rng.integers(0, 400, rows)],
        "splice_type": rng.choice(["neither", "donor", "acceptor"], rows),
        "f0": rng.random(rows).astype(np.float32),
        "f1": rng.random(rows),
    })
    path = tmp_path / "sites.parquet"
    frame.to_parquet(path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1

    stages = []
    monkeypatch.setattr(dataset_assets, "reshard_parquet", _recording(dataset_assets.reshard_parquet, stages))
    monkeypatch.setattr(dataset_assets, "scan_dataset", _recording(dataset_assets.scan_dataset, stages))
    resharded = tmp_path / "out" / "artifacts" / "source_dataset" / "resharded"
    with dg.instance_for_test() as instance:
        result = _materialize(instance, tmp_path, path)
        assert result.success
        assert stages == ["parquet_reshard", "dataset_metadata"]
        value = result.output_for_node("source_dataset")
        assert value["path"] == str(resharded.resolve())
        assert value["shards"] == [str(p.resolve()) for p in list_shards(resharded)]
        for shard in value["shards"]:
            parquet = pq.ParquetFile(shard)
            assert max(parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)) <= 65_536
            genes = parquet.read(columns=["gene_id"]).column(0).to_pylist()
            assert genes == sorted(genes)
        metadata = _source_metadata(instance)
        assert metadata["resharded_from_parquet"] is True and metadata["input_rows"] == rows
        assert "its only row group holds 140,000 rows" in metadata["reshard_reason"]
        assert result.output_for_node("dataset_metadata")["n_rows"] == rows

        # The next run reuses the shards; nothing is rewritten.
        mtimes = {p: p.stat().st_mtime_ns for p in list_shards(resharded)}
        assert _materialize(instance, tmp_path, path).success
        assert {p: p.stat().st_mtime_ns for p in list_shards(resharded)} == mtimes

        # Generated, gene-sorted shards with small row groups are read where they are.
        stages.clear()
        result = _materialize(instance, tmp_path, tiny_dataset)
        assert result.success and stages == ["dataset_metadata"]
        assert result.output_for_node("source_dataset")["path"] == str(tiny_dataset.resolve())
        assert _source_metadata(instance)["resharded_from_parquet"] is False
