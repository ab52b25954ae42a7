"""``ingest_csv``: stream CSV input (a file, ``.csv.gz``, or a folder of them) into gene-sorted Parquet shards.

The input may be far bigger than memory, so nothing here ever holds a whole file: memory is
bounded by a few CSV blocks while reading (:mod:`.csv_blocks`; ``block_bytes`` is capped at
``budget_bytes / 64``) and by one output shard while writing (:mod:`.shard_writer`), and the
shard size follows from the memory budget (:mod:`.shard_plan`).

Column types are inferred once and shared by every block and file (:mod:`.columns`). A later
value that does not fit its column's inferred type widens that column as it is read
(:mod:`.csv_blocks`); the spill files written so far are cast to the wider type when their
shard is written.

Passes
------
1. **Gene counts** (cheap): only the gene column is converted
   (``ConvertOptions(include_columns=[gene_column])``); rows are counted per gene, and empty
   or null gene values are rejected. The sorted genes are then cut into ranges, one per shard
   (:mod:`.shard_plan`).
2. **Routing**: all columns are read; each block's rows are assigned to their range
   (``np.searchsorted`` of the block's distinct genes in the sorted range boundaries), the
   block is reordered by range once (``take``) and each range's slice is appended to that
   range's spill file (:mod:`.spills`). Memory stays at about one block. At most
   ``max_open_spills()`` spill files are open at once; with more ranges pass 2 runs in
   sweeps, each re-reading the input for a subset of ranges.
3. **Finalize**: output files of an earlier, different ingest are removed, each range's spill
   file becomes one sorted shard (:mod:`.shard_writer`) and ``_ingest.json`` is written last
   (:mod:`.manifest`), so an unchanged input is reused next time.

``checkpoint`` (the memory guard's cooperative check, if given) runs after every parsed block
of both passes and for every shard written, in the calling thread, so a stage over its budget
stops there with a clean, retryable error; the spill folder is removed on success and on
error. No Dagster import here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.core.data.ingest.columns import check_headers, infer_types
from memopt_pipeline.core.data.ingest.csv_blocks import BlockStream
from memopt_pipeline.core.data.ingest.inputs import find_csv_inputs
from memopt_pipeline.core.data.ingest.manifest import (
    remove_previous_output,
    reusable_manifest,
    source_entries,
    write_manifest,
)
from memopt_pipeline.core.data.ingest.progress import IngestProgress, format_duration
from memopt_pipeline.core.data.ingest.shard_plan import (
    SHARD_BUDGET_FRACTION,
    GeneRange,
    default_rows_per_shard,
    max_open_spills,
    plan_ranges,
)
from memopt_pipeline.core.data.ingest.shard_writer import write_shards
from memopt_pipeline.core.data.ingest.spills import SPILL_PREFIX, Spills, remove_stale_spills
from memopt_pipeline.core.units import GiB, MiB

MIN_BLOCK_BYTES = 1024
BLOCKS_PER_BUDGET = 64  # block_bytes <= budget / 64: the few blocks in flight stay far below it


def _no_check() -> None:
    pass


@dataclass
class IngestResult:
    shards: list[Path]
    rows: int
    genes: int
    input_bytes: int
    seconds: float
    peak_rss_bytes: int  # highest process_rss_bytes() sampled at each block and shard


class _Ingest:
    """State of one ingest_csv call: headers, types, pass 1 and pass 2 (see the module docstring)."""

    def __init__(self, files, spill_dir, gene_column, budget_bytes, block_bytes, tracker, checkpoint):
        self.files: list[Path] = files
        self.spill_dir: Path = spill_dir
        self.gene_column: str = gene_column
        self.budget_bytes: int = budget_bytes
        self.block_bytes: int = block_bytes
        self.tracker: IngestProgress = tracker
        self.checkpoint: Callable[[], None] = checkpoint
        self.parse_options = pacsv.ParseOptions()
        self.names: list[str] = []
        self.headers: dict[Path, list[str]] = {}
        self.types: dict[str, pa.DataType] = {}
        self.bytes_per_row = 0.0
        self.file_rows: dict[Path, int] = {}
        self.gene_counts: Counter = Counter()

    # -- headers and types

    def check_headers(self) -> None:
        self.headers = check_headers(self.files, self.gene_column, self.parse_options)
        self.names = self.headers[self.files[0]]

    def infer_types(self) -> None:
        self.types, self.bytes_per_row = infer_types(
            self.files, self.gene_column, block_bytes=self.block_bytes, parse_options=self.parse_options,
            sample=self.tracker.sample,
        )

    # -- pass 1

    def count_genes(self) -> None:
        self.tracker.phase("ingest pass 1/2 (gene counts)")
        for path in self.files:
            rows = 0
            with BlockStream(path, block_bytes=self.block_bytes, column_types={self.gene_column: pa.string()},
                             include_columns=[self.gene_column], parse_options=self.parse_options) as stream:
                for batch in stream:
                    genes = batch.column(0)
                    self._check_genes(genes, path, rows)
                    counted = pc.value_counts(genes)
                    self.gene_counts.update(
                        dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))
                    )
                    rows += batch.num_rows
                    self.tracker.advance(batch.num_rows)
                    self.checkpoint()
            self.file_rows[path] = rows
            if rows == 0 and len(self.files) > 1:
                self.tracker.log(f"ingest: {path} has a header but no rows; skipping it")
        if not any(self.file_rows.values()):
            raise DatasetError(
                f"{self.files[0]} has a header but no data rows; write the rows or point at the right input"
            )

    def _check_genes(self, genes: pa.Array, path: Path, rows_before: int) -> None:
        blank = pc.or_kleene(pc.is_null(genes), pc.equal(pc.utf8_trim_whitespace(genes), ""))
        bad = int(pc.sum(pc.cast(pc.fill_null(blank, True), pa.int64())).as_py() or 0)
        if bad:
            first = rows_before + int(np.flatnonzero(pc.fill_null(blank, True).to_numpy(zero_copy_only=False))[0]) + 1
            raise DatasetError(
                f"{path}: {bad} row(s) in this block have an empty {self.gene_column!r} (first: data row {first:,}); "
                "every row needs a gene: fill in or drop those rows"
            )

    # -- pass 2

    def spill(self, ranges: list[GeneRange]) -> Spills:
        """Route every row to its range's spill files."""
        starts = np.array([r.first_gene for r in ranges])
        expected = np.array([r.rows for r in ranges], dtype=np.int64)
        spills = Spills(self.spill_dir, len(ranges))
        max_open = max_open_spills()
        sweeps = [(lo, min(lo + max_open, len(ranges))) for lo in range(0, len(ranges), max_open)]
        total = sum(self.file_rows.values())
        self.tracker.phase("ingest pass 2/2 (routing)", total * len(sweeps))
        if len(sweeps) > 1:
            self.tracker.log(
                f"ingest: {len(ranges)} ranges > {max_open} open files: pass 2 reads the input {len(sweeps)} times"
            )
        routed = np.zeros(len(ranges), dtype=np.int64)
        gene_index = self.names.index(self.gene_column)

        try:
            for lo, hi in sweeps:
                for path in self.files:
                    if not self.file_rows.get(path):
                        continue
                    reorder = self.headers[path] != self.names
                    schema = self.schema()
                    with BlockStream(path, block_bytes=self.block_bytes, column_types=self.types, widen=True,
                                     parse_options=self.parse_options, log=self.tracker.log) as stream:
                        for batch in stream:
                            if reorder:
                                batch = batch.select(self.names)
                            if batch.schema != schema:  # the reader widened a column
                                self.types.update((field.name, field.type) for field in batch.schema)
                                schema = self.schema()
                                spills.new_generation()
                            self._route(batch, gene_index, starts, lo, hi, routed, spills, path)
                            self.tracker.advance(batch.num_rows)
                            self.checkpoint()
                spills.close()
        finally:
            spills.close()

        if not np.array_equal(routed, expected):
            bad = int(np.flatnonzero(routed != expected)[0])
            raise DatasetError(
                f"the input changed while it was ingested: pass 1 counted {int(expected[bad]):,} rows for genes "
                f"{ranges[bad].first_gene}..{ranges[bad].last_gene}, pass 2 read {int(routed[bad]):,}; "
                "re-run once the CSV files are no longer being written"
            )
        return spills

    def schema(self) -> pa.Schema:
        return pa.schema([(name, self.types[name]) for name in self.names])

    def _route(self, batch, gene_index, starts, lo, hi, routed, spills, path) -> None:
        if batch.num_rows == 0:
            return
        encoded = pc.dictionary_encode(batch.column(gene_index))
        distinct = np.array(encoded.dictionary.to_pylist())
        range_of_distinct = np.searchsorted(starts, distinct, side="right") - 1
        if (range_of_distinct < 0).any():
            raise DatasetError(
                f"{path}: gene {distinct[range_of_distinct < 0][0]!r} was not there in pass 1; "
                "the input changed while it was ingested, re-run once it is complete"
            )
        row_range = range_of_distinct[encoded.indices.to_numpy(zero_copy_only=False)]
        if lo > 0 or hi < len(starts):
            selected = np.flatnonzero((row_range >= lo) & (row_range < hi))
            order = selected[np.argsort(row_range[selected], kind="stable")]
        else:
            order = np.argsort(row_range, kind="stable")
        if order.size == 0:
            return
        per_range = np.bincount(row_range[order] - lo, minlength=hi - lo)
        by_range = batch.take(pa.array(order))
        offset = 0
        for local in np.flatnonzero(per_range):
            count = int(per_range[local])
            index = lo + int(local)
            spills.write(index, by_range.slice(offset, count))
            routed[index] += count
            offset += count


def ingest_csv(
    path: str | Path,
    out_dir: str | Path,
    *,
    gene_column: str,
    budget_bytes: int,
    rows_per_shard: int | None = None,
    block_bytes: int = 16 * 2**20,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> IngestResult:
    """Ingest a CSV file, ``.csv.gz`` or folder of them into gene-sorted ``out_dir/part-*.parquet``.

    ``budget_bytes`` bounds memory: it caps ``block_bytes`` (at budget / 64) and sets the
    default ``rows_per_shard``. A shard holds whole genes, sorted by gene then ``position``.
    ``out_dir`` belongs to the ingest: ``part-*.parquet`` files of a different earlier ingest
    are removed. An identical earlier ingest (same files, sizes, mtimes, gene column) is
    reused. Raises :class:`DatasetError` for input that cannot be used, naming file and fix.
    ``checkpoint`` runs per parsed block and per shard written (see the module docstring).
    """
    started = time.monotonic()
    if not (budget_bytes > 0):
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
    if rows_per_shard is not None and not (rows_per_shard >= 1):
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard!r}")
    if not (block_bytes >= MIN_BLOCK_BYTES):
        raise ValueError(f"block_bytes must be >= {MIN_BLOCK_BYTES}, got {block_bytes!r}")
    budget_bytes, block_bytes = int(budget_bytes), int(block_bytes)

    files = find_csv_inputs(path)
    out_dir = Path(out_dir)
    tracker = IngestProgress(budget_bytes, progress)
    sources = source_entries(files)
    input_bytes = sum(entry["bytes"] for entry in sources)

    manifest = reusable_manifest(out_dir, sources, gene_column) if out_dir.is_dir() else None
    if manifest is not None:
        tracker.log(f"ingest: reusing {len(manifest['shards'])} shards in {out_dir} (the CSV input is unchanged)")
        return IngestResult(
            shards=[out_dir / name for name in manifest["shards"]],
            rows=int(manifest["rows"]),
            genes=int(manifest["genes"]),
            input_bytes=input_bytes,
            seconds=time.monotonic() - started,
            peak_rss_bytes=tracker.sample(),
        )

    cap = max(MiB, budget_bytes // BLOCKS_PER_BUDGET)
    if block_bytes > cap:
        tracker.log(
            f"ingest: block_bytes {block_bytes / MiB:.1f} MiB > budget/{BLOCKS_PER_BUDGET}; using {cap / MiB:.1f} MiB"
        )
        block_bytes = cap
    tracker.log(
        f"ingest: {input_bytes / GiB:.2f} GiB in {len(files)} CSV file(s) from {path}; "
        f"budget {budget_bytes / GiB:.2f} GiB, blocks of {block_bytes / MiB:.1f} MiB"
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_spills(out_dir)
    spill_dir = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=out_dir))
    try:
        checkpoint = checkpoint or _no_check
        job = _Ingest(files, spill_dir, gene_column, budget_bytes, block_bytes, tracker, checkpoint)
        job.check_headers()
        job.infer_types()
        job.count_genes()

        derived = rows_per_shard is None
        if derived:
            rows_per_shard = default_rows_per_shard(budget_bytes, job.bytes_per_row)
        ranges = plan_ranges(job.gene_counts, rows_per_shard)
        total_rows = sum(job.file_rows.values())
        biggest = max(r.rows for r in ranges)
        tracker.log(
            f"ingest plan: {input_bytes / GiB:.1f} GiB in {len(files)} file(s) -> {len(ranges)} shards of "
            f"~{rows_per_shard:,} rows ({total_rows:,} rows, {len(job.gene_counts):,} genes, "
            f"~{job.bytes_per_row:,.0f} B/row in Arrow"
            + (f", rows_per_shard from {SHARD_BUDGET_FRACTION:.0%} of the budget)" if derived else ")")
            + (f"; largest shard {biggest:,} rows (a gene is never split)" if biggest > rows_per_shard else "")
        )

        spills = job.spill(ranges)

        if source_entries(files) != sources:
            raise DatasetError(f"{path}: the CSV input changed while it was ingested; re-run once it is complete")
        remove_previous_output(out_dir)
        shards = write_shards(out_dir, ranges, spills, job.schema(), gene_column, tracker, checkpoint=checkpoint)
        write_manifest(
            out_dir,
            gene_column=gene_column,
            sources=sources,
            rows=total_rows,
            genes=len(job.gene_counts),
            rows_per_shard=rows_per_shard,
            shards=shards,
            shard_rows=[r.rows for r in ranges],
            columns={name: str(job.types[name]) for name in job.names},
        )
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    seconds = time.monotonic() - started
    rate = total_rows / max(seconds, 1e-9)
    tracker.log(
        f"ingest: {total_rows:,} rows, {len(job.gene_counts):,} genes -> {len(shards)} shards in {out_dir} "
        f"({format_duration(seconds)}, {rate:,.0f} rows/s, peak {tracker.peak_rss / GiB:.2f} GiB)"
    )
    return IngestResult(
        shards=shards,
        rows=total_rows,
        genes=len(job.gene_counts),
        input_bytes=input_bytes,
        seconds=seconds,
        peak_rss_bytes=tracker.peak_rss,
    )
