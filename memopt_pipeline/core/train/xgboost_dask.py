"""Training one instance model with XGBoost on a Dask cluster: one instance bigger than a machine.

The distributed counterpart of :mod:`memopt_pipeline.core.train.xgboost_backend` (same two phases,
same :class:`BoostingParams`, :class:`FoldResult` and :class:`InstanceTraining`, same XGBoost
parameters, a plain ``xgboost.Booster`` at the end, saved as ``.ubj`` like any XGBoost
model). What differs is where rows go: a lazy Dask DataFrame whose partitions are groups of
the instance's genes. Each partition is read *on a worker* by the project's one batch reader
(:class:`BatchReader`: projection, row-group skipping on the gene column, float32, the same
schema-drift and label handling as everywhere else), so the step process never holds rows
and the workers together hold the instance. XGBoost's ``DaskQuantileDMatrix`` bins each
worker's partitions where they are; validation matrices use ``ref=<training matrix>`` to share
its bin edges (there is no per-instance reference matrix as in the local backend: see
:class:`XGBoostDaskBackend`). Workers must see the shard paths (shared storage) and have memopt_pipeline
installed.

Two phases, as in the local backend (:func:`memopt_pipeline.core.train.loop.train_two_phases`,
driving :class:`XGBoostDaskBackend`):
1. per validation fold, ``xgboost.dask.train`` on the other folds' genes with early stopping
   on this fold's genes; the best iteration is kept as a number of trees (XGBoost's
   ``best_iteration`` is a 0-based index, so the count is ``best_iteration + 1``), and the
   held-out genes are predicted with that many trees (out-of-fold predictions, for
   calibration and the per-fold scores);
2. refit on all the instance's genes for the mean count, without early stopping.
Objectives as in :func:`xgboost_model.xgboost_params` (one-vs-rest: one-hot label columns).

The step's MemoryGuard callbacks are not passed on: XGBoost runs callbacks on the workers,
whose memory Dask's own worker limits manage. With no scheduler address,
:func:`dask_cluster.dask_client` starts a LocalCluster of worker processes, each with its own
memory limit (a share of the plan's predicted training peak) that its nanny enforces; a
worker killed at its limit fails the training as out of memory
(:class:`~memopt_pipeline.core.memory.errors.DaskWorkerOutOfMemory`, see
:mod:`memopt_pipeline.core.train.dask_cluster`). XGBoost uses each worker's own threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection

import numpy as np
import pandas as pd

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.dataset import DatasetMetadata
from memopt_pipeline.core.train.calibration import normalise_rows
from memopt_pipeline.core.train.dask_cluster import DaskSession, worker_memory_failures
from memopt_pipeline.core.train.instance import BoostingParams, InstanceTraining
from memopt_pipeline.core.train.loop import FoldSplit, train_two_phases
from memopt_pipeline.core.train.xgboost_model import best_rounds, device_check, one_hot_classes, xgboost_params

# The label travels as one more column of each partition; a name no feature will have.
LABEL_COLUMN = "__memopt_label__"


# --- cluster ---------------------------------------------------------------------------------


def workers_device(session: DaskSession, log: Callable[[str], None] = lambda message: None) -> str:
    """"cuda" when :func:`xgboost_model.device_check` passes on every worker, else "cpu"; logs why.

    Checked where the training runs: a remote cluster's workers, not this step's machine, hold
    the GPUs (or not). One worker that cannot use a GPU makes it "cpu" for all: XGBoost trains
    one model across all of them with one device setting.
    """
    results = session.client.run(device_check)
    failed = {worker: reason for worker, (device, reason) in results.items() if device != "cuda"}
    if results and not failed:
        log(f"XGBoost on Dask runs on the GPU (device=cuda) on {len(results)} worker(s): {next(iter(results.values()))[1]}")
        return "cuda"
    reasons = "; ".join(f"{worker}: {reason}" for worker, reason in sorted(failed.items())) or "no worker answered"
    log(f"XGBoost on Dask runs on the CPU (tree_method=hist): {reasons}")
    return "cpu"


# --- data ------------------------------------------------------------------------------------


def gene_groups(genes: Collection[str], rows_of_gene: dict[str, int], partition_rows: int) -> list[list[str]]:
    """Sorted genes in consecutive groups of at most ``partition_rows`` rows (a bigger gene alone).

    Consecutive genes of gene-sorted shards share row groups, so each group's reader decodes
    few row groups beyond its own rows.
    """
    if partition_rows <= 0:
        raise ValueError(f"partition_rows must be positive, got {partition_rows}")
    groups: list[list[str]] = []
    current: list[str] = []
    current_rows = 0
    for gene in sorted(str(g) for g in genes):
        rows = rows_of_gene.get(gene, 0)
        if current and current_rows + rows > partition_rows:
            groups.append(current)
            current, current_rows = [], 0
        current.append(gene)
        current_rows += rows
    if current:
        groups.append(current)
    return groups


def _empty_frame(features: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({name: pd.Series(dtype=np.float32) for name in features})
    frame[LABEL_COLUMN] = pd.Series(dtype=np.int32)
    return frame


def read_gene_group(genes: list[str], metadata: DatasetMetadata, features: list[str], batch_rows: int) -> pd.DataFrame:
    """One partition: the rows of ``genes`` as float32 feature columns plus the class index.

    Runs on a Dask worker. The rows come from :class:`BatchReader`, batch by batch, and are
    joined once at the end.
    """
    reader = BatchReader(metadata, features=features)
    features_parts, label_parts = [], []
    for batch in reader.iter_batches(genes, batch_rows):
        features_parts.append(batch.features)
        label_parts.append(batch.labels)
    if not features_parts:
        return _empty_frame(features)
    matrix = features_parts[0] if len(features_parts) == 1 else np.concatenate(features_parts)
    del features_parts
    frame = pd.DataFrame(matrix, columns=features, copy=False)
    frame[LABEL_COLUMN] = np.concatenate(label_parts).astype(np.int32)
    return frame


def instance_frame(reader: BatchReader, genes: Collection[str], *, partition_rows: int, batch_rows: int):
    """A lazy Dask DataFrame of ``genes``' rows: one partition per gene group, read on the workers."""
    import dask.dataframe as dd

    features = list(reader.features)
    if LABEL_COLUMN in features:
        raise ValueError(f"a feature is named {LABEL_COLUMN!r}, which the Dask backend uses for labels; rename it")
    stats = reader.metadata.read_gene_stats()
    rows_of_gene = dict(zip(stats["gene"].cast(str).to_list(), stats["rows"].to_list()))
    groups = gene_groups(genes, rows_of_gene, partition_rows)
    if not groups:
        raise ValueError("no genes to read: a fold or an instance is empty; re-materialize cv_folds")
    return dd.from_map(
        read_gene_group,
        groups,
        metadata=reader.metadata,
        features=features,
        batch_rows=batch_rows,
        meta=_empty_frame(features),
        enforce_metadata=False,
        label="read-gene-group",
    )


def _one_hot_labels(labels: pd.Series, n_classes: int) -> pd.DataFrame:
    """Class indices -> a (rows, classes) 0/1 frame: the one-vs-rest objective's labels."""
    return pd.DataFrame(
        np.eye(n_classes, dtype=np.float32)[labels.to_numpy()], columns=_one_hot_columns(n_classes), index=labels.index
    )


def _one_hot_columns(n_classes: int) -> list[str]:
    return [f"{LABEL_COLUMN}{index}" for index in range(n_classes)]


def _matrix(session: DaskSession, frame, features: list[str], *, max_bin: int, one_hot_classes: int | None, ref=None):
    """A DaskQuantileDMatrix binned on the workers holding ``frame``'s partitions."""
    from xgboost import dask as dxgb

    labels = frame[LABEL_COLUMN]
    if one_hot_classes:
        meta = pd.DataFrame({name: pd.Series(dtype=np.float32) for name in _one_hot_columns(one_hot_classes)})
        labels = labels.map_partitions(_one_hot_labels, one_hot_classes, meta=meta)
    data, labels = _persisted(session, frame[features], labels)
    return dxgb.DaskQuantileDMatrix(session.client, data, labels, max_bin=max_bin, ref=ref, feature_names=features)


def _persisted(session: DaskSession, *collections):
    """``collections`` persisted on the workers, once every partition is there.

    ``DaskQuantileDMatrix`` persists its inputs too (a no-op on these) but only asserts that
    each partition finished: a partition that failed would surface as a bare
    ``AssertionError: error``, once every partition was done. Waiting here raises the first
    failed partition's own error as soon as it fails: a reader's exception, or
    ``KilledWorker`` when the workers reading it kept dying.
    """
    import distributed

    persisted = session.client.persist(list(collections))
    for future in distributed.as_completed(session.client.futures_of(persisted)):
        if future.status in ("error", "cancelled"):
            future.result()  # raises the partition's error
    return persisted


# --- training --------------------------------------------------------------------------------


@dataclass
class _DaskMatrix:
    """A DaskQuantileDMatrix and its rows (counted from the gene statistics: no local matrix to ask)."""

    matrix: Any
    rows: int


class XGBoostDaskBackend:
    """XGBoost-on-Dask's steps of :func:`loop.train_two_phases`.

    No per-instance reference matrix here (unlike the local backend): ``xgboost.dask`` builds
    each worker's matrices inside every ``train`` call, the training one sketched across the
    workers, and accepts as ``ref`` only the training matrix of the same call (for validation
    sets). The sketching pass it makes is over partitions already in the workers' memory,
    not over the Parquet reader.
    """

    def __init__(
        self,
        reader: BatchReader,
        *,
        session: DaskSession,
        params: BoostingParams,
        xgb_params: dict,
        coll_cfg,
        partition_rows: int,
        batch_rows: int,
        log: Callable[[str], None],
    ):
        self.reader, self.session, self.params = reader, session, params
        self.xgb_params, self.coll_cfg = xgb_params, coll_cfg
        self.frame_args = {"partition_rows": partition_rows, "batch_rows": batch_rows}
        self.log = log
        self.features = list(reader.features)
        self.one_hot = one_hot_classes(params, reader.metadata.n_classes)
        self._held_out = None  # the fold's validation frame, predicted out of fold after training

    def _matrix(self, frame, rows: int, ref: _DaskMatrix | None = None) -> _DaskMatrix:
        matrix = _matrix(
            self.session, frame, self.features, max_bin=self.params.max_bin, one_hot_classes=self.one_hot,
            ref=None if ref is None else ref.matrix,
        )  # fmt: skip
        return _DaskMatrix(matrix, rows)

    def prepare(self, genes: list[str]) -> None:
        pass  # bin edges are sketched by each train call on the workers (see the class)

    def fold_matrices(self, split: FoldSplit) -> tuple[_DaskMatrix, _DaskMatrix]:
        train_rows, valid_rows = self.reader.count_rows(split.train_genes), self.reader.count_rows(split.valid_genes)
        self.log(
            f"{split.heading}: {self.session.description} bins {len(split.train_genes)} training genes "
            f"({train_rows:,} rows); early stopping on {valid_rows:,} rows"
        )
        train_frame = instance_frame(self.reader, split.train_genes, **self.frame_args)
        self._held_out = instance_frame(self.reader, split.valid_genes, **self.frame_args)
        train = self._matrix(train_frame, train_rows)
        return train, self._matrix(self._held_out, valid_rows, ref=train)

    def fit(self, train: _DaskMatrix, valid: _DaskMatrix, label: str) -> tuple[Any, int]:
        from xgboost import dask as dxgb

        output = dxgb.train(
            self.session.client,
            self.xgb_params,
            train.matrix,
            num_boost_round=self.params.max_rounds,
            evals=[(valid.matrix, "valid")],
            early_stopping_rounds=self.params.early_stopping_rounds,
            verbose_eval=False,
            coll_cfg=self.coll_cfg,
        )
        booster = output["booster"]
        return booster, best_rounds(booster)

    def rows(self, matrix: _DaskMatrix) -> int:
        return matrix.rows

    def free(self, model) -> None:
        pass  # the workers' matrices go with the DaskQuantileDMatrix objects the loop dropped

    def predict(self, model, genes: list[str], best: int, label: str) -> tuple[np.ndarray, np.ndarray]:
        """Out-of-fold predictions of the best rounds, computed where the held-out rows are;
        the probabilities and labels come from one graph, so each partition is read once."""
        import dask
        from xgboost import dask as dxgb

        frame, self._held_out = self._held_out, None
        proba = dxgb.inplace_predict(self.session.client, model, frame[self.features], iteration_range=(0, best))
        proba, labels = dask.compute(proba, frame[LABEL_COLUMN])
        return labels.to_numpy().astype(np.int32), normalise_rows(np.asarray(proba)).astype(np.float32)

    def refit_matrix(self, genes: list[str]) -> _DaskMatrix:
        rows = self.reader.count_rows(genes)
        self.log(f"phase 2: {self.session.description} bins {len(genes)} genes ({rows:,} rows)")
        return self._matrix(instance_frame(self.reader, genes, **self.frame_args), rows)

    def refit(self, matrix: _DaskMatrix, num_rounds: int):
        from xgboost import dask as dxgb

        output = dxgb.train(
            self.session.client, self.xgb_params, matrix.matrix, num_boost_round=num_rounds, verbose_eval=False,
            coll_cfg=self.coll_cfg,
        )  # fmt: skip
        return output["booster"]

    def close(self) -> None:
        self._held_out = None


def train_instance_xgboost_dask(
    reader: BatchReader,
    fold_of_gene: dict[str, int],
    *,
    params: BoostingParams,
    session: DaskSession,
    partition_rows: int,
    batch_rows: int,
    log: Callable[[str], None] = lambda message: None,
    device: str | None = None,
    validation_folds: Collection[int] | None = None,
) -> InstanceTraining:
    """Phase 1 (early stopping per gene-aware fold) then phase 2 (refit on all genes), on Dask.

    ``reader`` supplies the dataset metadata, the feature columns and row counts (from the
    gene statistics); the rows themselves are read by the workers. ``partition_rows`` bounds
    the rows of one partition (a worker holds it raw until binned); ``batch_rows`` those of
    one batch inside it. ``validation_folds``: as in :func:`lightgbm_backend.train_instance` (None =
    k-fold). The out-of-fold probabilities (rows x classes) are gathered in this process for
    calibration, like the other backends'. The returned booster is an ``xgboost.Booster``.
    ``device`` None: chosen by :func:`workers_device`, on the workers that train. The loop
    itself is :func:`loop.train_two_phases`.
    """
    from xgboost.collective import Config as CollConfig

    xgb_params = xgboost_params(params, n_classes=reader.metadata.n_classes, device=device or workers_device(session, log))
    # Each worker trains with its own threads (xgboost.dask's default without "nthread"): the
    # count this process resolved is its own CPUs, not a worker's share of them.
    xgb_params.pop("nthread", None)
    backend = XGBoostDaskBackend(
        reader, session=session, params=params, xgb_params=xgb_params,
        coll_cfg=CollConfig(tracker_host_ip=session.tracker_host) if session.tracker_host else None,
        partition_rows=partition_rows, batch_rows=batch_rows, log=log,
    )  # fmt: skip
    classes = reader.metadata.classes
    with worker_memory_failures(session):  # a worker killed for memory: DaskWorkerOutOfMemory
        return train_two_phases(backend, fold_of_gene, validation_folds=validation_folds, classes=classes, log=log)
