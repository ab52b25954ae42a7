"""feature_screening: drop leaky, constant and duplicate features before any model sees them."""

import dagster as dg
from pydantic import Field

from memopt_pipeline.assets.memory_heavy import guarded_reader
from memopt_pipeline.assets.versioning import versioned_output
from memopt_pipeline.core.data.dataset import DatasetMetadata
from memopt_pipeline.core.data.screening import screen_features
from memopt_pipeline.core.memory.planner import MemoryPlan
from memopt_pipeline.resources import MemoryGuard


class ScreeningConfig(dg.Config):
    sample_rows: int = Field(default=20_000, description="Rows (whole training genes) the screening looks at.")
    leak_auc: float = Field(
        default=0.99, description="A feature whose one-vs-rest ROC-AUC alone reaches this for any class is leaky."
    )
    duplicate_correlation: float = Field(
        default=0.999, description="Features this correlated with an earlier one are dropped as duplicates."
    )
    keep_features: list[str] = Field(default_factory=list, description="Features never dropped (override).")
    seed: int = Field(default=0, description="Seed of the gene sample.")


@dg.asset(code_version="1", group_name="splits")
def feature_screening(
    context: dg.AssetExecutionContext,
    config: ScreeningConfig,
    gene_split: dict,
    dataset_metadata: dict,
    memory_plan: dict,
    memory_guard: MemoryGuard,
) -> dg.Output[dict]:
    """Features kept for training, after removing leaky (single-feature AUC >= 0.99), constant and
    near-duplicate (|correlation| >= 0.999) ones, judged on a bounded sample of training genes."""
    metadata = DatasetMetadata.from_dict(dataset_metadata)
    plan = MemoryPlan.from_dict(memory_plan)
    with memory_guard.stage(context, "feature_screening") as monitor:
        reader = guarded_reader(context, metadata, monitor)
        result = screen_features(
            reader,
            gene_split["train_genes"],
            sample_rows=config.sample_rows,
            batch_rows=plan.batch_rows,
            leak_auc=config.leak_auc,
            duplicate_correlation=config.duplicate_correlation,
            keep=config.keep_features,
            seed=config.seed,
            checkpoint=monitor.check,
        )
    if result.leaky:
        context.log.warning(f"leaky features excluded (single-feature AUC): {result.leaky}")
    return versioned_output(
        context,
        result.to_dict(),
        config=config,
        metadata={
            "kept_features": len(result.kept),
            "leaky_features": dg.MetadataValue.json(result.leaky),
            "constant_features": dg.MetadataValue.json(result.constant),
            "duplicate_features": dg.MetadataValue.json(result.duplicates),
            "sample_rows": result.sample_rows,
            **MemoryGuard.metadata(monitor),
        },
    )
