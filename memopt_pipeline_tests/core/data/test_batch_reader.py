import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.dataset import DatasetError, list_shards, scan_dataset


def test_batches_hold_only_requested_genes_in_bounded_float32(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    genes = stats["gene"].to_list()[5:9]
    reader = BatchReader(tiny_metadata)
    batches = list(reader.iter_batches(genes, batch_rows=300, with_ids=True))
    assert batches
    for batch in batches:
        assert batch.features.dtype == np.float32 and batch.features.flags["C_CONTIGUOUS"]
        assert 0 < len(batch.features) <= 300
        assert batch.features.shape[1] == tiny_metadata.n_features
        assert set(batch.ids["gene_id"].to_pylist()) <= set(genes)
        assert len(batch.labels) == len(batch.features) == batch.ids.num_rows
    expected_rows = int(stats.filter(stats["gene"].is_in(genes))["rows"].sum())
    assert reader.stats.rows_read == expected_rows == reader.count_rows(genes)
    # Row groups of other genes were skipped from their statistics, not decoded.
    assert reader.stats.row_groups_skipped > 0
    assert reader.stats.rows_scanned < tiny_metadata.n_rows


def test_labels_pass_lines_up_with_feature_pass(tiny_metadata):
    genes = tiny_metadata.read_gene_stats()["gene"].to_list()[::3]
    reader = BatchReader(tiny_metadata)
    labels = reader.read_labels(genes)
    streamed = np.concatenate([b.labels for b in reader.iter_batches(genes, batch_rows=128)])
    np.testing.assert_array_equal(labels, streamed)
    assert set(np.unique(labels)) == {0, 1, 2}


def test_values_equal_a_direct_read(tiny_metadata, tiny_dataset):
    gene = tiny_metadata.read_gene_stats()["gene"][0]
    reader = BatchReader(tiny_metadata)
    matrix = np.concatenate([b.features for b in reader.iter_batches([gene], batch_rows=64)])
    table = pq.read_table(list_shards(tiny_dataset)[0], filters=[("gene_id", "=", gene)])
    direct = np.column_stack([table[f].to_numpy().astype(np.float32) for f in tiny_metadata.features])
    np.testing.assert_array_equal(matrix, direct)


def test_checkpoint_is_called_per_batch(tiny_metadata):
    calls = []
    reader = BatchReader(tiny_metadata, checkpoint=lambda: calls.append(1))
    batches = list(reader.iter_batches(tiny_metadata.read_gene_stats()["gene"].to_list()[:3], batch_rows=100))
    assert len(calls) == len(batches) > 1


def _meta(tmp_path, **shards):
    folder = tmp_path / "d"
    folder.mkdir()
    for name, table in shards.items():
        pq.write_table(table, folder / f"{name}.parquet")
    return scan_dataset(list_shards(folder), gene_column="gene", label_column="label", gene_stats_path=tmp_path / "s.parquet")


def test_feature_missing_from_a_shard_reads_as_nan(tmp_path):
    meta = _meta(
        tmp_path,
        a=pa.table({"gene": ["g1", "g1"], "label": [0, 1], "x": [1.0, 2.0], "y": [3, 4]}),
        b=pa.table({"gene": ["g2", "g2"], "label": [1, 0], "x": [5.0, None]}),
    )
    batches = list(BatchReader(meta).iter_batches(["g1", "g2"], batch_rows=10))
    matrix = np.concatenate([b.features for b in batches])
    np.testing.assert_array_equal(matrix[:2], [[1, 3], [2, 4]])
    assert np.isnan(matrix[2:, 1]).all() and matrix[2, 0] == 5 and np.isnan(matrix[3, 0])


def test_infinite_values_are_a_clear_error(tmp_path):
    meta = _meta(tmp_path, a=pa.table({"gene": ["g1", "g2"], "label": [0, 1], "x": [1.0, float("inf")]}))
    with pytest.raises(DatasetError, match=r"column 'x' holds infinite values"):
        list(BatchReader(meta).iter_batches(["g1", "g2"], batch_rows=10))


def test_empty_gene_list_reads_nothing(tiny_metadata):
    reader = BatchReader(tiny_metadata)
    assert list(reader.iter_batches([], batch_rows=10)) == []
    assert reader.stats.rows_read == 0
