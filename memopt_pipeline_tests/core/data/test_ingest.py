import gzip
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from memopt_pipeline.core.data.dataset import DatasetError, list_shards, scan_dataset
from memopt_pipeline.core.data.ingest import IngestResult, find_csv_inputs, ingest_csv, is_csv_input
from memopt_pipeline.core.data.ingest import progress as ingest_progress
from memopt_pipeline.core.data.ingest import run as ingest_run
from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN, SyntheticSpec, generate_dataset
from memopt_pipeline.core.memory.measure import kernel_peak_rss_bytes, process_rss_bytes, reset_kernel_peak
from memopt_pipeline.core.memory.release import release_memory
from memopt_pipeline.core.units import GiB
from memopt_pipeline_tests.core.data.csv_files import HEADER, simple_rows, write_rows

MB = 10**6
SPEC = SyntheticSpec(n_genes=24, kmer_sizes=(1, 2), genes_per_shard=8, row_group_rows=500, seed=5)
SMALL_BLOCK = 64 * 1024  # several blocks per test CSV, so block boundaries are exercised


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> pa.Table:
    """The generated dataset's rows, shuffled so genes are not in order."""
    folder = tmp_path_factory.mktemp("synthetic")
    table = pa.concat_tables(pq.read_table(path) for path in generate_dataset(folder, SPEC))
    order = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = table.take(pa.array(order))
    assert shuffled.column(GENE_COLUMN).to_pylist() != sorted(shuffled.column(GENE_COLUMN).to_pylist())
    return shuffled


@pytest.fixture(scope="module")
def source_csv(source, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("csv") / "rows.csv"
    pacsv.write_csv(source, path)
    return path


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(GENE_COLUMN, "ascending"), ("position", "ascending")])


def _read_all(shards) -> pa.Table:
    return pa.concat_tables(pq.read_table(path) for path in shards)


def _ingest(csv, out, **kwargs) -> IngestResult:
    kwargs.setdefault("block_bytes", SMALL_BLOCK)
    kwargs.setdefault("budget_bytes", GiB)
    return ingest_csv(csv, out, gene_column=GENE_COLUMN, **kwargs)


def test_round_trip_gives_gene_sorted_disjoint_shards_with_the_same_rows(source, source_csv, tmp_path):
    out = tmp_path / "out"
    lines = []
    rows_per_shard = source.num_rows // 4
    result = _ingest(source_csv, out, rows_per_shard=rows_per_shard, progress=lines.append)

    assert result.rows == source.num_rows
    assert result.genes == SPEC.n_genes
    assert result.input_bytes == source_csv.stat().st_size
    assert result.peak_rss_bytes > 0 and result.seconds > 0
    assert len(result.shards) >= 3
    assert [p.name for p in result.shards] == [f"part-{i:05d}.parquet" for i in range(len(result.shards))]
    assert list_shards(out) == result.shards  # no spill files or other leftovers look like shards
    assert not list(out.glob(".ingest-spill-*"))

    previous_last = None
    for shard in result.shards:
        parquet = pq.ParquetFile(shard)
        assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
        table = parquet.read()
        genes = table.column(GENE_COLUMN).to_pylist()
        assert table.equals(_sorted(table)), f"{shard.name} is not sorted by gene, position"
        if previous_last is not None:
            assert previous_last < genes[0], "gene ranges must increase and never share a gene"
        previous_last = genes[-1]

    output = _read_all(result.shards)
    features = SPEC.feature_columns()
    for name in features:
        arrow_type = output.schema.field(name).type
        assert pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type), (name, arrow_type)
    assert pa.types.is_integer(output.schema.field("position").type)
    # Same multiset of rows: every value round-trips through CSV exactly (float32 -> shortest text).
    assert _sorted(output.cast(source.schema)).equals(_sorted(source))

    metadata = scan_dataset(
        list_shards(out), gene_column=GENE_COLUMN, label_column=LABEL_COLUMN, gene_stats_path=tmp_path / "stats.parquet"
    )
    assert metadata.n_rows == source.num_rows
    assert metadata.n_genes == SPEC.n_genes
    assert set(metadata.features) == set(features)

    assert any(" -> " in line and "shards of ~" in line for line in lines), lines
    assert sum(": shard " in line for line in lines) == len(result.shards)
    assert (out / "_ingest.json").exists()


def test_folder_of_two_csvs_gives_the_same_shards_as_one_csv(source, source_csv, tmp_path):
    folder = tmp_path / "csvs"
    folder.mkdir()
    half = source.num_rows // 2
    pacsv.write_csv(source.slice(0, half), folder / "a.csv")
    with gzip.open(folder / "b.csv.gz", "wb") as compressed:  # a .csv.gz as the second file
        pacsv.write_csv(source.slice(half), compressed)

    assert is_csv_input(folder) and is_csv_input(source_csv)
    assert find_csv_inputs(folder) == [folder / "a.csv", folder / "b.csv.gz"]

    rows_per_shard = source.num_rows // 4
    single = _ingest(source_csv, tmp_path / "single", rows_per_shard=rows_per_shard)
    split = _ingest(folder, tmp_path / "split", rows_per_shard=rows_per_shard)
    assert split.rows == single.rows and split.genes == single.genes
    assert [p.name for p in split.shards] == [p.name for p in single.shards]
    for a, b in zip(single.shards, split.shards):
        assert pq.read_table(a).equals(pq.read_table(b))

    (folder / "stray.parquet").write_bytes(b"")
    assert not is_csv_input(folder)
    assert not is_csv_input(tmp_path / "missing")


def test_find_csv_inputs_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        find_csv_inputs(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no \\*.csv"):
        find_csv_inputs(tmp_path)
    (tmp_path / "x.tsv").write_text("a\n1\n")
    with pytest.raises(DatasetError, match="not a .csv"):
        find_csv_inputs(tmp_path / "x.tsv")


def test_second_call_reuses_and_a_changed_source_reingests(source, tmp_path):
    csv = tmp_path / "rows.csv"
    pacsv.write_csv(source, csv)
    out = tmp_path / "out"
    first = _ingest(csv, out, rows_per_shard=source.num_rows // 4)
    mtimes = {p: p.stat().st_mtime_ns for p in first.shards}
    first_rows = _sorted(_read_all(first.shards))

    lines = []
    again = _ingest(csv, out, rows_per_shard=source.num_rows // 4, progress=lines.append)
    assert any("reusing" in line for line in lines)
    assert again.shards == first.shards and again.rows == first.rows and again.genes == first.genes
    assert {p: p.stat().st_mtime_ns for p in again.shards} == mtimes

    # Touch the source: a new mtime re-ingests; a different layout leaves no stale shard behind.
    stat = csv.stat()
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    lines.clear()
    redone = _ingest(csv, out, rows_per_shard=source.num_rows // 2, progress=lines.append)
    assert not any("reusing" in line for line in lines)
    assert len(redone.shards) < len(first.shards)
    assert list_shards(out) == redone.shards
    assert _sorted(_read_all(redone.shards)).equals(first_rows)

    # A changed size re-ingests too.
    with open(csv, "a") as handle:
        handle.write(",".join(["G999999"] + ["0"] * (source.num_columns - 1)) + "\n")
    grown = _ingest(csv, out, rows_per_shard=source.num_rows // 2)
    assert grown.rows == source.num_rows + 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing_gene.csv", "gen,position,label\nG1,1,a\n",
         "gene column 'gene' not found; columns found: 'gen', 'position'"),
        ("header_only.csv", HEADER + "\n", "no data rows"),
        ("zero_bytes.csv", "", "is empty"),
        ("malformed.csv", HEADER + "\nG1,1,0,0.5\nG2,2,0,0.5,EXTRA\nG3,3,0,0.5\n", "malformed CSV line"),
        ("short_line.csv", HEADER + "\nG1,1,0,0.5\nG2,2\n", "malformed CSV line"),
        ("empty_gene.csv", HEADER + "\nG1,1,0,0.5\n,2,0,0.5\n", "empty 'gene' \\(first: data row 2\\)"),
        ("blank_gene.csv", HEADER + "\nG1,1,0,0.5\n  ,2,0,0.5\n", "empty 'gene'"),
    ],
)
def test_bad_input_raises_dataset_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "out"
    threads_before = threading.active_count()
    with pytest.raises(DatasetError, match=message) as raised:
        ingest_csv(path, out, gene_column="gene", budget_bytes=GiB)
    assert name in str(raised.value)
    assert not list(out.glob(".ingest-spill-*"))
    assert threading.active_count() == threads_before


def test_files_with_different_columns_are_rejected(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_rows(folder / "a.csv", HEADER, simple_rows(10))
    write_rows(folder / "b.csv", "gene,position,label,other", simple_rows(10))
    expected = r"b\.csv: columns differ from .*a\.csv: missing \['score'\], extra \['other'\]"
    with pytest.raises(DatasetError, match=expected):
        ingest_csv(folder, tmp_path / "out", gene_column="gene", budget_bytes=GiB)


def test_folder_files_may_order_columns_differently_and_be_empty(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_rows(folder / "a.csv", HEADER, simple_rows(300))
    reordered = [",".join(np.array(r.split(","))[[3, 0, 2, 1]]) for r in simple_rows(200, start=300)]
    write_rows(folder / "b.csv", "score,gene,label,position", reordered)
    write_rows(folder / "c.csv", HEADER, [])  # header only: skipped with a note
    lines = []
    result = ingest_csv(folder, tmp_path / "out", gene_column="gene", budget_bytes=GiB, rows_per_shard=100,
                        block_bytes=2048, progress=lines.append)
    table = _read_all(result.shards)
    assert table.column_names == ["gene", "position", "label", "score"]
    assert table.num_rows == 500 and sorted(table.column("position").to_pylist()) == list(range(500))
    assert any("c.csv has a header but no rows" in line for line in lines)


def test_a_value_that_does_not_fit_the_first_blocks_type_widens_the_column(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [f"G{i % 40:03d},{i},{i % 5},{i % 3},{i % 2}" for i in range(2000)]
    rows[1500] = "G001,1500,0.5,X,1"  # 'value' gets a fraction, 'chrom' a letter, blocks after the first
    header = "gene,position,value,chrom,count"
    write_rows(folder / "a.csv", header, rows)
    write_rows(folder / "b.csv", header, ["G002,5000,7,Y,1.25"])  # 'count' widens in the second file
    lines = []
    result = ingest_csv(folder, tmp_path / "out", gene_column="gene", budget_bytes=GiB, rows_per_shard=500,
                        block_bytes=4096, progress=lines.append)
    table = _read_all(result.shards)
    schema = table.schema
    assert schema.field("value").type == pa.float64()
    assert schema.field("chrom").type == pa.string()
    assert schema.field("count").type == pa.float64()
    assert schema.field("position").type == pa.int64()
    assert table.num_rows == 2001
    by_position = {row["position"]: row for row in table.to_pylist()}
    assert by_position[1500] == {"gene": "G001", "position": 1500, "value": 0.5, "chrom": "X", "count": 1.0}
    assert by_position[5000] == {"gene": "G002", "position": 5000, "value": 7.0, "chrom": "Y", "count": 1.25}
    # Rows spilled before a column was widened are converted, not lost.
    assert by_position[7] == {"gene": "G007", "position": 7, "value": 2.0, "chrom": "1", "count": 1.0}
    notes = sorted(line for line in lines if "reading it as" in line)  # block-1 order varies: parallel conversion
    assert len(notes) == 3
    assert "column 'chrom' of a.csv holds 'X'" in notes[0] and "reading it as string" in notes[0]
    assert "column 'count' of b.csv holds '1.25'" in notes[1] and "reading it as double" in notes[1]
    assert "column 'value' of a.csv holds '0.5'" in notes[2] and "reading it as double" in notes[2]


def test_many_ranges_are_routed_in_sweeps_with_the_same_result(source, source_csv, tmp_path, monkeypatch):
    rows_per_shard = source.num_rows // 6
    normal = _ingest(source_csv, tmp_path / "normal", rows_per_shard=rows_per_shard)
    monkeypatch.setattr(ingest_run, "max_open_spills", lambda: 2)
    lines = []
    swept = _ingest(source_csv, tmp_path / "swept", rows_per_shard=rows_per_shard, progress=lines.append)
    assert any("reads the input" in line for line in lines)
    assert len(swept.shards) == len(normal.shards) >= 5
    for a, b in zip(normal.shards, swept.shards):
        assert pq.read_table(a).equals(pq.read_table(b))


def test_progress_reports_rows_rate_eta_and_rss(source_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_progress, "PROGRESS_INTERVAL_S", 0.0)
    lines = []
    _ingest(source_csv, tmp_path / "out", rows_per_shard=10_000, block_bytes=16 * 1024, progress=lines.append)
    assert lines[0].startswith("ingest: 0.00 GiB in 1 CSV file(s)")
    pass1 = [line for line in lines if line.startswith("ingest pass 1/2")]
    pass2 = [line for line in lines if line.startswith("ingest pass 2/2")]
    assert pass1 and pass2
    assert "rows/s" in pass1[-1] and "GiB" in pass1[-1]
    assert "ETA" in pass2[-1] and "/1.00 GiB" in pass2[-1]


# --- memory ---------------------------------------------------------------------------------

BIG_ROWS = 300_000
BIG_FEATURES = 50
BIG_GENES = 2_000
# Bound on the ingest's RSS growth (4 MiB blocks, 50,000-row shards): measured ~125-180 MB,
# flat in the file size (a 3x bigger file: 141 MB), most of it allocator caches on top of
# ~50 MB of live Arrow memory. Reading the same file whole with pyarrow.csv.read_csv costs
# ~415 MB (measured in a subprocess below, and asserted to exceed the bound).
BIG_BOUND = 250 * MB

_WHOLE_FILE_COST = """
import sys
import pyarrow.csv
from memopt_pipeline.core.memory.measure import kernel_peak_rss_bytes, process_rss_bytes, reset_kernel_peak
from memopt_pipeline.core.memory.release import release_memory
release_memory()
before = process_rss_bytes()
assert reset_kernel_peak()
table = pyarrow.csv.read_csv(sys.argv[1])
print(kernel_peak_rss_bytes() - before)
"""


def _write_big_csv(path: Path) -> None:
    rng = np.random.default_rng(1)
    genes = np.array([f"GENE{i:05d}" for i in range(BIG_GENES)])
    schema = pa.schema([("gene_id", pa.string()), ("position", pa.int64())]
                       + [(f"f{i}", pa.float64()) for i in range(BIG_FEATURES)])
    chunk = 25_000
    with pacsv.CSVWriter(path, schema) as writer:
        for _ in range(0, BIG_ROWS, chunk):
            columns = [pa.array(genes[rng.integers(0, BIG_GENES, chunk)]), pa.array(rng.integers(0, 10**8, chunk))]
            # 6 decimals: ~9 characters per value, ~150 MB for the file.
            columns += [pa.array(np.round(rng.random(chunk), 6)) for _ in range(BIG_FEATURES)]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))


def test_memory_is_bounded_by_blocks_not_by_the_file(tmp_path):
    csv = tmp_path / "big.csv"
    _write_big_csv(csv)
    assert csv.stat().st_size > 130 * MB

    release_memory()
    rss_before = process_rss_bytes()
    kernel_peak = reset_kernel_peak()
    result = ingest_csv(csv, tmp_path / "out", gene_column="gene_id", budget_bytes=GiB,
                        block_bytes=4 * 2**20, rows_per_shard=50_000)
    sampled_growth = result.peak_rss_bytes - rss_before
    kernel_growth = kernel_peak_rss_bytes() - rss_before if kernel_peak else None

    whole_file = None
    if kernel_peak:  # what holding the file costs, in a fresh process (VmHWM needs /proc)
        command = [sys.executable, "-c", _WHOLE_FILE_COST, str(csv)]
        whole_file = int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    print(f"\ningest of a {csv.stat().st_size / MB:.0f} MB CSV in {result.seconds:.1f} s: RSS growth sampled "
          f"{sampled_growth / MB:.0f} MB, kernel peak {kernel_growth and kernel_growth / MB:.0f} MB; "
          f"read_csv of the whole file: {whole_file and whole_file / MB:.0f} MB")

    assert result.rows == BIG_ROWS and result.genes == BIG_GENES
    assert len(result.shards) >= 6
    assert sampled_growth < BIG_BOUND
    if kernel_growth is not None:  # VmHWM also catches spikes between the per-block samples
        assert kernel_growth < BIG_BOUND
    if whole_file is not None:  # the test discriminates: holding the file would fail it
        assert whole_file > 1.3 * BIG_BOUND


class _Stop(Exception):
    """What a test's checkpoint raises, as the memory guard's check raises MemoryBudgetExceeded."""


def test_checkpoint_runs_per_block_of_both_passes_and_per_shard_written(source, source_csv, tmp_path):
    callers = []
    result = _ingest(
        source_csv, tmp_path / "out", rows_per_shard=source.num_rows // 4,
        checkpoint=lambda: callers.append(sys._getframe(1).f_code.co_name),
    )
    counts = Counter(callers)
    assert set(counts) == {"count_genes", "spill", "write_shards"}
    assert counts["count_genes"] >= 3  # every block of pass 1, not once per file
    assert counts["spill"] == counts["count_genes"]  # the same blocks again in pass 2
    assert counts["write_shards"] >= 2 * len(result.shards)  # each shard read, then each row group written


def test_a_checkpoint_that_raises_stops_the_ingest_part_way_and_cleans_up(source, source_csv, tmp_path):
    out = tmp_path / "out"
    calls, lines = [], []

    def checkpoint():
        calls.append(1)
        if len(calls) == 5:
            raise _Stop

    with pytest.raises(_Stop):
        _ingest(source_csv, out, rows_per_shard=source.num_rows // 4, checkpoint=checkpoint, progress=lines.append)
    assert len(calls) == 5  # stopped at the check that raised
    assert not list(out.glob("part-*.parquet")) and not list(out.glob(".ingest-spill-*"))
    assert not any("shard 1/" in line for line in lines)
