"""The ensemble: calibrated members, weights, and loading large models one at a time."""

import numpy as np
import pytest

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.folds import gene_folds
from memopt_pipeline.core.evaluate.ensemble import Ensemble, EnsembleMember, load_model, validation_weights
from memopt_pipeline.core.evaluate.holdout import evaluate_holdout
from memopt_pipeline.core.evaluate.shap_summary import chunked_shap
from memopt_pipeline.core.train.calibration import apply_calibration, fit_calibration
from memopt_pipeline.core.train.instance import BoostingParams
from memopt_pipeline.core.train.lightgbm_backend import train_instance
from memopt_pipeline.core.train.xgboost_backend import train_instance_xgboost
from memopt_pipeline.core.train.xgboost_model import save_xgboost_model

PARAMS = BoostingParams(max_rounds=25, early_stopping_rounds=5, num_threads=1, min_data_in_leaf=5, learning_rate=0.3)


@pytest.fixture(scope="module")
def members(tiny_metadata, tmp_path_factory):
    """A LightGBM softmax member and an XGBoost one-vs-rest member on two gene sets, calibrated."""
    from dataclasses import replace

    folder = tmp_path_factory.mktemp("ensemble")
    stats = tiny_metadata.read_gene_stats()
    genes = stats["gene"].to_list()
    reader = BatchReader(tiny_metadata)
    made = []
    for index, (gene_set, backend) in enumerate([(genes[:14], "lightgbm"), (genes[12:28], "xgboost")]):
        folds = gene_folds(stats.filter(stats["gene"].is_in(gene_set)), n_folds=2, seed=0)
        if backend == "lightgbm":
            training = train_instance(reader, folds, params=PARAMS, batch_rows=500, bin_sample_rows=2_000)
            path = folder / f"m{index}.txt"
            training.booster.save_model(str(path))
        else:
            training = train_instance_xgboost(
                reader, folds, params=replace(PARAMS, objective="ovr"), batch_rows=500, device="cpu"
            )
            path = folder / f"m{index}.ubj"
            save_xgboost_model(training.booster, path)
        calibration = fit_calibration(training.oof_labels, training.oof_proba, method="platt")
        made.append(EnsembleMember(f"instance_{index}", str(path), weight=1.0, calibration=calibration))
    return made, genes[28:]


def test_members_are_calibrated_then_averaged_by_weight(members, tiny_metadata):
    made, holdout = members
    weighted = [EnsembleMember(m.partition, m.model_path, weight=w, calibration=m.calibration) for m, w in zip(made, (3.0, 1.0))]
    ensemble = Ensemble(weighted)
    features = next(BatchReader(tiny_metadata).iter_batches(holdout, 300)).features
    expected = sum(
        w * apply_calibration(m.calibration, load_model(m.model_path).predict_proba(features))
        for m, w in zip(made, (0.75, 0.25))
    )
    np.testing.assert_allclose(ensemble.predict_proba(features), expected, rtol=1e-10)
    np.testing.assert_allclose(ensemble.predict_proba(features).sum(axis=1), 1.0, rtol=1e-9)
    calibrated, uncalibrated = ensemble.predict_proba_both(features)
    np.testing.assert_allclose(calibrated, expected, rtol=1e-10)
    assert not np.allclose(calibrated, uncalibrated)  # calibration changed something


def test_large_models_are_loaded_one_at_a_time_with_the_same_results(members, tiny_metadata, tmp_path):
    made, holdout = members
    eager = Ensemble(made)
    lazy = Ensemble(made, max_resident_bytes=1)  # every model counts as too large to keep
    assert not eager.one_at_a_time and lazy.one_at_a_time and lazy.models is None
    features = next(BatchReader(tiny_metadata).iter_batches(holdout, 300)).features
    np.testing.assert_allclose(lazy.predict_proba(features), eager.predict_proba(features), rtol=1e-12)

    results = {}
    for name, ensemble in (("eager", eager), ("lazy", lazy)):
        reader = BatchReader(tiny_metadata)
        results[name] = evaluate_holdout(
            ensemble, reader, holdout, batch_rows=700, predictions_path=tmp_path / f"{name}.parquet"
        )
        results[name]["passes"] = reader.stats.passes
    assert results["lazy"]["models_loaded_one_at_a_time"] and not results["eager"]["models_loaded_one_at_a_time"]
    assert results["lazy"]["logloss"] == pytest.approx(results["eager"]["logloss"], rel=1e-6)
    assert results["lazy"]["ece_after_calibration"]["mean"] == pytest.approx(results["eager"]["ece_after_calibration"]["mean"], rel=1e-5)
    assert results["lazy"]["passes"] == len(made) + 1  # one pass per model, then ids + labels
    import pyarrow.parquet as pq

    eager_table, lazy_table = pq.read_table(tmp_path / "eager.parquet"), pq.read_table(tmp_path / "lazy.parquet")
    assert eager_table.column_names == lazy_table.column_names
    np.testing.assert_allclose(lazy_table["p_donor"].to_numpy(), eager_table["p_donor"].to_numpy(), rtol=1e-6)


def test_holdout_reports_calibration_error_before_and_after(members, tiny_metadata, tmp_path):
    made, holdout = members
    metrics = evaluate_holdout(
        Ensemble(made), BatchReader(tiny_metadata), holdout, batch_rows=700, predictions_path=tmp_path / "p.parquet"
    )
    for key in ("ece_before_calibration", "ece_after_calibration"):
        assert len(metrics[key]["per_class"]) == 3 and 0 <= metrics[key]["mean"] < 1
    assert metrics["uncalibrated_logloss"] < metrics["baseline_logloss"]


def test_validation_weights_favour_the_lower_loss_and_refuse_bad_scores():
    weights = validation_weights([0.1, 0.2])
    assert weights == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="positive finite"):
        validation_weights([0.1, float("nan")])


def test_bad_weights_are_refused(members):
    made, _ = members
    with pytest.raises(ValueError, match="not all zero"):
        Ensemble([EnsembleMember(m.partition, m.model_path, weight=0.0) for m in made])


def test_shap_of_mixed_members_explains_their_weighted_mean_margin_and_says_so(members, tiny_metadata):
    """A LightGBM softmax member and an XGBoost one-vs-rest member: the contributions add up to the
    weighted mean of the members' raw margins (each from its own library), and the summary says
    that this mixes two units and is not the output probabilities."""
    import lightgbm as lgb
    import xgboost

    made, holdout = members
    weighted = [EnsembleMember(m.partition, m.model_path, weight=w, calibration=m.calibration) for m, w in zip(made, (3.0, 1.0))]
    ensemble = Ensemble(weighted)
    summary = chunked_shap(ensemble, BatchReader(tiny_metadata), holdout, sample_rows=90, chunk_rows=40, additivity_rows=9)
    assert summary.additivity_max_error < 1e-4 and summary.additivity_rows == 9
    explained = summary.explained
    assert [(m["format"], m["objective"], m["weight"]) for m in explained["members"]] == [
        ("lightgbm", "softmax", 0.75), ("xgboost", "ovr", 0.25)
    ]
    assert explained["mixed_objectives"] and "two different units" in explained["text"]
    assert "weighted mean of the raw margins" in explained["text"] and "not to the output probabilities" in explained["text"]

    features = next(BatchReader(tiny_metadata).iter_batches(holdout, 50)).features
    margins = 0.75 * lgb.Booster(model_file=made[0].model_path).predict(features, raw_score=True)
    booster = xgboost.Booster()
    booster.load_model(made[1].model_path)
    margins += 0.25 * booster.inplace_predict(features, predict_type="margin")
    np.testing.assert_allclose(ensemble.predict_contributions(features).sum(axis=2), margins, rtol=1e-4, atol=1e-4)


def test_resident_bytes_count_every_model_or_only_the_largest_when_loaded_one_at_a_time(members):
    from pathlib import Path

    made, _ = members
    sizes = [Path(m.model_path).stat().st_size for m in made]
    eager, lazy = Ensemble(made), Ensemble(made, max_resident_bytes=1)
    # Loaded trees take more memory than their files; one at a time, only one model is held.
    assert eager.resident_bytes > sum(sizes)
    assert max(sizes) < lazy.resident_bytes < eager.resident_bytes
