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
error. What is not about reading CSV (reuse, planning, routing, finalizing) lives in
:mod:`.common`, shared with the Parquet re-shard (:mod:`.parquet_reshard`). No Dagster import here.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.core.data.ingest.columns import check_headers, infer_types
from memopt_pipeline.core.data.ingest.common import (
    IngestResult,
    check_genes,
    check_routed,
    count_genes,
    finish,
    plan_shards,
    reused_result,
    route_batch,
    spill_folder,
)
from memopt_pipeline.core.data.ingest.csv_blocks import BlockStream
from memopt_pipeline.core.data.ingest.inputs import find_csv_inputs
from memopt_pipeline.core.data.ingest.manifest import source_entries
from memopt_pipeline.core.data.ingest.progress import IngestProgress
from memopt_pipeline.core.data.ingest.shard_plan import GeneRange, max_open_spills
from memopt_pipeline.core.data.ingest.spills import Spills
from memopt_pipeline.core.units import GiB, MiB

__all__ = ["IngestResult", "ingest_csv"]

MIN_BLOCK_BYTES = 1024
BLOCKS_PER_BUDGET = 64  # block_bytes <= budget / 64: the few blocks in flight stay far below it


def _no_check() -> None:
    pass


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
                    check_genes(genes, path, rows, self.gene_column)
                    count_genes(genes, self.gene_counts)
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

    # -- pass 2

    def spill(self, ranges: list[GeneRange]) -> Spills:
        """Route every row to its range's spill files."""
        starts = np.array([r.first_gene for r in ranges])
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
                            route_batch(batch, batch.column(gene_index), starts, lo, hi, routed, spills, path)
                            self.tracker.advance(batch.num_rows)
                            self.checkpoint()
                spills.close()
        finally:
            spills.close()

        check_routed(routed, ranges, "CSV")
        return spills

    def schema(self) -> pa.Schema:
        return pa.schema([(name, self.types[name]) for name in self.names])


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

    reused = reused_result(out_dir, sources, gene_column, tracker, started, label="ingest", what="CSV")
    if reused is not None:
        return reused

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

    with spill_folder(out_dir) as spill_dir:
        checkpoint = checkpoint or _no_check
        job = _Ingest(files, spill_dir, gene_column, budget_bytes, block_bytes, tracker, checkpoint)
        job.check_headers()
        job.infer_types()
        job.count_genes()
        ranges, rows_per_shard = plan_shards(
            job.gene_counts, rows_per_shard=rows_per_shard, budget_bytes=budget_bytes,
            bytes_per_row=job.bytes_per_row, input_bytes=input_bytes, n_files=len(files), tracker=tracker,
            label="ingest",
        )
        spills = job.spill(ranges)
        return finish(
            out_dir, files=files, sources=sources, input_path=path, ranges=ranges, spills=spills,
            schema=job.schema(), gene_column=gene_column, rows_per_shard=rows_per_shard,
            genes=len(job.gene_counts), tracker=tracker, checkpoint=checkpoint, started=started,
            label="ingest", what="CSV",
        )
