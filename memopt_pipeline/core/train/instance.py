"""What every backend shares: the boosting parameters, the fold results, phase-1 bookkeeping
(folds, out-of-fold predictions, the refit's number of rounds) and the trained instance.

Two phases, whatever the backend (the number of trees is learnt, then the model is refit):
1. per validation fold, train on the other folds' genes with early stopping on this fold's
   genes and record the best iteration as a count of trees; the fold model then predicts its
   held-out genes: these out-of-fold predictions give the per-fold metrics (multi-logloss,
   per-class PR-AUC) and the data to fit calibration on;
2. refit on all the instance's genes for the mean best iteration, without early stopping.
The loop that drives a backend through them is :func:`memopt_pipeline.core.train.loop.train_two_phases`.

Fast mode is a single validation fold (a 95%/5% gene split): see ``validation_folds``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Collection

import numpy as np

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.train.calibration import normalise_rows

OBJECTIVES = ("softmax", "ovr")


@dataclass
class BoostingParams:
    learning_rate: float = 0.1
    num_leaves: int = 31
    max_bin: int = 255
    min_data_in_leaf: int = 20
    feature_fraction: float = 0.9
    lambda_l2: float = 1.0
    max_rounds: int = 300
    early_stopping_rounds: int = 20
    num_threads: int = 0  # 0 = the CPUs this process may use (core/train/threads.py)
    seed: int = 0
    histogram_pool_mb: float | None = None  # cap on LightGBM's histogram cache (None = unbounded)
    bagging_fraction: float = 1.0  # share of rows per tree (1 = no bagging)
    quantized_gradients: bool = False  # LightGBM use_quantized_grad: low-precision gradients, less memory/time
    objective: str = "softmax"  # "softmax" (one multiclass model) or "ovr" (one binary model per class)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        # LightGBM 4.7 crashes (native abort, not an exception) when quantized gradients meet
        # bagging; refuse the combination before any data is loaded.
        if self.quantized_gradients and self.bagging_fraction < 1.0:
            raise ValueError(
                "quantized_gradients cannot be combined with bagging (bagging_fraction="
                f"{self.bagging_fraction}): LightGBM 4.7 crashes on it. Set bagging_fraction to 1.0 or turn "
                "quantized_gradients off"
            )
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be 0 (the CPUs this process may use) or positive, got {self.num_threads}")
        if not 0.0 < self.bagging_fraction <= 1.0:
            raise ValueError(f"bagging_fraction must be in (0, 1], got {self.bagging_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)



@dataclass
class FoldResult:
    fold: int
    train_genes: int
    valid_genes: int
    train_rows: int
    valid_rows: int
    best_iteration: int  # number of trees at the best validation score
    valid_logloss: float  # multi-logloss of the fold model's (row-normalised) predictions on its held-out genes
    seconds: float
    pr_auc: dict[str, float] = field(default_factory=dict)  # per class, on the held-out genes


@dataclass
class InstanceTraining:
    booster: Any  # lightgbm.Booster or xgboost.Booster
    num_rounds: int
    folds: list[FoldResult] = field(default_factory=list)
    train_rows: int = 0
    train_genes: int = 0
    # Out-of-fold predictions of the phase-1 models (row-normalised), in fold order; None
    # when a backend does not produce them. Used to fit calibration.
    oof_labels: np.ndarray | None = None
    oof_proba: np.ndarray | None = None

    def fold_summary(self) -> dict:
        losses = np.array([f.valid_logloss for f in self.folds])
        iterations = np.array([f.best_iteration for f in self.folds])
        summary = {
            "cv_logloss_mean": float(losses.mean()) if len(losses) else math.nan,
            "cv_logloss_std": float(losses.std()) if len(losses) else math.nan,
            "best_iteration_mean": float(iterations.mean()) if len(iterations) else math.nan,
            "folds": [asdict(f) for f in self.folds],
        }
        classes = sorted({c for f in self.folds for c in f.pr_auc}, key=str)
        summary["cv_pr_auc"] = {
            c: {
                "mean": float(np.nanmean(values)) if not np.isnan(values).all() else math.nan,
                "std": float(np.nanstd(values)) if not np.isnan(values).all() else math.nan,
            }
            for c in classes
            for values in [np.array([f.pr_auc.get(c, math.nan) for f in self.folds], dtype=float)]
        }
        return summary


def fold_scores(labels: np.ndarray, proba: np.ndarray, classes: list) -> tuple[float, dict[str, float]]:
    """Multi-logloss and per-class PR-AUC (average precision) of held-out predictions."""
    from sklearn.metrics import average_precision_score, log_loss

    proba = normalise_rows(proba)
    logloss = float(log_loss(labels, proba, labels=list(range(len(classes)))))
    pr_auc = {}
    for index, name in enumerate(classes):
        positives = labels == index
        pr_auc[str(name)] = (
            float(average_precision_score(positives, proba[:, index])) if 0 < positives.sum() < len(labels) else math.nan
        )
    return logloss, pr_auc


def predict_genes(
    reader: BatchReader, genes: Collection[str], predict: Callable[[np.ndarray], np.ndarray], *, batch_rows: int, purpose: str
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, row-normalised probabilities) of ``genes``, streamed one batch at a time."""
    labels, proba = [], []
    for batch in reader.iter_batches(genes, batch_rows, purpose=purpose):
        labels.append(batch.labels)
        proba.append(normalise_rows(predict(batch.features)).astype(np.float32))
    if not labels:
        raise ValueError(f"{purpose}: the genes have no rows")
    return np.concatenate(labels), np.concatenate(proba)


class PhaseOne:
    """Phase-1 bookkeeping shared by every backend: which genes train and validate each fold,
    the fold results and their log lines, the out-of-fold predictions, the refit's number of
    rounds and the final :class:`InstanceTraining`."""

    def __init__(
        self,
        fold_of_gene: dict[str, int],
        validation_folds: Collection[int] | None,
        classes: list,
        log: Callable[[str], None],
    ):
        self.fold_of_gene = fold_of_gene
        self.all_genes = sorted(fold_of_gene)
        self.folds = validation_fold_list(fold_of_gene, validation_folds)
        self.classes = classes
        self.log = log
        self.results: list[FoldResult] = []
        self._oof_labels: list[np.ndarray] = []
        self._oof_proba: list[np.ndarray] = []

    def split(self, fold: int) -> tuple[list[str], list[str]]:
        """(training genes, validation genes) of ``fold``."""
        valid = [g for g in self.all_genes if self.fold_of_gene[g] == fold]
        train = [g for g in self.all_genes if self.fold_of_gene[g] != fold]
        return train, valid

    def record(
        self,
        fold: int,
        train_genes: list[str],
        valid_genes: list[str],
        *,
        train_rows: int,
        valid_rows: int,
        best_iteration: int,
        labels: np.ndarray,
        proba: np.ndarray,
        started: float,
    ) -> FoldResult:
        """Score one fold's held-out predictions, keep them for calibration, log the result."""
        logloss, pr_auc = fold_scores(labels, proba, self.classes)
        self._oof_labels.append(labels)
        self._oof_proba.append(proba)
        result = FoldResult(
            fold=fold,
            train_genes=len(train_genes),
            valid_genes=len(valid_genes),
            train_rows=train_rows,
            valid_rows=valid_rows,
            best_iteration=int(best_iteration),
            valid_logloss=logloss,
            seconds=time.monotonic() - started,
            pr_auc=pr_auc,
        )
        self.results.append(result)
        self.log(
            f"phase 1, fold {fold + 1}: best iteration {best_iteration}, valid logloss {logloss:.4f}, PR-AUC "
            + ", ".join(f"{c} {v:.3f}" for c, v in pr_auc.items())
        )
        return result

    def refit_rounds(self) -> int:
        """Phase 2's number of trees: the mean best iteration of the folds."""
        return max(1, int(round(np.mean([r.best_iteration for r in self.results]))))

    def training(self, booster, *, num_rounds: int, train_rows: int) -> InstanceTraining:
        return InstanceTraining(
            booster=booster,
            num_rounds=num_rounds,
            folds=self.results,
            train_rows=train_rows,
            train_genes=len(self.all_genes),
            oof_labels=np.concatenate(self._oof_labels),
            oof_proba=np.concatenate(self._oof_proba),
        )


def validation_fold_list(fold_of_gene: dict[str, int], validation_folds: Collection[int] | None) -> list[int]:
    """The folds that take a turn as validation set: all of them, or the given ones (fast mode)."""
    folds = sorted(set(fold_of_gene.values()))
    if validation_folds is None:
        return folds
    chosen = sorted(set(validation_folds))
    unknown = [f for f in chosen if f not in folds]
    if unknown or not chosen:
        raise ValueError(f"validation folds {chosen} must be a non-empty subset of the folds {folds}")
    return chosen

