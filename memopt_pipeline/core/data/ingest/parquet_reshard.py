"""``reshard_parquet``: stream a Parquet input into gene-sorted shards with small row groups, once.

For input that :mod:`.parquet_layout` finds unsuitable (a huge row group, or rows not grouped
by gene). The output is what the CSV ingest writes (the same planning, spill files, shard
writer and manifest, :mod:`.common`): ``out_dir/part-*.parquet``, whole genes per shard,
sorted by gene then ``position``, row groups of 65,536 rows, ``_ingest.json`` written last;
an unchanged input (same files, sizes, mtimes, gene column) is reused next time.

Reading streams: ``ParquetFile(buffer_size=64 KiB, pre_buffer=False).iter_batches`` decodes
a row group page by page (with pyarrow's default ``pre_buffer`` it loads the compressed
column chunks of the whole row group first; measured on a 1,000,000-row, 50-column pandas
file: 354 MB of Arrow memory instead of 116 MB). A column being streamed still holds its
current pages (a dictionary page and a data page, up to 1 MiB each by default; measured
1.7-2.3 MiB a column), so wide input is read in **column groups** whose estimated reader
memory (:func:`_column_stream_bytes`) fits ``budget / 8``; each group's rows are spilled
separately and the groups are joined column-wise per shard, which is sound because each
group's rows reach a shard's spill in the input's order (:func:`.common.route_batch` keeps
it). Batches are ``min(16 MiB, budget / 64)`` of Arrow data, as the CSV path's blocks.

Passes. Each value is decoded from Parquet once in pass 2 (once per sweep: one unless there
are more than ``max_open_spills()`` shards), the gene column 1 + (column groups) times in all,
and the first :data:`PROBE_ROWS` rows once more; spill files are read back once, as Arrow IPC:

1. **Gene counts**: only the gene column, in batches of 65,536 rows; empty genes are rejected.
   Then the first batch (:data:`PROBE_ROWS` rows) of each column group gives the Arrow bytes
   per row that size the shards, and the sorted genes are cut into ranges, one per shard.
2. **Routing**, per column group: the group's columns plus the gene column, every batch's rows
   appended to their range's spill file. With more than ``max_open_spills()`` ranges a group
   is read in sweeps, each for a subset of ranges (8 to 512 open files: rarely).
3. **Finalize** (:func:`.common.finish`): the earlier output is removed, each range becomes one
   sorted shard, the manifest is written last.

Columns: the union of all files' columns in first-seen order; one missing from a file is null
there (as the reader treats a shard without a feature); a type differing between files is
promoted when Arrow can (int64 and double: double), else a :class:`DatasetError`. The gene
column is written as string (as the CSV ingest writes it, and as the reader compares genes),
dictionary columns (pandas categoricals) as their values, and pandas' schema metadata is
dropped (the row order, hence any stored index range, changed). No Dagster import here.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from memopt_pipeline.core.data.dataset import DatasetError, list_shards
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
from memopt_pipeline.core.data.ingest.manifest import source_entries
from memopt_pipeline.core.data.ingest.parquet_layout import open_parquet
from memopt_pipeline.core.data.ingest.progress import IngestProgress
from memopt_pipeline.core.data.ingest.shard_plan import GeneRange, max_open_spills
from memopt_pipeline.core.data.ingest.spills import ColumnGroupSpills
from memopt_pipeline.core.units import GiB, MiB

STREAM_BUFFER_BYTES = 64 * 1024  # read buffer per column being streamed
COLUMN_PAGES_BYTES = 3 * MiB  # reader memory of one streamed column: its current pages (see above)
READ_BUDGET_FRACTION = 1 / 8  # column readers of one group
BATCHES_PER_BUDGET = 64  # a batch is at most budget / 64, as the CSV path's blocks
DEFAULT_BATCH_BYTES = 16 * MiB
MIN_BATCH_ROWS, MAX_BATCH_ROWS = 256, 65_536
GENE_BATCH_ROWS = 65_536
PROBE_ROWS = 2_048


def _no_check() -> None:
    pass


@dataclass
class _File:
    path: Path
    rows: int
    names: set[str]


def _target_type(field: pa.Field, gene_column: str) -> pa.DataType:
    if field.name == gene_column:
        return pa.string()
    return field.type.value_type if pa.types.is_dictionary(field.type) else field.type


def _column_stream_bytes(parquet, names: list[str]) -> dict[str, int]:
    """Reader memory per column of one file: its largest row group's chunk (compressed and not),
    at most a few pages plus the read buffer."""
    metadata = parquet.metadata
    if metadata.num_row_groups == 0:
        return {}
    biggest = max(range(metadata.num_row_groups), key=lambda i: metadata.row_group(i).num_rows)
    group = metadata.row_group(biggest)
    wanted, cost = set(names), {}
    for index in range(group.num_columns):
        chunk = group.column(index)
        name = chunk.path_in_schema
        if name in wanted:
            chunk_bytes = chunk.total_compressed_size + chunk.total_uncompressed_size
            cost[name] = min(chunk_bytes, COLUMN_PAGES_BYTES) + STREAM_BUFFER_BYTES
    return cost


class _Reshard:
    """State of one reshard_parquet call: footers, column groups, pass 1 and pass 2."""

    def __init__(self, files, spill_dir, gene_column, budget_bytes, tracker, checkpoint):
        self.all_files: list[Path] = files
        self.spill_dir: Path = spill_dir
        self.gene_column: str = gene_column
        self.budget_bytes: int = budget_bytes
        self.tracker: IngestProgress = tracker
        self.checkpoint: Callable[[], None] = checkpoint
        self.files: list[_File] = []  # those with rows
        self.schema = pa.schema([])
        self.groups: list[list[str]] = []
        self.gene_counts: Counter = Counter()
        self.bytes_per_row = 0.0

    # -- footers: columns, types, column groups

    def read_footers(self) -> None:
        fields: dict[str, tuple[pa.DataType, Path]] = {}
        costs: dict[str, int] = {}
        for path in self.all_files:
            parquet = open_parquet(path)
            schema = parquet.schema_arrow
            if self.gene_column not in schema.names:
                shown = ", ".join(repr(n) for n in schema.names[:20]) + (", ..." if len(schema.names) > 20 else "")
                raise DatasetError(
                    f"{path}: gene column {self.gene_column!r} not found; columns found: {shown}. "
                    "Set the gene column name to one of them"
                )
            duplicates = sorted({n for n in schema.names if schema.names.count(n) > 1})
            if duplicates:
                raise DatasetError(f"{path}: duplicate column names {duplicates}; give every column a unique name")
            for field in schema:
                new = _target_type(field, self.gene_column)
                if field.name in fields and fields[field.name][0] != new:
                    old, first = fields[field.name]
                    try:
                        pair = [pa.schema([(field.name, old)]), pa.schema([(field.name, new)])]
                        new = pa.unify_schemas(pair, promote_options="permissive").field(0).type
                    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                        raise DatasetError(
                            f"column {field.name!r} is {new} in {path} but {old} in {first}; make the type "
                            "consistent across the files or drop the column"
                        ) from exc
                    fields[field.name] = (new, first)
                elif field.name not in fields:
                    fields[field.name] = (new, path)
            for name, cost in _column_stream_bytes(parquet, schema.names).items():
                costs[name] = max(costs.get(name, 0), cost)
            rows = parquet.metadata.num_rows
            if rows:
                self.files.append(_File(path, rows, set(schema.names)))
            elif len(self.all_files) > 1:
                self.tracker.log(f"reshard: {path} has no rows; skipping it")
        if not self.files:
            n_files = len(self.all_files)
            which = f"{self.all_files[0]} has" if n_files == 1 else f"all {n_files} Parquet files have"
            raise DatasetError(f"{which} no rows; write the rows or point at the right input")
        self.schema = pa.schema([pa.field(name, arrow_type) for name, (arrow_type, _) in fields.items()])
        self.groups = self._column_groups(costs)

    def _column_groups(self, costs: dict[str, int]) -> list[list[str]]:
        """Columns in schema order, cut where a group's readers (plus the gene column's) would
        pass ``budget * READ_BUDGET_FRACTION``; at least one column a group."""
        limit = self.budget_bytes * READ_BUDGET_FRACTION - costs.get(self.gene_column, 0)
        groups: list[list[str]] = [[]]
        used = 0
        for name in self.schema.names:
            cost = costs.get(name, 0) if name != self.gene_column else 0
            if groups[-1] and used + cost > limit:
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += cost
        return groups

    def group_schema(self, group: list[str]) -> pa.Schema:
        return pa.schema([self.schema.field(name) for name in group])

    # -- reading

    def _batches(self, file: _File, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The file's batches of ``columns``, read page by page; read errors as a DatasetError."""
        parquet = open_parquet(file.path, buffer_size=STREAM_BUFFER_BYTES, pre_buffer=False)
        batches = parquet.iter_batches(batch_size=batch_rows, columns=columns, use_threads=True)
        rows = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as exc:
                raise DatasetError(
                    f"{file.path}: cannot read the Parquet data after row {rows:,} ({exc}); the file is damaged "
                    "or incomplete: re-export it or remove it from the input"
                ) from exc
            rows += batch.num_rows
            yield batch

    def _genes(self, batch: pa.RecordBatch) -> pa.Array:
        genes = batch.column(self.gene_column)
        if pa.types.is_dictionary(genes.type):
            genes = genes.dictionary_decode()
        return genes if genes.type == pa.string() else genes.cast(pa.string())

    def _conform(self, batch: pa.RecordBatch, schema: pa.Schema, path: Path) -> pa.RecordBatch:
        """The batch with ``schema``'s columns and types: missing columns null, others cast."""
        arrays = []
        for field in schema:
            index = batch.schema.get_field_index(field.name)
            if index < 0:
                arrays.append(pa.nulls(batch.num_rows, field.type))
                continue
            column = batch.column(index)
            if pa.types.is_dictionary(column.type):
                column = column.dictionary_decode()
            if column.type != field.type:
                try:
                    column = column.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise DatasetError(
                        f"{path}: column {field.name!r} ({column.type}) cannot be read as {field.type}, its type "
                        f"in other files ({exc}); make the type consistent across the files or drop the column"
                    ) from exc
            arrays.append(column)
        return pa.RecordBatch.from_arrays(arrays, schema=schema)

    # -- pass 1

    def count_genes(self) -> None:
        total = sum(file.rows for file in self.files)
        self.tracker.phase("reshard pass 1/2 (gene counts)", total)
        for file in self.files:
            rows = 0
            for batch in self._batches(file, [self.gene_column], GENE_BATCH_ROWS):
                genes = self._genes(batch)
                check_genes(genes, file.path, rows, self.gene_column)
                count_genes(genes, self.gene_counts)
                rows += batch.num_rows
                self.tracker.advance(batch.num_rows)
                self.checkpoint()
            if rows != file.rows:
                raise DatasetError(
                    f"{file.path}: read {rows:,} rows but its footer says {file.rows:,}; the file is damaged "
                    "or was rewritten while it was read: re-run, or re-export it"
                )

    def probe_bytes_per_row(self) -> None:
        """Arrow bytes per row, from the first rows of the first file, one column group at a time."""
        file = self.files[0]
        total = 0.0
        for group in self.groups:
            columns = [name for name in group if name in file.names]
            batch = next(self._batches(file, columns, PROBE_ROWS), None) if columns else None
            if batch is not None and batch.num_rows:
                total += self._conform(batch, self.group_schema(group), file.path).nbytes / batch.num_rows
            self.tracker.sample()
        self.bytes_per_row = max(total, 1.0)

    def batch_rows(self) -> int:
        batch_bytes = min(DEFAULT_BATCH_BYTES, max(MiB, self.budget_bytes // BATCHES_PER_BUDGET))
        return int(min(max(batch_bytes // self.bytes_per_row, MIN_BATCH_ROWS), MAX_BATCH_ROWS))

    # -- pass 2

    def spill(self, ranges: list[GeneRange]) -> ColumnGroupSpills:
        """Route every row of every column group to its range's spill files."""
        starts = np.array([r.first_gene for r in ranges])
        schemas = [self.group_schema(group) for group in self.groups]
        spills = ColumnGroupSpills(self.spill_dir, len(ranges), schemas)
        max_open = max_open_spills()
        sweeps = [(lo, min(lo + max_open, len(ranges))) for lo in range(0, len(ranges), max_open)]
        reads = len(sweeps) * len(self.groups)
        batch_rows = self.batch_rows()
        self.tracker.phase("reshard pass 2/2 (routing)", sum(file.rows for file in self.files) * reads)
        if reads > 1:
            self.tracker.log(
                f"reshard: pass 2 reads the input {reads} times ({len(self.groups)} column group(s) within "
                f"{self.budget_bytes * READ_BUDGET_FRACTION / MiB:,.0f} MiB of column readers, {len(sweeps)} "
                f"sweep(s) of at most {max_open} open spill files), every value once"
            )
        try:
            for group, schema, group_spills in zip(self.groups, schemas, spills.groups):
                routed = np.zeros(len(ranges), dtype=np.int64)
                for lo, hi in sweeps:
                    for file in self.files:
                        columns = [name for name in group if name in file.names]
                        if self.gene_column not in columns:
                            columns.append(self.gene_column)
                        for batch in self._batches(file, columns, batch_rows):
                            data = self._conform(batch, schema, file.path)
                            route_batch(data, self._genes(batch), starts, lo, hi, routed, group_spills, file.path)
                            self.tracker.advance(batch.num_rows)
                            self.checkpoint()
                    group_spills.close()
                check_routed(routed, ranges, "Parquet")
        finally:
            spills.close()
        return spills


def reshard_parquet(
    path: str | Path,
    out_dir: str | Path,
    *,
    gene_column: str,
    budget_bytes: int,
    rows_per_shard: int | None = None,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> IngestResult:
    """Re-shard a Parquet file or folder into gene-sorted ``out_dir/part-*.parquet`` (see the module docstring).

    ``budget_bytes`` bounds memory (column groups, batch size) and sets the default
    ``rows_per_shard`` as in :func:`.run.ingest_csv`. ``out_dir`` belongs to the re-shard: an
    identical earlier one is reused, a different one replaced once the new rows are all spilled.
    Raises :class:`DatasetError` for input that cannot be used, naming the file and the fix.
    ``checkpoint`` runs per batch of both passes and per shard written.
    """
    started = time.monotonic()
    if not (budget_bytes > 0):
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
    if rows_per_shard is not None and not (rows_per_shard >= 1):
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard!r}")
    budget_bytes = int(budget_bytes)

    files = list_shards(path)
    out_dir = Path(out_dir)
    tracker = IngestProgress(budget_bytes, progress)
    sources = source_entries(files)
    input_bytes = sum(entry["bytes"] for entry in sources)
    reused = reused_result(out_dir, sources, gene_column, tracker, started, label="reshard", what="Parquet")
    if reused is not None:
        return reused

    with spill_folder(out_dir) as spill_dir:
        checkpoint = checkpoint or _no_check
        job = _Reshard(files, spill_dir, gene_column, budget_bytes, tracker, checkpoint)
        job.read_footers()
        tracker.log(
            f"reshard: {input_bytes / GiB:.2f} GiB in {len(files)} Parquet file(s) from {path}; budget "
            f"{budget_bytes / GiB:.2f} GiB, {len(job.schema)} columns read in {len(job.groups)} group(s)"
        )
        job.count_genes()
        job.probe_bytes_per_row()
        ranges, rows_per_shard = plan_shards(
            job.gene_counts, rows_per_shard=rows_per_shard, budget_bytes=budget_bytes,
            bytes_per_row=job.bytes_per_row, input_bytes=input_bytes, n_files=len(files), tracker=tracker,
            label="reshard",
        )
        spills = job.spill(ranges)
        return finish(
            out_dir, files=files, sources=sources, input_path=path, ranges=ranges, spills=spills,
            schema=job.schema, gene_column=gene_column, rows_per_shard=rows_per_shard,
            genes=len(job.gene_counts), tracker=tracker, checkpoint=checkpoint, started=started,
            label="reshard", what="Parquet",
        )
