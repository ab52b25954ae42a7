"""Plan memory before loading anything: how many rows one model can hold inside the budget.

The estimate follows LightGBM's real memory layout (see DESIGN.md, "The memory model"):

    peak = process baseline
         + binned training data      rows * features * bytes_per_bin
         + per-row state             rows * classes * 24  (labels, scores, gradients, hessians)
         + histogram pool            num_leaves * features * max_bin * 16
         + max(bin-finding sample, one raw batch)
           bin sample: sample_rows * features * 16   (float32 rows, their float64 transpose)
           raw batch:  batch_rows * features * 4 * 3  (Arrow -> numpy conversion overlap, and the
                                                     next row group the reader decodes ahead)

Training holds the training and validation folds of one instance at once, i.e. all the
instance's rows. The planner solves the inequality ``peak <= budget * safety`` for the
rows one instance may hold; ``instance_assignment`` later divides the sampled training
genes into as many instances as that requires.

When the rows need several instances, the plan chooses between that ensemble and one XGBoost
external-memory model of all rows (:func:`choose_strategy`): by predicted time the ensemble
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
MIN_INSTANCE_ROWS = 1_000  # below this a model is not worth training: the plan fails instead
# Below this many rows per instance an ensemble loses more than 0.5% holdout logloss against one
# model of all rows: on 2.0M training rows x 338 features, k = 2, 4, 8 instances of 1.10M, 551k and
# 275k rows cost -0.09%, -0.08% and +0.31%, k = 16 of 138k rows +1.24%; the 0.5% line crosses at
# about 247k rows (benchmarks/ensemble_size.py; table in benchmarks/README.md).
MIN_ENSEMBLE_INSTANCE_ROWS = 250_000
# XGBoost external memory's seconds per round against the same model in memory (QuantileDMatrix),
# with plan-sized pages (benchmarks/external_memory.py: 0.82 s vs 0.50 s on 428k rows x 338).
EXTERNAL_MEMORY_TIME_FACTOR = 1.65


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
    binned_data: int
    per_row_state: int
    histograms: int
    transient: int  # max(bin sample, raw batch)

    @property
    def total(self) -> int:
        return self.baseline + self.binned_data + self.per_row_state + self.histograms + self.transient


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
) -> TrainingFootprint:
    """Predicted peak of training one model on ``rows`` rows (all folds of one instance)."""
    bin_sample = min(rows, bin_sample_rows) * n_features * BIN_SAMPLE_BYTES_PER_CELL
    raw_batch = min(rows, batch_rows) * n_features * 4 * RAW_BATCH_COPIES
    return TrainingFootprint(
        baseline=baseline_bytes,
        binned_data=math.ceil(rows * n_features * bytes_per_binned_cell(max_bin)),
        per_row_state=rows * n_classes * PER_ROW_STATE_BYTES_PER_CLASS,
        histograms=num_leaves * n_features * max_bin * HISTOGRAM_BYTES_PER_BIN,
        transient=max(bin_sample, raw_batch),
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

    def training_peak(self, rows: int) -> int:
        return training_footprint(
            rows=rows,
            n_features=self.n_features,
            n_classes=self.n_classes,
            max_bin=self.max_bin,
            num_leaves=self.num_leaves,
            batch_rows=self.batch_rows,
            bin_sample_rows=self.bin_sample_rows,
            baseline_bytes=self.baseline_bytes,
        ).total

    def lightgbm_layout(self, rows: int) -> "LightGBMLayout":
        """How LightGBM bins and trains ``rows`` rows, by headroom under ``budget * safety``.

        Each choice costs about one more copy of the binned rows: cutting the folds out of the
        instance binned once keeps the whole instance binned beside each fold's sets (but
        decodes the rows once instead of once per fold), and row-wise histograms hold a
        row-major copy of the training rows (measured 1.5x faster per round than column-wise
        on 2M x 300). Cutting comes first: it removes whole passes over the data."""
        binned = math.ceil(rows * self.n_features * bytes_per_binned_cell(self.max_bin))
        usable = self.budget_bytes * self.safety
        peak = self.training_peak(rows)
        cut_folds = peak + binned <= usable
        peak += binned if cut_folds else 0
        row_wise = peak + binned <= usable
        peak += binned if row_wise else 0
        return LightGBMLayout(cut_folds=cut_folds, row_wise=row_wise, predicted_peak=peak)

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
    fixed = training_footprint(
        rows=0, n_features=n_features, n_classes=n_classes, max_bin=max_bin, num_leaves=num_leaves,
        batch_rows=batch_rows, bin_sample_rows=bin_sample_rows, baseline_bytes=baseline_bytes,
    )
    # The transient term grows with rows until it saturates; use its saturated value so the
    # solved row count is safe for any instance size.
    transient = max(bin_sample_rows * n_features * BIN_SAMPLE_BYTES_PER_CELL, batch_rows * n_features * 4 * RAW_BATCH_COPIES)
    per_row = n_features * bytes_per_binned_cell(max_bin) + n_classes * PER_ROW_STATE_BYTES_PER_CLASS
    room = usable - fixed.baseline - fixed.histograms - transient
    max_rows = int(room // per_row) if room > 0 else 0
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
        needed = (fixed.baseline + fixed.histograms + transient + MIN_INSTANCE_ROWS * per_row) / safety
        raise PlanError(
            f"a {budget_bytes / GiB:.2f} GiB budget cannot train even {MIN_INSTANCE_ROWS:,} rows x "
            f"{n_features} features: the process baseline alone is {baseline_bytes / GiB:.2f} GiB and "
            f"histograms + one batch need {(fixed.histograms + transient) / GiB:.2f} GiB. The smallest "
            f"budget that works is {needed / GiB:.2f} GiB; raise the budget or lower num_leaves / max_bin / batch_rows"
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
    )


def choose_strategy(
    *, dataset_rows: int, max_rows: int, external_fits: bool, min_ensemble_instance_rows: int = MIN_ENSEMBLE_INSTANCE_ROWS
) -> tuple[str, str]:
    """(strategy, why) for ``dataset_rows`` rows when one in-memory model may hold ``max_rows``.

    - all rows fit one model: ``in_memory``;
    - k = ceil(rows / max_rows) instances: the ensemble trains every row once, about the time
      of one in-memory model, against ``EXTERNAL_MEMORY_TIME_FACTOR`` times that for one
      external-memory model; so the ensemble, unless its instances would hold fewer than
      ``min_ensemble_instance_rows`` rows (measured to lose more than 0.5% holdout logloss)
      and external memory fits (``external_fits``): then ``external_memory``, one model of
      all rows at the quality of an in-memory one. 0 turns the quality rule off;
    - no in-memory instance of ``MIN_INSTANCE_ROWS`` rows fits: ``external_memory`` when it fits.
    The caller raises PlanError when the answer is an instance that does not fit.
    """
    slower = f"about {EXTERNAL_MEMORY_TIME_FACTOR:g}x the time per round of an in-memory model"
    if max_rows >= max(dataset_rows, MIN_INSTANCE_ROWS):
        return "in_memory", f"all {dataset_rows:,} rows fit one in-memory model"
    if max_rows < MIN_INSTANCE_ROWS:
        return ("external_memory" if external_fits else "multi_instance"), (
            f"no in-memory instance of {MIN_INSTANCE_ROWS:,} rows fits the budget; one external-memory model of all rows "
            f"({slower})" if external_fits else "neither an in-memory instance nor external memory fits the budget"
        )
    k = math.ceil(dataset_rows / max_rows)
    per_instance = math.ceil(dataset_rows / k)
    ensemble = f"{k} in-memory instances of about {per_instance:,} rows"
    if per_instance >= min_ensemble_instance_rows:
        rule = f"at least {min_ensemble_instance_rows:,} rows per instance" if min_ensemble_instance_rows else "rule off"
        return "multi_instance", (
            f"{ensemble}: about the time of one in-memory model, expected within 0.5% of its holdout logloss "
            f"({rule}); one external-memory model would take {slower}"
        )
    if external_fits:
        return "external_memory", (
            f"{ensemble} would each hold fewer than {min_ensemble_instance_rows:,} rows, where an ensemble was measured "
            f"to lose more than 0.5% holdout logloss; one external-memory model of all rows instead ({slower})"
        )
    return "multi_instance", (
        f"{ensemble}, fewer than {min_ensemble_instance_rows:,} rows each (expect more than 0.5% holdout logloss lost "
        "against one model), because external memory does not fit the budget either"
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
