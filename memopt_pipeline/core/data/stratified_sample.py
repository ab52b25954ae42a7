"""A seeded sample of a gene set's rows, stratified by class and spread over genes, in one pass.

What it is for: explaining a model (SHAP) on a sample that covers every class and the whole
gene list. Reading the first rows in file order would not: shards are sorted by gene, so that
sample would hold only the alphabetically first genes, and mostly the majority class.

The rule, fixed before any row is read (:func:`plan_sample`, from the per-gene class counts of
the metadata's gene statistics):

- rows per class: equal shares of ``sample_rows``; a class with fewer rows than its share gives
  all it has and the rest is shared among the others (so the sample is ``sample_rows`` rows
  whenever the genes hold that many);
- rows per gene, per class: the smallest cap that still lets the class fill its share, so the
  rows of a class are spread over as many of its genes as possible (with 1,000 "neither" rows to
  draw from 200 genes, at most 5 per gene).

The draw (:func:`stratified_sample`): every row gets a seeded uniform key; per class, the rows
kept are those with the smallest keys among the rows that are within their gene's cap (the
gene's smallest keys). That is a uniform sample within each (gene, class) and across the
eligible rows, computed in one pass over the reader's batches (row groups of other genes
skipped) with a reservoir per class of at most its share of rows: each batch's rows are merged
into it and the same rule is applied again, which gives the same rows as applying it to all
rows at once (a row dropped from the reservoir had enough smaller-key rows ahead of it, and
later rows only add more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import numpy as np
import polars as pl
import pyarrow as pa

from memopt_pipeline.core.data.batch_reader import BatchReader


@dataclass
class SamplePlan:
    rows_per_class: list[int]  # rows to draw per class index
    gene_cap: list[int]  # at most this many rows of a class per gene
    available: list[int]  # rows of each class in the genes

    @property
    def rows(self) -> int:
        return int(sum(self.rows_per_class))


def plan_sample(gene_stats: pl.DataFrame, genes: Collection[str], n_classes: int, sample_rows: int) -> SamplePlan:
    """Rows per class and per-gene caps for a sample of ``sample_rows`` rows of ``genes`` (see the
    module docstring), from the gene statistics' ``n_class_<k>`` columns."""
    if sample_rows < 1:
        raise ValueError(f"sample_rows must be >= 1, got {sample_rows}")
    wanted = sorted({str(g) for g in genes})
    stats = gene_stats.filter(pl.col("gene").cast(pl.String).is_in(wanted))
    missing = [f"n_class_{k}" for k in range(n_classes) if f"n_class_{k}" not in stats.columns]
    if missing:
        raise ValueError(f"the gene statistics lack {missing}; re-materialize dataset_metadata")
    counts = [stats[f"n_class_{k}"].to_numpy().astype(np.int64) for k in range(n_classes)]
    available = [int(c.sum()) for c in counts]
    # Equal shares, the smallest classes served first so what they cannot use goes to the others.
    rows_per_class = [0] * n_classes
    remaining = sample_rows
    order = sorted(range(n_classes), key=lambda k: (available[k], k))
    for position, k in enumerate(order):
        rows_per_class[k] = min(available[k], remaining // (n_classes - position))
        remaining -= rows_per_class[k]
    gene_cap = [_smallest_cap(counts[k], rows_per_class[k]) for k in range(n_classes)]
    return SamplePlan(rows_per_class=rows_per_class, gene_cap=gene_cap, available=available)


def _smallest_cap(counts: np.ndarray, rows: int) -> int:
    """The smallest c with sum(min(c, counts)) >= rows (0 when no row is wanted)."""
    if rows <= 0:
        return 0
    low, high = 1, int(counts.max())
    while low < high:
        middle = (low + high) // 2
        if np.minimum(counts, middle).sum() >= rows:
            high = middle
        else:
            low = middle + 1
    return low


@dataclass
class StratifiedSample:
    """The sampled rows in reader order (the order of one pass over the genes)."""

    features: np.ndarray  # float32 (rows, features)
    labels: np.ndarray  # int32 class indices
    genes: np.ndarray  # gene of each row (str)
    ids: pa.Table  # the reader's id columns (gene first) of each row
    row_index: np.ndarray  # position of each row in the pass
    plan: SamplePlan

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, n_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=n_classes).astype(int).tolist()


@dataclass
class _Reservoir:
    keys: np.ndarray
    row_index: np.ndarray
    genes: np.ndarray
    features: np.ndarray
    ids: pa.Table

    def merge(self, other: "_Reservoir", *, cap: int, capacity: int) -> "_Reservoir":
        """Both reservoirs' rows, at most ``cap`` per gene and ``capacity`` in all, smallest keys
        first. Only the kept rows' features are copied."""
        keys = np.concatenate([self.keys, other.keys])
        genes = np.concatenate([self.genes, other.genes])
        _, gene_code = np.unique(genes, return_inverse=True)
        by_gene = np.lexsort((keys, gene_code))  # by gene, then key
        sorted_codes = gene_code[by_gene]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        rank = np.arange(len(by_gene)) - np.repeat(starts, np.diff(np.r_[starts, len(by_gene)]))
        eligible = by_gene[rank < cap]
        kept = np.sort(eligible[np.argsort(keys[eligible], kind="stable")[:capacity]])
        mine, theirs = kept[kept < len(self.keys)], kept[kept >= len(self.keys)] - len(self.keys)
        return _Reservoir(
            keys=keys[kept],
            row_index=np.concatenate([self.row_index[mine], other.row_index[theirs]]),
            genes=genes[kept],
            features=np.concatenate([self.features[mine], other.features[theirs]]),
            ids=pa.concat_tables([self.ids.take(mine), other.ids.take(theirs)]),
        )


def sample_bytes(sample_rows: int, n_features: int) -> int:
    """Peak memory of :func:`stratified_sample` beyond the reader's batch and one copy of it (a
    class's candidates): the reservoirs (float32 features, keys, ids) and, while a class's
    reservoir is merged, its new copy; the final reordering takes the same two copies."""
    return 2 * sample_rows * (n_features * 4 + 64)


def stratified_sample(
    reader: BatchReader,
    genes: Collection[str],
    sample_rows: int,
    *,
    seed: int,
    batch_rows: int,
    purpose: str = "stratified sample",
) -> StratifiedSample:
    """Draw the sample of ``sample_rows`` rows of ``genes`` described in the module docstring."""
    n_classes = reader.metadata.n_classes
    plan = plan_sample(reader.metadata.read_gene_stats(), genes, n_classes, sample_rows)
    rng = np.random.default_rng(seed)
    reservoirs: list[_Reservoir | None] = [None] * n_classes
    seen = 0
    gene_column = reader.metadata.gene_column
    for batch in reader.iter_batches(genes, batch_rows, with_ids=True, purpose=purpose):
        keys = rng.random(len(batch.labels))  # drawn for every row, so keys depend only on the seed
        batch_genes = batch.ids.column(gene_column).to_numpy(zero_copy_only=False).astype(str)
        for k in range(n_classes):
            capacity = plan.rows_per_class[k]
            if capacity == 0:
                continue
            current = reservoirs[k]
            candidates = batch.labels == k
            if current is not None and len(current.keys) == capacity:
                candidates &= keys < current.keys.max()  # could not get in
            rows = np.flatnonzero(candidates)
            if len(rows) == 0:
                continue
            incoming = _Reservoir(
                keys[rows], seen + rows, batch_genes[rows], batch.features[rows], batch.ids.take(pa.array(rows))
            )
            if current is None:
                current = _Reservoir(
                    np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=batch_genes.dtype),
                    np.empty((0, batch.features.shape[1]), dtype=np.float32), incoming.ids.slice(0, 0),
                )  # fmt: skip
            reservoirs[k] = current.merge(incoming, cap=plan.gene_cap[k], capacity=capacity)
        seen += len(batch.labels)
    kept = [(k, r) for k, r in enumerate(reservoirs) if r is not None and len(r.keys)]
    if not kept:
        raise ValueError(f"{purpose}: the genes have no rows")
    row_index = np.concatenate([r.row_index for _, r in kept])
    order = np.argsort(row_index, kind="stable")
    return StratifiedSample(
        features=np.concatenate([r.features for _, r in kept])[order],
        labels=np.concatenate([np.full(len(r.keys), k, dtype=np.int32) for k, r in kept])[order],
        genes=np.concatenate([r.genes for _, r in kept])[order],
        ids=pa.concat_tables([r.ids for _, r in kept]).take(pa.array(order)),
        row_index=row_index[order],
        plan=plan,
    )
