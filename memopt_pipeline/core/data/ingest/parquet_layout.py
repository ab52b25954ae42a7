"""Whether a Parquet input streams well as it is, or needs re-sharding (:mod:`.parquet_reshard`).

Every training pass reads rows through ``BatchReader``, which skips row groups whose gene
statistics exclude the wanted genes and reads the others whole or batch by batch. That works
when row groups are small and hold contiguous genes, as the synthetic generator and the
ingest write them (65,536 rows, gene-sorted). Two layouts defeat it, and this module finds
them from the files' footers alone (no data is read):

- **A row group of more than** :data:`MAX_INPUT_ROW_GROUP_ROWS` **rows** (131,072, twice the
  largest reader batch, ``planner.MAX_BATCH_ROWS``). The planner budgets two copies of one
  batch of at most 65,536 rows; a row group up to twice that costs no more to read whole.
  Bigger ones cost every pass more than was planned (pyarrow's default ``pre_buffer`` loads
  the compressed column chunks of the whole row group, and their dictionary pages stay for
  it) and, holding many genes, can rarely be skipped: a file of one row group is decoded in
  full by every fold, instance, evaluation and SHAP pass. ``DataFrame.to_parquet`` and
  ``pyarrow.parquet.write_table`` write row groups of up to 1,048,576 rows (older writers:
  one per file), polars 262,144: re-sharded. The generator and the ingest (65,536) and
  DuckDB (122,880) are not. The threshold is a number of rows, not a share of the memory
  budget, on purpose: the budget defaults to a share of the memory available at run time,
  and whether an unchanged input is re-sharded must not change from one run to the next.
- **Row groups not in gene order within a file** (a row group whose smallest gene sorts
  before the largest gene of the row group before it): the rows are not grouped by gene, so
  a gene's rows lie in row groups whose gene ranges overlap and can't be skipped. Rows of
  one gene spanning consecutive row groups of a sorted file are fine.

Not detected: files that are each in gene order but overlap each other (a folder with one
file per sample, each holding every gene); their row groups stay skippable within each file.

A file without the gene column, or one without rows, is not a reason: ``dataset_metadata``
names such a file as it always did (the re-shard rejects it too, if another file needs it).
A file whose footer cannot be read is a :class:`DatasetError` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from memopt_pipeline.core.data.dataset import DatasetError, list_shards

READER_BATCH_ROWS = 65_536  # = planner.MAX_BATCH_ROWS, the largest batch a reader asks for
MAX_INPUT_ROW_GROUP_ROWS = 2 * READER_BATCH_ROWS


@dataclass
class ParquetLayout:
    files: list[Path]
    rows: int
    row_groups: int
    largest_row_group: int  # rows
    reason: str | None  # why the input needs re-sharding; None: it streams well as it is

    @property
    def needs_reshard(self) -> bool:
        return self.reason is not None


def open_parquet(path: Path, **options) -> pq.ParquetFile:
    """``pq.ParquetFile(path)``, or a :class:`DatasetError` naming the file and the fix."""
    try:
        return pq.ParquetFile(path, **options)
    except Exception as exc:  # pyarrow raises several types for a damaged or empty file
        raise DatasetError(f"{path} is not a readable Parquet file ({exc}); re-export or remove this file") from exc


def _gene_range(metadata, row_group: int, gene_index: int):
    stats = metadata.row_group(row_group).column(gene_index).statistics
    if stats is None or not stats.has_min_max:
        return None
    return stats.min, stats.max


def _file_reason(path: Path, parquet: pq.ParquetFile, gene_column: str, max_row_group_rows: int) -> str | None:
    metadata = parquet.metadata
    for row_group in range(metadata.num_row_groups):
        rows = metadata.row_group(row_group).num_rows
        if rows > max_row_group_rows:
            of = "its only row group" if metadata.num_row_groups == 1 else f"row group {row_group}"
            return (
                f"{path.name}: {of} holds {rows:,} rows (more than {max_row_group_rows:,}), so every pass "
                "would decode it whole"
            )
    gene_index = parquet.schema_arrow.get_field_index(gene_column)
    if gene_index < 0 or metadata.num_row_groups < 2:
        return None
    # Parquet column index == Arrow field index for flat schemas; check the name to be sure.
    if metadata.schema.column(gene_index).name != gene_column:
        return None
    previous = _gene_range(metadata, 0, gene_index)
    for row_group in range(1, metadata.num_row_groups):
        current = _gene_range(metadata, row_group, gene_index)
        if previous is not None and current is not None:
            try:
                out_of_order = current[0] < previous[1]
            except TypeError:  # statistics of different types: nothing to compare
                out_of_order = False
            if out_of_order:
                return (
                    f"{path.name}: rows are not grouped by gene (row group {row_group} starts at gene "
                    f"{current[0]!r}, before the previous one ends at {previous[1]!r}), so no pass can skip "
                    "the row groups of other genes"
                )
        previous = current
    return None


def parquet_layout(
    path: str | Path, *, gene_column: str, max_row_group_rows: int = MAX_INPUT_ROW_GROUP_ROWS
) -> ParquetLayout:
    """The Parquet input's files (as :func:`list_shards` finds them) and whether it needs re-sharding.

    Reads the footers only. The ``reason`` names the first file found unsuitable, and how
    many others are, when any are.
    """
    if not (max_row_group_rows >= 1):
        raise ValueError(f"max_row_group_rows must be >= 1, got {max_row_group_rows!r}")
    files = list_shards(path)
    reasons: list[str] = []
    rows = row_groups = largest = 0
    for file in files:
        parquet = open_parquet(file)
        metadata = parquet.metadata
        rows += metadata.num_rows
        row_groups += metadata.num_row_groups
        for index in range(metadata.num_row_groups):
            largest = max(largest, metadata.row_group(index).num_rows)
        reason = _file_reason(file, parquet, gene_column, max_row_group_rows)
        if reason is not None:
            reasons.append(reason)
    reason = None
    if reasons:
        reason = reasons[0] + (f" (and {len(reasons) - 1} more of the {len(files)} files)" if len(reasons) > 1 else "")
    return ParquetLayout(files=files, rows=rows, row_groups=row_groups, largest_row_group=largest, reason=reason)
