"""The two-phase training loop, written once for every backend.

What a backend is asked to do is :class:`Backend`; :func:`train_two_phases` drives it:

1. ``prepare`` once per instance (bin edges from a sample, a binned copy to cut folds from)
   -> ``release()``;
2. per validation fold: ``fold_matrices`` -> ``fit`` (early stopping, the best number of
   trees) -> ``rows`` -> drop the matrices -> ``free`` -> ``release()`` -> ``predict`` the
   held-out genes with the best number of trees -> :meth:`PhaseOne.record` -> ``release()``;
3. ``refit_matrix`` on all genes -> ``refit`` for the mean best number of trees -> ``free``;
4. ``close``, also when any step fails.

Backends keep no reference to the matrices they hand out, so dropping them here
really frees them (and, for XGBoost's external memory, lets the backend remove their cache
folders in ``free``). Each fold runs in a function of its own for the same reason: its
matrices and model go when it returns.

Which matrices a backend builds, how it logs its binning, how it trains and predicts is its
own business; the bookkeeping (folds, out-of-fold predictions, calibration data, refit
rounds, the fold result lines) is :class:`PhaseOne`'s.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Collection, Protocol

import numpy as np

from memopt_pipeline.core.train.instance import InstanceTraining, PhaseOne


@dataclass(frozen=True)
class FoldSplit:
    """One validation fold's turn: which genes train, which validate (and are predicted out of fold)."""

    fold: int
    n_folds: int  # folds validated in this training (1 in fast mode)
    train_genes: list[str]
    valid_genes: list[str]

    @property
    def name(self) -> str:
        """"fold 2": the label of progress lines, read purposes and cache folders."""
        return f"fold {self.fold + 1}"

    @property
    def heading(self) -> str:
        """"phase 1, fold 2/5": how a backend's line about building this fold's matrices starts."""
        return f"phase 1, fold {self.fold + 1}/{self.n_folds}"


class Backend(Protocol):
    """The per-backend steps of :func:`train_two_phases`. Matrices and models are opaque to the
    loop: whatever the backend returns from one step it gets back in the next."""

    def prepare(self, genes: list[str]) -> None:
        """Once per instance, before any fold: e.g. the bin edges every matrix is built on."""

    def fold_matrices(self, split: FoldSplit) -> tuple[Any, Any]:
        """(training matrix, validation matrix) of one fold, on the instance's bin edges."""

    def fit(self, train: Any, valid: Any, label: str) -> tuple[Any, int]:
        """(model, best number of trees): training with early stopping on ``valid``."""

    def rows(self, matrix: Any) -> int:
        """Rows of a matrix this backend built."""

    def free(self, model: Any) -> None:
        """Called once the loop has dropped a model's training matrices: release what the model
        or the backend still holds of them (LightGBM's datasets, external memory folders)."""

    def predict(self, model: Any, genes: list[str], best: int, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, row-normalised probabilities) of ``genes`` with the model's first ``best`` trees."""

    def refit_matrix(self, genes: list[str]) -> Any:
        """The training matrix of all the instance's genes, for the refit."""

    def refit(self, matrix: Any, num_rounds: int) -> Any:
        """The final model: ``num_rounds`` trees on ``matrix``, no early stopping."""

    def close(self) -> None:
        """Release what ``prepare`` built and remove temporary files; also called after a failure."""


def train_two_phases(
    backend: Backend,
    fold_of_gene: dict[str, int],
    *,
    validation_folds: Collection[int] | None,
    classes: list,
    log: Callable[[str], None],
    release: Callable[[], object] = lambda: None,
) -> InstanceTraining:
    """Phase 1 (early stopping per gene-aware validation fold, out-of-fold predictions) then
    phase 2 (refit on all genes for the folds' mean best number of trees) with ``backend``.

    ``release`` is called between steps, once a step's matrices or model are dropped (the
    caller's memory check point: collect garbage, return freed memory, check the budget).
    ``validation_folds`` None: every fold is validated once (k-fold); otherwise only those."""
    phase = PhaseOne(fold_of_gene, validation_folds, classes, log)
    try:
        backend.prepare(phase.all_genes)
        release()  # the bin-edge sample's raw rows are gone: return them before any row is binned
        for fold in phase.folds:
            train_genes, valid_genes = phase.split(fold)
            _phase_one_fold(backend, phase, FoldSplit(fold, len(phase.folds), train_genes, valid_genes), release)
            release()
        num_rounds = phase.refit_rounds()
        log(f"phase 2: refit on all {len(phase.all_genes)} genes for {num_rounds} rounds")
        booster, train_rows = _refit(backend, phase.all_genes, num_rounds)
        backend.free(booster)
    except BaseException as error:
        # The traceback's finished frames (the library's training call, the fold's) still
        # reference the matrices; clear their locals so the matrices are freed (for external
        # memory: XGBoost deletes its cache files) before close() removes what is left. The
        # traceback's lines are kept.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        backend.close()
    release()
    return phase.training(booster, num_rounds=num_rounds, train_rows=train_rows)


def _phase_one_fold(backend: Backend, phase: PhaseOne, split: FoldSplit, release: Callable[[], object]) -> None:
    """Early-stopped training of one fold, its out-of-fold predictions and their record. A
    function of its own so that the fold's matrices and model are freed when it returns."""
    started = time.monotonic()
    train, valid = backend.fold_matrices(split)
    model, best = backend.fit(train, valid, split.name)
    train_rows, valid_rows = backend.rows(train), backend.rows(valid)
    del train, valid  # not needed to predict: free them before streaming the held-out genes
    backend.free(model)
    release()
    labels, proba = backend.predict(model, split.valid_genes, best, split.name)
    phase.record(
        split.fold, split.train_genes, split.valid_genes, train_rows=train_rows, valid_rows=valid_rows,
        best_iteration=best, labels=labels, proba=proba, started=started,
    )  # fmt: skip


def _refit(backend: Backend, genes: list[str], num_rounds: int) -> tuple[Any, int]:
    """(final model, its training rows); the refit matrix is freed when this returns."""
    matrix = backend.refit_matrix(genes)
    model = backend.refit(matrix, num_rounds)
    return model, backend.rows(matrix)
