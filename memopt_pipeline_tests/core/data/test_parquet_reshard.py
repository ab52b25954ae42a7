"""Parquet input that streams badly (a pandas file: one huge row group, genes in any order) is
re-sharded once into gene-sorted shards with small row groups; well-formed input is left alone."""

import os
import sys
from collections import Counter

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.dataset import DatasetError, list_shards, scan_dataset
from memopt_pipeline.core.data.ingest import MAX_INPUT_ROW_GROUP_ROWS, parquet_layout, reshard_parquet, shard_writer
from memopt_pipeline.core.data.ingest import parquet_reshard as reshard_module
from memopt_pipeline.core.data.ingest import progress as ingest_progress
from memopt_pipeline.core.data.synthetic import SyntheticSpec, generate_dataset
from memopt_pipeline.core.units import GiB

GENE = "gene_id"
ROWS = 6_000
GENES = 30
SMALL_GROUP = 500  # row groups the re-shard writes here, so a shard has several


def _frame(rows: int = ROWS, seed: int = 0) -> pd.DataFrame:
    """Splice-site-like rows in random gene order, as a user's DataFrame would hold them."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        GENE: [f"ENSG{i:04d}" for i in rng.integers(0, GENES, rows)],
        "position": rng.integers(0, 10**7, rows),
        "splice_type": rng.choice(["neither", "donor", "acceptor"], rows),
        "strand": pd.Categorical(rng.choice(["+", "-"], rows)),
        "score32": rng.random(rows).astype(np.float32),
        "score64": rng.random(rows),
        "count": rng.integers(0, 50, rows),
    })
    return frame.sample(frac=1.0, random_state=seed)  # a shuffled index: pandas writes it as a column


@pytest.fixture
def pandas_file(tmp_path):
    path = tmp_path / "input" / "sites.parquet"
    path.parent.mkdir()
    _frame().to_parquet(path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    return path


@pytest.fixture(autouse=True)
def small_row_groups(monkeypatch):
    monkeypatch.setattr(shard_writer, "OUTPUT_ROW_GROUP_ROWS", SMALL_GROUP)


def _reshard(path, out, **kwargs):
    kwargs.setdefault("budget_bytes", GiB)
    kwargs.setdefault("rows_per_shard", ROWS // 4)
    return reshard_parquet(path, out, gene_column=GENE, **kwargs)


def _rows(paths) -> pl.DataFrame:
    """All rows as one frame in a canonical order (the pandas index column is unique)."""
    frame = pl.concat([pl.read_parquet(p) for p in paths], how="vertical_relaxed")
    return frame.with_columns(pl.col("strand").cast(pl.String)).sort("__index_level_0__")


def test_a_pandas_file_is_resharded_into_gene_sorted_shards_with_small_row_groups(pandas_file, tmp_path):
    layout = parquet_layout(pandas_file, gene_column=GENE, max_row_group_rows=2_000)
    assert layout.needs_reshard and "its only row group holds 6,000 rows" in layout.reason

    out = tmp_path / "out"
    lines = []
    result = _reshard(pandas_file, out, progress=lines.append)

    assert result.rows == ROWS and result.genes == GENES and len(result.shards) >= 3
    assert list_shards(out) == result.shards and (out / "_ingest.json").exists()
    assert not list(out.glob(".ingest-spill-*"))
    row_groups = [
        pq.ParquetFile(shard).metadata.row_group(i).num_rows
        for shard in result.shards
        for i in range(pq.ParquetFile(shard).metadata.num_row_groups)
    ]
    assert len(row_groups) >= 2 * len(result.shards) - 1 and max(row_groups) <= SMALL_GROUP
    previous_last = None
    for shard in result.shards:
        parquet = pq.ParquetFile(shard)
        table = parquet.read()
        genes = table.column(GENE).to_pylist()
        assert genes == sorted(genes), f"{shard.name} is not sorted by gene"
        if previous_last is not None:
            assert previous_last < genes[0], "gene ranges must increase and never share a gene"
        previous_last = genes[-1]
    assert pq.read_schema(result.shards[0]).field(GENE).type == pa.string()
    assert pq.read_schema(result.shards[0]).metadata is None  # pandas' index metadata is stale after a re-sort

    # The same rows, every column and value, as a multiset.
    assert_frame_equal(_rows(result.shards), _rows([pandas_file]))
    # What it wrote streams well: checked again, it would be left alone.
    assert not parquet_layout(out, gene_column=GENE, max_row_group_rows=2_000).needs_reshard
    assert any(line.startswith("reshard plan:") and " -> " in line for line in lines)
    assert sum(": shard " in line for line in lines) == len(result.shards)


def test_second_call_reuses_and_a_changed_input_is_resharded(pandas_file, tmp_path):
    out = tmp_path / "out"
    first = _reshard(pandas_file, out)
    mtimes = {p: p.stat().st_mtime_ns for p in first.shards}

    lines = []
    again = _reshard(pandas_file, out, progress=lines.append)
    assert any("reusing" in line for line in lines)
    assert again.shards == first.shards and again.rows == first.rows
    assert {p: p.stat().st_mtime_ns for p in again.shards} == mtimes

    stat = pandas_file.stat()  # touched: re-sharded, to fewer shards, nothing stale left
    os.utime(pandas_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    lines.clear()
    redone = _reshard(pandas_file, out, rows_per_shard=ROWS // 2, progress=lines.append)
    assert not any("reusing" in line for line in lines)
    assert len(redone.shards) < len(first.shards) and list_shards(out) == redone.shards
    assert_frame_equal(_rows(redone.shards), _rows([pandas_file]))

    _frame(rows=ROWS + 7, seed=3).to_parquet(pandas_file)  # new content
    changed = _reshard(pandas_file, out)
    assert changed.rows == ROWS + 7
    assert_frame_equal(_rows(changed.shards), _rows([pandas_file]))


def test_well_formed_input_is_left_alone(tmp_path):
    spec = SyntheticSpec(n_genes=12, kmer_sizes=(1,), genes_per_shard=4, row_group_rows=50, seed=3)
    generated = tmp_path / "generated"
    generate_dataset(generated, spec)
    assert pq.ParquetFile(list_shards(generated)[0]).metadata.num_row_groups > 1
    # Even with a threshold of the generator's row-group size: sorted, small row groups.
    layout = parquet_layout(generated, gene_column=GENE, max_row_group_rows=50)
    assert not layout.needs_reshard and layout.files == list_shards(generated)

    # A big gene spanning row groups of a sorted file is fine; the same rows shuffled are not.
    rows = pa.table({GENE: ["A"] * 900 + [f"B{i % 7}" for i in range(700)], "x": np.arange(1600.0)})
    pq.write_table(rows.sort_by(GENE), tmp_path / "sorted.parquet", row_group_size=200)
    assert not parquet_layout(tmp_path / "sorted.parquet", gene_column=GENE).needs_reshard
    shuffled = rows.take(np.random.default_rng(0).permutation(rows.num_rows))
    pq.write_table(shuffled, tmp_path / "shuffled.parquet", row_group_size=200)
    reason = parquet_layout(tmp_path / "shuffled.parquet", gene_column=GENE).reason
    assert reason is not None and "not grouped by gene" in reason

    # The default threshold: twice the largest reader batch; pandas' 1,048,576-row groups exceed it.
    assert MAX_INPUT_ROW_GROUP_ROWS == 131_072
    big = pa.table({GENE: pa.array(["G"] * 131_073), "x": pa.array(np.zeros(131_073))})
    pq.write_table(big.slice(0, 131_072), tmp_path / "at.parquet")
    pq.write_table(big, tmp_path / "over.parquet")
    assert not parquet_layout(tmp_path / "at.parquet", gene_column=GENE).needs_reshard
    assert parquet_layout(tmp_path / "over.parquet", gene_column=GENE).needs_reshard


def test_a_gene_subset_reads_fewer_rows_after_the_reshard(pandas_file, tmp_path):
    result = _reshard(pandas_file, tmp_path / "out")
    wanted = sorted({f"ENSG{i:04d}" for i in range(3)})

    def pass_over(shards, name):
        metadata = scan_dataset(
            shards, gene_column=GENE, label_column="splice_type", gene_stats_path=tmp_path / f"{name}.parquet"
        )
        reader = BatchReader(metadata)
        delivered = sum(len(batch.labels) for batch in reader.iter_batches(wanted, batch_rows=256))
        return metadata, reader.stats, delivered

    metadata, resharded, delivered = pass_over(result.shards, "resharded")
    _, raw, raw_delivered = pass_over([pandas_file], "raw")
    assert delivered == raw_delivered > 0
    assert raw.rows_scanned == ROWS and raw.row_groups_skipped == 0  # the one row group, decoded whole
    assert resharded.row_groups_skipped > 0
    assert resharded.rows_scanned < ROWS / 4  # 3 of 30 genes: about their row groups only
    assert metadata.n_rows == ROWS and metadata.n_genes == GENES


def test_wide_input_is_read_in_column_groups_and_many_ranges_in_sweeps(pandas_file, tmp_path, monkeypatch):
    normal = _reshard(pandas_file, tmp_path / "normal", rows_per_shard=ROWS // 6)
    monkeypatch.setattr(reshard_module, "max_open_spills", lambda: 2)
    monkeypatch.setattr(reshard_module, "READ_BUDGET_FRACTION", 1e-6)  # ~1 KiB of column readers: a column a group
    lines = []
    grouped = _reshard(pandas_file, tmp_path / "grouped", rows_per_shard=ROWS // 6, progress=lines.append)
    note = next(line for line in lines if "reads the input" in line)
    assert "column group(s)" in note and "every value once" in note
    groups = int(note.split("(")[1].split(" column group")[0])
    sweeps = int(note.split(", ")[1].split(" sweep")[0])
    assert groups >= 4 and sweeps >= 3
    assert len(grouped.shards) == len(normal.shards) >= 5
    for a, b in zip(normal.shards, grouped.shards):
        assert pq.read_table(a).equals(pq.read_table(b))


def test_a_folder_gets_the_union_of_columns_with_promoted_types(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    a = pa.table({GENE: ["g2", "g1", "g2"], "x": [1, 2, 3], "only_a": [0.5, 0.25, 0.125]})
    pq.write_table(a, folder / "a.parquet")
    b = pa.table({"x": [4.5, 5.5], GENE: ["g1", "g3"], "only_b": ["u", "v"]})  # other order, x a double
    pq.write_table(b, folder / "b.parquet")
    pq.write_table(pa.table({GENE: pa.array([], pa.string()), "x": pa.array([], pa.int64())}), folder / "c.parquet")
    lines = []
    result = _reshard(folder, tmp_path / "out", progress=lines.append)
    table = pa.concat_tables(pq.read_table(p) for p in result.shards)
    assert table.schema.names == [GENE, "x", "only_a", "only_b"]
    assert table.schema.field("x").type == pa.float64()
    assert table.to_pylist() == [
        {GENE: "g1", "x": 2.0, "only_a": 0.25, "only_b": None},
        {GENE: "g1", "x": 4.5, "only_a": None, "only_b": "u"},
        {GENE: "g2", "x": 1.0, "only_a": 0.5, "only_b": None},
        {GENE: "g2", "x": 3.0, "only_a": 0.125, "only_b": None},
        {GENE: "g3", "x": 5.5, "only_a": None, "only_b": "v"},
    ]
    assert any("c.parquet has no rows; skipping it" in line for line in lines)


def _corrupt_data_pages(path) -> None:
    """Overwrite part of the last column's compressed pages; the footer stays readable."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(pq.read_schema(path).names.index("x"))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    offset = start + chunk.total_compressed_size // 2
    data[offset:offset + 2000] = bytes(2000)
    path.write_bytes(bytes(data))


def _write(path, table, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kwargs)
    return path


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("no_gene.parquet", lambda p: _write(p, pa.table({"gene": ["a"], "x": [1.0]})),
         "gene column 'gene_id' not found; columns found: 'gene', 'x'. Set the gene column name"),
        ("zero_bytes.parquet", lambda p: p.write_bytes(b""), "is not a readable Parquet file"),
        ("garbage.parquet", lambda p: p.write_bytes(b"PAR1 not really"), "is not a readable Parquet file"),
        ("no_rows.parquet", lambda p: _write(p, pa.table({GENE: pa.array([], pa.string())})), "has no rows"),
        ("null_gene.parquet", lambda p: _write(p, pa.table({GENE: ["a", None, "b"]})),
         "empty 'gene_id' \\(first: data row 2\\)"),
        ("blank_gene.parquet", lambda p: _write(p, pa.table({GENE: ["a", "  "]})), "empty 'gene_id'"),
    ],
)
def test_bad_input_raises_dataset_error_naming_the_file(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=message) as raised:
        _reshard(path, out)
    assert name in str(raised.value)
    assert not list(out.glob(".ingest-spill-*"))


def test_a_failed_reshard_leaves_the_earlier_output_in_place(tmp_path):
    rng = np.random.default_rng(1)
    table = pa.table({GENE: [f"G{i:02d}" for i in rng.integers(0, 20, 20_000)], "x": rng.random(20_000)})
    path = _write(tmp_path / "in.parquet", table, compression="zstd")
    out = tmp_path / "out"
    before = _reshard(path, out, rows_per_shard=5_000)
    saved = {p.name: p.read_bytes() for p in out.iterdir()}

    _corrupt_data_pages(path)  # pass 1 (gene column only) reads fine, pass 2 does not
    with pytest.raises(DatasetError, match=r"in\.parquet: cannot read the Parquet data after row .*re-export it"):
        _reshard(path, out, rows_per_shard=5_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved  # shards and manifest untouched
    assert [p.name for p in list_shards(out)] == [p.name for p in before.shards]


def test_progress_lines_and_checkpoints(pandas_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_progress, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(reshard_module, "DEFAULT_BATCH_BYTES", 64 * 1024)  # several batches of ~60 B rows
    lines, callers = [], []
    result = _reshard(pandas_file, tmp_path / "out", budget_bytes=GiB, progress=lines.append,
                      checkpoint=lambda: callers.append(sys._getframe(1).f_code.co_name))
    assert lines[0].startswith("reshard: 0.00 GiB in 1 Parquet file(s)")
    pass1 = [line for line in lines if line.startswith("reshard pass 1/2")]
    pass2 = [line for line in lines if line.startswith("reshard pass 2/2")]
    assert pass1 and pass2 and "rows/s" in pass2[-1] and "/1.00 GiB" in pass2[-1]
    counts = Counter(callers)
    assert set(counts) == {"count_genes", "spill", "write_shards"}
    assert counts["count_genes"] == 1 and counts["spill"] >= 5  # per batch, not per file
    assert counts["write_shards"] >= 2 * len(result.shards)


def test_a_checkpoint_that_raises_stops_and_cleans_up(pandas_file, tmp_path):
    class Stop(Exception):
        pass

    calls = []

    def checkpoint():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        _reshard(pandas_file, out, checkpoint=checkpoint)
    assert not list(out.glob("part-*.parquet")) and not list(out.glob(".ingest-spill-*"))
    assert not (out / "_ingest.json").exists()
