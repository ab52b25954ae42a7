"""Feature screening on a bounded sample of training genes: leaky, constant, duplicate features.

Rules (each feature judged on the same sample of whole training genes, never holdout genes):
- leaky: a single feature that almost determines a class on its own — one-vs-rest ROC-AUC
  of the raw feature value (either direction) >= ``leak_auc`` (default 0.99) for any class.
  Such a feature is usually the label in disguise (a column derived from the annotation);
  a model trained with it looks perfect and is useless on new data.
- constant: one distinct non-missing value (or none) in the sample: no split can use it.
- near-duplicate: absolute Pearson correlation >= ``duplicate_correlation`` (default 0.999)
  with an earlier feature (dataset order); the later one is dropped, the earlier kept.
Missing values rank lowest for the AUC and are ignored by the other rules. ``keep`` names
features that are never dropped (the user's override).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Collection, Sequence

import numpy as np
from scipy.stats import rankdata

from memopt_pipeline.core.data.batch_reader import BatchReader


@dataclass
class ScreeningResult:
    kept: list[str]
    leaky: dict[str, float]  # feature -> its best single-feature one-vs-rest ROC-AUC
    constant: list[str]
    duplicates: dict[str, str]  # dropped feature -> the earlier feature it duplicates
    sample_rows: int
    sample_genes: int

    def to_dict(self) -> dict:
        return asdict(self)


def sample_genes_for_rows(gene_rows: dict[str, int], genes: Sequence[str], max_rows: int, seed: int) -> list[str]:
    """Whole genes in a seeded random order until about ``max_rows`` rows are covered."""
    order = np.random.default_rng(seed).permutation(len(genes))
    chosen, rows = [], 0
    for index in order:
        gene = genes[index]
        if rows and rows + gene_rows.get(gene, 0) > max_rows:
            continue
        chosen.append(gene)
        rows += gene_rows.get(gene, 0)
        if rows >= max_rows:
            break
    return sorted(chosen)


def single_feature_auc(
    matrix: np.ndarray, labels: np.ndarray, n_classes: int, checkpoint: Callable[[], None] | None = None
) -> np.ndarray:
    """max over classes of max(AUC, 1 - AUC) of each column as a one-vs-rest score, shape (features,).

    ``checkpoint`` runs per class: each class selects a rows x features copy of the ranks."""
    filled = np.where(np.isnan(matrix), -np.inf, matrix)
    ranks = rankdata(filled, axis=0)  # ties get average ranks, as the Mann-Whitney AUC needs
    best = np.full(matrix.shape[1], 0.5)
    for cls in range(n_classes):
        positives = labels == cls
        n_pos, n_neg = int(positives.sum()), int((~positives).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        auc = (ranks[positives].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        best = np.maximum(best, np.maximum(auc, 1.0 - auc))
        if checkpoint is not None:
            checkpoint()
    return best


def screen_features(
    reader: BatchReader,
    genes: Collection[str],
    *,
    sample_rows: int = 20_000,
    batch_rows: int = 8_192,
    leak_auc: float = 0.99,
    duplicate_correlation: float = 0.999,
    keep: Collection[str] = (),
    seed: int = 0,
    checkpoint: Callable[[], None] | None = None,
) -> ScreeningResult:
    """Screen ``reader``'s features on a sample of ``genes`` (see the module docstring).

    The reader's own checkpoint covers reading the sample; ``checkpoint`` (the memory guard's
    check) covers what follows on the whole sample at once: the float64 ranks and per-class
    copies of the AUC, and the float64 copy and correlation matrix of the duplicate search.
    """
    features = list(reader.features)
    stats = reader.metadata.read_gene_stats()
    gene_rows = dict(zip(stats["gene"].to_list(), stats["rows"].to_list()))
    chosen = sample_genes_for_rows(gene_rows, sorted(genes), sample_rows, seed)
    parts, labels = [], []
    for batch in reader.iter_batches(chosen, batch_rows, purpose="feature screening"):
        parts.append(batch.features)
        labels.append(batch.labels)
    if not parts:
        raise ValueError("no rows to screen features on; check gene_split")
    matrix = np.concatenate(parts)
    y = np.concatenate(labels)
    del parts
    protected = set(keep)

    with np.errstate(invalid="ignore"):
        low, high = np.nanmin(matrix, axis=0), np.nanmax(matrix, axis=0)
    constant_mask = ~(high > low)  # all-NaN columns give NaN here, which also counts as constant
    auc = single_feature_auc(matrix, y, reader.metadata.n_classes, checkpoint)
    leaky_mask = (auc >= leak_auc) & ~constant_mask

    duplicates: dict[str, str] = {}
    candidates = np.flatnonzero(~constant_mask & ~leaky_mask)
    if len(candidates) > 1:
        # Correlation on mean-imputed columns; NaN patterns are rare in duplicate pairs.
        block = matrix[:, candidates].astype(np.float64)
        means = np.nanmean(block, axis=0)
        block = np.where(np.isnan(block), means, block)
        corr = np.abs(np.corrcoef(block, rowvar=False))
        del block
        if checkpoint is not None:
            checkpoint()
        dropped = set()
        for i in range(len(candidates)):
            if i in dropped:
                continue
            for j in np.flatnonzero(corr[i, i + 1 :] >= duplicate_correlation) + i + 1:
                if j not in dropped and features[candidates[j]] not in protected:
                    dropped.add(int(j))
                    duplicates[features[candidates[j]]] = features[candidates[i]]

    leaky = {features[i]: float(auc[i]) for i in np.flatnonzero(leaky_mask) if features[i] not in protected}
    constant = [features[i] for i in np.flatnonzero(constant_mask) if features[i] not in protected]
    removed = set(leaky) | set(constant) | set(duplicates)
    kept = [f for f in features if f not in removed]
    if not kept:
        raise ValueError("feature screening dropped every feature; list the ones to keep in keep_features")
    return ScreeningResult(
        kept=kept, leaky=leaky, constant=constant, duplicates=duplicates,
        sample_rows=int(len(y)), sample_genes=len(chosen),
    )
