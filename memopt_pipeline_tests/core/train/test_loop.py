"""The two-phase loop every backend shares, driven with a fake backend: order of the steps, the
memory check points, what reaches PhaseOne, and the cleanup on error."""

import gc
import weakref

import numpy as np
import pytest

from memopt_pipeline.core.train.loop import FoldSplit, train_two_phases

CLASSES = ["neither", "donor", "acceptor"]
FOLD_OF_GENE = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2}
ROWS_PER_GENE = 10


class Matrix:
    def __init__(self, genes):
        self.genes = list(genes)


class FakeBackend:
    """Records each step; ``fail_at`` names the step that raises."""

    def __init__(self, calls: list, fail_at: str | None = None):
        self.calls, self.fail_at = calls, fail_at
        self.matrices: list[weakref.ref] = []
        self.alive_at_close: list | None = None

    def _step(self, name: str, *details):
        self.calls.append((name, *details))
        if name == self.fail_at:
            raise RuntimeError(f"{name} failed")

    def _matrix(self, genes) -> Matrix:
        matrix = Matrix(genes)
        self.matrices.append(weakref.ref(matrix))
        return matrix

    def prepare(self, genes):
        self._step("prepare", tuple(genes))

    def fold_matrices(self, split: FoldSplit):
        self._step("fold_matrices", split.name, split.heading)
        return self._matrix(split.train_genes), self._matrix(split.valid_genes)

    def fit(self, train, valid, label):
        model = {"trees": 3 + len(train.genes)}
        self._step("fit", label)
        return model, model["trees"]

    def rows(self, matrix):
        return ROWS_PER_GENE * len(matrix.genes)

    def free(self, model):
        self._step("free", sum(ref() is not None for ref in self.matrices))  # matrices still alive

    def predict(self, model, genes, best, label):
        self._step("predict", tuple(genes), best, label)
        labels = np.arange(ROWS_PER_GENE * len(genes)) % len(CLASSES)
        return labels, np.full((len(labels), len(CLASSES)), 1 / len(CLASSES), dtype=np.float32)

    def refit_matrix(self, genes):
        self._step("refit_matrix", tuple(genes))
        return self._matrix(genes)

    def refit(self, matrix, num_rounds):
        self._step("refit", num_rounds)
        return {"trees": num_rounds}

    def close(self):
        gc.collect()
        self.alive_at_close = [ref() for ref in self.matrices if ref() is not None]
        self.calls.append(("close",))


def _train(backend, calls, **options):
    return train_two_phases(
        backend, FOLD_OF_GENE, classes=CLASSES, log=lambda message: calls.append(("log", message)),
        release=lambda: calls.append(("release",)), **options,
    )  # fmt: skip


def test_the_steps_run_in_order_with_a_check_point_after_each_freed_step():
    calls = []
    backend = FakeBackend(calls)
    training = _train(backend, calls, validation_folds=[0, 2])
    steps = [c if c[0] != "log" else ("log", c[1].split(":")[0]) for c in calls]
    assert steps == [
        ("prepare", ("a", "b", "c", "d", "e")),
        ("release",),  # the bin-edge sample is returned before any row is binned
        ("fold_matrices", "fold 1", "phase 1, fold 1/2"),
        ("fit", "fold 1"),
        ("free", 0),  # the loop dropped the fold's matrices before asking the backend to free
        ("release",),
        ("predict", ("a", "b"), 6, "fold 1"),
        ("log", "phase 1, fold 1"),  # PhaseOne's result line
        ("release",),
        ("fold_matrices", "fold 3", "phase 1, fold 3/2"),  # fold number / folds validated, as before
        ("fit", "fold 3"),
        ("free", 0),
        ("release",),
        ("predict", ("e",), 7, "fold 3"),
        ("log", "phase 1, fold 3"),
        ("release",),
        ("log", "phase 2"),
        ("refit_matrix", ("a", "b", "c", "d", "e")),
        ("refit", 6),  # round((6 + 7) / 2)
        ("free", 0),
        ("close",),
        ("release",),
    ]
    assert ("log", "phase 2: refit on all 5 genes for 6 rounds") in calls
    assert training.booster == {"trees": 6} and training.num_rounds == 6
    assert training.train_rows == 50 and training.train_genes == 5
    folds = [(f.fold, f.best_iteration, f.train_rows, f.valid_rows) for f in training.folds]
    assert folds == [(0, 6, 30, 20), (2, 7, 40, 10)]
    assert len(training.oof_labels) == len(training.oof_proba) == 30


@pytest.mark.parametrize("step", ["prepare", "fold_matrices", "fit", "free", "predict", "refit_matrix", "refit"])
def test_a_failing_step_closes_the_backend_with_no_matrix_left(step):
    calls = []
    backend = FakeBackend(calls, fail_at=step)
    with pytest.raises(RuntimeError, match=f"{step} failed") as raised:
        _train(backend, calls, validation_folds=None)
    assert calls[-1] == ("close",)
    # The traceback's frames no longer hold the matrices: close() could remove their files.
    assert backend.alive_at_close == []
    assert raised.traceback  # the lines of the traceback are kept


def test_invalid_validation_folds_fail_before_the_backend_prepares_anything():
    calls = []
    with pytest.raises(ValueError, match="subset of the folds"):
        _train(FakeBackend(calls), calls, validation_folds=[7])
    assert calls == []
