"""Training one instance model with LightGBM, from streamed row batches.

The raw float matrix of an instance is never built: a :class:`StreamingRows` sequence
serves LightGBM's two sequential passes (bin-finding sample, then row pushes) from the
batch reader, holding one batch at a time. Validation sets are built with
``reference=train`` so they share the training bin edges.

Two phases (the number of trees is learnt, then the model is refit on everything):
1. per validation fold, train on the other folds' genes with early stopping on this fold's
   genes and record the best iteration (LightGBM's ``best_iteration`` is a count of trees);
   the fold model then predicts its held-out genes: these out-of-fold predictions give the
   per-fold metrics (multi-logloss, per-class PR-AUC) and the data to fit calibration on;
2. refit on all the instance's genes for the mean best iteration, without early stopping.

Fast mode is a single validation fold (a 95%/5% gene split): see ``validation_folds``.

Objectives: ``softmax`` (one multiclass model) or ``ovr`` (one-vs-rest: one binary model per
class, LightGBM's ``multiclassova``); one-vs-rest probabilities are renormalised to sum to 1
wherever they are used as a distribution.

``lgb.cv`` is deliberately not used: it keeps a copy of the data per fold.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Iterator

import lightgbm as lgb
import numpy as np

from memopt_pipeline.core.batches import BatchReader
from memopt_pipeline.core.calibration import normalise_rows
from memopt_pipeline.core.memory import process_rss_bytes

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
    num_threads: int = 0  # 0 = LightGBM default (all cores)
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
        if not 0.0 < self.bagging_fraction <= 1.0:
            raise ValueError(f"bagging_fraction must be in (0, 1], got {self.bagging_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


def lightgbm_params(params: BoostingParams, *, n_classes: int, bin_sample_rows: int) -> dict:
    return {
        "objective": "multiclass" if params.objective == "softmax" else "multiclassova",
        "num_class": n_classes,
        "metric": "multi_logloss",
        "learning_rate": params.learning_rate,
        "num_leaves": params.num_leaves,
        "max_bin": params.max_bin,
        "min_data_in_leaf": params.min_data_in_leaf,
        "feature_fraction": params.feature_fraction,
        "lambda_l2": params.lambda_l2,
        "num_threads": params.num_threads,
        "seed": params.seed,
        "deterministic": True,
        # Column-wise histograms skip the transient row-wise copy LightGBM makes to test
        # which layout is faster (measured: 1.88 GB -> 1.45 GB peak on 2M x 300).
        "force_col_wise": True,
        "bin_construct_sample_cnt": bin_sample_rows,
        "verbosity": -1,
        **({"histogram_pool_size": params.histogram_pool_mb} if params.histogram_pool_mb else {}),
        **({"bagging_fraction": params.bagging_fraction, "bagging_freq": 1} if params.bagging_fraction < 1.0 else {}),
        **({"use_quantized_grad": True} if params.quantized_gradients else {}),
    }


class StreamingRows(lgb.Sequence):
    """A forward-only ``lgb.Sequence`` over the batch reader.

    LightGBM reads a Sequence twice, each time in increasing row order (the bin sample
    asserts monotonic indices, then pushes rows in ``batch_size`` slices). Holding one batch
    and restarting the stream when asked for an earlier row serves both passes in two reads
    of the data, with one batch in memory.
    """

    def __init__(self, open_batches: Callable[[], Iterator[np.ndarray]], n_rows: int, batch_size: int):
        self.batch_size = batch_size
        self._open_batches = open_batches
        self._n_rows = n_rows
        self._restart()

    def __len__(self) -> int:
        return self._n_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._n_rows)
            if step != 1:
                raise IndexError("StreamingRows supports contiguous slices only")
            return self._rows(start, stop)
        if index < 0:
            index += self._n_rows
        # Single rows feed LightGBM's bin-finding sample, which must be float64; batches
        # for the row pushes stay float32 (LightGBM accepts both there).
        return self._rows(index, index + 1)[0].astype(np.float64)

    def _restart(self) -> None:
        self._batches = self._open_batches()
        self._buffer = np.empty((0, 0), dtype=np.float32)
        self._buffer_start = 0

    def _advance(self) -> None:
        self._buffer_start += len(self._buffer)
        try:
            self._buffer = next(self._batches)
        except StopIteration:
            raise RuntimeError(
                f"the data ended after {self._buffer_start:,} rows but dataset_metadata counted {self._n_rows:,}; "
                "the shards changed since metadata was computed: re-materialize dataset_metadata"
            ) from None

    def _rows(self, start: int, stop: int) -> np.ndarray:
        if start < self._buffer_start:
            self._restart()
        pieces = []
        position = start
        while position < stop:
            while position >= self._buffer_start + len(self._buffer):
                self._advance()
            low = position - self._buffer_start
            high = min(stop - self._buffer_start, len(self._buffer))
            pieces.append(self._buffer[low:high])
            position = self._buffer_start + high
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def build_dataset(
    reader: BatchReader,
    genes: Collection[str],
    *,
    batch_rows: int,
    lgb_params: dict,
    reference: lgb.Dataset | None = None,
    purpose: str = "binning",
) -> lgb.Dataset:
    """Binned LightGBM Dataset of ``genes``' rows, streamed; labels read in a light first pass."""
    labels = reader.read_labels(genes)
    rows = StreamingRows(
        lambda: (batch.features for batch in reader.iter_batches(genes, batch_rows, purpose=purpose)),
        n_rows=len(labels),
        batch_size=batch_rows,
    )
    dataset = lgb.Dataset(
        rows,
        label=labels,
        reference=reference,
        params=lgb_params,
        feature_name=list(reader.features),
        free_raw_data=True,
    )
    return dataset.construct()


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
    booster: lgb.Booster
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


def _progress_callback(log: Callable[[str], None], label: str, total_rounds: int, every_seconds: float = 10.0):
    state = {"last": time.monotonic(), "start": time.monotonic()}

    def callback(env: lgb.callback.CallbackEnv) -> None:
        now = time.monotonic()
        if now - state["last"] >= every_seconds:
            done = env.iteration + 1
            rate = done / max(now - state["start"], 1e-9)
            log(
                f"{label}: round {done}/{total_rounds} ({rate:.1f} rounds/s, at most {(total_rounds - done) / rate:.0f} s left), "
                f"RSS {process_rss_bytes() / 2**30:.2f} GiB"
            )
            state["last"] = now

    callback.order = 40  # after evaluation, before early stopping's check
    return callback


def train_instance(
    reader: BatchReader,
    fold_of_gene: dict[str, int],
    *,
    params: BoostingParams,
    batch_rows: int,
    bin_sample_rows: int,
    callbacks: list | None = None,
    log: Callable[[str], None] = lambda message: None,
    release: Callable[[], object] = lambda: None,
    validation_folds: Collection[int] | None = None,
) -> InstanceTraining:
    """Phase 1 (early stopping per gene-aware validation fold) then phase 2 (refit on all genes).

    ``validation_folds`` None: every fold is validated once (k-fold); otherwise only those
    (fast mode: one 5% fold)."""
    lgb_params = lightgbm_params(params, n_classes=reader.metadata.n_classes, bin_sample_rows=bin_sample_rows)
    phase = PhaseOne(fold_of_gene, validation_folds, reader.metadata.classes, log)
    for fold in phase.folds:
        started = time.monotonic()
        train_genes, valid_genes = phase.split(fold)
        log(f"phase 1, fold {fold + 1}/{len(phase.folds)}: binning {len(train_genes)} training genes")
        train_set = build_dataset(
            reader, train_genes, batch_rows=batch_rows, lgb_params=lgb_params, purpose=f"fold {fold + 1} binning train"
        )
        valid_set = build_dataset(
            reader, valid_genes, batch_rows=batch_rows, lgb_params=lgb_params, reference=train_set,
            purpose=f"fold {fold + 1} binning valid",
        )
        booster = lgb.train(
            lgb_params,
            train_set,
            num_boost_round=params.max_rounds,
            valid_sets=[valid_set],
            valid_names=["valid"],
            callbacks=[
                lgb.early_stopping(params.early_stopping_rounds, verbose=False),
                _progress_callback(log, f"fold {fold + 1}", params.max_rounds),
                *(callbacks or []),
            ],
        )
        # With early stopping LightGBM's best_iteration is the number of trees to keep
        # (1-based); if stopping never triggered it is 0, meaning "all rounds".
        best = booster.best_iteration or booster.current_iteration()
        train_rows, valid_rows = train_set.num_data(), valid_set.num_data()
        # The binned data is not needed to predict: free it (the booster holds references
        # to both sets) before streaming the held-out genes.
        booster.free_dataset()
        del train_set, valid_set
        release()
        labels, proba = predict_genes(
            reader, valid_genes, lambda x: booster.predict(x, num_iteration=best),
            batch_rows=batch_rows, purpose=f"fold {fold + 1} out-of-fold prediction",
        )  # fmt: skip
        phase.record(
            fold, train_genes, valid_genes, train_rows=train_rows, valid_rows=valid_rows, best_iteration=best,
            labels=labels, proba=proba, started=started,
        )  # fmt: skip
        del booster
        release()

    num_rounds = phase.refit_rounds()
    log(f"phase 2: refit on all {len(phase.all_genes)} genes for {num_rounds} rounds")
    full_set = build_dataset(reader, phase.all_genes, batch_rows=batch_rows, lgb_params=lgb_params, purpose="refit binning")
    booster = lgb.train(
        lgb_params,
        full_set,
        num_boost_round=num_rounds,
        callbacks=[_progress_callback(log, "refit", num_rounds), *(callbacks or [])],
    )
    train_rows = full_set.num_data()
    del full_set
    release()
    return phase.training(booster, num_rounds=num_rounds, train_rows=train_rows)
