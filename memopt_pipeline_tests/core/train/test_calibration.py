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
