"""Training one instance model with XGBoost, from streamed row batches.

The XGBoost counterpart of :mod:`memopt_pipeline.core.train.lightgbm_backend` (same two phases, same
:class:`BoostingParams`, :class:`FoldResult` and :class:`InstanceTraining`). The raw float
matrix of an instance is never built: a :class:`ReaderIter` (an ``xgboost.DataIter``) feeds
the batch reader's batches one at a time, and XGBoost sketches and bins them into a
``QuantileDMatrix`` (in memory, only the binned matrix is kept) or an
``ExtMemQuantileDMatrix`` (the binned pages are cached on disk, for data whose binned form
does not fit either). Validation sets are built with ``ref=<training matrix>`` so they share
its bin edges.

Two phases (the number of trees is learnt, then the model is refit on everything):
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
import time
import traceback
import weakref
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import xgboost

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.train.callbacks import xgboost_progress_callback
from memopt_pipeline.core.train.instance import BoostingParams, InstanceTraining, PhaseOne, predict_genes
from memopt_pipeline.core.train.threads import resolve_threads
from memopt_pipeline.core.train.xgboost_model import (
    best_rounds,
    choose_device,
    one_hot_classes,
    predict_proba_xgboost,
    xgboost_params,
)

# --- data feeding --------------------------------------------------------------------------


class ReaderIter(xgboost.DataIter):
    """Feeds one gene set's batches from BatchReader to XGBoost; reset() restarts the stream.

    One batch in memory at a time: ``release_data=True`` lets XGBoost drop its staged copy of
    a batch when it asks for the next one, and this iterator keeps no reference to a batch.
    XGBoost reads the stream several times while building a matrix (sketch, then bin; 4-5
    passes on CPU), each pass opened by ``reset()``. ``cache_prefix`` set means external
    memory: XGBoost writes its binned pages to files starting with that prefix.
    ``one_hot_classes`` set means labels are fed as a (rows, classes) 0/1 matrix, for the
    one-vs-rest objective (one binary output per class).
    """

    def __init__(
        self,
        reader: BatchReader,
        genes: Collection[str],
        batch_rows: int,
        *,
        cache_prefix: str | None = None,
        one_hot_classes: int | None = None,
    ):
        if batch_rows <= 0:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        self.reader = reader
        self.genes = list(genes)
        self.batch_rows = batch_rows
        self.feature_names = list(reader.features)
        self.one_hot_classes = one_hot_classes
        self.passes = 0  # reset() calls, i.e. passes started over the data
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
        batch = next(self._batches, None)
        if batch is None:
            self._batches = None
            return False
        self._rows += len(batch.labels)
        labels = batch.labels
        if self.one_hot_classes:
            labels = np.eye(self.one_hot_classes, dtype=np.float32)[labels]
        input_data(data=batch.features, label=labels, feature_names=self.feature_names)
        return True


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
) -> xgboost.DMatrix:
    """Binned XGBoost matrix of ``genes``' rows, streamed.

    In memory: a ``QuantileDMatrix``. With ``external_memory_dir``: an
    ``ExtMemQuantileDMatrix`` caching its pages in files ``<dir>/cache-*``; the caller owns
    the folder and removes it after freeing the matrix (XGBoost deletes its own cache files
    when the matrix is freed, but not the folder). Pass ``ref=<training matrix>`` for
    validation/test matrices so they use the training bin edges. ``nthread`` (None or 0 =
    the CPUs this process may use) is used for sketching and binning. ``one_hot_classes``: see :class:`ReaderIter`.
    """
    threads = resolve_threads(nthread or 0)
    if external_memory_dir is None:
        return xgboost.QuantileDMatrix(
            ReaderIter(reader, genes, batch_rows, one_hot_classes=one_hot_classes), max_bin=max_bin, ref=ref, nthread=threads
        )
    folder = Path(external_memory_dir)
    folder.mkdir(parents=True, exist_ok=True)
    iterator = ReaderIter(reader, genes, batch_rows, cache_prefix=str(folder / "cache"), one_hot_classes=one_hot_classes)
    return xgboost.ExtMemQuantileDMatrix(iterator, max_bin=max_bin, ref=ref, nthread=threads)




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



def _fit_fold(
    caches: _CacheFolders,
    reader: BatchReader,
    train_genes: list[str],
    valid_genes: list[str],
    *,
    xgb_params: dict,
    params: BoostingParams,
    batch_rows: int,
    label: str,
    callbacks: list,
    log: Callable[[str], None],
) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """Early-stopped training of one fold: (best rounds, train rows, valid rows, held-out
    labels, held-out row-normalised probabilities of the best rounds).

    A function of its own so that its matrices and booster are freed when it returns.
    """
    matrix_args = {
        "batch_rows": batch_rows,
        "max_bin": params.max_bin,
        "nthread": params.num_threads,
        "one_hot_classes": one_hot_classes(params, reader.metadata.n_classes),
    }
    folder = label.replace(" ", "")
    train = caches.build(reader, train_genes, f"{folder}-train", **matrix_args)
    valid = caches.build(reader, valid_genes, f"{folder}-valid", ref=train, **matrix_args)
    log(f"{label}: training on {train.num_row():,} rows, early stopping on {valid.num_row():,}")
    booster = xgboost.train(
        xgb_params,
        train,
        num_boost_round=params.max_rounds,
        evals=[(valid, "valid")],
        early_stopping_rounds=params.early_stopping_rounds,
        verbose_eval=False,
        callbacks=[xgboost_progress_callback(log, label, params.max_rounds), *callbacks],
    )
    best = best_rounds(booster)
    train_rows, valid_rows = train.num_row(), valid.num_row()
    del train, valid  # the binned matrices are not needed to predict
    caches.release()
    labels, proba = predict_genes(
        reader, valid_genes, lambda x: predict_proba_xgboost(booster, x, iteration_range=(0, best)),
        batch_rows=batch_rows, purpose=f"{label} out-of-fold prediction",
    )  # fmt: skip
    return best, train_rows, valid_rows, labels, proba


def _refit(
    caches: _CacheFolders,
    reader: BatchReader,
    genes: list[str],
    *,
    xgb_params: dict,
    params: BoostingParams,
    batch_rows: int,
    num_rounds: int,
    callbacks: list,
    log: Callable[[str], None],
) -> tuple[xgboost.Booster, int]:
    full = caches.build(
        reader, genes, "refit", batch_rows=batch_rows, max_bin=params.max_bin, nthread=params.num_threads,
        one_hot_classes=one_hot_classes(params, reader.metadata.n_classes),
    )  # fmt: skip
    booster = xgboost.train(
        xgb_params,
        full,
        num_boost_round=num_rounds,
        verbose_eval=False,
        callbacks=[xgboost_progress_callback(log, "refit", num_rounds), *callbacks],
    )
    return booster, full.num_row()


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
) -> InstanceTraining:
    """Phase 1 (early stopping per gene-aware fold) then phase 2 (refit on all genes).

    ``callbacks`` are ``xgboost.callback.TrainingCallback`` objects (e.g.
    :func:`callbacks.xgboost_callback`); they are reused by every ``xgboost.train`` call.
    ``device`` None picks one with :func:`choose_device`. With ``external_memory_dir`` the
    binned matrices live in per-matrix cache folders there, all removed by the end (also on
    error). The returned ``InstanceTraining.booster`` is an ``xgboost.Booster``.
    ``validation_folds``: as in :func:`lightgbm_backend.train_instance` (None = k-fold).
    """
    xgb_params = xgboost_params(params, n_classes=reader.metadata.n_classes, device=device or choose_device(log))
    callbacks = list(callbacks or [])
    phase = PhaseOne(fold_of_gene, validation_folds, reader.metadata.classes, log)
    caches = _CacheFolders(external_memory_dir)
    try:
        for fold in phase.folds:
            started = time.monotonic()
            train_genes, valid_genes = phase.split(fold)
            label = f"fold {fold + 1}"
            log(f"phase 1, fold {fold + 1}/{len(phase.folds)}: binning {len(train_genes)} training genes")
            best, train_rows, valid_rows, labels, proba = _fit_fold(
                caches, reader, train_genes, valid_genes, xgb_params=xgb_params, params=params,
                batch_rows=batch_rows, label=label, callbacks=callbacks, log=log,
            )  # fmt: skip
            caches.release()
            phase.record(
                fold, train_genes, valid_genes, train_rows=train_rows, valid_rows=valid_rows, best_iteration=best,
                labels=labels, proba=proba, started=started,
            )  # fmt: skip
            release()

        num_rounds = phase.refit_rounds()
        log(f"phase 2: refit on all {len(phase.all_genes)} genes for {num_rounds} rounds")
        booster, train_rows = _refit(
            caches, reader, phase.all_genes, xgb_params=xgb_params, params=params, batch_rows=batch_rows,
            num_rounds=num_rounds, callbacks=callbacks, log=log,
        )  # fmt: skip
        caches.release()
        release()
    except BaseException as error:
        # The traceback's finished frames (xgboost.train's, _fit_fold's) still reference the
        # matrices; clear their locals so the matrices are freed (and XGBoost deletes its
        # cache files) before the folders are removed below. The traceback lines are kept.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        caches.close()
    return phase.training(booster, num_rounds=num_rounds, train_rows=train_rows)

