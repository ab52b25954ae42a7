import numpy as np
import pytest

from memopt_pipeline.core.data.batch_reader import Batch, BatchReader
from memopt_pipeline.core.data.folds import gene_folds
from memopt_pipeline.core.evaluate.metrics import multiclass_metrics
from memopt_pipeline.core.train.instance import BoostingParams
from memopt_pipeline.core.train.lightgbm_backend import StreamingRows, train_instance


def test_streaming_rows_serves_the_push_in_one_pass_and_collects_labels():
    data = np.arange(1000 * 3, dtype=np.float32).reshape(1000, 3)
    sizes = [7, 300, 1, 250, 442]

    def batches():
        start = 0
        for size in sizes:
            yield Batch(features=data[start : start + size], labels=np.arange(start, start + size) % 3, ids=None)
            start += size

    rows = StreamingRows(batches(), n_rows=1000, batch_size=128)
    for start in range(0, 1000, 128):  # LightGBM's push: contiguous slices from 0, in order
        np.testing.assert_array_equal(rows[start : start + 128], data[start : start + 128])
    np.testing.assert_array_equal(np.concatenate(rows.labels), np.arange(1000) % 3)
    with pytest.raises(IndexError, match="once"):
        rows[0:10]


def test_cut_folds_train_the_same_models_as_streamed_folds_from_one_decode(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    genes = stats["gene"].to_list()[:28]
    folds = gene_folds(stats.filter(stats["gene"].is_in(genes)), n_folds=3, seed=0)
    params = BoostingParams(max_rounds=25, early_stopping_rounds=5, num_threads=1, min_data_in_leaf=5)
    trained, readers = {}, {}
    for cut in (False, True):
        readers[cut] = BatchReader(tiny_metadata)
        trained[cut] = train_instance(readers[cut], folds, params=params, batch_rows=300, bin_sample_rows=2_000, cut_folds=cut)
    assert [f.best_iteration for f in trained[True].folds] == [f.best_iteration for f in trained[False].folds]
    assert trained[True].booster.model_to_string() == trained[False].booster.model_to_string()
    np.testing.assert_array_equal(trained[True].oof_proba, trained[False].oof_proba)
    rows = readers[True].count_rows(genes)
    # Cut: the instance is decoded once, to bin it (plus a sample); out-of-fold predictions come
    # from the scores LightGBM kept for each fold's validation rows, not from another read.
    assert readers[True].stats.rows_read <= rows + 2_000 + 300
    # Streamed: each fold's training and validation rows (one pass per fold), the refit.
    assert readers[False].stats.rows_read <= (3 + 1) * rows + 2_000 + 300
    assert readers[False].stats.rows_read > readers[True].stats.rows_read


@pytest.mark.parametrize("objective", ["softmax", "ovr"])
def test_validation_predictions_equal_predicting_the_raw_rows_with_the_best_trees(tiny_metadata, objective):
    """The held-out rows' probabilities from LightGBM's validation scores, after rolling back the
    trees early stopping did not keep, are what predicting their raw feature values gives."""
    import lightgbm as lgb

    from memopt_pipeline.core.train.calibration import normalise_rows
    from memopt_pipeline.core.train.lightgbm_backend import lightgbm_params, validation_predictions

    genes = tiny_metadata.read_gene_stats()["gene"].to_list()
    reader = BatchReader(tiny_metadata)
    (train_x, train_y), (valid_x, valid_y) = (_holdout_matrix(reader, part) for part in (genes[:20], genes[20:30]))
    params = lightgbm_params(
        BoostingParams(max_rounds=200, early_stopping_rounds=3, num_threads=1, min_data_in_leaf=5, objective=objective,
                       learning_rate=0.5),
        n_classes=3, bin_sample_rows=2_000,
    )  # fmt: skip
    train = lgb.Dataset(train_x, train_y, params=params)
    valid = lgb.Dataset(valid_x, valid_y, reference=train)
    booster = lgb.train(params, train, num_boost_round=200, valid_sets=[valid], keep_training_booster=True,
                        callbacks=[lgb.early_stopping(3, verbose=False)])
    best = booster.best_iteration
    assert 0 < best < booster.current_iteration()  # stopping triggered: there are trees to roll back
    expected = normalise_rows(booster.predict(valid_x, num_iteration=best))
    every_tree = normalise_rows(booster.predict(valid_x, num_iteration=0))  # 0: every tree, not the best
    # The scores of every tree differ from the best trees': without the roll-back this test fails.
    assert not np.allclose(every_tree, expected, rtol=1e-5, atol=1e-7)
    labels, proba = validation_predictions(booster, valid, best)
    np.testing.assert_array_equal(labels, valid_y)
    np.testing.assert_allclose(proba, expected, rtol=1e-5, atol=1e-7)


def test_row_wise_histograms_train_a_model_as_good(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    genes = stats["gene"].to_list()
    folds = gene_folds(stats.filter(stats["gene"].is_in(genes[:28])), n_folds=2, seed=0)
    reader = BatchReader(tiny_metadata)
    params = BoostingParams(max_rounds=30, early_stopping_rounds=5, num_threads=2, min_data_in_leaf=5)
    losses = {}
    for row_wise in (False, True):
        training = train_instance(reader, folds, params=params, batch_rows=500, bin_sample_rows=2_000, cut_folds=True, row_wise=row_wise)
        features, labels = _holdout_matrix(reader, genes[28:])
        losses[row_wise] = multiclass_metrics(labels, training.booster.predict(features), tiny_metadata.classes)["logloss"]
    assert losses[True] == pytest.approx(losses[False], rel=0.01)


def test_train_instance_two_phases_beats_the_prior(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    train_genes, holdout_genes = stats["gene"].to_list()[:28], stats["gene"].to_list()[28:]
    folds = gene_folds(stats.filter(stats["gene"].is_in(train_genes)), n_folds=2, seed=0)
    reader = BatchReader(tiny_metadata)
    checks = []
    training = train_instance(
        reader, folds, params=BoostingParams(max_rounds=60, early_stopping_rounds=5, num_threads=2, min_data_in_leaf=5),
        batch_rows=500, bin_sample_rows=2_000, callbacks=[lambda env: checks.append(env.iteration)],
    )
    assert len(training.folds) == 2
    assert all(1 <= f.best_iteration <= 60 for f in training.folds)
    assert training.num_rounds == max(1, round(np.mean([f.best_iteration for f in training.folds])))
    assert training.booster.current_iteration() == training.num_rounds
    assert training.train_rows == reader.count_rows(train_genes)
    assert checks  # memory check points run inside boosting
    for fold in training.folds:  # train + valid of each fold = the whole instance, no gene twice
        assert fold.train_rows + fold.valid_rows == training.train_rows

    batches = list(reader.iter_batches(holdout_genes, batch_rows=10_000))
    features = np.concatenate([b.features for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    metrics = multiclass_metrics(labels, training.booster.predict(features), tiny_metadata.classes)
    assert metrics["logloss"] < metrics["baseline_logloss"]
    assert metrics["per_class"]["donor"]["pr_auc"] > 2 * metrics["per_class"]["donor"]["prevalence"]


def test_quantized_gradients_with_bagging_is_refused_before_training():
    import pytest

    from memopt_pipeline.core.train.lightgbm_backend import lightgbm_params

    with pytest.raises(ValueError, match="quantized_gradients cannot be combined with bagging"):
        BoostingParams(quantized_gradients=True, bagging_fraction=0.8)
    params = lightgbm_params(BoostingParams(quantized_gradients=True), n_classes=3, bin_sample_rows=1000)
    assert params["use_quantized_grad"] is True and "bagging_fraction" not in params


def test_quantized_gradients_train(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    folds = gene_folds(stats, n_folds=2, seed=0)
    training = train_instance(
        BatchReader(tiny_metadata), folds,
        params=BoostingParams(max_rounds=10, num_threads=1, min_data_in_leaf=5, quantized_gradients=True),
        batch_rows=500, bin_sample_rows=2_000,
    )
    assert training.num_rounds >= 1


def _holdout_matrix(reader, genes):
    batches = list(reader.iter_batches(genes, batch_rows=10_000))
    return np.concatenate([b.features for b in batches]), np.concatenate([b.labels for b in batches])


def test_fold_metrics_and_out_of_fold_predictions_cover_every_instance_row(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    train_genes = stats["gene"].to_list()[:28]
    folds = gene_folds(stats.filter(stats["gene"].is_in(train_genes)), n_folds=2, seed=0)
    reader = BatchReader(tiny_metadata)
    training = train_instance(
        reader, folds, params=BoostingParams(max_rounds=30, early_stopping_rounds=5, num_threads=2, min_data_in_leaf=5),
        batch_rows=500, bin_sample_rows=2_000,
    )
    # Every training row is predicted once, by the model that did not see its gene.
    assert len(training.oof_labels) == training.train_rows == len(training.oof_proba)
    np.testing.assert_allclose(training.oof_proba.sum(axis=1), 1.0, rtol=1e-5)
    summary = training.fold_summary()
    assert set(summary["cv_pr_auc"]) == {"neither", "donor", "acceptor"}
    for fold in training.folds:
        assert fold.pr_auc["donor"] > 0.2 and fold.valid_logloss > 0
    donor = [f.pr_auc["donor"] for f in training.folds]
    assert summary["cv_pr_auc"]["donor"]["mean"] == pytest.approx(np.mean(donor))
    assert summary["cv_pr_auc"]["donor"]["std"] == pytest.approx(np.std(donor))


def test_one_vs_rest_trains_one_binary_model_per_class_and_beats_the_prior(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    genes = stats["gene"].to_list()
    folds = gene_folds(stats.filter(stats["gene"].is_in(genes[:28])), n_folds=2, seed=0)
    reader = BatchReader(tiny_metadata)
    training = train_instance(
        reader, folds,
        params=BoostingParams(max_rounds=40, early_stopping_rounds=5, num_threads=2, min_data_in_leaf=5, objective="ovr"),
        batch_rows=500, bin_sample_rows=2_000,
    )  # fmt: skip
    assert "multiclassova" in training.booster.model_to_string()[:2_000]
    features, labels = _holdout_matrix(reader, genes[28:])
    raw = training.booster.predict(features)
    assert not np.allclose(raw.sum(axis=1), 1.0)  # independent sigmoids, not a softmax
    metrics = multiclass_metrics(labels, raw, tiny_metadata.classes)  # renormalises rows
    assert metrics["logloss"] < metrics["baseline_logloss"]


def test_fast_mode_trains_one_validation_fold(tiny_metadata):
    from memopt_pipeline.core.data.folds import fast_validation_split

    stats = tiny_metadata.read_gene_stats()
    split = fast_validation_split(stats, validation_share=0.25)  # 36 genes: 4 groups, one held out
    reader = BatchReader(tiny_metadata)
    training = train_instance(
        reader, split, params=BoostingParams(max_rounds=20, early_stopping_rounds=5, num_threads=2, min_data_in_leaf=5),
        batch_rows=500, bin_sample_rows=2_000, validation_folds=[1],
    )
    assert [f.fold for f in training.folds] == [1]
    assert training.folds[0].valid_genes == sum(1 for f in split.values() if f == 1)
    assert len(training.oof_labels) == training.folds[0].valid_rows
    with pytest.raises(ValueError, match="subset of the folds"):
        train_instance(reader, split, params=BoostingParams(), batch_rows=500, bin_sample_rows=2_000, validation_folds=[7])
