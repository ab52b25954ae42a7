"""The dataset stages hand their memory guard's check to the ingest and the scan."""

import dagster as dg
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
