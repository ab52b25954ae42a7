import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memopt_pipeline.core.data import dataset as dataset_module
from memopt_pipeline.core.data.dataset import DatasetError, list_shards, scan_dataset
from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN


def _scan(folder, tmp_path, **kwargs):
    return scan_dataset(
        list_shards(folder), gene_column="gene", label_column="label",
        gene_stats_path=tmp_path / "stats.parquet", **kwargs,
    )


def _write(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_metadata_of_the_demo_dataset(tiny_metadata, tiny_dataset):
    meta = tiny_metadata
    assert meta.classes == ["neither", "donor", "acceptor"]
    assert meta.gene_column == GENE_COLUMN and meta.label_column == LABEL_COLUMN
    total_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in list_shards(tiny_dataset))
    assert meta.n_rows == total_rows == sum(meta.class_counts)
    assert meta.n_genes == 36
    for column in ("gene_id", "transcript_id", "chrom", "strand", "position", "splice_type"):
        assert column in meta.excluded_columns and column not in meta.features
    assert "donor_score" in meta.features and "acceptor_score" in meta.features
    stats = meta.read_gene_stats()
    assert stats["rows"].sum() == meta.n_rows
    assert stats.columns == ["gene", "rows", "n_class_0", "n_class_1", "n_class_2"]
    assert meta.raw_float32_bytes == meta.n_rows * meta.n_features * 4


def test_missing_label_column_names_file_and_fix(tmp_path):
    _write(tmp_path / "d" / "a.parquet", gene=["g1"], x=[1.0])
    with pytest.raises(DatasetError, match=r"a\.parquet: label column 'label' not found.*set the label column"):
        _scan(tmp_path / "d", tmp_path)


def test_empty_shard_is_an_error(tmp_path):
    _write(tmp_path / "d" / "a.parquet", gene=["g1", "g2"], label=[0, 1], x=[1.0, 2.0])
    pq.write_table(pa.table({"gene": pa.array([], pa.string()), "label": pa.array([], pa.int64()), "x": pa.array([], pa.float64())}), tmp_path / "d" / "b.parquet")
    with pytest.raises(DatasetError, match=r"b\.parquet has no rows"):
        _scan(tmp_path / "d", tmp_path)


def test_corrupt_shard_is_an_error(tmp_path):
    _write(tmp_path / "d" / "a.parquet", gene=["g1", "g2"], label=[0, 1], x=[1.0, 2.0])
    (tmp_path / "d" / "b.parquet").write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(DatasetError, match=r"b\.parquet is not a readable Parquet file"):
        _scan(tmp_path / "d", tmp_path)


def test_type_conflict_names_column_and_both_files(tmp_path):
    _write(tmp_path / "d" / "a.parquet", gene=["g1"], label=[0], x=[1.0])
    _write(tmp_path / "d" / "b.parquet", gene=["g2"], label=[1], x=["oops"])
    with pytest.raises(DatasetError, match=r"column 'x' is string in .*b\.parquet but numeric"):
        _scan(tmp_path / "d", tmp_path)


def test_single_class_is_an_error(tmp_path):
    _write(tmp_path / "d" / "a.parquet", gene=["g1", "g2"], label=[0, 0], x=[1.0, 2.0])
    with pytest.raises(DatasetError, match="single class"):
        _scan(tmp_path / "d", tmp_path)


def test_null_labels_are_an_error(tmp_path):
    _write(tmp_path / "d" / "a.parquet", gene=["g1", "g2"], label=pa.array([0, None]), x=[1.0, 2.0])
    with pytest.raises(DatasetError, match="null 'label'"):
        _scan(tmp_path / "d", tmp_path)


def test_schema_drift_is_reported_per_shard(tmp_path):
    _write(tmp_path / "d" / "a.parquet", gene=["g1", "g1"], label=[0, 1], x=[1.0, 2.0], y=[3.0, 4.0])
    _write(tmp_path / "d" / "b.parquet", gene=["g2", "g2"], label=[1, 0], x=[5.0, 6.0])
    meta = _scan(tmp_path / "d", tmp_path)
    assert meta.features == ["x", "y"]
    assert [s.missing_features for s in meta.shards] == [[], ["y"]]


def test_exclusions_and_integer_labels(tmp_path):
    _write(tmp_path / "d" / "a.parquet", gene=["g1", "g2", "g2"], label=[2, 0, 1], x=[1.0, 2.0, 3.0], leak=[2, 0, 1], position=[1, 2, 3])
    meta = _scan(tmp_path / "d", tmp_path, exclude_columns=["leak"])
    assert meta.features == ["x"]
    assert meta.classes == [0, 1, 2]
    assert meta.excluded_columns["leak"] == "excluded by configuration"
    assert meta.excluded_columns["position"] == "identifier column"


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no \*\.parquet files"):
        list_shards(tmp_path / "empty")


class _Stop(Exception):
    """What a test's checkpoint raises, as the memory guard's check raises MemoryBudgetExceeded."""


def test_checkpoint_runs_per_batch_of_gene_and_label_values(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "_METADATA_SCAN_BATCH_ROWS", 300)  # several batches per shard
    shards = list_shards(tiny_dataset)
    batches = sum(
        sum(1 for _ in pq.ParquetFile(path).iter_batches(batch_size=300, columns=[GENE_COLUMN])) for path in shards
    )
    assert batches > len(shards)
    calls = []
    scan_dataset(
        shards, gene_column=GENE_COLUMN, label_column=LABEL_COLUMN, gene_stats_path=tmp_path / "stats.parquet",
        checkpoint=lambda: calls.append(1),
    )
    assert len(calls) == batches + 1  # and once the per-gene counts are merged


def test_a_checkpoint_that_raises_stops_the_scan_part_way(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "_METADATA_SCAN_BATCH_ROWS", 300)
    calls, lines = [], []

    def checkpoint():
        calls.append(1)
        if len(calls) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        scan_dataset(
            list_shards(tiny_dataset), gene_column=GENE_COLUMN, label_column=LABEL_COLUMN,
            gene_stats_path=tmp_path / "stats.parquet", checkpoint=checkpoint, progress=lines.append,
        )
    assert not lines  # stopped inside the first shard
    assert not (tmp_path / "stats.parquet").exists()
