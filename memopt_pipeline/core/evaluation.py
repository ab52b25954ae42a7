"""Streamed holdout evaluation: predictions chunk by chunk, written incrementally.

Only one batch of features is in memory at a time; what is kept for the metrics is one
label and one probability vector per row (rows * classes * 8 bytes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Collection

import numpy as np
import pyarrow as pa

from memopt_pipeline.core.batches import BatchReader
from memopt_pipeline.core.ensemble import Ensemble
from memopt_pipeline.core.metrics import multiclass_metrics
from memopt_pipeline.core.storage import IncrementalParquetWriter


def _probability_columns(classes: list) -> list[str]:
    return [f"p_{c}" for c in classes]


def evaluate_holdout(
    ensemble: Ensemble,
    reader: BatchReader,
    genes: Collection[str],
    *,
    batch_rows: int,
    predictions_path: str | Path,
) -> dict:
    """Metrics of ``ensemble`` on ``genes``; progress is logged by the reader."""
    metadata = reader.metadata
    labels_parts: list[np.ndarray] = []
    proba_parts: list[np.ndarray] = []
    gene_parts: list[np.ndarray] = []
    probability_columns = _probability_columns(metadata.classes)
    writer: IncrementalParquetWriter | None = None
    started = time.monotonic()
    try:
        for batch in reader.iter_batches(genes, batch_rows, with_ids=True, purpose="holdout prediction"):
            proba = ensemble.predict_proba(batch.features)
            table = batch.ids.append_column("label", pa.array(batch.labels))
            for j, name in enumerate(probability_columns):
                table = table.append_column(name, pa.array(proba[:, j].astype(np.float32)))
            if writer is None:
                writer = IncrementalParquetWriter(predictions_path, table.schema)
            writer.write(table)
            labels_parts.append(batch.labels)
            gene_parts.append(batch.ids.column(metadata.gene_column).to_numpy(zero_copy_only=False))
            proba_parts.append(proba.astype(np.float32))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        raise ValueError("the holdout genes have no rows; check gene_split")
    writer.close()
    labels = np.concatenate(labels_parts)
    proba = np.concatenate(proba_parts)
    metrics = multiclass_metrics(labels, proba, metadata.classes, genes=np.concatenate(gene_parts))
    metrics["genes"] = len(genes)
    metrics["seconds"] = time.monotonic() - started
    return metrics
