"""The one reader of rows: gene set + columns in, bounded float32 batches out.

Every stage that needs rows (training, folds, holdout, SHAP) goes through
:class:`BatchReader`, so the user's gene sample is honoured everywhere and the rows each
stage reads can be counted. Reading is shard by shard, row group by row group:

- projection: only the requested feature columns (plus gene and label) are decoded;
- predicate pushdown: row groups whose gene min/max statistics cannot contain a requested
  gene are skipped without decoding (effective because shards are sorted by gene);
- the remaining rows are filtered to the gene set and converted into a C-contiguous float32
  matrix of at most ``batch_rows`` rows, column by column, so no float64 copy of the batch
  ever exists.

Order is deterministic (shard order, then row order), so two passes over the same genes
(labels first, features next) line up row for row.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memopt_pipeline.core.data.dataset import DatasetError, DatasetMetadata
from memopt_pipeline.core.report.progress import RowProgress


@dataclass
class Batch:
    features: np.ndarray  # float32, C-contiguous, shape (rows, n_features)
    labels: np.ndarray  # int32 class indices, shape (rows,)
    ids: pa.Table | None  # gene and id columns when requested


@dataclass
class ReadStats:
    rows_read: int = 0  # rows delivered (after the gene filter)
    rows_scanned: int = 0  # rows decoded from row groups that could hold a requested gene
    row_groups_skipped: int = 0
    bytes_read: int = 0  # bytes of the delivered float32 matrices
    batches: int = 0
    passes: int = 0
    genes_requested: set = field(default_factory=set)  # every gene any pass asked for


class BatchReader:
    """Stream rows of a gene set from the dataset described by ``metadata``."""

    def __init__(
        self,
        metadata: DatasetMetadata,
        *,
        checkpoint: Callable[[], None] | None = None,
        id_columns: tuple[str, ...] = ("position",),
        log: Callable[[str], None] | None = None,
        budget_bytes: int | None = None,
        features: list[str] | None = None,
    ):
        """``checkpoint`` runs after every batch (the memory guard's check); with ``log``, long
        passes report progress (rows of total, rows/s, time left, RSS against ``budget_bytes``).
        ``features`` (default: all of the metadata's) are the columns batches hold, in order."""
        self.metadata = metadata
        self.features = list(metadata.features if features is None else features)
        unknown = sorted(set(self.features) - set(metadata.features))
        if unknown:
            raise ValueError(f"features not in the dataset: {unknown[:10]}; re-materialize dataset_metadata")
        self.checkpoint = checkpoint
        self.id_columns = id_columns
        self.log = log
        self.budget_bytes = budget_bytes
        self.stats = ReadStats()
        self._class_values = pa.array(metadata.classes)
        self._gene_rows: dict[str, int] | None = None

    # -- public API -----------------------------------------------------------------------
    def iter_batches(
        self,
        genes: Collection[str],
        batch_rows: int,
        *,
        features: list[str] | None = None,
        with_ids: bool = False,
        purpose: str = "reading rows",
    ) -> Iterator[Batch]:
        """Yield :class:`Batch` objects with the rows of ``genes``, at most ``batch_rows`` each."""
        if batch_rows <= 0:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        features = list(self.features if features is None else features)
        yield from self._scan(genes, batch_rows, features, with_ids=with_ids, purpose=purpose)

    def read_labels(self, genes: Collection[str], batch_rows: int = 1_000_000) -> np.ndarray:
        """All class indices of ``genes`` in reader order (one int32 per row)."""
        parts = [batch.labels for batch in self._scan(genes, batch_rows, [], with_ids=False, purpose="reading labels")]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)

    def count_rows(self, genes: Collection[str]) -> int:
        """Rows of ``genes`` according to the metadata's per-gene statistics (no data read)."""
        if self._gene_rows is None:
            stats = self.metadata.read_gene_stats()
            self._gene_rows = dict(zip(stats["gene"].to_list(), stats["rows"].to_list()))
        return int(sum(self._gene_rows.get(str(g), 0) for g in genes))

    # -- internals ------------------------------------------------------------------------
    def _scan(
        self, genes: Collection[str], batch_rows: int, features: list[str], *, with_ids: bool, purpose: str
    ) -> Iterator[Batch]:
        gene_column = self.metadata.gene_column
        label_column = self.metadata.label_column
        wanted_sorted = sorted(str(g) for g in genes)
        if not wanted_sorted:
            return
        wanted = pa.array(wanted_sorted, type=pa.string())
        self.stats.passes += 1
        self.stats.genes_requested.update(wanted_sorted)
        progress = None
        if self.log is not None:
            progress = RowProgress(purpose, self.count_rows(wanted_sorted), self.log, budget_bytes=self.budget_bytes)

        for shard in self.metadata.shards:
            path = Path(shard.path)
            parquet = pq.ParquetFile(path)
            names = set(parquet.schema_arrow.names)
            present = [f for f in features if f in names]
            ids = [c for c in self.id_columns if with_ids and c in names]
            columns = [gene_column, label_column, *present, *ids]
            gene_index = parquet.schema_arrow.get_field_index(gene_column)
            for row_group in range(parquet.num_row_groups):
                if not _row_group_may_hold(parquet, row_group, gene_index, wanted_sorted):
                    self.stats.row_groups_skipped += 1
                    continue
                for record_batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[row_group], columns=columns):
                    self.stats.rows_scanned += record_batch.num_rows
                    gene_values = pc.cast(record_batch.column(gene_column), pa.string())
                    mask = pc.is_in(gene_values, value_set=wanted)
                    selected = record_batch.filter(mask)
                    if selected.num_rows == 0:
                        continue
                    batch = self._to_batch(selected, path, features, present, ids, with_ids)
                    if progress is not None:
                        progress.advance(selected.num_rows)
                    yield batch

    def _to_batch(
        self,
        record_batch: pa.RecordBatch,
        path: Path,
        features: list[str],
        present: list[str],
        ids: list[str],
        with_ids: bool,
    ) -> Batch:
        rows = record_batch.num_rows
        labels = pc.index_in(record_batch.column(self.metadata.label_column), value_set=self._class_values)
        if labels.null_count:
            unknown = pc.filter(record_batch.column(self.metadata.label_column), pc.is_null(labels))[0]
            raise DatasetError(
                f"{path}: label {unknown} is not one of the classes {self.metadata.classes} seen by "
                "dataset_metadata; re-materialize dataset_metadata after changing the data"
            )
        matrix = np.empty((rows, len(features)), dtype=np.float32)
        present_set = set(present)
        for j, name in enumerate(features):
            if name not in present_set:
                matrix[:, j] = np.nan  # schema drift: a feature missing from this shard is missing data
                continue
            column = pc.cast(record_batch.column(name), pa.float32(), safe=False)
            matrix[:, j] = column.to_numpy(zero_copy_only=False)
        if features and not np.isfinite(matrix).all():
            infinite = np.isinf(matrix)
            if infinite.any():
                column = features[int(np.nonzero(infinite.any(axis=0))[0][0])]
                raise DatasetError(
                    f"{path}: column {column!r} holds infinite values; replace them (e.g. with null, "
                    "which is treated as missing) or exclude the column"
                )
        self.stats.rows_read += rows
        self.stats.bytes_read += matrix.nbytes
        self.stats.batches += 1
        if self.checkpoint is not None:
            self.checkpoint()
        id_table = None
        if with_ids:
            id_names = [self.metadata.gene_column, *ids]
            id_table = pa.Table.from_batches([record_batch.select(id_names)])
        return Batch(features=matrix, labels=labels.to_numpy(zero_copy_only=False).astype(np.int32), ids=id_table)


def _row_group_may_hold(parquet: pq.ParquetFile, row_group: int, gene_index: int, wanted_sorted: list[str]) -> bool:
    """False only when the row group's gene statistics prove it holds none of the genes."""
    column = parquet.metadata.row_group(row_group).column(gene_index)
    stats = column.statistics
    if stats is None or not stats.has_min_max or not isinstance(stats.min, str):
        return True  # no usable statistics (or non-string genes): must read to know
    first = bisect.bisect_left(wanted_sorted, stats.min)
    return first < len(wanted_sorted) and wanted_sorted[first] <= stats.max
