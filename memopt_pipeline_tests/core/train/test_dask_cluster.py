"""The xgboost_dask backend's own LocalCluster: worker processes with memory limits, and their deaths.

One model is trained across two worker *processes*; a worker that goes over its memory limit
is terminated by its nanny and the training fails as out of memory (retryable one ladder
level lower); a worker's ordinary error stays an ordinary error.
"""

import contextlib
import os
import pickle
import types

import dask
import numpy as np
import pytest
from distributed import get_task_stream
from distributed.scheduler import KilledWorker
from distributed.utils import key_split

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.folds import gene_folds
from memopt_pipeline.core.evaluate.metrics import multiclass_metrics
from memopt_pipeline.core.memory.errors import DaskWorkerOutOfMemory
from memopt_pipeline.core.memory.failures import exception_is_out_of_memory, text_is_kill, text_is_out_of_memory
from memopt_pipeline.core.memory.planner import make_plan
from memopt_pipeline.core.train import dask_cluster as dc
from memopt_pipeline.core.train import xgboost_dask as xd
from memopt_pipeline.core.train import xgboost_model as xm
from memopt_pipeline.core.train.instance import BoostingParams
from memopt_pipeline.core.units import GiB, MiB
from memopt_pipeline_tests.core.train import dask_tasks

PARAMS = BoostingParams(
    max_rounds=40, early_stopping_rounds=5, learning_rate=0.3, num_leaves=15, min_data_in_leaf=5, max_bin=63,
    num_threads=1,
)
WORKER_MEMORY = int(1.5 * GiB)


@pytest.fixture(scope="module")
def split(tiny_metadata):
    stats = tiny_metadata.read_gene_stats()
    genes = stats["gene"].to_list()
    train_genes, holdout_genes = genes[:28], genes[28:]
    folds = gene_folds(stats.filter(stats["gene"].is_in(train_genes)), n_folds=2, seed=0)
    return train_genes, holdout_genes, folds


@pytest.fixture(scope="module")
def processes_session():
    """The backend's default cluster: two worker processes, one thread and 1.5 GiB each. A user
    configuration that turns the nanny's memory management off must not apply to it."""
    messages = []
    with contextlib.ExitStack() as stack:
        with dask.config.set({"distributed.worker.memory.terminate": False, "distributed.worker.memory.pause": False}):
            session = stack.enter_context(
                dc.dask_client("", threads=2, n_workers=2, worker_memory_bytes=WORKER_MEMORY, log=messages.append)
            )
        yield session, messages


def _worker_pause_fraction(dask_worker) -> float:
    return dask_worker.memory_manager.memory_pause_fraction


def test_local_worker_memory_shares_the_plans_training_peak():
    plan = make_plan(
        dataset_rows=2_000_000, n_features=300, n_classes=3, budget_bytes=16 * GiB, baseline_bytes=400 * MiB
    )
    rows = plan.max_rows_per_instance
    peak = plan.training_peak(rows)
    limit = dc.local_worker_memory(plan, rows, 2)
    # Each worker: its own process baseline plus half of the data the plan predicts.
    assert limit == plan.baseline_bytes + -(-(peak - plan.baseline_bytes) // 2)
    assert 2 * limit == pytest.approx(peak + plan.baseline_bytes, abs=2)
    assert dc.local_worker_memory(plan, rows, 4) < limit
    # An in-memory peak beyond what the plan lets a training hold is capped there.
    capped = dc.local_worker_memory(plan, 10 * rows, 2)
    assert capped == plan.baseline_bytes + -(-(int(plan.budget_bytes * plan.safety) - plan.baseline_bytes) // 2)
    # A tiny instance still gets a worker that can start and hold a partition.
    assert dc.local_worker_memory(plan, 1_000, 2) == dc.MIN_WORKER_MEMORY_BYTES
    with pytest.raises(ValueError, match="dask_workers"):
        dc.local_worker_memory(plan, rows, 0)


def test_an_empty_scheduler_address_starts_worker_processes_with_their_own_memory_limits(processes_session):
    session, messages = processes_session
    pids = session.client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    assert sorted(session.worker_memory_limits.values()) == [WORKER_MEMORY, WORKER_MEMORY]
    # The nannies (in this process) terminate their worker above 95% of its limit; the workers
    # pause at 80%, whatever the surrounding Dask configuration said.
    nannies = list(session.client.cluster.workers.values())
    assert [n.memory_manager.memory_limit for n in nannies] == [WORKER_MEMORY, WORKER_MEMORY]
    assert [n.memory_manager.memory_terminate_fraction for n in nannies] == [0.95, 0.95]
    assert set(session.client.run(_worker_pause_fraction).values()) == {0.8}
    assert any("starting a LocalCluster for this step: 2 worker processes x 1 thread(s)" in m for m in messages)
    assert "1.50 GiB" in session.description and session.tracker_host == dc.LOOPBACK


def test_one_model_trains_across_two_worker_processes_and_beats_the_class_prior(
    tiny_metadata, split, processes_session
):
    session, _ = processes_session
    reader = BatchReader(tiny_metadata)
    with get_task_stream(client=session.client) as stream:
        training = xd.train_instance_xgboost_dask(
            reader, split[2], params=PARAMS, session=session, partition_rows=300, batch_rows=500
        )
    pids = session.client.run(os.getpid)
    workers_of = {}
    for task in stream.data:
        workers_of.setdefault(key_split(task["key"]), set()).add(task["worker"])
    # The rows were read, and XGBoost trained, in both worker processes: one model across them.
    assert len(workers_of["read-gene-group"]) == 2
    train_tasks = [workers for name, workers in workers_of.items() if name.startswith(("fn", "do_train", "dispatched"))]
    assert train_tasks and all(len(workers) == 2 for workers in train_tasks), workers_of
    assert {pids[w] for w in workers_of["read-gene-group"]} == set(pids.values())
    assert training.train_rows == reader.count_rows(split[0])
    assert training.booster.num_boosted_rounds() == training.num_rounds
    batches = list(BatchReader(tiny_metadata).iter_batches(split[1], batch_rows=10_000))
    features, labels = np.concatenate([b.features for b in batches]), np.concatenate([b.labels for b in batches])
    metrics = multiclass_metrics(labels, xm.predict_proba_xgboost(training.booster, features), tiny_metadata.classes)
    assert metrics["logloss"] < metrics["baseline_logloss"]


def test_a_reader_bug_on_a_worker_stays_an_ordinary_error(tiny_metadata, split, processes_session, monkeypatch):
    session, _ = processes_session
    monkeypatch.setattr(xd, "read_gene_group", dask_tasks.broken_read_gene_group)
    with pytest.raises(ValueError, match="simulated reader bug") as raised:
        xd.train_instance_xgboost_dask(
            BatchReader(tiny_metadata), split[2], params=PARAMS, session=session, partition_rows=300, batch_rows=500,
            device="cpu",
        )  # fmt: skip
    assert not isinstance(raised.value, DaskWorkerOutOfMemory)
    assert not exception_is_out_of_memory(raised.value)  # MemoryGuard fails it without a retry
    assert session.memory_kills() == []


def test_a_worker_over_its_memory_limit_is_killed_by_its_nanny_and_the_training_is_out_of_memory(
    tiny_metadata, split, monkeypatch
):
    monkeypatch.setattr(xd, "read_gene_group", dask_tasks.hungry_read_gene_group)
    # One death makes the task fail (KilledWorker) instead of three more on restarted workers.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with dc.dask_client("", threads=1, n_workers=1, worker_memory_bytes=GiB) as session:
            with pytest.raises(DaskWorkerOutOfMemory) as raised:
                xd.train_instance_xgboost_dask(
                    BatchReader(tiny_metadata), split[2], params=PARAMS, session=session, partition_rows=300,
                    batch_rows=500, device="cpu",
                )  # fmt: skip
    error = raised.value
    assert "out of memory: a Dask worker was killed by its nanny at its memory limit of 1.00 GiB" in str(error)
    assert error.limit_bytes == GiB and error.rss_bytes > 0.95 * GiB
    # How it surfaced: distributed's KilledWorker for the partition being read.
    assert isinstance(error.__cause__, KilledWorker)
    assert exception_is_out_of_memory(error.__cause__) and exception_is_out_of_memory(error)
    # Read back from the failed attempt's error text, it is out of memory and not a kill of the step.
    text = f"{type(error).__name__}: {error}\n{type(error.__cause__).__name__}: {error.__cause__}"
    assert text_is_out_of_memory(text) and not text_is_kill(text)


def test_a_worker_killed_for_memory_while_xgboost_trains_fails_the_training_out_of_memory(
    tiny_metadata, split, monkeypatch
):
    real_fit = xd.XGBoostDaskBackend.fit
    surfaced = []

    def fit_while_a_worker_runs_out_of_memory(self, train, valid, label):
        worker = sorted(self.session.client.scheduler_info()["workers"])[0]
        self.session.client.run(dask_tasks.start_memory_hog, workers=[worker])  # 2 s into the training
        try:
            return real_fit(self, train, valid, label)
        except Exception as error:
            surfaced.append(error)
            raise

    monkeypatch.setattr(xd.XGBoostDaskBackend, "fit", fit_while_a_worker_runs_out_of_memory)
    # Rounds enough to still be training when the worker is killed (and to end if it never is).
    slow = {"max_rounds": 5000, "early_stopping_rounds": 5000, "learning_rate": 1e-4}
    params = BoostingParams(**{**PARAMS.to_dict(), **slow})
    with dc.dask_client("", threads=2, n_workers=2, worker_memory_bytes=GiB) as session:
        with pytest.raises(DaskWorkerOutOfMemory, match="killed by its nanny at its memory limit of 1.00 GiB") as error:
            xd.train_instance_xgboost_dask(
                BatchReader(tiny_metadata), split[2], params=params, session=session, partition_rows=300,
                batch_rows=500, device="cpu", validation_folds=[0],
            )  # fmt: skip
    # What xgboost.dask raised (here: the surviving worker's collective lost its peer, an
    # XGBoostError) says nothing about memory by itself: the nanny's kill event does.
    assert surfaced and error.value.__cause__ is surfaced[0]
    assert not exception_is_out_of_memory(surfaced[0]), surfaced[0]


def test_killed_worker_is_out_of_memory_and_other_worker_failures_are_not():
    killed = KilledWorker("('read-gene-group', 3)", types.SimpleNamespace(address="tcp://127.0.0.1:4000"), 3)
    assert exception_is_out_of_memory(killed)
    assert text_is_out_of_memory(f"{type(killed).__name__}: {killed}")
    wrapped = RuntimeError("training failed")
    wrapped.__cause__ = killed
    assert exception_is_out_of_memory(wrapped)
    for other in (ValueError("Invalid worker address"), RuntimeError("Missing required workers: {'tcp://x'}")):
        assert not exception_is_out_of_memory(other)


class _Events:
    """A client whose scheduler holds these memory-kill events."""

    def __init__(self, events):
        self.events = events

    def get_events(self, topic):
        assert topic == dc.MEMORY_KILL_TOPIC
        return tuple(self.events)


def _session(events, kills_after=0.0):
    return dc.DaskSession(
        client=_Events(events), tracker_host=None, description="fake", kills_after=kills_after,
        worker_memory_limits={"tcp://a:1": 2 * GiB, "tcp://b:2": 3 * GiB},
    )  # fmt: skip


def test_a_failure_is_out_of_memory_when_a_nanny_killed_a_worker_during_the_session():
    kill = {"worker": "tcp://a:1", "pid": 12, "rss": int(1.97 * GiB)}
    error = dc.memory_failure(_session([(5.0, kill)]), RuntimeError("Missing required workers"), grace_s=0)
    assert isinstance(error, DaskWorkerOutOfMemory)
    assert "killed by its nanny at its memory limit of 2.00 GiB (tcp://a:1, 1.97 GiB resident" in str(error)
    # A kill before the session started is someone else's; no kill and no KilledWorker: not memory.
    assert dc.memory_failure(_session([(5.0, kill)], kills_after=5.0), RuntimeError("x"), grace_s=0) is None
    presumed = dc.memory_failure(_session([]), KilledWorker("t", types.SimpleNamespace(address="a"), 0), grace_s=0)
    assert isinstance(presumed, DaskWorkerOutOfMemory) and "3.00 GiB" in str(presumed) and "task t" in str(presumed)
    # Errors cross process boundaries (Dagster's step events): rebuilt from their fields.
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.rss_bytes == error.rss_bytes


def test_worker_memory_failures_leaves_other_errors_alone():
    with pytest.raises(KeyError, match="gene_id"):
        with dc.worker_memory_failures(_session([])):
            raise KeyError("gene_id")
