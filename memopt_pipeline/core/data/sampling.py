"""Gene-level sampling and the holdout split.

The user's sample size is applied here, once, to genes (never rows, so no gene is cut in
half); every later stage receives these gene lists and reads only their rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import polars as pl


class SamplingError(ValueError):
    """The requested sample or split cannot be made from this dataset."""


@dataclass
class GeneSplit:
    train_genes: list[str]
    holdout_genes: list[str]
    sampled_genes: int  # genes used in total (train + holdout)
    dataset_genes: int
    train_rows: int
    holdout_rows: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> "GeneSplit":
        return cls(**payload)


def split_genes(
    gene_stats: pl.DataFrame,
    *,
    holdout_fraction: float,
    sample_genes: int = 0,
    seed: int = 0,
    min_train_genes: int = 2,
) -> GeneSplit:
    """Sample ``sample_genes`` genes (0 = all) and hold out ``holdout_fraction`` of them.

    Genes are permuted deterministically by ``seed`` from their sorted order, so the same
    seed and data always give the same split.
    """
    n_genes = gene_stats.height
    if not 0.0 < holdout_fraction < 1.0:
        raise SamplingError(f"holdout_fraction must be between 0 and 1 (exclusive), got {holdout_fraction}")
    if sample_genes < 0:
        raise SamplingError(f"sample_genes must be 0 (all genes) or positive, got {sample_genes}")
    if sample_genes > n_genes:
        raise SamplingError(
            f"sample_genes={sample_genes} is larger than the {n_genes} genes in the dataset; "
            f"use at most {n_genes}, or 0 for all genes"
        )
    stats = gene_stats.sort("gene")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_genes)
    if sample_genes:
        order = order[:sample_genes]
    chosen = stats[order.tolist()]
    n_holdout = max(1, int(round(chosen.height * holdout_fraction)))
    if chosen.height - n_holdout < min_train_genes:
        raise SamplingError(
            f"{chosen.height} sampled genes leave fewer than {min_train_genes} training genes after holding out "
            f"{n_holdout}; sample more genes or lower holdout_fraction"
        )
    holdout = chosen[:n_holdout]
    train = chosen[n_holdout:]
    return GeneSplit(
        train_genes=sorted(train["gene"].to_list()),
        holdout_genes=sorted(holdout["gene"].to_list()),
        sampled_genes=chosen.height,
        dataset_genes=n_genes,
        train_rows=int(train["rows"].sum()),
        holdout_rows=int(holdout["rows"].sum()),
        seed=seed,
    )
