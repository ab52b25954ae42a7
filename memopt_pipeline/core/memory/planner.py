"""Plan memory before loading anything: how many rows one model can hold inside the budget.

The estimate follows LightGBM's real memory layout (see DESIGN.md, "The memory model"):

    peak = process baseline
         + max(bin-finding sample,                 sample_rows * features * 16  (float32 rows,
                                                   their float64 transpose; freed before any
                                                   row is binned, so it never adds to the rest)
               binned rows                         rows * features * bytes_per_bin, times the
                                                   copies the LightGBM layout holds (below)
               + per-row state                     rows * classes * 24  (labels, scores, gradients, hessians)
               + histogram pool                    num_leaves * features * max_bin * 16
               + one raw batch)                    batch_rows * features * 4 * 3  (Arrow -> numpy
                                                   conversion overlap, and the next row group the
                                                   reader decodes ahead)

Binned copies (:func:`binned_copies`): training holds the training and validation folds of
one instance at once, i.e. all the instance's rows (1 copy); cutting the folds out of the
instance binned once adds a copy during the folds; LightGBM's row-wise histograms add
``ROW_WISE_BINNED_COPIES`` copies of the rows being trained on. The planner solves
``peak <= budget * safety`` for the rows one instance may hold, for the fastest layout that
keeps instances large enough (:func:`make_plan`); ``instance_assignment`` later divides the
sampled training genes into as many instances as that requires.

When the rows need several instances, the plan chooses between that ensemble and one XGBoost
external-memory model of all rows (:func:`memopt_pipeline.core.memory.strategy.choose_strategy`): by predicted time the ensemble
always wins (every row is trained once either way, and external memory's rounds are slower),
so expected quality decides: an ensemble whose instances would hold fewer than
``min_ensemble_instance_rows`` rows, where splitting was measured to cost more than 0.5%
holdout logloss, gives way to external memory when that fits the budget.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from memopt_pipeline.core.memory.strategy import (
    MIN_ENSEMBLE_INSTANCE_ROWS,
    MIN_INSTANCE_ROWS,
    choose_strategy,
    ensemble_split,
)
from memopt_pipeline.core.units import GiB, MiB

PER_ROW_STATE_BYTES_PER_CLASS = 24
HISTOGRAM_BYTES_PER_BIN = 16
BIN_SAMPLE_BYTES_PER_CELL = 16
# A batch in flight: its decoded Arrow record batch and its float32 matrix, plus the next row
# group the batch reader decodes ahead on its read-ahead thread.
RAW_BATCH_COPIES = 3
MIN_BATCH_ROWS = 1_024
MAX_BATCH_ROWS = 65_536
# An XGBoost external-memory page in flight: the reader's batches gathered (float32), their
# concatenation (float32) and XGBoost's binned page (1 byte per cell up to 256 bins).
PAGE_BYTES_PER_CELL = 9
MAX_PAGE_ROWS = 1_048_576
# holdout_evaluation keeps each holdout row's label, gene index and two float32 probability
# vectors (32 bytes) for its metrics, which then work on float64 copies of the probabilities and
# sort one class's scores at a time (scikit-learn). Calibrated on two runs of the stage
# (benchmarks/train_memory.py): 424,144 holdout rows at a 1 GiB budget, measured 0.533 GiB against
# 0.540 predicted with this term; 2.03M holdout rows at 4 GiB, measured 1.02 GiB against 1.07
# (that run predated the integer gene index, so it held more per row than the stage now does).
HOLDOUT_BYTES_PER_ROW = 250
# LightGBM's row-wise histograms keep a row-major copy of the binned training rows and, while
# LightGBM builds it, a second one: measured +0.14 GiB for 256k training rows and +0.25 GiB for the
# 384k-row refit (x 338 features, 1 byte per cell) over column-wise (benchmarks/instance_training.py
# --layout stream vs stream_row_wise, peaks per step logged).
ROW_WISE_BINNED_COPIES = 2
# The training share of the rows in the fold phase when the number of folds is not known (the
# default 3 gene folds).
DEFAULT_TRAIN_SHARE = 2 / 3


class PlanError(ValueError):
    """No configuration fits the budget; the message says the smallest budget that would."""


def bytes_per_binned_cell(max_bin: int) -> float:
    if max_bin <= 15:
        return 0.5
    if max_bin <= 255:
        return 1.0
    return 2.0


@dataclass
class TrainingFootprint:
    baseline: int
    binned_data: int  # every binned copy the layout holds at once (binned_copies)
    per_row_state: int
    histograms: int
    raw_batch: int
    bin_sample: int  # before any row is binned: never held with the terms above

    @property
    def total(self) -> int:
        return self.baseline + max(self.bin_sample, self.binned_data + self.per_row_state + self.histograms + self.raw_batch)


def binned_copies(*, cut_folds: bool, row_wise: bool, train_share: float = DEFAULT_TRAIN_SHARE) -> float:
    """Binned copies of an instance's rows held at the peak of training it with this layout.

    Folds: the fold's training and validation sets (1 copy of the instance), the instance
    binned once beside them with ``cut_folds`` (+1), the row-wise copy of the training rows
    (+``ROW_WISE_BINNED_COPIES`` x ``train_share``). Refit: the instance (1), its row-wise
    copy (+``ROW_WISE_BINNED_COPIES``). The larger of the two phases."""
    row_wise_copies = ROW_WISE_BINNED_COPIES if row_wise else 0
    folds = 1 + (1 if cut_folds else 0) + row_wise_copies * train_share
    refit = 1 + row_wise_copies
    return max(folds, refit)


def training_footprint(
    *,
    rows: int,
    n_features: int,
    n_classes: int,
    max_bin: int,
    num_leaves: int,
    batch_rows: int,
    bin_sample_rows: int,
    baseline_bytes: int,
    cut_folds: bool = False,
    row_wise: bool = False,
    train_share: float = DEFAULT_TRAIN_SHARE,
) -> TrainingFootprint:
    """Predicted peak of training one model on ``rows`` rows (all folds of one instance) with a
    LightGBM layout (default: each fold streamed, column-wise histograms: the least memory)."""
    copies = binned_copies(cut_folds=cut_folds, row_wise=row_wise, train_share=train_share)
    return TrainingFootprint(
        baseline=baseline_bytes,
        binned_data=math.ceil(rows * n_features * bytes_per_binned_cell(max_bin) * copies),
        per_row_state=rows * n_classes * PER_ROW_STATE_BYTES_PER_CLASS,
        histograms=num_leaves * n_features * max_bin * HISTOGRAM_BYTES_PER_BIN,
        raw_batch=min(rows, batch_rows) * n_features * 4 * RAW_BATCH_COPIES,
        bin_sample=min(rows, bin_sample_rows) * n_features * BIN_SAMPLE_BYTES_PER_CELL,
    )


@dataclass(frozen=True)
class LightGBMLayout:
    cut_folds: bool  # bin the instance once, cut every fold's sets out of it
    row_wise: bool  # LightGBM's row-wise histograms (else column-wise)
    predicted_peak: int  # the training peak with these choices

    @classmethod
    def conservative(cls, predicted_peak: int) -> "LightGBMLayout":
        """Streamed folds, column-wise: the least memory (for retries after running out of it)."""
        return cls(cut_folds=False, row_wise=False, predicted_peak=predicted_peak)

    def describe(self) -> str:
        folds = "folds cut from the instance binned once" if self.cut_folds else "each fold streamed and binned"
        return f"{folds}; {'row' if self.row_wise else 'column'}-wise histograms"


# (cut_folds, row_wise), fastest first. One instance of 384,230 rows x 338 features, 3 gene folds +
# refit, 60 rounds, 2 cores (benchmarks/instance_training.py --layout ...): row-wise with the folds
# cut 145 s, row-wise streamed 165 s, column-wise streamed 559 s; the same work in memory 132 s.
# Row-wise histograms are the big win (column-wise rounds on these Datasets were 3.4x slower);
# cutting the folds saves the per-fold decode and binning.
LAYOUTS_FASTEST_FIRST = ((True, True), (False, True), (True, False), (False, False))


@dataclass
class MemoryPlan:
    budget_bytes: int
    safety: float
    baseline_bytes: int
    n_features: int
    n_classes: int
    dataset_rows: int
    max_bin: int
    num_leaves: int
    batch_rows: int
    bin_sample_rows: int
    max_rows_per_instance: int
    strategy: str  # "in_memory" (all rows fit one model), "multi_instance", or "external_memory"
    min_instances_full_data: int
    predicted_peak_full_data: int  # training on all rows in one model (what naive code would need)
    predicted_peak_prediction: int  # streaming prediction with one batch
    disk_needed_bytes: int  # checkpoints: models, predictions, external-memory caches
    choice: str = ""  # why this strategy, with the predicted time and expected quality of the alternatives
    instance_layout: str = ""  # the LightGBM layout max_rows_per_instance was sized for (LightGBMLayout.describe)

    def training_peak(
        self, rows: int, *, cut_folds: bool = False, row_wise: bool = False, train_share: float = DEFAULT_TRAIN_SHARE
    ) -> int:
        """Predicted peak of training ``rows`` rows; by default with the layout needing least memory."""
        return training_footprint(
            rows=rows,
            n_features=self.n_features,
            n_classes=self.n_classes,
            max_bin=self.max_bin,
            num_leaves=self.num_leaves,
            batch_rows=self.batch_rows,
            bin_sample_rows=self.bin_sample_rows,
            baseline_bytes=self.baseline_bytes,
            cut_folds=cut_folds,
            row_wise=row_wise,
            train_share=train_share,
        ).total

    def lightgbm_layout(self, rows: int, train_share: float = DEFAULT_TRAIN_SHARE) -> "LightGBMLayout":
        """How LightGBM bins and trains ``rows`` rows: the fastest layout of
        ``LAYOUTS_FASTEST_FIRST`` whose predicted peak fits ``budget * safety`` (instances are
        sized for one, :func:`make_plan`); streamed column-wise when none does.
        ``train_share``: the largest share of the rows one fold trains on (1 - 1/folds)."""
        usable = self.budget_bytes * self.safety
        for cut_folds, row_wise in LAYOUTS_FASTEST_FIRST:
            peak = self.training_peak(rows, cut_folds=cut_folds, row_wise=row_wise, train_share=train_share)
            if peak <= usable:
                return LightGBMLayout(cut_folds=cut_folds, row_wise=row_wise, predicted_peak=peak)
        return LightGBMLayout.conservative(self.training_peak(rows, train_share=train_share))

    def external_memory_page_rows(self, rows: int) -> int:
        """Rows per XGBoost external-memory page for an instance of ``rows`` rows: as large as the
        budget allows (XGBoost's external-memory guide: every tree level reads every page, and
        small pages make that slow), i.e. half of what ``budget * safety`` leaves beside
        :func:`external_memory_peak`'s other terms; at least one reader batch, at most
        ``MAX_PAGE_ROWS``."""
        fixed = external_memory_peak(
            rows=rows, n_features=self.n_features, n_classes=self.n_classes, max_bin=self.max_bin,
            num_leaves=self.num_leaves, batch_rows=self.batch_rows, baseline_bytes=self.baseline_bytes,
        )  # fmt: skip
        room = self.budget_bytes * self.safety - fixed
        page_rows = int(room / 2 // (self.n_features * PAGE_BYTES_PER_CELL)) if room > 0 else 0
        return max(self.batch_rows, min(page_rows, MAX_PAGE_ROWS))

    def external_memory_training_peak(self, rows: int, page_rows: int | None = None) -> int:
        """Predicted peak of external-memory training of ``rows`` rows, with pages of
        ``page_rows`` (default: :meth:`external_memory_page_rows`)."""
        return external_memory_peak(
            rows=rows, n_features=self.n_features, n_classes=self.n_classes, max_bin=self.max_bin,
            num_leaves=self.num_leaves, batch_rows=self.batch_rows, baseline_bytes=self.baseline_bytes,
            page_rows=self.external_memory_page_rows(rows) if page_rows is None else page_rows,
        )  # fmt: skip

    def holdout_peak(self, holdout_rows: int, model_bytes: int = 0) -> int:
        """Predicted peak of holdout_evaluation: streaming prediction with one batch, the models
        held (``model_bytes``), and what the stage keeps per holdout row for its metrics
        (``HOLDOUT_BYTES_PER_ROW``)."""
        return self.predicted_peak_prediction + model_bytes + holdout_rows * HOLDOUT_BYTES_PER_ROW

    def shap_peak(self, chunk_rows: int) -> int:
        """Baseline + one raw chunk + its contributions (rows x classes x (features+1) doubles, and
        the per-model copy being averaged in)."""
        contributions = chunk_rows * self.n_classes * (self.n_features + 1) * 8 * 2
        return self.baseline_bytes + chunk_rows * self.n_features * 4 * RAW_BATCH_COPIES + contributions

    def instances_needed(self, rows: int, overlap: float = 0.0) -> int:
        """Instances so that each one's rows (its share plus overlap) fit the plan."""
        if self.strategy == "external_memory":
            return 1  # binned rows live on disk: one instance holds everything
        return max(1, math.ceil(rows * (1.0 + overlap) / self.max_rows_per_instance))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> "MemoryPlan":
        return cls(**payload)


def external_memory_peak(
    *,
    rows: int,
    n_features: int,
    n_classes: int,
    max_bin: int,
    num_leaves: int,
    batch_rows: int,
    baseline_bytes: int,
    page_rows: int = 0,
) -> int:
    """Predicted peak of XGBoost external-memory training: baseline, per-row state, histograms,
    one raw batch in conversion and, with ``page_rows``, the page being gathered from batches
    (``PAGE_BYTES_PER_CELL``). The binned pages live on disk."""
    return (
        baseline_bytes
        + rows * n_classes * PER_ROW_STATE_BYTES_PER_CLASS
        + num_leaves * n_features * max_bin * HISTOGRAM_BYTES_PER_BIN
        + batch_rows * n_features * 4 * RAW_BATCH_COPIES
        + page_rows * n_features * PAGE_BYTES_PER_CELL
    )


# XGBoost's bin-edge sample at its peak: the decoded row groups it is drawn from, the kept
# float32 rows and their concatenation, and the QuantileDMatrix sketched from them (measured
# on 338 features: 17 bytes per sampled cell for 50,000 rows, 26 for 10,000).
XGBOOST_SAMPLE_BYTES_PER_CELL = 26
# Fewer sampled rows than this per bin and the edges are left to XGBoost's own sketch.
MIN_SAMPLE_ROWS_PER_BIN = 20


def external_memory_bin_sample_rows(*, batch_rows: int, bin_sample_rows: int, max_bin: int) -> int:
    """Rows of XGBoost external memory's bin-edge sample: at most ``bin_sample_rows``, and no
    more than fits in the raw-batch transient :func:`external_memory_peak` already counts (the
    sample is drawn before any batch is converted, so the two never overlap); external memory
    is chosen for budgets without room for the in-memory sample. 0 (no sample, every training
    matrix sketches its own stream) when that leaves fewer than ``MIN_SAMPLE_ROWS_PER_BIN``
    rows per bin."""
    rows = min(bin_sample_rows, batch_rows * 4 * RAW_BATCH_COPIES // XGBOOST_SAMPLE_BYTES_PER_CELL)
    return rows if rows >= MIN_SAMPLE_ROWS_PER_BIN * max_bin else 0


def default_batch_rows(budget_bytes: int, n_features: int) -> int:
    """Raw batches take at most ~4% of the budget (two copies live during conversion)."""
    rows = int(budget_bytes * 0.04 / max(1, n_features * 4 * RAW_BATCH_COPIES))
    return max(MIN_BATCH_ROWS, min(MAX_BATCH_ROWS, rows))


def make_plan(
    *,
    dataset_rows: int,
    n_features: int,
    n_classes: int,
    budget_bytes: int,
    baseline_bytes: int,
    num_leaves: int = 31,
    max_bin: int = 255,
    batch_rows: int | None = None,
    bin_sample_rows: int = 50_000,
    safety: float = 0.85,
    min_ensemble_instance_rows: int = MIN_ENSEMBLE_INSTANCE_ROWS,
) -> MemoryPlan:
    """Choose batch rows and the largest instance that keeps training under budget * safety."""
    if budget_bytes <= 0:
        raise PlanError(f"memory budget must be positive, got {budget_bytes} bytes")
    batch_rows = batch_rows or default_batch_rows(budget_bytes, n_features)
    usable = budget_bytes * safety
    histograms = num_leaves * n_features * max_bin * HISTOGRAM_BYTES_PER_BIN
    # The batch and sample terms grow with rows until they saturate; their saturated values
    # keep the solved row count safe for any instance size.
    raw_batch = batch_rows * n_features * 4 * RAW_BATCH_COPIES
    bin_sample = bin_sample_rows * n_features * BIN_SAMPLE_BYTES_PER_CELL
    room = usable - baseline_bytes - histograms - raw_batch if baseline_bytes + bin_sample <= usable else 0

    def max_rows_with(cut_folds: bool, row_wise: bool) -> int:
        copies = binned_copies(cut_folds=cut_folds, row_wise=row_wise)
        per_row = n_features * bytes_per_binned_cell(max_bin) * copies + n_classes * PER_ROW_STATE_BYTES_PER_CLASS
        return int(room // per_row) if room > 0 else 0

    def qualifies(cut_folds: bool, row_wise: bool) -> bool:
        """One instance holds every row, or the instances the rows split into hold at least as
        many rows as the quality rule wants."""
        rows = max_rows_with(cut_folds, row_wise)
        if rows >= dataset_rows:
            return True
        if rows < MIN_INSTANCE_ROWS:
            return False
        return ensemble_split(dataset_rows, rows)[1] >= max(min_ensemble_instance_rows, MIN_INSTANCE_ROWS)

    # Instances are sized for the fastest layout that keeps them as large as the quality rule
    # wants (or holds all rows): more, smaller instances train every row once all the same,
    # while the slower layouts cost up to 3.4x the time (LAYOUTS_FASTEST_FIRST).
    sized_for = next((lay for lay in LAYOUTS_FASTEST_FIRST if qualifies(*lay)), LAYOUTS_FASTEST_FIRST[-1])
    max_rows = max_rows_with(*sized_for)
    # XGBoost external memory keeps the binned rows on disk: RAM holds per-row gradients and
    # predictions, the histograms and one raw batch (its bin sample is capped to the batch's
    # bytes: external_memory_bin_sample_rows).
    external_fits = external_memory_peak(
        rows=dataset_rows, n_features=n_features, n_classes=n_classes, max_bin=max_bin,
        num_leaves=num_leaves, batch_rows=batch_rows, baseline_bytes=baseline_bytes,
    ) <= usable
    strategy, choice = choose_strategy(
        dataset_rows=dataset_rows, max_rows=max_rows, external_fits=external_fits,
        min_ensemble_instance_rows=min_ensemble_instance_rows,
    )
    external = strategy == "external_memory"
    if max_rows < MIN_INSTANCE_ROWS and not external:
        per_row = n_features * bytes_per_binned_cell(max_bin) + n_classes * PER_ROW_STATE_BYTES_PER_CLASS
        needed = (baseline_bytes + max(bin_sample, histograms + raw_batch + MIN_INSTANCE_ROWS * per_row)) / safety
        raise PlanError(
            f"a {budget_bytes / GiB:.2f} GiB budget cannot train even {MIN_INSTANCE_ROWS:,} rows x "
            f"{n_features} features: the process baseline alone is {baseline_bytes / GiB:.2f} GiB, "
            f"histograms + one batch need {(histograms + raw_batch) / GiB:.2f} GiB and the bin-edge sample "
            f"{bin_sample / GiB:.2f} GiB. The smallest "
            f"budget that works is {needed / GiB:.2f} GiB; raise the budget or lower num_leaves / max_bin / batch_rows / bin_sample_rows"
        )
    full = training_footprint(
        rows=dataset_rows, n_features=n_features, n_classes=n_classes, max_bin=max_bin, num_leaves=num_leaves,
        batch_rows=batch_rows, bin_sample_rows=bin_sample_rows, baseline_bytes=baseline_bytes,
    )
    prediction_peak = baseline_bytes + batch_rows * n_features * 4 * RAW_BATCH_COPIES + batch_rows * n_classes * 8 * 4
    # Predictions Parquet (ids + class probabilities, uncompressed upper bound), one binned
    # copy for an external-memory cache, and a fixed margin for models and small files.
    disk_needed = dataset_rows * (n_classes * 4 + 32) + math.ceil(dataset_rows * n_features * bytes_per_binned_cell(max_bin)) + 256 * MiB
    return MemoryPlan(
        budget_bytes=budget_bytes,
        safety=safety,
        baseline_bytes=baseline_bytes,
        n_features=n_features,
        n_classes=n_classes,
        dataset_rows=dataset_rows,
        max_bin=max_bin,
        num_leaves=num_leaves,
        batch_rows=batch_rows,
        bin_sample_rows=bin_sample_rows,
        max_rows_per_instance=max(dataset_rows, 1) if external else max_rows,
        strategy=strategy,
        # External memory trains all rows in one instance: its RAM does not grow with binned data.
        min_instances_full_data=1 if external else max(1, math.ceil(dataset_rows / max_rows)),
        predicted_peak_full_data=full.total,
        predicted_peak_prediction=prediction_peak,
        disk_needed_bytes=disk_needed,
        choice=choice,
        instance_layout=LightGBMLayout(*sized_for, predicted_peak=0).describe(),
    )


def check_free_disk(folder: str | Path, needed_bytes: int) -> int:
    """Fail before any work when ``folder``'s file system has less than ``needed_bytes`` free."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise PlanError(
            f"{folder} has {free / GiB:.2f} GiB free but checkpoints and caches need about "
            f"{needed_bytes / GiB:.2f} GiB; free space there or choose another output folder"
        )
    return free
