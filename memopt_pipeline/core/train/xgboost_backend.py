"""Training one instance model with XGBoost, from streamed row batches.

The XGBoost counterpart of :mod:`memopt_pipeline.core.train.lightgbm_backend` (same two phases,
same :class:`BoostingParams`, :class:`FoldResult` and :class:`InstanceTraining`). The raw float
matrix of an instance is never built: a :class:`ReaderIter` (an ``xgboost.DataIter``) feeds
the batch reader's batches one at a time, and XGBoost bins them into a ``QuantileDMatrix``
(in memory, only the binned matrix is kept) or an ``ExtMemQuantileDMatrix`` (the binned
pages are cached on disk, for data whose binned form does not fit either).

Bin edges come once per instance, as with LightGBM: a seeded sample drawn across the
instance's row groups is binned into a small reference ``QuantileDMatrix``
(:func:`bin_reference`), and every fold's training matrix and the refit's are built with
``ref=<reference>``, each validation matrix with ``ref=<its training matrix>`` (which
``xgboost.train`` requires). All share the reference's cut points, and XGBoost skips the
sketching pass over the stream it would otherwise make for each matrix.

Two phases (:func:`memopt_pipeline.core.train.loop.train_two_phases`, driving
:class:`XGBoostBackend`; the number of trees is learnt, then the model is refit on everything):
1. per fold, train on the other folds' genes with early stopping on this fold's genes and
   record the best iteration as a number of trees (XGBoost's ``best_iteration`` is a 0-based
   index, so the count is ``best_iteration + 1``);
2. refit on all the instance's genes for the mean count, without early stopping.

External memory: every DMatrix gets its own cache folder under ``external_memory_dir``;
the folder is removed as soon as the DMatrix is freed, and all of them (and the root, if
this module created it) are removed by the end of training, also when training fails.
"""
from __future__ import annotations

import gc
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import xgboost

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.train.callbacks import xgboost_progress_callback
from memopt_pipeline.core.train.instance import BoostingParams, InstanceTraining, predict_genes
from memopt_pipeline.core.train.loop import FoldSplit, train_two_phases
from memopt_pipeline.core.train.threads import resolve_threads
from memopt_pipeline.core.train.xgboost_model import (
    best_rounds,
    choose_device,
    one_hot_classes,
    predict_proba_xgboost,
    xgboost_params,
)

# The planner's default (assets/planning.py): what train_instance_xgboost samples when not told.
DEFAULT_BIN_SAMPLE_ROWS = 50_000

# --- data feeding --------------------------------------------------------------------------


class ReaderIter(xgboost.DataIter):
    """Feeds one gene set's batches from BatchReader to XGBoost; reset() restarts the stream.

    One batch in memory at a time: ``release_data=True`` lets XGBoost drop its staged copy of
    a batch when it asks for the next one, and this iterator keeps no reference to a batch.
    XGBoost reads the stream several times while building a matrix, each pass opened by
    ``reset()``: on CPU one to count rows and values, one to sketch the bin edges (skipped
    when a ``ref`` matrix gives them), one to bin and, in memory, one for the column layout.
    ``passes`` counts the ``reset()`` calls (XGBoost's last one starts no read), ``reads``
    the passes that read data. ``cache_prefix`` set means external memory: XGBoost writes its
    binned pages to files starting with that prefix.
    ``one_hot_classes`` set means labels are fed as a (rows, classes) 0/1 matrix, for the
    one-vs-rest objective (one binary output per class).
    ``page_rows``: consecutive batches are gathered into pieces of at least this many rows
    (the last one may be smaller); with external memory each piece is one cached page, and
    XGBoost reads every page for every tree level, so few large pages train faster than many
    small ones (a reader batch never spans row groups: 13k rows on the demo data).
    """

    def __init__(
        self,
        reader: BatchReader,
        genes: Collection[str],
        batch_rows: int,
        *,
        cache_prefix: str | None = None,
        one_hot_classes: int | None = None,
        page_rows: int | None = None,
    ):
        if batch_rows <= 0:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        self.reader = reader
        self.genes = list(genes)
        self.batch_rows = batch_rows
        self.feature_names = list(reader.features)
        self.one_hot_classes = one_hot_classes
        self.page_rows = page_rows or 0
        self.pages_last_read = 0  # pieces handed to XGBoost by the last pass that read data
        self.passes = 0  # reset() calls, i.e. passes started over the data
        self.reads = 0  # passes that read the data
        self.rows_last_pass = 0
        self._rows = 0
        self._batches = None
        super().__init__(cache_prefix=cache_prefix, release_data=True)

    def reset(self) -> None:
        if self._batches is not None:
            self._batches.close()  # close the Parquet generator (and its open file) now
            self._batches = None
        self.rows_last_pass, self._rows = self._rows, 0
        self.passes += 1

    def next(self, input_data: Callable) -> bool:
        if self._batches is None:
            self._batches = self.reader.iter_batches(self.genes, self.batch_rows)
            self.reads += 1
            self.pages_last_read = 0
        features, labels = self._next_piece()
        if features is None:
            self._batches = None
            return False
        self._rows += len(labels)
        self.pages_last_read += 1
        if self.one_hot_classes:
            labels = np.eye(self.one_hot_classes, dtype=np.float32)[labels]
        input_data(data=features, label=labels, feature_names=self.feature_names)
        return True

    def _next_piece(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The next batch, or with ``page_rows`` the next batches gathered to at least that many rows."""
        features, labels, rows = [], [], 0
        while rows < max(1, self.page_rows):
            batch = next(self._batches, None)
            if batch is None:
                break
            features.append(batch.features)
            labels.append(batch.labels)
            rows += len(batch.labels)
        if not features:
            return None, None
        if len(features) == 1:
            return features[0], labels[0]
        return np.concatenate(features), np.concatenate(labels)


def build_dmatrix(
    reader: BatchReader,
    genes: Collection[str],
    *,
    batch_rows: int,
    max_bin: int,
    ref: xgboost.DMatrix | None = None,
    external_memory_dir: str | Path | None = None,
    nthread: int | None = None,
    one_hot_classes: int | None = None,
    page_rows: int | None = None,
) -> xgboost.DMatrix:
    """Binned XGBoost matrix of ``genes``' rows, streamed.

    In memory: a ``QuantileDMatrix``. With ``external_memory_dir``: an
    ``ExtMemQuantileDMatrix`` caching its pages in files ``<dir>/cache-*``; the caller owns
    the folder and removes it after freeing the matrix (XGBoost deletes its own cache files
    when the matrix is freed, but not the folder). ``ref``: a matrix whose bin edges this one
    takes instead of sketching its own (one pass fewer over the stream), e.g. the instance's
    :func:`bin_reference`; validation/test matrices need one so that they are binned like
    the training matrix. ``nthread`` (None or 0 = the CPUs this process may use) is used for
    sketching and binning. ``one_hot_classes``, ``page_rows`` (external memory only): see
    :class:`ReaderIter`.
    """
    threads = resolve_threads(nthread or 0)
    if external_memory_dir is None:
        return xgboost.QuantileDMatrix(
            ReaderIter(reader, genes, batch_rows, one_hot_classes=one_hot_classes), max_bin=max_bin, ref=ref, nthread=threads
        )
    folder = Path(external_memory_dir)
    folder.mkdir(parents=True, exist_ok=True)
    iterator = ReaderIter(
        reader, genes, batch_rows, cache_prefix=str(folder / "cache"), one_hot_classes=one_hot_classes, page_rows=page_rows
    )
    return xgboost.ExtMemQuantileDMatrix(iterator, max_bin=max_bin, ref=ref, nthread=threads)


def bin_reference(
    reader: BatchReader,
    genes: Collection[str],
    *,
    bin_sample_rows: int,
    seed: int,
    max_bin: int,
    nthread: int | None = None,
    batch_rows: int = 65_536,
) -> xgboost.QuantileDMatrix:
    """The instance's bin edges, from a seeded sample drawn across its row groups (no full
    decode): a small in-memory ``QuantileDMatrix`` to pass as ``ref`` to every matrix of the
    instance (in memory or external memory alike), which then takes its cut points instead
    of sketching its own stream."""
    sample = reader.sample_rows(genes, bin_sample_rows, seed=seed, batch_rows=batch_rows)
    if len(sample) == 0:
        raise ValueError("the instance's genes have no rows")
    # No labels: only the cut points are read from it. max_bin must be the matrices' and the
    # booster's (XGBoost refuses a matrix binned with another max_bin).
    return xgboost.QuantileDMatrix(
        sample, max_bin=max_bin, feature_names=list(reader.features), nthread=resolve_threads(nthread or 0)
    )


# --- training ------------------------------------------------------------------------------


class _CacheFolders:
    """One external-memory cache folder per DMatrix, under ``root`` (None = in memory).

    XGBoost deletes a matrix's cache files when the matrix is freed; deleting them earlier
    makes it warn about missing files. So a folder is only removed once its matrix is gone
    (tracked with a weak reference), and :meth:`close` removes whatever is left.
    """

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)
        self._created_root = False
        self._folders: list[tuple[Path, weakref.ref]] = []
        if self.root is not None and not self.root.exists():
            self.root.mkdir(parents=True)
            self._created_root = True

    def build(self, reader: BatchReader, genes: Collection[str], label: str, **kwargs) -> xgboost.DMatrix:
        if self.root is None:
            return build_dmatrix(reader, genes, **kwargs)
        folder = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.root))
        try:
            matrix = build_dmatrix(reader, genes, external_memory_dir=folder, **kwargs)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._folders.append((folder, weakref.ref(matrix)))
        return matrix

    def release(self) -> None:
        """Remove the folders of matrices that have been freed."""
        if any(alive() is not None for _, alive in self._folders):
            gc.collect()  # a reference cycle may be all that keeps a matrix
        kept = []
        for folder, alive in self._folders:
            if alive() is None:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                kept.append((folder, alive))
        self._folders = kept

    def close(self) -> None:
        """Remove every folder (even of matrices still referenced) and the root if created here."""
        self.release()
        for folder, _ in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders = []
        if self._created_root:
            shutil.rmtree(self.root, ignore_errors=True)


class XGBoostBackend:
    """XGBoost's steps of :func:`loop.train_two_phases`, in memory or external memory.

    :meth:`prepare` bins a seeded sample of the instance into a small reference
    ``QuantileDMatrix`` (:func:`bin_reference`); every fold's training matrix and the refit's
    are built with ``ref=<reference>``, each validation matrix with ``ref=<its training
    matrix>`` (the same edges): all share the reference's bin edges, and XGBoost skips its
    sketching pass over the stream for each of them. ``bin_sample_rows`` 0: no reference, each
    training matrix sketches its own edges from its stream.
    """

    def __init__(
        self,
        reader: BatchReader,
        *,
        params: BoostingParams,
        xgb_params: dict,
        batch_rows: int,
        bin_sample_rows: int,
        external_memory_dir: str | Path | None,
        callbacks: list,
        log: Callable[[str], None],
        page_rows: int | None = None,
    ):
        self.reader, self.params, self.xgb_params, self.batch_rows = reader, params, xgb_params, batch_rows
        self.bin_sample_rows, self.external_memory_dir, self.callbacks, self.log = (
            bin_sample_rows, external_memory_dir, callbacks, log
        )
        self.matrix_args = {
            "batch_rows": batch_rows,
            "max_bin": params.max_bin,
            "nthread": params.num_threads,
            "one_hot_classes": one_hot_classes(params, reader.metadata.n_classes),
            "page_rows": page_rows,
        }
        self.caches: _CacheFolders | None = None
        self.reference: xgboost.DMatrix | None = None

    def _build(self, genes: Collection[str], folder: str, ref: xgboost.DMatrix | None) -> xgboost.DMatrix:
        self.caches.release()  # folders of matrices freed since the last build
        return self.caches.build(self.reader, genes, folder, ref=ref, **self.matrix_args)

    def prepare(self, genes: list[str]) -> None:
        # Created here, inside the loop's cleanup, so that close() removes a root it created.
        self.caches = _CacheFolders(self.external_memory_dir)
        if self.bin_sample_rows <= 0:
            # No room for a sample (external memory at a tight budget): each training matrix
            # sketches its own stream, one more pass over the reader per matrix.
            self.log("binning: each training matrix sketches its own bin edges (no sample)")
            return
        self.log(f"binning: bin edges from a sample of up to {self.bin_sample_rows:,} rows")
        self.reference = bin_reference(
            self.reader, genes, bin_sample_rows=self.bin_sample_rows, seed=self.params.seed,
            max_bin=self.params.max_bin, nthread=self.params.num_threads, batch_rows=self.batch_rows,
        )  # fmt: skip

    def fold_matrices(self, split: FoldSplit) -> tuple[xgboost.DMatrix, xgboost.DMatrix]:
        self.log(f"{split.heading}: binning {len(split.train_genes)} training genes")
        folder = split.name.replace(" ", "")
        train = self._build(split.train_genes, f"{folder}-train", ref=self.reference)
        # The same edges as the reference's, taken from the training matrix: xgboost.train
        # refuses an evaluation QuantileDMatrix whose ref is not the training matrix itself.
        return train, self._build(split.valid_genes, f"{folder}-valid", ref=train)

    def fit(self, train: xgboost.DMatrix, valid: xgboost.DMatrix, label: str) -> tuple[xgboost.Booster, int]:
        self.log(f"{label}: training on {train.num_row():,} rows, early stopping on {valid.num_row():,}")
        booster = xgboost.train(
            self.xgb_params,
            train,
            num_boost_round=self.params.max_rounds,
            evals=[(valid, "valid")],
            early_stopping_rounds=self.params.early_stopping_rounds,
            verbose_eval=False,
            callbacks=[xgboost_progress_callback(self.log, label, self.params.max_rounds), *self.callbacks],
        )
        return booster, best_rounds(booster)

    def rows(self, matrix: xgboost.DMatrix) -> int:
        return matrix.num_row()

    def free(self, model: xgboost.Booster) -> None:
        # The booster does not hold its matrices: once the loop dropped them they are gone,
        # and so may their cache folders be.
        self.caches.release()

    def predict(self, model: xgboost.Booster, genes: list[str], best: int, label: str) -> tuple[np.ndarray, np.ndarray]:
        return predict_genes(
            self.reader, genes, lambda x: predict_proba_xgboost(model, x, iteration_range=(0, best)),
            batch_rows=self.batch_rows, purpose=f"{label} out-of-fold prediction",
        )  # fmt: skip

    def refit_matrix(self, genes: list[str]) -> xgboost.DMatrix:
        return self._build(genes, "refit", ref=self.reference)

    def refit(self, matrix: xgboost.DMatrix, num_rounds: int) -> xgboost.Booster:
        return xgboost.train(
            self.xgb_params,
            matrix,
            num_boost_round=num_rounds,
            verbose_eval=False,
            callbacks=[xgboost_progress_callback(self.log, "refit", num_rounds), *self.callbacks],
        )

    def close(self) -> None:
        self.reference = None
        if self.caches is not None:
            self.caches.close()


def train_instance_xgboost(
    reader: BatchReader,
    fold_of_gene: dict[str, int],
    *,
    params: BoostingParams,
    batch_rows: int,
    external_memory_dir: str | Path | None = None,
    callbacks: list | None = None,
    log: Callable[[str], None] = lambda message: None,
    release: Callable[[], object] = lambda: None,
    device: str | None = None,
    validation_folds: Collection[int] | None = None,
    bin_sample_rows: int = DEFAULT_BIN_SAMPLE_ROWS,
    page_rows: int | None = None,
) -> InstanceTraining:
    """Phase 1 (early stopping per gene-aware fold) then phase 2 (refit on all genes).

    ``callbacks`` are ``xgboost.callback.TrainingCallback`` objects (e.g.
    :func:`callbacks.xgboost_callback`); they are reused by every ``xgboost.train`` call.
    ``device`` None picks one with :func:`choose_device`. With ``external_memory_dir`` the
    binned matrices live in per-matrix cache folders there, all removed by the end (also on
    error). The returned ``InstanceTraining.booster`` is an ``xgboost.Booster``.
    ``validation_folds``: as in :func:`lightgbm_backend.train_instance` (None = k-fold).
    ``bin_sample_rows``: rows sampled once per instance for the bin edges every matrix
    shares, as LightGBM's ``bin_sample_rows``. ``page_rows``: external memory's page size
    (:class:`ReaderIter`; None: one reader batch per page). The loop itself is
    :func:`loop.train_two_phases`.
    """
    xgb_params = xgboost_params(params, n_classes=reader.metadata.n_classes, device=device or choose_device(log))
    backend = XGBoostBackend(
        reader, params=params, xgb_params=xgb_params, batch_rows=batch_rows, bin_sample_rows=bin_sample_rows,
        external_memory_dir=external_memory_dir, callbacks=list(callbacks or []), log=log, page_rows=page_rows,
    )  # fmt: skip
    classes = reader.metadata.classes
    return train_two_phases(backend, fold_of_gene, validation_folds=validation_folds, classes=classes, log=log, release=release)
