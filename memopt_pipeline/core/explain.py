"""Chunked native SHAP: mean |contribution| per feature and class, bounded by the chunk size.

LightGBM's own ``pred_contrib`` (TreeSHAP in C++) is used rather than shap.TreeExplainer:
it is exact for the model, needs no model conversion, and its memory is proportional to
the chunk (rows x classes x (features + 1) doubles). Each chunk is reduced at once into
running sums, so memory does not grow with the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

import numpy as np

from memopt_pipeline.core.batches import BatchReader
from memopt_pipeline.core.ensemble import Ensemble


@dataclass
class ShapSummary:
    features: list[str]
    classes: list
    mean_abs: np.ndarray  # (classes, features)
    rows: int
    chunks: int
    additivity_max_error: float  # |sum of contributions - raw score|, max over checked rows

    def top_features(self, k: int = 10) -> list[tuple[str, float]]:
        overall = self.mean_abs.mean(axis=0)
        order = np.argsort(-overall)[:k]
        return [(self.features[i], float(overall[i])) for i in order]


def chunked_shap(
    ensemble: Ensemble,
    reader: BatchReader,
    genes: Collection[str],
    *,
    sample_rows: int,
    chunk_rows: int,
    additivity_rows: int = 5,
    log: Callable[[str], None] = lambda message: None,
) -> ShapSummary:
    """Contributions for the first ``sample_rows`` rows of ``genes`` in ``chunk_rows`` chunks."""
    metadata = reader.metadata
    sums = np.zeros((metadata.n_classes, len(reader.features)), dtype=np.float64)
    rows = chunks = 0
    additivity_error = 0.0
    for batch in reader.iter_batches(genes, chunk_rows, purpose="shap"):
        features = batch.features[: sample_rows - rows]
        contributions = ensemble.predict_contributions(features)
        sums += np.abs(contributions[:, :, :-1]).sum(axis=0)
        if chunks == 0:
            # Additivity: per class, contributions plus bias must equal the raw score.
            check = features[:additivity_rows]
            raw = ensemble.predict_raw(check)
            additivity_error = float(np.abs(contributions[: len(check)].sum(axis=2) - raw).max())
        rows += len(features)
        chunks += 1
        del contributions
        if rows >= sample_rows:
            break
    if rows == 0:
        raise ValueError("no holdout rows to explain; check gene_split")
    log(f"shap: {rows:,} rows in {chunks} chunks, additivity error {additivity_error:.2e}")
    return ShapSummary(
        features=list(reader.features),
        classes=list(metadata.classes),
        mean_abs=sums / rows,
        rows=rows,
        chunks=chunks,
        additivity_max_error=additivity_error,
    )
