import math
import sys

import numpy as np
import pytest

from memopt_pipeline.core.evaluate.metrics import holdout_curves, multiclass_metrics


def test_perfect_and_prior_predictions():
    labels = np.array([0, 0, 0, 1, 2, 0])
    perfect = np.eye(3)[labels]
    result = multiclass_metrics(labels, perfect, ["neither", "donor", "acceptor"])
    assert result["logloss"] < 1e-6
    assert result["per_class"]["donor"]["pr_auc"] == 1.0
    prior = np.tile(np.bincount(labels, minlength=3) / len(labels), (len(labels), 1))
    baseline = multiclass_metrics(labels, prior, ["neither", "donor", "acceptor"])
    assert math.isclose(baseline["logloss"], baseline["baseline_logloss"], rel_tol=1e-9)
    assert baseline["per_class"]["donor"]["prevalence"] == 1 / 6


def test_absent_class_has_nan_ranking_metrics():
    labels = np.array([0, 1, 0, 1])
    proba = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.7, 0.3, 0.0], [0.4, 0.6, 0.0]])
    result = multiclass_metrics(labels, proba, [0, 1, 2])
    assert math.isnan(result["per_class"]["2"]["pr_auc"])
    assert result["per_class"]["1"]["roc_auc"] == 1.0


def test_splice_metrics_top_k_f1_confusion_and_gene_spread():
    from memopt_pipeline.core.evaluate.metrics import top_k_accuracy

    labels = np.array([0, 0, 0, 0, 1, 1, 2, 0])
    proba = np.array(
        [
            [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1],
            [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05],
        ]
    )
    genes = np.array(["a", "a", "a", "a", "b", "b", "b", "b"])
    result = multiclass_metrics(labels, proba, ["neither", "donor", "acceptor"], genes=genes)
    # donor: k = 2 true sites; the two highest donor scores are rows 4 (donor) and 1 (neither).
    assert result["per_class"]["donor"]["top_k_accuracy"] == 0.5
    assert result["per_class"]["acceptor"]["top_k_accuracy"] == 1.0
    assert result["per_class"]["acceptor"]["best_f1"] == 1.0
    assert result["confusion_matrix"] == [[4, 1, 0], [1, 1, 0], [0, 0, 1]]
    spread = result["per_gene_logloss"]
    assert spread["genes"] == 2 and spread["worst"] >= spread["median"] >= 0
    assert math.isnan(top_k_accuracy(np.zeros(3, dtype=bool), np.ones(3)))


def test_pr_curve_is_downsampled_keeping_both_ends():
    from sklearn.metrics import precision_recall_curve

    from memopt_pipeline.core.evaluate.metrics import pr_curve_points

    rng = np.random.default_rng(0)
    positives = rng.random(5_000) < 0.1
    scores = rng.random(5_000) + positives
    curve = pr_curve_points(positives, scores, max_points=50)
    precision, recall, _ = precision_recall_curve(positives, scores)
    assert len(curve["recall"]) == len(curve["precision"]) == 50 < len(recall)
    assert (curve["recall"][0], curve["precision"][0]) == (recall[0], precision[0])
    assert (curve["recall"][-1], curve["precision"][-1]) == (recall[-1], precision[-1])
    assert np.all(np.diff(curve["recall"]) <= 0)
    assert pr_curve_points(np.zeros(10, dtype=bool), np.linspace(0, 1, 10)) == {"recall": [], "precision": []}


def test_reliability_bins_agree_with_the_reported_ece():
    import pytest

    from memopt_pipeline.core.evaluate.metrics import holdout_curves
    from memopt_pipeline.core.train.calibration import ECE_BINS, expected_calibration_error

    rng = np.random.default_rng(1)
    proba = rng.dirichlet([1.0, 1.0, 1.0], size=3_000)
    labels = np.array([rng.choice(3, p=p) for p in proba])
    curves = holdout_curves(labels, proba, ["neither", "donor", "acceptor"])
    ece = expected_calibration_error(labels, proba)["per_class"]
    for k, name in enumerate(["neither", "donor", "acceptor"]):
        bins = curves["reliability"][name]
        assert sum(bins["count"]) == len(labels) and len(bins["count"]) <= ECE_BINS
        weighted_gap = np.sum(np.array(bins["count"]) * np.abs(np.array(bins["mean_predicted"]) - bins["fraction_positive"]))
        assert weighted_gap / len(labels) == pytest.approx(ece[k], rel=1e-9)
        assert curves["pr"][name]["recall"][0] == 1.0


class _Stop(Exception):
    """What a test's checkpoint raises, as the memory guard's check raises MemoryBudgetExceeded."""


def _holdout_like(rows=3_000, classes=3):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows)
    proba = rng.dirichlet(np.ones(classes), rows)
    genes = np.array([f"g{i // 30:04d}" for i in range(rows)], dtype=object)
    return labels, proba, genes


def test_checkpoint_runs_per_class_and_per_step_of_the_gene_spread():
    labels, proba, genes = _holdout_like()
    callers = []

    def record():
        callers.append(sys._getframe(1).f_code.co_name)

    multiclass_metrics(labels, proba, ["neither", "donor", "acceptor"], genes=genes, checkpoint=record)
    assert callers == ["multiclass_metrics"] + ["per_gene_logloss_spread"] * 2 + ["multiclass_metrics"] * 3
    callers.clear()
    holdout_curves(labels, proba, ["neither", "donor", "acceptor"], checkpoint=record)
    assert callers == ["holdout_curves"] * 3


def test_a_checkpoint_that_raises_stops_the_metrics_part_way():
    labels, proba, genes = _holdout_like()
    for computation, stop_at in (
        (lambda check: multiclass_metrics(labels, proba, ["a", "b", "c"], genes=genes, checkpoint=check), 4),
        (lambda check: holdout_curves(labels, proba, ["a", "b", "c"], checkpoint=check), 2),
    ):
        calls = []

        def checkpoint():
            calls.append(1)
            if len(calls) == stop_at:
                raise _Stop

        with pytest.raises(_Stop):
            computation(checkpoint)
        assert len(calls) == stop_at
