import sys

import numpy as np
import pytest
import xgboost

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.folds import gene_folds
from memopt_pipeline.core.evaluate.metrics import multiclass_metrics
from memopt_pipeline.core.memory import gpu
from memopt_pipeline.core.memory.errors import MemoryBudgetExceeded
from memopt_pipeline.core.memory.monitor import StageMonitor
from memopt_pipeline.core.train import xgboost_backend as xb
from memopt_pipeline.core.train import xgboost_model as xm
from memopt_pipeline.core.train.callbacks import xgboost_callback
from memopt_pipeline.core.train.instance import BoostingParams
from memopt_pipeline.core.units import GiB

# One thread: XGBoost's OpenMP threads busy-wait at every barrier, so on a shared 2-core
# machine num_threads=2 made these tests 3x (in memory) to 10x (external memory) slower
# whenever another process was using a core (measured: 3 s -> 26 s for one training).
THREADS = 1
PARAMS = BoostingParams(
    max_rounds=40, early_stopping_rounds=5, learning_rate=0.3, num_leaves=15, min_data_in_leaf=5, max_bin=63,
    num_threads=THREADS,
)
BATCH_ROWS = 500


@pytest.fixture(scope="module")
def split(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    genes = stats["gene"].to_list()
    train_genes, holdout_genes = genes[:28], genes[28:]
    folds = gene_folds(stats.filter(stats["gene"].is_in(train_genes)), n_folds=2, seed=0)
    return train_genes, holdout_genes, folds


@pytest.fixture(scope="module")
def holdout(tiny_metadata, split):
    batches = list(BatchReader(tiny_metadata).iter_batches(split[1], batch_rows=10_000))
    return np.concatenate([b.features for b in batches]), np.concatenate([b.labels for b in batches])


@pytest.fixture(scope="module")
def trained_in_memory(tiny_metadata, split):
    reader = BatchReader(tiny_metadata)
    return reader, xb.train_instance_xgboost(reader, split[2], params=PARAMS, batch_rows=BATCH_ROWS, device="cpu")


@pytest.fixture(scope="module")
def trained_external(tiny_metadata, split, tmp_path_factory):
    cache_root = tmp_path_factory.mktemp("xgb_cache")
    reader = BatchReader(tiny_metadata)
    training = xb.train_instance_xgboost(
        reader, split[2], params=PARAMS, batch_rows=BATCH_ROWS, external_memory_dir=cache_root, device="cpu"
    )
    return reader, training, cache_root


def test_reader_iter_streams_the_labels_in_order_across_resets(tiny_metadata, split):
    reader = BatchReader(tiny_metadata)
    genes = split[0][:10]
    expected = reader.read_labels(genes)
    iterator = xb.ReaderIter(reader, genes, batch_rows=300)
    matrix = xgboost.QuantileDMatrix(iterator, max_bin=63)
    assert iterator.passes >= 2  # XGBoost restarted the stream (sketch pass, then binning)
    assert matrix.num_row() == len(expected) == reader.count_rows(genes)
    assert matrix.num_col() == len(tiny_metadata.features)
    np.testing.assert_array_equal(matrix.get_label(), expected)

    collected = []  # driving the iterator by hand: every pass yields the same labels
    for _ in range(2):
        iterator.reset()
        labels = []
        while iterator.next(lambda data, label, feature_names: labels.append(label)):
            pass
        collected.append(np.concatenate(labels))
    for labels in collected:
        np.testing.assert_array_equal(labels, expected)


def test_choose_device_falls_back_to_cpu_and_says_why():
    messages = []
    assert not gpu.gpu_available()  # no GPU on the test machines
    assert xm.choose_device(messages.append) == "cpu"
    assert len(messages) == 1
    assert "no GPU" in messages[0] and "CPU" in messages[0] and gpu.gpu_status().reason in messages[0]


def test_cuda_is_chosen_when_every_check_passes(gpu_checks_pass):
    messages = []
    assert xm.choose_device(messages.append) == "cuda"
    assert [p["device"] for p in gpu_checks_pass.params] == ["cuda"]  # the trial training asked for the GPU
    assert len(messages) == 1 and "GPU (device=cuda)" in messages[0] and "cuda:0" in messages[0]
    assert xm.xgboost_params(PARAMS, n_classes=3, device="cuda")["device"] == "cuda"


def _no_device(monkeypatch, trial):
    from memopt_pipeline_tests.core.memory.test_gpu import fake_pynvml

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices=[]))


def _driver_broken(monkeypatch, trial):
    from memopt_pipeline_tests.core.memory.test_gpu import fake_pynvml

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices=[(0, GiB)], init_error="Driver Not Loaded"))


def _cpu_only_build(monkeypatch, trial):
    monkeypatch.setattr(xgboost, "build_info", lambda: {"USE_CUDA": False})


def _training_fails(monkeypatch, trial):
    trial.error = xgboost.core.XGBoostError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")


def _training_falls_back(monkeypatch, trial):
    trial.ran_on = "cpu"  # what XGBoost does with no usable GPU: warn, train on the CPU


@pytest.mark.parametrize(
    "break_check, reason, trial_runs",
    [
        (_no_device, "NVML reports no devices", False),
        (_driver_broken, "Driver Not Loaded", False),
        (_cpu_only_build, 'build_info()["USE_CUDA"] is false', False),
        (_training_fails, "training on the GPU failed (XGBoostError: cudaErrorInsufficientDriver", True),
        (_training_falls_back, "asked for the GPU ran on 'cpu'", True),
    ],
)
def test_each_failing_check_leads_to_the_cpu_and_is_named(gpu_checks_pass, monkeypatch, break_check, reason, trial_runs):
    break_check(monkeypatch, gpu_checks_pass)
    messages = []
    assert xm.choose_device(messages.append) == "cpu"
    assert len(messages) == 1 and "runs on the CPU" in messages[0] and reason in messages[0], messages
    assert bool(gpu_checks_pass.params) == trial_runs  # later checks are not run after a failed one


def test_the_real_xgboost_without_a_usable_gpu_is_caught_by_the_trial_training(monkeypatch):
    """NVML and the build faked as passing; the trial is the real XGBoost on this GPU-less machine:
    it either refuses the device or falls back to the CPU, and both mean the CPU."""
    from memopt_pipeline_tests.core.memory.test_gpu import fake_pynvml

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices=[(0, GiB)]))
    monkeypatch.setattr(xgboost, "build_info", lambda: {"USE_CUDA": True})
    device, reason = xm.device_check()
    assert device == "cpu" and "one-round XGBoost training" in reason


def test_params_mirror_lightgbm():
    params = xm.xgboost_params(BoostingParams(num_threads=3, seed=7), n_classes=3, device="cpu")
    assert params["objective"] == "multi:softprob" and params["num_class"] == 3
    assert params["eval_metric"] == "mlogloss" and params["tree_method"] == "hist"
    assert params["grow_policy"] == "lossguide" and params["max_leaves"] == 31 and params["max_depth"] == 0
    assert params["min_child_weight"] == pytest.approx(1.0)  # LightGBM's default 20 rows = XGBoost's default
    assert params["max_bin"] == 255 and params["eta"] == 0.1 and params["colsample_bytree"] == 0.9
    assert params["lambda"] == 1.0 and params["subsample"] == 1.0
    assert params["nthread"] == 3 and params["seed"] == 7 and params["device"] == "cpu"


def _check_training(reader, training, split, holdout):
    train_genes = split[0]
    assert len(training.folds) == 2
    assert all(1 <= f.best_iteration <= PARAMS.max_rounds for f in training.folds)
    assert training.num_rounds == max(1, round(np.mean([f.best_iteration for f in training.folds])))
    assert training.booster.num_boosted_rounds() == training.num_rounds
    assert training.train_rows == reader.count_rows(train_genes)
    assert training.train_genes == len(train_genes)
    for fold in training.folds:  # train + valid of each fold = the whole instance
        assert fold.train_rows + fold.valid_rows == training.train_rows
        assert 0 < fold.valid_logloss < 1.2
    features, labels = holdout
    metrics = multiclass_metrics(labels, xm.predict_proba_xgboost(training.booster, features), reader.metadata.classes)
    assert metrics["logloss"] < metrics["baseline_logloss"]
    return metrics


def test_train_in_memory_two_phases_beats_the_prior(trained_in_memory, split, holdout):
    reader, training = trained_in_memory
    _check_training(reader, training, split, holdout)
    assert isinstance(training.booster, xgboost.Booster)
    assert training.fold_summary()["best_iteration_mean"] >= 1


def test_train_with_external_memory_matches_in_memory_and_cleans_up(trained_external, trained_in_memory, split, holdout):
    reader, training, cache_root = trained_external
    external = _check_training(reader, training, split, holdout)
    assert not cache_root.exists() or list(cache_root.iterdir()) == []
    in_memory = multiclass_metrics(
        holdout[1], xm.predict_proba_xgboost(trained_in_memory[1].booster, holdout[0]), reader.metadata.classes
    )
    assert external["logloss"] == pytest.approx(in_memory["logloss"], rel=0.05)


def test_external_memory_dir_created_by_training_is_removed(tiny_metadata, split, tmp_path):
    reader = BatchReader(tiny_metadata)
    genes = split[0][:8]
    folds = {gene: i % 2 for i, gene in enumerate(genes)}
    params = BoostingParams(max_rounds=3, early_stopping_rounds=2, num_threads=THREADS, max_bin=31)
    training = xb.train_instance_xgboost(
        reader, folds, params=params, batch_rows=BATCH_ROWS, external_memory_dir=tmp_path / "new" / "cache", device="cpu"
    )
    assert training.num_rounds >= 1
    assert not (tmp_path / "new" / "cache").exists()


def test_validation_matrix_shares_training_bin_edges(tiny_metadata, split, tmp_path):
    reader = BatchReader(tiny_metadata)
    train_genes, valid_genes = split[0][:14], split[0][14:]
    for cache in (None, tmp_path):
        train = xb.build_dmatrix(reader, train_genes, batch_rows=BATCH_ROWS, max_bin=31, external_memory_dir=cache and cache / "t")
        valid = xb.build_dmatrix(
            reader, valid_genes, batch_rows=BATCH_ROWS, max_bin=31, ref=train, external_memory_dir=cache and cache / "v"
        )
        assert valid.num_row() == reader.count_rows(valid_genes)
        params = xm.xgboost_params(BoostingParams(max_bin=31, num_threads=THREADS), n_classes=3, device="cpu")
        log: dict = {}
        booster = xgboost.train(params, train, num_boost_round=3, evals=[(valid, "valid")], evals_result=log, verbose_eval=False)
        assert len(log["valid"]["mlogloss"]) == 3 and all(np.isfinite(log["valid"]["mlogloss"]))
        assert booster.num_boosted_rounds() == 3
        del train, valid, booster


def test_contributions_are_additive(trained_in_memory, holdout):
    booster = trained_in_memory[1].booster
    features = holdout[0][:200]
    contributions = xm.predict_contributions_xgboost(booster, features)
    assert contributions.shape == (200, 3, features.shape[1] + 1)
    raw = xm.predict_raw_xgboost(booster, features)
    assert raw.shape == (200, 3)
    np.testing.assert_allclose(contributions.sum(axis=-1), raw, atol=1e-3)
    proba = xm.predict_proba_xgboost(booster, features)
    assert proba.shape == (200, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    softmax = np.exp(raw - raw.max(axis=1, keepdims=True))
    np.testing.assert_allclose(proba, softmax / softmax.sum(axis=1, keepdims=True), atol=1e-5)


def test_save_load_round_trip_in_ubjson(trained_in_memory, holdout, tmp_path):
    booster = trained_in_memory[1].booster
    path = tmp_path / "models" / "instance_0.ubj"
    xm.save_xgboost_model(booster, path)
    assert path.read_bytes()[:1] == b"{"  # UBJSON object marker (JSON would also start with "{" but as text + "\"")
    assert path.read_bytes()[1:2] != b'"'
    assert [p.name for p in path.parent.iterdir()] == ["instance_0.ubj"]  # no temporary file left
    for loaded in (xm.load_xgboost_model(path), xgboost.Booster(model_file=str(path))):
        np.testing.assert_array_equal(
            xm.predict_proba_xgboost(loaded, holdout[0]), xm.predict_proba_xgboost(booster, holdout[0])
        )
        assert loaded.num_boosted_rounds() == booster.num_boosted_rounds()
    with pytest.raises(ValueError, match="ubj"):
        xm.save_xgboost_model(booster, tmp_path / "model.json")


@pytest.mark.parametrize("external", [False, True])
def test_memory_callback_stops_training(tiny_metadata, split, tmp_path, external):
    calls = {"n": 0}

    def fake_rss() -> int:
        calls["n"] += 1
        return GiB if calls["n"] < 4 else 10 * GiB  # over budget from the 3rd round

    cache_root = tmp_path / "cache" if external else None
    reader = BatchReader(tiny_metadata)
    with StageMonitor("train", 2 * GiB, rss_reader=fake_rss, sampler=False, use_kernel_peak=False) as monitor:
        with pytest.raises(MemoryBudgetExceeded):
            xb.train_instance_xgboost(
                reader, split[2], params=PARAMS, batch_rows=BATCH_ROWS, external_memory_dir=cache_root,
                callbacks=[xgboost_callback(monitor)], device="cpu",
            )  # fmt: skip
    assert calls["n"] >= 4
    if external:
        assert not cache_root.exists()  # created by the training, removed on error too


def test_one_vs_rest_trains_a_binary_output_per_class(tiny_metadata, split, holdout):
    from dataclasses import replace

    reader = BatchReader(tiny_metadata)
    training = xb.train_instance_xgboost(
        reader, split[2], params=replace(PARAMS, objective="ovr"), batch_rows=BATCH_ROWS, device="cpu"
    )
    config = training.booster.save_config()
    assert '"binary:logistic"' in config
    features, labels = holdout
    proba = xm.predict_proba_xgboost(training.booster, features)
    assert proba.shape == (len(labels), 3)
    assert not np.allclose(proba.sum(axis=1), 1.0)  # independent sigmoids
    metrics = multiclass_metrics(labels, proba, tiny_metadata.classes)
    assert metrics["logloss"] < metrics["baseline_logloss"]
    assert len(training.oof_labels) == training.train_rows
    contributions = xm.predict_contributions_xgboost(training.booster, features[:5])
    np.testing.assert_allclose(contributions.sum(axis=2), xm.predict_raw_xgboost(training.booster, features[:5]), atol=1e-3)


def test_fold_pr_auc_and_oof_predictions(trained_in_memory):
    _, training = trained_in_memory
    assert len(training.oof_proba) == training.train_rows
    assert all(0 < f.pr_auc["donor"] <= 1 for f in training.folds)


# --- one reference per instance: bin edges from a sample, shared by every matrix ------------------


@pytest.mark.parametrize("external", [False, True], ids=["in_memory", "external_memory"])
def test_the_instance_reference_saves_a_pass_over_the_reader_per_matrix(
    tiny_metadata, split, tmp_path, monkeypatch, external
):
    """Before: each fold's training matrix and the refit's sketched their own bin edges from the
    stream. Now every matrix takes the instance reference's and XGBoost skips that pass."""
    built: list[xb.ReaderIter] = []

    class RecordingIter(xb.ReaderIter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(xb, "ReaderIter", RecordingIter)
    reader = BatchReader(tiny_metadata)
    genes = split[0]
    args = {"batch_rows": BATCH_ROWS, "max_bin": PARAMS.max_bin, "nthread": THREADS}
    cache = (lambda name: tmp_path / name) if external else (lambda name: None)
    xb.build_dmatrix(reader, genes, external_memory_dir=cache("sketched"), **args)
    sketched = built[-1]  # what every training matrix was before
    reference = xb.bin_reference(reader, genes, bin_sample_rows=2_000, seed=0, max_bin=PARAMS.max_bin, nthread=THREADS)
    xb.build_dmatrix(reader, genes, ref=reference, external_memory_dir=cache("shared"), **args)
    shared = built[-1]
    counts = f"reset() calls {sketched.passes} -> {shared.passes}, stream reads {sketched.reads} -> {shared.reads}"
    print(f"XGBoost passes over the reader per matrix ({'external' if external else 'in'} memory): {counts}")
    assert shared.reads == sketched.reads - 1 and shared.passes == sketched.passes - 1, counts

    built.clear()  # a whole training: every matrix (2 folds x train, valid, and the refit) on the reference
    xb.train_instance_xgboost(
        reader, split[2], params=PARAMS, batch_rows=BATCH_ROWS, device="cpu",
        external_memory_dir=cache("training"),
    )  # fmt: skip
    assert len(built) == 5
    assert {(matrix.passes, matrix.reads) for matrix in built} == {(shared.passes, shared.reads)}

    built.clear()  # no sample (external memory at a tight budget): training matrices sketch their own stream
    xb.train_instance_xgboost(
        reader, split[2], params=PARAMS, batch_rows=BATCH_ROWS, device="cpu", bin_sample_rows=0,
        external_memory_dir=cache("unsampled"),
    )  # fmt: skip
    assert len(built) == 5
    # 2 fold training matrices and the refit sketch; the 2 validation matrices take their training matrix's edges.
    assert sorted(matrix.reads for matrix in built) == [shared.reads] * 2 + [sketched.reads] * 3


def test_every_matrix_of_an_instance_has_the_reference_cut_points(tiny_metadata, split, tmp_path):
    from memopt_pipeline.core.train.loop import FoldSplit

    reader = BatchReader(tiny_metadata)
    train_genes, valid_genes = split[0][:14], split[0][14:]
    xgb_params = xm.xgboost_params(PARAMS, n_classes=3, device="cpu")
    for cache in (None, tmp_path / "cache"):
        backend = xb.XGBoostBackend(
            reader, params=PARAMS, xgb_params=xgb_params, batch_rows=BATCH_ROWS, bin_sample_rows=500,
            external_memory_dir=cache, callbacks=[], log=lambda message: None,
        )  # fmt: skip
        try:
            backend.prepare(split[0])
            assert 0 < backend.reference.num_row() <= 500 < reader.count_rows(split[0])
            pointers, values = backend.reference.get_quantile_cut()
            train, valid = backend.fold_matrices(FoldSplit(0, 2, train_genes, valid_genes))
            full = backend.refit_matrix(split[0])
            assert train.num_row() == reader.count_rows(train_genes)
            assert valid.num_row() == reader.count_rows(valid_genes)
            for matrix in (train, valid, full):
                matrix_pointers, matrix_values = matrix.get_quantile_cut()
                np.testing.assert_array_equal(matrix_pointers, pointers)
                np.testing.assert_array_equal(matrix_values, values)
            del train, valid, full, matrix  # freed before close() removes their cache folders
        finally:
            backend.close()
        assert cache is None or not cache.exists()  # created by the backend, removed by close()


def test_bin_edges_come_from_a_seeded_sample_of_bin_sample_rows(
    tiny_metadata, split, holdout, trained_in_memory, monkeypatch
):
    samples = []
    original = BatchReader.sample_rows

    def recording_sample(self, genes, n_rows, **options):
        rows = original(self, genes, n_rows, **options)
        samples.append((sorted(genes), n_rows, len(rows), options["seed"]))
        return rows

    monkeypatch.setattr(BatchReader, "sample_rows", recording_sample)
    reader = BatchReader(tiny_metadata)
    training = xb.train_instance_xgboost(
        reader, split[2], params=PARAMS, batch_rows=BATCH_ROWS, device="cpu", bin_sample_rows=1_000
    )
    assert samples == [(sorted(split[2]), 1_000, samples[0][2], PARAMS.seed)] and 0 < samples[0][2] <= 1_000
    assert reader.count_rows(split[2]) > 1_000  # a real sample: about half the instance
    # Edges from half the rows, as good as from all of them (the default sample holds them all
    # here). For scale: changing only the seed moves this holdout logloss by up to 10%.
    coarse = _check_training(reader, training, split, holdout)
    default = multiclass_metrics(
        holdout[1], xm.predict_proba_xgboost(trained_in_memory[1].booster, holdout[0]), reader.metadata.classes
    )
    assert coarse["logloss"] == pytest.approx(default["logloss"], rel=0.05)


def test_external_memory_pages_gather_batches_and_train_the_same_model(tiny_metadata, split, holdout, tmp_path):
    """Pages of page_rows rows: fewer, larger pieces handed to XGBoost, every row once, and the
    same trees as with one page per reader batch (histograms do not depend on the paging)."""
    reader = BatchReader(tiny_metadata)
    genes = split[0]
    reference = xb.bin_reference(reader, genes, bin_sample_rows=2_000, seed=0, max_bin=PARAMS.max_bin, nthread=THREADS)
    args = {"batch_rows": BATCH_ROWS, "max_bin": PARAMS.max_bin, "nthread": THREADS, "ref": reference}
    built: list[xb.ReaderIter] = []
    original = xb.ReaderIter

    class RecordingIter(original):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    xb.ReaderIter = RecordingIter
    try:
        small = xb.build_dmatrix(reader, genes, external_memory_dir=tmp_path / "small", **args)
        large = xb.build_dmatrix(reader, genes, external_memory_dir=tmp_path / "large", page_rows=3 * BATCH_ROWS, **args)
    finally:
        xb.ReaderIter = original
    assert small.num_row() == large.num_row() == reader.count_rows(genes)
    assert built[1].pages_last_read < built[0].pages_last_read
    labels = np.concatenate([b.labels for b in reader.iter_batches(genes, BATCH_ROWS)])
    np.testing.assert_array_equal(large.get_label(), labels)  # rows in reader order, none lost at page seams
    params = {**xm.xgboost_params(PARAMS, n_classes=3, device="cpu"), "nthread": 1}
    models = [xgboost.train(params, matrix, num_boost_round=5) for matrix in (small, large)]
    np.testing.assert_allclose(
        xm.predict_proba_xgboost(models[0], holdout[0]), xm.predict_proba_xgboost(models[1], holdout[0]), rtol=1e-5, atol=1e-6
    )
