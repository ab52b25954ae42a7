"""Classification metrics for multiclass probabilities, beside the class-prior baseline.

The metrics run over every holdout row at once, after the streamed predictions, and each
per-class ranking metric sorts or copies a column of all rows: ``checkpoint`` (the memory
guard's cooperative check, when given) runs after each such step so a stage over its budget
stops there rather than being killed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, log_loss, precision_recall_curve, roc_auc_score

from memopt_pipeline.core.train.calibration import ECE_BINS

_EPS = 1e-15


def top_k_accuracy(positives: np.ndarray, scores: np.ndarray) -> float:
    """The splice-site literature's top-k accuracy (SpliceAI): with k = number of true sites,
    the share of the k highest-scoring rows that are true sites."""
    k = int(positives.sum())
    if k == 0:
        return float("nan")
    top = np.argpartition(-scores, k - 1)[:k]
    return float(positives[top].mean())


def best_f1(positives: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Highest F1 over all thresholds, and that threshold."""
    precision, recall, thresholds = precision_recall_curve(positives, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("nan")


def _no_check() -> None:
    pass


def per_gene_logloss_spread(
    genes: np.ndarray, labels: np.ndarray, proba: np.ndarray, checkpoint: Callable[[], None] | None = None
) -> dict:
    """Spread of per-gene mean logloss: a model can be good on average and bad on many genes."""
    checkpoint = checkpoint or _no_check
    row_loss = -np.log(np.clip(proba[np.arange(len(labels)), labels], _EPS, 1.0))
    checkpoint()
    # Sorting every row's gene id is the largest step here (a sorted copy plus the indices).
    _, inverse = np.unique(genes, return_inverse=True)
    checkpoint()
    sums = np.bincount(inverse, weights=row_loss)
    counts = np.bincount(inverse)
    per_gene = sums / counts
    return {
        "genes": int(len(per_gene)),
        "mean": float(per_gene.mean()),
        "std": float(per_gene.std()),
        "p10": float(np.quantile(per_gene, 0.1)),
        "median": float(np.median(per_gene)),
        "p90": float(np.quantile(per_gene, 0.9)),
        "worst": float(per_gene.max()),
    }


def multiclass_metrics(
    labels: np.ndarray,
    proba: np.ndarray,
    classes: list,
    genes: np.ndarray | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> dict:
    """Multi-logloss, per-class PR-AUC (average precision), ROC-AUC, best F1, top-k accuracy,
    the confusion matrix and (given ``genes``) the per-gene logloss spread, beside baselines.

    The baseline predicts the class prior of ``labels`` for every row: its logloss is the
    entropy of the prior and its PR-AUC equals the class prevalence. A model that does not
    beat it has learnt nothing. ``checkpoint`` runs per class and per step of the gene spread.
    """
    checkpoint = checkpoint or _no_check
    labels = np.asarray(labels)
    n_classes = len(classes)
    proba = np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0)
    proba = proba / proba.sum(axis=1, keepdims=True)
    prior = np.bincount(labels, minlength=n_classes) / len(labels)
    prior_proba = np.broadcast_to(np.clip(prior, _EPS, 1.0), proba.shape)
    result: dict = {
        "rows": int(len(labels)),
        "logloss": float(log_loss(labels, proba, labels=list(range(n_classes)))),
        "baseline_logloss": float(log_loss(labels, prior_proba, labels=list(range(n_classes)))),
        "accuracy": float((proba.argmax(axis=1) == labels).mean()),
        # rows: true class, columns: predicted (argmax) class, in class-index order
        "confusion_matrix": confusion_matrix(labels, proba.argmax(axis=1), labels=list(range(n_classes))).tolist(),
        "per_class": {},
    }
    checkpoint()
    if genes is not None:
        result["per_gene_logloss"] = per_gene_logloss_spread(np.asarray(genes), labels, proba, checkpoint)
    for index, name in enumerate(classes):
        positives = labels == index
        entry = {"prevalence": float(prior[index]), "support": int(positives.sum())}
        if 0 < positives.sum() < len(labels):
            entry["pr_auc"] = float(average_precision_score(positives, proba[:, index]))
            entry["roc_auc"] = float(roc_auc_score(positives, proba[:, index]))
            entry["best_f1"], entry["best_f1_threshold"] = best_f1(positives, proba[:, index])
            entry["top_k_accuracy"] = top_k_accuracy(positives, proba[:, index])
        else:  # a class absent from (or alone in) the evaluated genes has no ranking metric
            for name_ in ("pr_auc", "roc_auc", "best_f1", "best_f1_threshold", "top_k_accuracy"):
                entry[name_] = float("nan")
        result["per_class"][str(name)] = entry
        checkpoint()
    return result


# Points kept per PR curve: enough for a smooth line in a plot or a report, few enough that
# the curves of every class fit in the holdout asset's JSON value (not one point per row).
PR_CURVE_POINTS = 200


def pr_curve_points(positives: np.ndarray, scores: np.ndarray, max_points: int = PR_CURVE_POINTS) -> dict:
    """Precision-recall curve of one class, down-sampled to at most ``max_points`` points.

    Points are taken evenly along sklearn's curve (which has one point per distinct score),
    always keeping both ends; recall is non-increasing along the lists.
    """
    positives = np.asarray(positives, dtype=bool)
    if not 0 < positives.sum() < len(positives):
        return {"recall": [], "precision": []}  # no curve without both positives and negatives
    precision, recall, _ = precision_recall_curve(positives, scores)
    keep = np.unique(np.linspace(0, len(recall) - 1, min(max_points, len(recall))).round().astype(np.int64))
    return {"recall": recall[keep].tolist(), "precision": precision[keep].tolist()}


def reliability_bins(positives: np.ndarray, scores: np.ndarray, bins: int) -> dict:
    """Reliability (calibration) curve of one class: equal-width bins of the predicted
    probability, each with its mean prediction, observed frequency and row count. Empty bins
    are left out. The same bins as :func:`calibration.expected_calibration_error`, so the
    curve and the reported ECE agree."""
    scores = np.asarray(scores, dtype=np.float64)
    observed = np.asarray(positives, dtype=np.float64)
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    filled = counts > 0
    return {
        "mean_predicted": (np.bincount(index, weights=scores, minlength=bins)[filled] / counts[filled]).tolist(),
        "fraction_positive": (np.bincount(index, weights=observed, minlength=bins)[filled] / counts[filled]).tolist(),
        "count": counts[filled].tolist(),
    }


def holdout_curves(
    labels: np.ndarray, proba: np.ndarray, classes: list, checkpoint: Callable[[], None] | None = None
) -> dict:
    """Per class (by name): a down-sampled PR curve and reliability bins, for plots and reports;
    ``checkpoint`` runs per class (sklearn's curve holds a point per distinct score)."""
    checkpoint = checkpoint or _no_check
    labels = np.asarray(labels)
    proba = np.asarray(proba)
    curves: dict = {"pr": {}, "reliability": {}}
    for index, name in enumerate(classes):
        positives = labels == index
        curves["pr"][str(name)] = pr_curve_points(positives, proba[:, index])
        curves["reliability"][str(name)] = reliability_bins(positives, proba[:, index], ECE_BINS)
        checkpoint()
    return curves
