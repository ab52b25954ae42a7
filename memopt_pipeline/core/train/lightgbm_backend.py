"""Training one instance model with LightGBM, from streamed row batches.

The raw float matrix of an instance is never built. Bin edges come once per instance from a
sampled read (:func:`bin_reference`); every Dataset is then built against them in a single
streamed pass (:class:`StreamingRows`, one batch held, labels collected on the way), and
with room in the plan the folds are cut out of the instance's binned rows instead of being
streamed again.

The two phases are :func:`memopt_pipeline.core.train.loop.train_two_phases`, driving
:class:`LightGBMBackend`; their bookkeeping is in :mod:`memopt_pipeline.core.train.instance`.
LightGBM's ``best_iteration`` is already a count of trees.

Objectives: ``softmax`` (one multiclass model) or ``ovr`` (one-vs-rest: one binary model per
class, LightGBM's ``multiclassova``); one-vs-rest probabilities are renormalised to sum to 1
wherever they are used as a distribution.

``lgb.cv`` is deliberately not used: it keeps a copy of the data per fold.
"""

from __future__ import annotations

from typing import Callable, Collection, Iterator

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.train.calibration import normalise_rows
from memopt_pipeline.core.train.callbacks import lightgbm_progress_callback
from memopt_pipeline.core.train.instance import BoostingParams, InstanceTraining, predict_genes
from memopt_pipeline.core.train.loop import FoldSplit, train_two_phases
from memopt_pipeline.core.train.threads import resolve_threads


def lightgbm_params(params: BoostingParams, *, n_classes: int, bin_sample_rows: int, row_wise: bool = False) -> dict:
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
        "num_threads": resolve_threads(params.num_threads),
        "seed": params.seed,
        "deterministic": True,
        # The layout is chosen by the plan (planner.lightgbm_layout), never tested by LightGBM:
        # its test builds the row-wise copy even when it then picks column-wise (measured:
        # 1.88 GB -> 1.45 GB peak on 2M x 300 when forced column-wise). Row-wise is faster
        # per round but holds a row-major copy of the binned training rows.
        **({"force_row_wise": True} if row_wise else {"force_col_wise": True}),
        "bin_construct_sample_cnt": bin_sample_rows,
        "verbosity": -1,
        **({"histogram_pool_size": params.histogram_pool_mb} if params.histogram_pool_mb else {}),
        **({"bagging_fraction": params.bagging_fraction, "bagging_freq": 1} if params.bagging_fraction < 1.0 else {}),
        **({"use_quantized_grad": True} if params.quantized_gradients else {}),
    }


class StreamingRows(lgb.Sequence):
    """A forward-only ``lgb.Sequence`` over the batch reader, read once.

    With a reference Dataset (the bin edges) LightGBM reads a Sequence once, in increasing
    row slices of ``batch_size``: holding one batch serves that pass with one batch in
    memory. Labels, and optionally each row's fold, are collected on the way, so the push
    is the only pass over the rows.
    """

    def __init__(self, batches: Iterator, n_rows: int, batch_size: int, fold_of_row: Callable | None = None):
        self.batch_size = batch_size
        self._batches = batches
        self._n_rows = n_rows
        self._fold_of_row = fold_of_row
        self._buffer = np.empty((0, 0), dtype=np.float32)
        self._buffer_start = 0
        self.labels: list[np.ndarray] = []
        self.folds: list[np.ndarray] = []

    def __len__(self) -> int:
        return self._n_rows

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise IndexError("StreamingRows serves contiguous slices in increasing order only (bins come from a reference)")
        start, stop, _ = index.indices(self._n_rows)
        if start < self._buffer_start:
            raise IndexError("StreamingRows is read once, forwards")
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

    def _advance(self) -> None:
        self._buffer_start += len(self._buffer)
        try:
            batch = next(self._batches)
        except StopIteration:
            raise RuntimeError(
                f"the data ended after {self._buffer_start:,} rows but dataset_metadata counted {self._n_rows:,}; "
                "the shards changed since metadata was computed: re-materialize dataset_metadata"
            ) from None
        self._buffer = batch.features
        self.labels.append(batch.labels)
        if self._fold_of_row is not None:
            self.folds.append(self._fold_of_row(batch))


def bin_reference(reader: BatchReader, genes: Collection[str], *, bin_sample_rows: int, seed: int, lgb_params: dict) -> lgb.Dataset:
    """The instance's bin edges, from a seeded sample drawn across its row groups (no full decode):
    a small Dataset every fold's, validation's and the refit's Dataset are built against."""
    sample = reader.sample_rows(genes, bin_sample_rows, seed=seed)
    if len(sample) == 0:
        raise ValueError("the instance's genes have no rows")
    # The sample's labels only matter for LightGBM's checks, not for the bin edges.
    reference = lgb.Dataset(
        sample, label=np.zeros(len(sample)), params=lgb_params, feature_name=list(reader.features), free_raw_data=True
    )
    return reference.construct()


def build_dataset(
    reader: BatchReader,
    genes: Collection[str],
    *,
    batch_rows: int,
    lgb_params: dict,
    reference: lgb.Dataset,
    purpose: str = "binning",
    fold_of_gene: dict[str, int] | None = None,
) -> tuple[lgb.Dataset, np.ndarray | None]:
    """Binned LightGBM Dataset of ``genes``' rows on ``reference``'s bin edges, in one streamed
    pass that also collects the labels; with ``fold_of_gene``, each row's fold as well."""
    fold_of_row = None
    if fold_of_gene is not None:
        gene_names = pa.array(sorted(fold_of_gene), type=pa.string())
        folds_by_index = np.array([fold_of_gene[g] for g in gene_names.to_pylist()], dtype=np.int32)

        def fold_of_row(batch) -> np.ndarray:
            index = pc.index_in(pc.cast(batch.ids.column(reader.metadata.gene_column), pa.string()), value_set=gene_names)
            return folds_by_index[index.to_numpy(zero_copy_only=False)]

    rows = StreamingRows(
        reader.iter_batches(genes, batch_rows, purpose=purpose, with_ids=fold_of_gene is not None),
        n_rows=reader.count_rows(genes),
        batch_size=batch_rows,
        fold_of_row=fold_of_row,
    )
    dataset = lgb.Dataset(rows, reference=reference, params=lgb_params, feature_name=list(reader.features), free_raw_data=True)
    dataset.construct()
    dataset.set_label(np.concatenate(rows.labels))
    return dataset, (np.concatenate(rows.folds) if fold_of_gene is not None else None)


def validation_predictions(booster: lgb.Booster, valid: lgb.Dataset, best: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, row-normalised probabilities) of the validation set with the first ``best``
    trees, from the scores LightGBM kept for it while training: the held-out rows are not read
    again. Trees after ``best`` are rolled back first (which updates those scores); the
    booster is a fold's, thrown away after this. The scores are the binned rows' path through
    the trees, which is the raw values' path: thresholds are bin edges."""
    while booster.current_iteration() > best:
        booster.rollback_one_iter()
    scores: list[np.ndarray] = []

    def keep(predictions: np.ndarray, _data: lgb.Dataset) -> tuple[str, float, bool]:
        scores.append(np.array(predictions, dtype=np.float64))
        return "held_out", 0.0, False

    booster.eval_valid(feval=keep)  # the public way to the validation scores (converted by the objective)
    proba = scores[0].reshape(valid.num_data(), -1)
    return valid.get_label().astype(np.int32), normalise_rows(proba).astype(np.float32)


class LightGBMBackend:
    """LightGBM's steps of :func:`loop.train_two_phases`.

    Bin edges come once per instance from a sampled read (:func:`bin_reference`). With
    ``cut_folds`` the instance is binned in one pass in :meth:`prepare` and every fold's
    training and validation sets are cut out of it (``Dataset.subset``), the refit trains on
    it directly; otherwise each fold streams its own sets, and the refit all the rows.
    """

    def __init__(
        self,
        reader: BatchReader,
        fold_of_gene: dict[str, int],
        *,
        params: BoostingParams,
        lgb_params: dict,
        batch_rows: int,
        bin_sample_rows: int,
        callbacks: list,
        log: Callable[[str], None],
        cut_folds: bool,
    ):
        self.reader, self.fold_of_gene, self.params, self.lgb_params = reader, fold_of_gene, params, lgb_params
        self.batch_rows, self.bin_sample_rows, self.callbacks, self.log = batch_rows, bin_sample_rows, callbacks, log
        self.cut_folds = cut_folds
        self._reference: lgb.Dataset | None = None
        self._full_set: lgb.Dataset | None = None  # the instance binned once (cut_folds)
        self._row_folds: np.ndarray | None = None  # the fold of each of its rows
        self._held_out: tuple[np.ndarray, np.ndarray] | None = None  # the last fit's validation predictions

    def _dataset(self, genes: Collection[str], purpose: str, **options) -> tuple[lgb.Dataset, np.ndarray | None]:
        return build_dataset(
            self.reader, genes, batch_rows=self.batch_rows, lgb_params=self.lgb_params, reference=self._reference,
            purpose=purpose, **options,
        )  # fmt: skip

    def prepare(self, genes: list[str]) -> None:
        self.log(f"binning: bin edges from a sample of up to {self.bin_sample_rows:,} rows")
        self._reference = bin_reference(
            self.reader, genes, bin_sample_rows=self.bin_sample_rows, seed=self.params.seed, lgb_params=self.lgb_params
        )
        if self.cut_folds:
            self.log(f"binning all {len(genes)} genes once; folds are cut from the binned rows")
            self._full_set, self._row_folds = self._dataset(
                genes, "binning the instance", fold_of_gene=self.fold_of_gene
            )

    def fold_matrices(self, split: FoldSplit) -> tuple[lgb.Dataset, lgb.Dataset]:
        if self._full_set is not None:
            in_fold = self._row_folds == split.fold
            train = self._full_set.subset(np.flatnonzero(~in_fold).astype(np.int32), params=self.lgb_params)
            return train, self._full_set.subset(np.flatnonzero(in_fold).astype(np.int32), params=self.lgb_params)
        self.log(f"{split.heading}: binning {len(split.train_genes)} training genes")
        train, _ = self._dataset(split.train_genes, f"{split.name} binning train")
        valid, _ = self._dataset(split.valid_genes, f"{split.name} binning valid")
        return train, valid

    def fit(self, train: lgb.Dataset, valid: lgb.Dataset, label: str) -> tuple[lgb.Booster, int]:
        booster = lgb.train(
            self.lgb_params,
            train,
            num_boost_round=self.params.max_rounds,
            valid_sets=[valid],
            valid_names=["valid"],
            # The training booster itself, not a copy reloaded from text: it holds the scores of
            # the validation rows that validation_predictions reads.
            keep_training_booster=True,
            callbacks=[
                lgb.early_stopping(self.params.early_stopping_rounds, verbose=False),
                lightgbm_progress_callback(self.log, label, self.params.max_rounds),
                *self.callbacks,
            ],
        )
        # With early stopping LightGBM's best_iteration is the number of trees to keep
        # (1-based); if stopping never triggered it is 0, meaning "all rounds".
        best = booster.best_iteration or booster.current_iteration()
        self._held_out = validation_predictions(booster, valid, best)
        return booster, best

    def rows(self, matrix: lgb.Dataset) -> int:
        return matrix.num_data()

    def free(self, model: lgb.Booster) -> None:
        # The booster holds references to the sets it was trained and validated on.
        model.free_dataset()

    def predict(self, model: lgb.Booster, genes: list[str], best: int, label: str) -> tuple[np.ndarray, np.ndarray]:
        if self._held_out is not None:  # scored while training: the fold's validation rows are these genes'
            held_out, self._held_out = self._held_out, None
            return held_out
        return predict_genes(
            self.reader, genes, lambda x: model.predict(x, num_iteration=best),
            batch_rows=self.batch_rows, purpose=f"{label} out-of-fold prediction",
        )  # fmt: skip

    def refit_matrix(self, genes: list[str]) -> lgb.Dataset:
        if self._full_set is not None:  # handed over: freed once the refit is done with it
            full, self._full_set, self._row_folds = self._full_set, None, None
            return full
        return self._dataset(genes, "refit binning")[0]

    def refit(self, matrix: lgb.Dataset, num_rounds: int) -> lgb.Booster:
        return lgb.train(
            self.lgb_params,
            matrix,
            num_boost_round=num_rounds,
            callbacks=[lightgbm_progress_callback(self.log, "refit", num_rounds), *self.callbacks],
        )

    def close(self) -> None:
        self._reference = self._full_set = self._row_folds = self._held_out = None


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
    cut_folds: bool = False,
    row_wise: bool = False,
) -> InstanceTraining:
    """Phase 1 (early stopping per gene-aware validation fold) then phase 2 (refit on all genes).

    Bin edges come once per instance from a sampled read (:func:`bin_reference`). With
    ``cut_folds`` the instance is binned in one pass and every fold's training and validation
    sets are cut out of it (``Dataset.subset``), the refit trains on it directly: one decode
    of the rows for all the binning, for about twice the binned bytes held. Otherwise each
    fold streams its own training and validation sets, and the refit all the rows.
    ``row_wise``: LightGBM's row-wise histograms (faster, one more copy of the binned rows).

    ``validation_folds`` None: every fold is validated once (k-fold); otherwise only those
    (fast mode: one 5% fold). The loop itself is :func:`loop.train_two_phases`."""
    lgb_params = lightgbm_params(
        params, n_classes=reader.metadata.n_classes, bin_sample_rows=bin_sample_rows, row_wise=row_wise
    )
    backend = LightGBMBackend(
        reader, fold_of_gene, params=params, lgb_params=lgb_params, batch_rows=batch_rows,
        bin_sample_rows=bin_sample_rows, callbacks=list(callbacks or []), log=log, cut_folds=cut_folds,
    )  # fmt: skip
    classes = reader.metadata.classes
    return train_two_phases(backend, fold_of_gene, validation_folds=validation_folds, classes=classes, log=log, release=release)
