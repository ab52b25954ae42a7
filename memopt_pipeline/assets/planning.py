"""memory_plan: the budget and the dataset's shape decide how training will fit."""


import dagster as dg
from pydantic import Field

from memopt_pipeline.assets.versioning import versioned_output
from memopt_pipeline.core.data.dataset import DatasetMetadata
from memopt_pipeline.core.memory.gpu import gpu_status
from memopt_pipeline.core.memory.measure import process_rss_bytes
from memopt_pipeline.core.memory.planner import check_free_disk, make_plan
from memopt_pipeline.core.memory.release import release_memory
from memopt_pipeline.core.memory.strategy import MIN_ENSEMBLE_INSTANCE_ROWS
from memopt_pipeline.core.units import GiB
from memopt_pipeline.resources import ArtifactStore, MemoryGuard


class PlanConfig(dg.Config):
    num_leaves: int = Field(default=31, description="Leaves per tree (sizes the histogram pool; used by training).")
    max_bin: int = Field(default=255, description="Histogram bins per feature (<=255 keeps one byte per binned value).")
    batch_rows: int = Field(default=0, description="Rows per streamed batch; 0 lets the plan choose from the budget.")
    bin_sample_rows: int = Field(default=50_000, description="Rows sampled to find histogram bin edges.")
    safety: float = Field(default=0.85, description="Plan to this share of the budget, leaving the rest as margin.")
    min_ensemble_instance_rows: int = Field(
        default=MIN_ENSEMBLE_INSTANCE_ROWS,
        description="When the data need several in-memory instances of fewer rows than this each, train one XGBoost "
        "external-memory model of all rows instead (if it fits): below it an ensemble was measured to lose more than "
        "0.5% holdout logloss (benchmarks/ensemble_size.py). 0: always the ensemble when its instances fit.",
    )


@dg.asset(code_version="2", group_name="planning")
def memory_plan(
    context: dg.AssetExecutionContext,
    config: PlanConfig,
    dataset_metadata: dict,
    memory_guard: MemoryGuard,
    artifacts: ArtifactStore,
) -> dg.Output[dict]:
    """Budget x dataset shape -> rows per instance, batch rows, max_bin and the predicted peak of each stage."""
    metadata = DatasetMetadata.from_dict(dataset_metadata)
    budget = memory_guard.budget_bytes()
    # The process baseline is measured, not assumed: imports alone cost ~0.3 GiB. What earlier
    # steps in this process left behind (dataset_metadata's scan runs in the same process) is
    # returned first: a training step starts in a fresh process without it (measured 0.40 GiB
    # here before, 0.33 GiB at the start of instance_model, on the 2.1M-row benchmark).
    release_memory()
    baseline = process_rss_bytes()
    plan = make_plan(
        dataset_rows=metadata.n_rows,
        n_features=metadata.n_features,
        n_classes=metadata.n_classes,
        budget_bytes=budget,
        baseline_bytes=baseline,
        num_leaves=config.num_leaves,
        max_bin=config.max_bin,
        batch_rows=config.batch_rows or None,
        bin_sample_rows=config.bin_sample_rows,
        safety=config.safety,
        min_ensemble_instance_rows=config.min_ensemble_instance_rows,
    )
    free_disk = check_free_disk(artifacts.root(), plan.disk_needed_bytes)
    context.log.info(
        f"plan: budget {budget / GiB:.2f} GiB, baseline {baseline / GiB:.2f} GiB, up to "
        f"{plan.max_rows_per_instance:,} rows per instance ({plan.strategy}; sized for {plan.instance_layout}); all {metadata.n_rows:,} rows in one "
        f"model would need {plan.predicted_peak_full_data / GiB:.2f} GiB. Strategy {plan.strategy}: {plan.choice}"
    )
    return versioned_output(
        context,
        plan.to_dict(),
        config=config,
        budget_bytes=budget,
        metadata={
            "budget_gb": budget / GiB,
            "baseline_gb": baseline / GiB,
            "strategy": plan.strategy,
            "strategy_choice": plan.choice,
            "max_rows_per_instance": plan.max_rows_per_instance,
            "instance_layout": plan.instance_layout,
            "min_instances_full_data": plan.min_instances_full_data,
            "batch_rows": plan.batch_rows,
            "max_bin": plan.max_bin,
            "predicted_peak_full_data_gb": plan.predicted_peak_full_data / GiB,
            "predicted_peak_prediction_gb": plan.predicted_peak_prediction / GiB,
            "disk_needed_gb": plan.disk_needed_bytes / GiB,
            "disk_free_gb": free_disk / GiB,
            # Said once per run here rather than on every stage's memory record (MemoryGuard.metadata
            # adds GPU use only when there is a GPU).
            "gpu": gpu_status().summary(),
        },
    )
