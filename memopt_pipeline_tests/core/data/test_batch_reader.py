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


def test_conversion_matches_a_direct_read_across_column_blocks_types_and_nulls(tmp_path):
    rng = np.random.default_rng(0)
    n = 700
    columns = {"gene": pa.array(np.repeat([f"g{i:02d}" for i in range(7)], 100)), "label": pa.array(rng.integers(0, 3, n))}
    expected = []
    for j in range(37):  # more than two blocks of columns, the last one partial
        values = rng.normal(size=n)
        if j % 3 == 0:
            array = pa.array(values, type=pa.float64())
        elif j % 3 == 1:
            array = pa.array((values * 10).astype(np.int64))
        else:
            mask = rng.random(n) < 0.1
            array = pa.array(values.astype(np.float32), mask=mask)
        columns[f"f{j}"] = array
        expected.append(np.asarray(array.to_pandas(), dtype=np.float32))
    meta = _meta(tmp_path, a=pa.table(columns))
    matrix = np.concatenate([b.features for b in BatchReader(meta).iter_batches([f"g{i:02d}" for i in range(7)], 256)])
    np.testing.assert_array_equal(matrix, np.column_stack(expected))


def _many_row_groups(tmp_path, row_group_size):
    rng = np.random.default_rng(1)
    genes = np.repeat([f"g{i:03d}" for i in range(200)], 50)  # 10,000 rows, sorted by gene
    table = pa.table({"gene": genes, "label": rng.integers(0, 3, len(genes)), **{f"f{j}": rng.normal(size=len(genes)) for j in range(5)}})
    folder = tmp_path / "d"
    folder.mkdir()
    pq.write_table(table, folder / "a.parquet", row_group_size=row_group_size)
    return scan_dataset(list_shards(folder), gene_column="gene", label_column="label", gene_stats_path=tmp_path / "s.parquet")


def test_bin_sample_reads_a_seeded_sample_not_the_whole_instance(tmp_path):
    meta = _many_row_groups(tmp_path, row_group_size=250)
    genes = [f"g{i:03d}" for i in range(0, 200, 2)]  # 5,000 rows
    reader = BatchReader(meta)
    sample = reader.sample_rows(genes, 1_000, seed=3, spread=4)
    assert sample.shape == (1_000, 5) and sample.dtype == np.float32
    # Spread 4: ~4,000 rows scanned (plus one row group), not all 10,000; half of each row
    # group is of other genes, so 2,000 rows of the genes decoded for 1,000 kept.
    assert reader.stats.rows_scanned <= 4_250
    every_row = np.concatenate([b.features for b in BatchReader(meta).iter_batches(genes, 4096)])
    assert {tuple(r) for r in sample} <= {tuple(r) for r in every_row}  # rows of the requested genes only
    np.testing.assert_array_equal(sample, BatchReader(meta).sample_rows(genes, 1_000, seed=3, spread=4))  # seeded
    assert not np.array_equal(sample, BatchReader(meta).sample_rows(genes, 1_000, seed=4, spread=4))
    # Drawn across the instance, not its first row groups: the sample's rows come from many genes.
    gene_of_first_value = {r[0]: g for r, g in zip(every_row, np.repeat(genes, 50))}
    sampled = sorted(int(gene_of_first_value[r[0]][1:]) for r in sample)
    assert len(set(sampled)) >= 30 and sampled[-1] - sampled[0] > 100  # 16 random row groups of 40
    # Spread: the same sample size from more genes than whole row groups give.
    narrow_reader = BatchReader(meta)
    narrow = narrow_reader.sample_rows(genes, 1_000, seed=3, spread=1)
    assert len({gene_of_first_value[r[0]] for r in narrow}) < len(set(sampled))
    # Spread 1 still delivers the rows asked for: 1,000 rows of the genes, ~2,000 scanned.
    assert len(narrow) == 1_000 and narrow_reader.stats.rows_scanned <= 2_250
    assert len(BatchReader(meta).sample_rows(genes, 10_000, seed=0)) == 5_000  # fewer rows than asked: all


def test_bin_sample_of_genes_scattered_among_others_decodes_what_it_needs(tmp_path):
    """An ensemble's instance holds a few genes of every row group: the sample takes every row
    of them it decodes instead of decoding spread x more rows of them."""
    meta = _many_row_groups(tmp_path, row_group_size=250)
    genes = [f"g{i:03d}" for i in range(0, 200, 5)]  # 40 genes, a fifth of each row group: 2,000 rows
    reader = BatchReader(meta)
    sample = reader.sample_rows(genes, 500, seed=1, spread=4)
    assert len(sample) == 500
    # ~500 rows of the genes from ~2,500 scanned (4 x 500 x a fifth < 500), not 4 x 500 of
    # them from ~10,000 scanned.
    assert reader.stats.rows_scanned <= 2_500 + 250


def test_bin_sample_of_one_huge_row_group_stops_early(tmp_path):
    meta = _many_row_groups(tmp_path, row_group_size=10_000)  # one row group, as pandas writes
    reader = BatchReader(meta)
    sample = reader.sample_rows([f"g{i:03d}" for i in range(200)], 500, seed=0, batch_rows=1_000)
    assert len(sample) == 500
    assert reader.stats.rows_scanned <= 4 * 500 + 1_000  # spread 4: 2,000 rows and one batch, not 10,000


def test_scattered_genes_with_ids_equal_a_polars_filter_with_and_without_read_ahead(tmp_path):
    """Non-contiguous wanted genes inside one row group (several runs per batch) deliver exactly
    a direct filter's rows, features, labels and ids, in file order; read-ahead changes nothing."""
    import polars as pl

    meta = _many_row_groups(tmp_path, row_group_size=1_000)  # 20 genes per row group
    wanted = [f"g{i:03d}" for i in (1, 2, 5, 9, 10, 11, 57, 120, 121, 199)]
    frame = pl.read_parquet(list_shards(tmp_path / "d")).with_row_index("row").filter(pl.col("gene").is_in(wanted))
    for read_ahead in (False, True):
        reader = BatchReader(meta, id_columns=(), read_ahead=read_ahead)
        batches = list(reader.iter_batches(wanted, batch_rows=512, with_ids=True))
        np.testing.assert_array_equal(
            np.concatenate([b.features for b in batches]), frame.select([f"f{j}" for j in range(5)]).to_numpy().astype(np.float32)
        )
        classes = {value: index for index, value in enumerate(meta.classes)}
        np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), [classes[v] for v in frame["label"]])
        assert [g for b in batches for g in b.ids.column("gene").to_pylist()] == frame["gene"].to_list()
        assert reader.stats.rows_read == frame.height


def test_read_ahead_stops_cleanly_when_the_consumer_stops_early(tiny_metadata):
    import threading

    genes = tiny_metadata.read_gene_stats()["gene"].to_list()
    batches = BatchReader(tiny_metadata).iter_batches(genes, batch_rows=16)
    next(batches)
    batches.close()  # e.g. a training step that failed after its first batch
    assert not [t for t in threading.enumerate() if t.name.startswith("parquet-read-ahead")]


def test_a_decoding_error_on_the_read_ahead_thread_reaches_the_caller(tmp_path):
    meta = _many_row_groups(tmp_path, row_group_size=1_000)
    shard = list_shards(tmp_path / "d")[0]
    data = bytearray(shard.read_bytes())
    data[200:4_000] = b"\x00" * 3_800  # the first row groups' pages, footer intact
    shard.write_bytes(bytes(data))
    rows = 0
    with pytest.raises((OSError, pa.ArrowException)):
        for batch in BatchReader(meta, read_ahead=True).iter_batches([f"g{i:03d}" for i in range(200)], batch_rows=512):
            rows += len(batch.labels)
    assert rows < 10_000  # the pass did not end as if the data were complete
