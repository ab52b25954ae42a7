"""Streamed holdout evaluation: predictions chunk by chunk, written incrementally.

Only one batch of features is in memory at a time; what is kept for the metrics is one
label and two probability vectors per row (calibrated and uncalibrated, float32), so that
the calibration error (ECE) is reported before and after calibration on unseen genes.

When the ensemble's models are too large to hold together (``Ensemble.one_at_a_time``) the
loop is turned inside out: one pass over the holdout per member, each member loaded once,
accumulating its weighted probabilities, then a last pass for the ids and the Parquet file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.evaluate.ensemble import Ensemble
from memopt_pipeline.core.evaluate.metrics import holdout_curves, multiclass_metrics
from memopt_pipeline.core.storage import IncrementalParquetWriter
from memopt_pipeline.core.train.calibration import apply_calibration, expected_calibration_error


def _probability_columns(classes: list) -> list[str]:
    return [f"p_{c}" for c in classes]


def _member_outer_probabilities(
    ensemble: Ensemble, reader: BatchReader, genes: Collection[str], batch_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated, uncalibrated) ensemble probabilities of ``genes`` in reader order, loading
    each member once (one pass over the holdout per member)."""
    rows = reader.count_rows(genes)
    calibrated = np.zeros((rows, ensemble.n_classes), dtype=np.float64)
    uncalibrated = np.zeros_like(calibrated)
    for index, (weight, member, model) in enumerate(ensemble.iter_members()):
        offset = 0
        purpose = f"holdout prediction, model {index + 1}/{len(ensemble.members)}"
        for batch in reader.iter_batches(genes, batch_rows, purpose=purpose):
            proba = model.predict_proba(batch.features)
            end = offset + len(proba)
            calibrated[offset:end] += weight * apply_calibration(member.calibration, proba)
            uncalibrated[offset:end] += weight * apply_calibration(None, proba)
            offset = end
        if offset != rows:
            raise ValueError(
                f"holdout has {offset:,} rows but dataset_metadata counted {rows:,}; re-materialize dataset_metadata"
            )
    return calibrated, uncalibrated


def _concatenate_and_clear(parts: list[np.ndarray]) -> np.ndarray:
    joined = np.concatenate(parts)
    parts.clear()
    return joined


def evaluate_holdout(
    ensemble: Ensemble,
    reader: BatchReader,
    genes: Collection[str],
    *,
    batch_rows: int,
    predictions_path: str | Path,
    checkpoint: Callable[[], None] | None = None,
) -> dict:
    """Metrics of ``ensemble`` on ``genes``; progress is logged by the reader.

    The reader's checkpoint covers the prediction passes; ``checkpoint`` (the memory guard's
    check) covers the metrics computed afterwards over all holdout rows at once.
    """
    metadata = reader.metadata
    labels_parts: list[np.ndarray] = []
    proba_parts: list[np.ndarray] = []
    uncalibrated_parts: list[np.ndarray] = []
    gene_parts: list[np.ndarray] = []
    probability_columns = _probability_columns(metadata.classes)
    gene_values = pa.array(sorted({str(g) for g in genes}), type=pa.string())
    writer: IncrementalParquetWriter | None = None
    started = time.monotonic()
    precomputed = _member_outer_probabilities(ensemble, reader, genes, batch_rows) if ensemble.one_at_a_time else None
    offset = 0
    try:
        # With precomputed probabilities this pass only needs ids and labels: no features.
        for batch in reader.iter_batches(
            genes, batch_rows, with_ids=True, features=[] if precomputed else None, purpose="holdout prediction"
        ):
            if precomputed is None:
                proba, uncalibrated = ensemble.predict_proba_both(batch.features)
            else:
                end = offset + len(batch.labels)
                proba, uncalibrated = precomputed[0][offset:end], precomputed[1][offset:end]
                offset = end
            table = batch.ids.append_column("label", pa.array(batch.labels))
            for j, name in enumerate(probability_columns):
                table = table.append_column(name, pa.array(proba[:, j].astype(np.float32)))
            if writer is None:
                writer = IncrementalParquetWriter(predictions_path, table.schema)
            writer.write(table)
            labels_parts.append(batch.labels)
            # The gene of each row as an int32 index into the holdout's genes, not a Python string
            # per row (~60 bytes each): the per-gene spread only groups by it.
            gene_names = pc.cast(batch.ids.column(metadata.gene_column), pa.string())
            gene_parts.append(pc.index_in(gene_names, value_set=gene_values).to_numpy(zero_copy_only=False))
            proba_parts.append(proba.astype(np.float32))
            uncalibrated_parts.append(uncalibrated.astype(np.float32))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        raise ValueError("the holdout genes have no rows; check gene_split")
    writer.close()
    # Each list is dropped once concatenated, so that the rows are held once, not twice.
    labels, proba, gene_index = (_concatenate_and_clear(parts) for parts in (labels_parts, proba_parts, gene_parts))
    uncalibrated = _concatenate_and_clear(uncalibrated_parts)
    precomputed = None  # the per-member pass's probabilities, now copied into proba / uncalibrated
    metrics = multiclass_metrics(labels, proba, metadata.classes, genes=gene_index, checkpoint=checkpoint)
    del gene_index
    uncalibrated_metrics = multiclass_metrics(labels, uncalibrated, metadata.classes, checkpoint=checkpoint)
    metrics["uncalibrated_logloss"] = uncalibrated_metrics["logloss"]
    metrics["ece_before_calibration"] = expected_calibration_error(labels, uncalibrated)
    metrics["ece_after_calibration"] = expected_calibration_error(labels, proba)
    # PR curves and reliability bins of the calibrated probabilities, for plots and the run report.
    metrics["curves"] = holdout_curves(labels, proba, metadata.classes, checkpoint)
    metrics["genes"] = len(genes)
    metrics["models_loaded_one_at_a_time"] = ensemble.one_at_a_time
    metrics["seconds"] = time.monotonic() - started
    return metrics
