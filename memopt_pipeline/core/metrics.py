"""Classification metrics for multiclass probabilities, beside the class-prior baseline."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

_EPS = 1e-15


def multiclass_metrics(labels: np.ndarray, proba: np.ndarray, classes: list) -> dict:
    """Multi-logloss, per-class PR-AUC (average precision) and ROC-AUC, and their baselines.

    The baseline predicts the class prior of ``labels`` for every row: its logloss is the
    entropy of the prior and its PR-AUC equals the class prevalence. A model that does not
    beat it has learnt nothing.
    """
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
        "per_class": {},
    }
    for index, name in enumerate(classes):
        positives = labels == index
        entry = {"prevalence": float(prior[index]), "support": int(positives.sum())}
        if 0 < positives.sum() < len(labels):
            entry["pr_auc"] = float(average_precision_score(positives, proba[:, index]))
            entry["roc_auc"] = float(roc_auc_score(positives, proba[:, index]))
        else:  # a class absent from (or alone in) the evaluated genes has no ranking metric
            entry["pr_auc"] = float("nan")
            entry["roc_auc"] = float("nan")
        result["per_class"][str(name)] = entry
    return result
