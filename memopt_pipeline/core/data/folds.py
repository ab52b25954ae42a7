"""Instances of genes and gene-aware cross-validation folds, from per-gene aggregates.

Nothing here touches rows: genes are assigned whole, using their row and class counts, so
no gene is ever split between folds or instances and the work is O(genes), not O(rows).
"""

from __future__ import annotations

import math
from typing import Callable, Collection

import numpy as np
import polars as pl

from memopt_pipeline.core.data.dataset import class_count_columns


def _shuffled_largest_first(stats: pl.DataFrame, seed: int) -> pl.DataFrame:
    # Random tie-break first, then a stable sort by size: deterministic, and equal-sized
    # genes do not always land in the same order as their ids.
    rng = np.random.default_rng(seed)
    shuffled = stats.sort("gene")[rng.permutation(stats.height).tolist()]
    return shuffled.sort("rows", descending=True, maintain_order=True)


def assign_instances(
    gene_stats: pl.DataFrame,
    *,
    n_instances: int,
    overlap: float = 0.1,
    seed: int = 0,
) -> list[list[str]]:
    """Split genes into ``n_instances`` groups of similar row counts; add ``overlap`` extra genes.

    Every gene belongs to exactly one group's core (so coverage is 100%); with overlap > 0
    each instance also trains on ``overlap * len(core)`` genes drawn from other instances,
    which smooths the ensemble at the seams.
    """
    if n_instances < 1:
        raise ValueError(f"n_instances must be >= 1, got {n_instances}")
    if n_instances > gene_stats.height:
        raise ValueError(f"{n_instances} instances need at least as many genes, only {gene_stats.height} given")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    ordered = _shuffled_largest_first(gene_stats, seed)
    loads = np.zeros(n_instances, dtype=np.int64)
    cores: list[list[str]] = [[] for _ in range(n_instances)]
    for gene, rows in zip(ordered["gene"].to_list(), ordered["rows"].to_list()):
        target = int(np.argmin(loads))
        cores[target].append(gene)
        loads[target] += rows
    if n_instances == 1 or overlap == 0.0:
        return [sorted(core) for core in cores]
    rng = np.random.default_rng(seed + 1)
    instances = []
    for index, core in enumerate(cores):
        others = sorted(g for j, other in enumerate(cores) if j != index for g in other)
        extra_count = min(len(others), math.ceil(overlap * len(core)))
        extra = rng.choice(len(others), size=extra_count, replace=False) if extra_count else []
        instances.append(sorted(core + [others[i] for i in extra]))
    return instances


def gene_folds(gene_stats: pl.DataFrame, *, n_folds: int, seed: int = 0) -> dict[str, int]:
    """Map each gene to a fold so that every fold's class counts are close to 1/n_folds of the total.

    Greedy: genes largest first; each goes to the fold where, after adding it, the sum of
    squared per-class fill ratios (fold count / target count) is smallest. This balances
    every class, rare ones included, not just total rows.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if gene_stats.height < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} genes, only {gene_stats.height} given")
    count_columns = [c for c in gene_stats.columns if c.startswith("n_class_")]
    ordered = _shuffled_largest_first(gene_stats, seed)
    counts = ordered.select(count_columns).to_numpy().astype(np.float64)
    target = np.maximum(counts.sum(axis=0) / n_folds, 1.0)
    fold_counts = np.zeros((n_folds, len(count_columns)))
    fold_genes = np.zeros(n_folds, dtype=np.int64)
    assignment: dict[str, int] = {}
    for gene, gene_counts in zip(ordered["gene"].to_list(), counts):
        # Until every fold has a gene, fill empty folds first so no fold ends up empty.
        candidates = np.flatnonzero(fold_genes == 0) if (fold_genes == 0).any() else np.arange(n_folds)
        cost = (((fold_counts[candidates] + gene_counts) / target) ** 2).sum(axis=1)
        fold = int(candidates[int(np.argmin(cost))])
        fold_counts[fold] += gene_counts
        fold_genes[fold] += 1
        assignment[gene] = fold
    return dict(sorted(assignment.items()))


FAST_VALIDATION_SHARE = 0.05


def fold_groups(n_folds: int, *, fast: bool, validation_share: float = FAST_VALIDATION_SHARE) -> int:
    """Gene groups cv_folds cuts an instance into, so the fewest genes an instance may have:
    ``n_folds``, or in fast mode the 1/share groups its validation split is made of."""
    return max(2, round(1.0 / validation_share)) if fast else n_folds


def fast_validation_split(
    gene_stats: pl.DataFrame, *, validation_share: float = FAST_VALIDATION_SHARE, seed: int = 0
) -> dict[str, int]:
    """Fast mode: one gene-aware split, fold 1 = ``validation_share`` of the genes (by class
    counts), fold 0 = the rest. Built from :func:`gene_folds` with 1/share folds, one of which
    becomes the validation fold, so its class proportions are as close to the whole as a k-fold's.
    """
    if not 0.0 < validation_share <= 0.5:
        raise ValueError(f"validation_share must be in (0, 0.5], got {validation_share}")
    n_folds = fold_groups(0, fast=True, validation_share=validation_share)
    if gene_stats.height < n_folds:
        raise ValueError(
            f"a {validation_share:.0%} validation split is made of {n_folds} gene groups and needs at least "
            f"{n_folds} genes; this instance has {gene_stats.height}: use k-fold (fast off) or fewer instances"
        )
    folds = gene_folds(gene_stats, n_folds=n_folds, seed=seed)
    return {gene: 1 if fold == 0 else 0 for gene, fold in folds.items()}


def fold_class_counts(gene_stats: pl.DataFrame, assignment: dict[str, int]) -> pl.DataFrame:
    """Per-fold row and class counts of an assignment (for metadata and tests)."""
    count_columns = class_count_columns(sum(c.startswith("n_class_") for c in gene_stats.columns))
    folds = pl.DataFrame({"gene": list(assignment), "fold": list(assignment.values())})
    return (
        gene_stats.join(folds, on="gene", how="inner")
        .group_by("fold")
        .agg(pl.col("rows").sum(), *[pl.col(c).sum() for c in count_columns])
        .sort("fold")
    )


def largest_training_share(
    fold_of_gene: dict[str, int], rows_of: Callable[[Collection[str]], int], validation_folds: Collection[int] | None = None
) -> float:
    """The largest share of an instance's rows one validation fold trains on (all rows but the
    fold's): what the fold phase holds binned beside the validation rows. ``rows_of`` counts
    the rows of genes (``BatchReader.count_rows``); ``validation_folds`` None: every fold."""
    genes_of_fold: dict[int, list[str]] = {}
    for gene, fold in fold_of_gene.items():
        genes_of_fold.setdefault(fold, []).append(gene)
    total = rows_of(fold_of_gene)
    folds = genes_of_fold if validation_folds is None else [f for f in validation_folds if f in genes_of_fold]
    if total <= 0 or not folds:
        return 1.0
    return max(1.0 - rows_of(genes_of_fold[fold]) / total for fold in folds)
