"""Shared by the benchmarks that hold a dataset's rows in memory to compare models on them
(calibration_quality.py, ensemble_size.py): the pipeline's gene split, rows as numpy arrays,
chunked prediction."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

HOLDOUT_FRACTION, SPLIT_SEED = 0.2, 0  # the pipeline's gene_split defaults
PREDICT_CHUNK_ROWS = 200_000


def scan_and_split(data: Path):
    """(metadata, gene stats, split) of the dataset at ``data``, split as the pipeline's gene_split does."""
    from memopt_pipeline.core.data.dataset import list_shards, scan_dataset
    from memopt_pipeline.core.data.sampling import split_genes
    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN

    with tempfile.TemporaryDirectory() as scratch:
        metadata = scan_dataset(list_shards(data), gene_column=GENE_COLUMN, label_column=LABEL_COLUMN,
                                gene_stats_path=Path(scratch) / "gene_stats.parquet")
        stats = metadata.read_gene_stats()
    return metadata, stats, split_genes(stats, holdout_fraction=HOLDOUT_FRACTION, seed=SPLIT_SEED)


def frame_to_arrays(frame, metadata, stats):
    """(float32 C-order features, class indices, gene indices, gene -> index) of a frame of the
    gene, label and feature columns; gene indices follow the sorted genes of ``stats``."""
    import polars as pl

    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN

    gene_index = {gene: i for i, gene in enumerate(sorted(stats["gene"].to_list()))}
    genes = frame[GENE_COLUMN].cast(pl.Utf8).replace_strict(gene_index, return_dtype=pl.Int32).to_numpy()
    labels = frame[LABEL_COLUMN].replace_strict({c: i for i, c in enumerate(metadata.classes)},
                                                return_dtype=pl.Int32).to_numpy()
    features = frame.select(pl.col(metadata.features).cast(pl.Float32)).to_numpy(order="c")
    return features, labels, genes, gene_index


def predict(booster, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The model's probabilities (raw per-class sigmoids for one-vs-rest) on ``rows``, in chunks: no full copy."""
    out = np.empty((len(rows), booster.num_model_per_iteration()), dtype=np.float64)
    for start in range(0, len(rows), PREDICT_CHUNK_ROWS):
        chunk = rows[start:start + PREDICT_CHUNK_ROWS]
        out[start:start + len(chunk)] = booster.predict(features[chunk])
    return out
