"""Calibration fitted on out-of-fold predictions makes held-out genes' probabilities calibrated,
for one-vs-rest models too: it must be applied to the same quantity it was fitted on.

The model is deliberately over-confident (learning rate 1, tiny leaves, no early stopping):
its one-vs-rest sigmoids on unseen genes are far from calibrated and their rows sum to
anything between 0 and 3, which is where fitting on one quantity and applying to another shows.
"""

import lightgbm as lgb
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.dataset import list_shards, scan_dataset
from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN, SyntheticSpec, generate_dataset
from memopt_pipeline.core.evaluate.ensemble import Ensemble, EnsembleMember
from memopt_pipeline.core.evaluate.holdout import evaluate_holdout
from memopt_pipeline.core.train.calibration import fit_calibration
from memopt_pipeline.core.train.instance import predict_genes

# ~6,000 rows over 90 genes: a third trains the model, a third stands in for the out-of-fold
# predictions calibration is fitted on, a third is the holdout (~1,800 rows).
SPEC = SyntheticSpec(n_genes=90, kmer_sizes=(1, 2), windows=((-10, 0), (0, 10)), genes_per_shard=30, row_group_rows=1_000, seed=11)
OBJECTIVES = {"ovr": "multiclassova", "softmax": "multiclass"}
BINS = 15
# How close to the best achievable ECE (a map fitted on the holdout itself) calibration must get.
ORACLE_MARGIN = 0.02


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration_data")
    generate_dataset(folder / "shards", SPEC)
    metadata = scan_dataset(
        list_shards(folder / "shards"), gene_column=GENE_COLUMN, label_column=LABEL_COLUMN,
        gene_stats_path=folder / "gene_stats.parquet",
    )  # fmt: skip
    genes = metadata.read_gene_stats()["gene"].to_list()
    return metadata, genes[0::3], genes[1::3], genes[2::3]


def _rows(metadata, genes):
    batches = list(BatchReader(metadata).iter_batches(genes, 100_000))
    return np.concatenate([b.features for b in batches]), np.concatenate([b.labels for b in batches])


@pytest.fixture(scope="module")
def over_confident(data, tmp_path_factory):
    """One over-confident LightGBM model per objective, saved as the pipeline saves it."""
    metadata, train_genes, _, _ = data
    features, labels = _rows(metadata, train_genes)
    folder = tmp_path_factory.mktemp("over_confident")
    paths = {}
    for name, objective in OBJECTIVES.items():
        params = {
            "objective": objective, "num_class": 3, "learning_rate": 1.0, "num_leaves": 31, "min_data_in_leaf": 2,
            "lambda_l2": 0.0, "num_threads": 1, "deterministic": True, "seed": 0, "verbose": -1,
        }  # fmt: skip
        booster = lgb.train(params, lgb.Dataset(features, labels, feature_name=list(metadata.features)), num_boost_round=50)
        paths[name] = folder / f"{name}.txt"
        booster.save_model(str(paths[name]))
    return paths


def _ece(labels: np.ndarray, proba: np.ndarray) -> float:
    """Mean over classes of the one-vs-rest ECE, equal-width bins, written out bin by bin."""
    per_class = []
    for k in range(proba.shape[1]):
        p, hit = proba[:, k], labels == k
        total = 0.0
        for b in range(BINS):
            low, high = b / BINS, (b + 1) / BINS
            in_bin = (p >= low) & ((p < high) if b < BINS - 1 else (p <= high))
            if in_bin.any():
                total += in_bin.sum() * abs(p[in_bin].mean() - hit[in_bin].mean())
        per_class.append(total / len(labels))
    return float(np.mean(per_class))


def _oracle(labels: np.ndarray, distribution: np.ndarray, method: str) -> np.ndarray:
    """The same kind of per-class map, fitted on the holdout itself (the best it can do), then rows
    renormalised as any calibrated output is."""
    columns = []
    for k in range(distribution.shape[1]):
        p, hit = np.clip(distribution[:, k], 1e-6, 1 - 1e-6), labels == k
        if method == "isotonic":
            columns.append(IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6).fit(p, hit).predict(p))
        else:
            logit = (np.log(p) - np.log1p(-p)).reshape(-1, 1)
            columns.append(LogisticRegression(C=1e4).fit(logit, hit).predict_proba(logit)[:, 1])
    out = np.column_stack(columns)
    return out / out.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("objective", ["ovr", "softmax"])
@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_brings_held_out_genes_close_to_the_best_achievable(data, over_confident, objective, method, tmp_path):
    metadata, _, calibration_genes, holdout_genes = data
    path = over_confident[objective]
    booster = lgb.Booster(model_file=str(path))
    # Out-of-fold predictions as the backends record them, on genes the model never saw.
    oof_labels, oof_proba = predict_genes(
        BatchReader(metadata), calibration_genes, booster.predict, batch_rows=1_000, purpose="out-of-fold prediction"
    )
    calibration = fit_calibration(oof_labels, oof_proba, method=method)

    predictions = tmp_path / "predictions.parquet"
    metrics = evaluate_holdout(
        Ensemble([EnsembleMember("instance_0", str(path), calibration=calibration)]),
        BatchReader(metadata), holdout_genes, batch_rows=700, predictions_path=predictions,
    )  # fmt: skip
    table = pq.read_table(predictions)
    labels = table.column("label").to_numpy()
    output = np.column_stack([table.column(f"p_{c}").to_numpy() for c in metadata.classes]).astype(np.float64)

    features, holdout_labels = _rows(metadata, holdout_genes)
    np.testing.assert_array_equal(labels, holdout_labels)
    raw = np.clip(booster.predict(features), 1e-6, None)  # one-vs-rest rows can be all zeros
    distribution = raw / raw.sum(axis=1, keepdims=True)
    uncalibrated, calibrated = _ece(labels, distribution), _ece(labels, output)
    oracle = _ece(labels, _oracle(labels, distribution, method))
    print(f"{objective} {method}: ECE uncalibrated {uncalibrated:.4f}, calibrated {calibrated:.4f}, oracle {oracle:.4f}")

    assert calibrated < uncalibrated
    assert calibrated <= oracle + ORACLE_MARGIN, (calibrated, oracle)
    # The holdout metadata reports the ECE of what is written out (float32 probabilities).
    assert metrics["ece_after_calibration"]["mean"] == pytest.approx(calibrated, abs=1e-4)
