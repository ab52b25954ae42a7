"""Per-class probability calibration fitted on out-of-fold predictions, and its error (ECE).

Why out-of-fold: the refit model has seen every training row, so its own predictions on
them are over-confident; the phase-1 fold models' predictions on their held-out genes are
honest, and the refit model (same rounds, more data) is at least as sharp, so a map fitted
on them transfers.

One quantity, fitted and applied: the row-normalised probabilities. Both
:func:`fit_calibration` and :func:`apply_calibration` renormalise their input rows first. For
softmax models this changes nothing; for one-vs-rest models (per-class sigmoids whose rows
do not sum to 1) it is what makes the map fitted on the out-of-fold predictions (recorded
row-normalised, the quantity the fold metrics score) valid for the model's raw output at
prediction time. Renormalising first rather than calibrating each raw sigmoid: measured on an
over-confident one-vs-rest model (rows summing to 0..3), held-out ECE as low or lower, and
calibrations already stored in model cards (fitted on normalised rows) stay valid.

Methods (per class, one-vs-rest, then rows renormalised to sum to 1):
- ``platt``: a logistic regression on the logit of the class probability (two numbers per
  class). Smooth and hard to over-fit; the default.
- ``isotonic``: a monotone step function (sklearn's IsotonicRegression), stored as its
  breakpoints and applied by linear interpolation. More flexible, needs more rows.
- ``none``: the identity, kept so every model carries the same structure.

The fitted calibrator is a plain dict (JSON in the model card) so that it travels with the
model and is applied at prediction time by :mod:`memopt_pipeline.core.evaluate.ensemble`.
"""

from __future__ import annotations

import numpy as np

METHODS = ("platt", "isotonic", "none")
# Probabilities are clipped away from 0 and 1 before taking logits and after calibration:
# an isotonic step at exactly 0 would make one mistake cost an infinite logloss.
_CLIP = 1e-6
# The maps' input is also held this far from 0 and 1. A saturated model's probabilities differ
# below it only by rounding (rows clipped at _CLIP then renormalised, out-of-fold rows stored
# as float32): left apart, isotonic regression turns that noise into steps (measured: a class
# observed 47% of the time among such rows calibrated to ~0 on held-out genes).
_INPUT_FLOOR = 1e-5
ECE_BINS = 15


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _CLIP, 1.0 - _CLIP)
    return np.log(p) - np.log1p(-p)


def normalise_rows(proba: np.ndarray) -> np.ndarray:
    """Rows summing to 1 (one-vs-rest models' per-class probabilities do not)."""
    proba = np.clip(np.asarray(proba, dtype=np.float64), _CLIP, None)
    return proba / proba.sum(axis=1, keepdims=True)


def _map_input(proba: np.ndarray) -> np.ndarray:
    """What the per-class maps are fitted on and applied to: renormalised rows (see the module
    docstring), held within [_INPUT_FLOOR, 1 - _INPUT_FLOOR]."""
    return np.clip(normalise_rows(proba), _INPUT_FLOOR, 1.0 - _INPUT_FLOOR)


def fit_calibration(labels: np.ndarray, proba: np.ndarray, *, method: str = "platt") -> dict:
    """Fit one calibration map per class on (out-of-fold) ``proba`` of shape (rows, classes)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    labels = np.asarray(labels)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or len(proba) != len(labels):
        raise ValueError(f"proba must be (rows, classes) with one row per label; got {proba.shape} for {len(labels)} labels")
    proba = _map_input(proba)  # the quantity apply_calibration maps
    n_classes = proba.shape[1]
    result: dict = {"method": method, "n_classes": n_classes, "rows": int(len(labels)), "per_class": []}
    if method == "none":
        return result
    for k in range(n_classes):
        positives = (labels == k).astype(np.float64)
        if positives.sum() == 0 or positives.sum() == len(positives):
            # Nothing to learn from one value: keep this class as predicted.
            result["per_class"].append({"identity": True})
            continue
        if method == "platt":
            from sklearn.linear_model import LogisticRegression

            # Large C: almost unregularised, the two parameters are well determined by
            # thousands of rows; lbfgs on one feature converges in a few iterations.
            model = LogisticRegression(C=1e4, solver="lbfgs", max_iter=200)
            model.fit(_logit(proba[:, k]).reshape(-1, 1), positives)
            result["per_class"].append({"slope": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0])})
        else:
            from sklearn.isotonic import IsotonicRegression

            model = IsotonicRegression(y_min=_CLIP, y_max=1.0 - _CLIP, out_of_bounds="clip")
            model.fit(proba[:, k], positives)
            result["per_class"].append(
                {"x": model.X_thresholds_.astype(float).tolist(), "y": model.y_thresholds_.astype(float).tolist()}
            )
    return result


def apply_calibration(calibration: dict | None, proba: np.ndarray) -> np.ndarray:
    """Calibrated probabilities (rows sum to 1) of a model's output ``proba`` (softmax rows or raw
    one-vs-rest sigmoids); ``None`` or method ``none`` only renormalises.

    The per-class maps are applied to the renormalised rows, the quantity they were fitted on."""
    if not calibration or calibration["method"] == "none":
        return normalise_rows(proba)
    proba = _map_input(proba)
    if proba.shape[1] != calibration["n_classes"]:
        raise ValueError(
            f"the calibration was fitted for {calibration['n_classes']} classes, the model predicts {proba.shape[1]}"
        )
    out = np.empty_like(proba)
    for k, params in enumerate(calibration["per_class"]):
        if params.get("identity"):
            out[:, k] = proba[:, k]
        elif calibration["method"] == "platt":
            z = params["slope"] * _logit(proba[:, k]) + params["intercept"]
            out[:, k] = 1.0 / (1.0 + np.exp(-z))
        else:
            out[:, k] = np.interp(proba[:, k], params["x"], params["y"])
    return normalise_rows(out)


def expected_calibration_error(labels: np.ndarray, proba: np.ndarray, *, bins: int = ECE_BINS) -> dict:
    """Per-class ECE (one-vs-rest, equal-width bins) and their mean.

    ECE = sum over bins of (rows in bin / rows) * |mean predicted probability - observed
    frequency|: 0 means that among rows predicted at p, a share p is of the class.
    """
    labels = np.asarray(labels)
    proba = np.asarray(proba, dtype=np.float64)
    per_class = []
    for k in range(proba.shape[1]):
        p = proba[:, k]
        observed = (labels == k).astype(np.float64)
        index = np.minimum((p * bins).astype(np.int64), bins - 1)
        predicted_sum = np.bincount(index, weights=p, minlength=bins)
        observed_sum = np.bincount(index, weights=observed, minlength=bins)
        per_class.append(float(np.abs(predicted_sum - observed_sum).sum() / max(len(p), 1)))
    return {"per_class": per_class, "mean": float(np.mean(per_class))}
