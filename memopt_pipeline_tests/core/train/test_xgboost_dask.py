"""XGBoost on Dask: two workers of a LocalCluster read the instance's genes and train it."""

import numpy as np
import pytest
from distributed import Client, LocalCluster

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.folds import gene_folds
from memopt_pipeline.core.evaluate.ensemble import XGBoostModel, load_model
from memopt_pipeline.core.evaluate.metrics import multiclass_metrics
from memopt_pipeline.core.train import dask_cluster as dc
from memopt_pipeline.core.train import xgboost_dask as xd
from memopt_pipeline.core.train import xgboost_model as xm
from memopt_pipeline.core.train.instance import BoostingParams

PARAMS = BoostingParams(
    max_rounds=40, early_stopping_rounds=5, learning_rate=0.3, num_leaves=15, min_data_in_leaf=5, max_bin=63, num_threads=1
)


@pytest.fixture(scope="module")
def split(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    genes = stats["gene"].to_list()
    train_genes, holdout_genes = genes[:28], genes[28:]
    folds = gene_folds(stats.filter(stats["gene"].is_in(train_genes)), n_folds=2, seed=0)
    return train_genes, holdout_genes, folds


@pytest.fixture(scope="module")
def session():
    # Two workers (threads of this process, one core each, quick to start): partitions really are
    # spread over workers and XGBoost's collective joins them; the tracker listens on loopback.
    # The backend's own cluster of worker processes: test_dask_cluster.py.
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, **dc.LOCAL_CLUSTER_HTTP) as cluster,
        Client(cluster) as client,
    ):
        yield dc.DaskSession(client=client, tracker_host=dc.LOOPBACK, description="test LocalCluster")


@pytest.fixture(scope="module")
def trained(tiny_metadata, split, session):
    reader = BatchReader(tiny_metadata)
    messages = []
    training = xd.train_instance_xgboost_dask(
        reader, split[2], params=PARAMS, session=session, partition_rows=300, batch_rows=500, log=messages.append
    )
    return reader, training, messages


def test_gene_groups_are_sorted_consecutive_and_bounded():
    rows = {"a": 3, "b": 3, "c": 5, "d": 1, "e": 9}
    assert xd.gene_groups(["e", "a", "c", "b", "d"], rows, partition_rows=6) == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValueError, match="partition_rows"):
        xd.gene_groups(["a"], rows, partition_rows=0)


def test_a_partition_holds_exactly_its_genes_rows(tiny_metadata, split):
    genes = split[0][:3]
    frame = xd.read_gene_group(genes, tiny_metadata, list(tiny_metadata.features), batch_rows=300)
    reader = BatchReader(tiny_metadata)
    assert len(frame) == reader.count_rows(genes)
    assert np.array_equal(frame[xd.LABEL_COLUMN].to_numpy(), reader.read_labels(genes))
    assert (frame.dtypes.drop(xd.LABEL_COLUMN) == np.float32).all()


def test_the_instance_frame_is_split_over_gene_groups(tiny_metadata, split, session):
    frame = xd.instance_frame(BatchReader(tiny_metadata), split[0], partition_rows=300, batch_rows=500)
    assert frame.npartitions > 2
    assert len(frame) == BatchReader(tiny_metadata).count_rows(split[0])  # computed on the workers


def test_two_phases_on_dask_beat_the_class_prior(trained, split):
    reader, training, messages = trained
    assert len(training.folds) == 2
    for fold in training.folds:
        assert 1 <= fold.best_iteration <= PARAMS.max_rounds  # a count of trees, not XGBoost's 0-based index
        assert fold.train_rows > 0 and fold.valid_rows > 0
    assert training.num_rounds == max(1, round(np.mean([f.best_iteration for f in training.folds])))
    assert training.booster.num_boosted_rounds() == training.num_rounds
    assert training.train_rows == reader.count_rows(split[0])
    # Out-of-fold predictions of every held-out row, for calibration as with the other backends.
    assert len(training.oof_labels) == len(training.oof_proba) == sum(f.valid_rows for f in training.folds)
    assert np.allclose(training.oof_proba.sum(axis=1), 1.0, atol=1e-5)
    assert any("phase 2: refit" in message for message in messages)


def test_one_vs_rest_trains_one_output_per_class_on_one_validation_fold(tiny_metadata, split, session):
    params = BoostingParams(**{**PARAMS.to_dict(), "objective": "ovr", "max_rounds": 10})
    training = xd.train_instance_xgboost_dask(
        BatchReader(tiny_metadata), split[2], params=params, session=session, partition_rows=300, batch_rows=500,
        validation_folds=[0],
    )  # fmt: skip
    assert [f.fold for f in training.folds] == [0]
    holdout = next(BatchReader(tiny_metadata).iter_batches(split[1], batch_rows=10_000))
    assert xm.predict_proba_xgboost(training.booster, holdout.features).shape == (len(holdout.labels), tiny_metadata.n_classes)


def test_the_model_saves_as_ubjson_and_loads_through_the_ensemble(trained, split, tiny_metadata, tmp_path):
    reader, training, _ = trained
    path = tmp_path / "model.ubj"
    xm.save_xgboost_model(training.booster, path)
    model = load_model(str(path))
    assert isinstance(model, XGBoostModel)
    assert model.feature_names == list(reader.features)
    batches = list(BatchReader(tiny_metadata).iter_batches(split[1], batch_rows=10_000))
    features, labels = np.concatenate([b.features for b in batches]), np.concatenate([b.labels for b in batches])
    metrics = multiclass_metrics(labels, model.predict_proba(features), tiny_metadata.classes)
    assert metrics["logloss"] < metrics["baseline_logloss"]


def test_an_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(ConnectionError, match="dask_scheduler_address"):
        with dc.dask_client("tcp://127.0.0.1:1", log=lambda m: None, timeout="2s"):
            pass


def test_the_device_is_checked_on_the_workers_and_cuda_only_when_all_pass(session, gpu_checks_pass):
    messages = []
    assert xd.workers_device(session, messages.append) == "cuda"
    assert len(gpu_checks_pass.params) == 2  # one trial training per worker
    assert "on 2 worker(s)" in messages[0]

    gpu_checks_pass.ran_on = "cpu"  # XGBoost's fallback on the workers
    messages.clear()
    assert xd.workers_device(session, messages.append) == "cpu"
    assert messages[0].count("asked for the GPU ran on 'cpu'") == 2  # each worker's reason


def test_training_without_a_device_uses_the_one_the_workers_chose(tiny_metadata, split, session, monkeypatch):
    class Chosen(Exception):
        pass

    monkeypatch.setattr(xd, "device_check", lambda: ("cuda", "faked: every check passed"))

    def recording_params(params, *, n_classes, device):
        raise Chosen(device)

    monkeypatch.setattr(xd, "xgboost_params", recording_params)
    with pytest.raises(Chosen, match="^cuda$"):
        xd.train_instance_xgboost_dask(BatchReader(tiny_metadata), split[2], params=PARAMS, session=session, partition_rows=300, batch_rows=500)
    with pytest.raises(Chosen, match="^cpu$"):  # an explicit device is kept
        xd.train_instance_xgboost_dask(
            BatchReader(tiny_metadata), split[2], params=PARAMS, session=session, partition_rows=300, batch_rows=500, device="cpu"
        )
