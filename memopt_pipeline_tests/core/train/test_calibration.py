import numpy as np
import pytest

from memopt_pipeline.core.train.calibration import (
    apply_calibration,
    expected_calibration_error,
    fit_calibration,
    normalise_rows,
)


def _overconfident(n=20_000, seed=0):
    """True 3-class probabilities, and a model that sharpens them (logits x 3): over-confident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.0, size=(n, 3)) + np.array([2.0, 0.0, 0.0])
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in true])
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)
    return labels, true, sharp


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_reduces_the_error_of_an_overconfident_model(method):
    labels, true, sharp = _overconfident()
    before = expected_calibration_error(labels, sharp)["mean"]
    calibration = fit_calibration(labels[:10_000], sharp[:10_000], method=method)
    # Measured on rows the map was not fitted on.
    after = expected_calibration_error(labels[10_000:], apply_calibration(calibration, sharp[10_000:]))["mean"]
    oracle = expected_calibration_error(labels[10_000:], true[10_000:])["mean"]
    assert before > 0.05
    assert after < before / 3
    assert after < oracle + 0.02


def test_calibrated_rows_are_distributions_and_the_map_is_json():
    import json

    labels, _, sharp = _overconfident(3_000)
    for method in ("platt", "isotonic", "none"):
        calibration = json.loads(json.dumps(fit_calibration(labels, sharp, method=method)))
        out = apply_calibration(calibration, sharp)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-9)
        assert out.min() > 0  # no zero probability: a mistake must not cost an infinite logloss


def test_ece_is_zero_for_a_perfectly_calibrated_binning_and_large_for_a_wrong_one():
    labels = np.array([0] * 50 + [1] * 50)
    half = np.full((100, 2), 0.5)
    assert expected_calibration_error(labels, half)["mean"] == pytest.approx(0.0)
    wrong = np.tile([0.9, 0.1], (100, 1))
    assert expected_calibration_error(labels, wrong)["per_class"][0] == pytest.approx(0.4)


def test_a_class_absent_from_the_oof_rows_is_left_as_predicted():
    labels = np.zeros(100, dtype=int)  # only class 0 seen
    proba = normalise_rows(np.random.default_rng(1).random((100, 2)))
    calibration = fit_calibration(labels, proba, method="platt")
    assert calibration["per_class"][0] == {"identity": True}


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration(np.zeros(3, dtype=int), np.ones((3, 2)) / 2, method="beta")
    with pytest.raises(ValueError, match="one row per label"):
        fit_calibration(np.zeros(4, dtype=int), np.ones((3, 2)) / 2)
    calibration = fit_calibration(np.array([0, 1, 0, 1]), np.array([[0.6, 0.4], [0.3, 0.7]] * 2))
    with pytest.raises(ValueError, match="fitted for 2 classes"):
        apply_calibration(calibration, np.ones((2, 3)) / 3)


def _saturated(rng, n):
    """A saturated model's rows, two kinds: half put all but <1e-6 on one class (right 96% of the
    time); the other half split between two classes and put <1e-6 on the third, which is
    nevertheless the answer 40% of the time. Returns labels, predictions and the third class of
    the second kind (-1 for the first kind)."""
    rows = np.arange(n)
    winner = rng.integers(0, 3, n)
    second = (winner + rng.integers(1, 3, n)) % 3
    third = 3 - winner - second
    split = rng.random(n) < 0.5
    raw = 10 ** rng.uniform(-12, -7, (n, 3))
    raw[rows, second] = np.where(split, rng.uniform(0.05, 0.45, n), raw[rows, second])
    raw[rows, winner] = 0.0
    raw[rows, winner] = 1.0 - raw.sum(axis=1)
    wrong = np.where(rng.random(n) < 0.5, second, third)
    confident_labels = np.where(rng.random(n) < 0.96, winner, wrong)
    split_labels = np.where(rng.random(n) < 0.4, third, np.where(rng.random(n) < 0.7, winner, second))
    return np.where(split, split_labels, confident_labels), raw, np.where(split, third, -1)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_saturated_probabilities_are_calibrated_whatever_their_rounding(method):
    """Out-of-fold rows arrive row-normalised as float32 (as predict_genes records them), held-out
    rows as the model's float64 output. Below 1e-6 the two forms of one prediction differ only by
    rounding, so they must be calibrated alike; and held out, a class predicted below 1e-6 must
    get about its observed frequency among those rows, not a step fitted to rounding noise."""
    rng = np.random.default_rng(0)
    oof_labels, oof_raw, _ = _saturated(rng, 6_000)
    labels, raw, _ = _saturated(rng, 6_000)
    calibration = fit_calibration(oof_labels, normalise_rows(oof_raw).astype(np.float32), method=method)
    calibrated = apply_calibration(calibration, raw)
    as_recorded = apply_calibration(calibration, normalise_rows(raw).astype(np.float32))
    np.testing.assert_allclose(calibrated, as_recorded, atol=1e-3)
    for k in range(3):
        rows = raw[:, k] < 1e-6
        observed = (labels[rows] == k).mean()  # about 0.15
        assert calibrated[rows, k].mean() == pytest.approx(observed, abs=0.07), k
