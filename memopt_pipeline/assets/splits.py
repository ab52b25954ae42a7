"""Gene-level splits: holdout, instances (dynamic partitions) and cross-validation folds."""


import dagster as dg
import polars as pl
from pydantic import Field

from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME, instance_key, instance_partitions
from memopt_pipeline.assets.versioning import versioned_output
from memopt_pipeline.core.data.dataset import DatasetMetadata, class_count_columns
from memopt_pipeline.core.data.folds import assign_instances, fast_validation_split, fold_class_counts, gene_folds
from memopt_pipeline.core.data.sampling import GeneSplit, split_genes
from memopt_pipeline.core.memory.planner import MemoryPlan
from memopt_pipeline.core.report.run_report import markdown_table


class SplitConfig(dg.Config):
    sample_genes: int = Field(
        default=0,
        description="Use only this many randomly chosen genes (0 = all). Every later stage reads only these genes.",
    )
    holdout_fraction: float = Field(default=0.2, description="Share of the sampled genes held out for evaluation.")
    seed: int = Field(default=0, description="Seed of the gene sample and holdout split.")


@dg.asset(code_version="1", group_name="splits")
def gene_split(context: dg.AssetExecutionContext, config: SplitConfig, dataset_metadata: dict) -> dg.Output[dict]:
    """Holdout genes vs training genes. The user's gene sample lives here and nowhere else."""
    metadata = DatasetMetadata.from_dict(dataset_metadata)
    split = split_genes(
        metadata.read_gene_stats(),
        holdout_fraction=config.holdout_fraction,
        sample_genes=config.sample_genes,
        seed=config.seed,
    )
    return versioned_output(
        context,
        split.to_dict(),
        config=config,
        metadata={
            "train_genes": len(split.train_genes),
            "holdout_genes": len(split.holdout_genes),
            "train_rows": split.train_rows,
            "holdout_rows": split.holdout_rows,
            "sampled_share_of_genes": split.sampled_genes / split.dataset_genes,
        },
    )


class InstanceConfig(dg.Config):
    n_instances: int = Field(
        default=0, description="Instance models to train (0 = as few as the memory plan allows, at least 1)."
    )
    overlap: float = Field(default=0.1, description="Share of extra genes each instance borrows from the others.")
    seed: int = Field(default=0, description="Seed of the gene-to-instance assignment.")


# chain_settings (resources/chain_settings.py) by key, not by a typed parameter: that module is
# built from this one's FoldConfig. Requiring it puts the settings of a chain's later runs in
# the Launchpad of full_training.
@dg.asset(code_version="1", group_name="splits", required_resource_keys={"chain_settings"})
def instance_assignment(
    context: dg.AssetExecutionContext,
    config: InstanceConfig,
    gene_split: dict,
    dataset_metadata: dict,
    memory_plan: dict,
) -> dg.Output[dict]:
    """Training genes divided into instances that each fit the memory plan (100% coverage, with overlap);
    registers one dynamic partition per instance."""
    metadata = DatasetMetadata.from_dict(dataset_metadata)
    split = GeneSplit.from_dict(gene_split)
    plan = MemoryPlan.from_dict(memory_plan)
    train_stats = metadata.read_gene_stats().filter(pl.col("gene").is_in(split.train_genes))
    needed = plan.instances_needed(split.train_rows, overlap=config.overlap)
    n_instances = max(config.n_instances, needed)
    if config.n_instances and config.n_instances < needed:
        context.log.warning(
            f"{config.n_instances} instances requested but the memory plan needs {needed} for "
            f"{split.train_rows:,} training rows; using {needed}"
        )
    instances = assign_instances(train_stats, n_instances=n_instances, overlap=config.overlap, seed=config.seed)
    # In a chain run, settings of the later runs that cannot work on these instances fail here,
    # before the partitions change or a training run is launched.
    context.resources.chain_settings.check_chain_start(context, [len(genes) for genes in instances])
    rows_by_gene = dict(zip(train_stats["gene"].to_list(), train_stats["rows"].to_list()))
    keys = [instance_key(i) for i in range(len(instances))]
    value = {
        "instances": {
            key: {"genes": genes, "rows": int(sum(rows_by_gene[g] for g in genes))}
            for key, genes in zip(keys, instances)
        },
        "overlap": config.overlap,
    }
    covered = set().union(*map(set, instances))
    coverage = len(covered) / len(split.train_genes)

    existing = set(context.instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME))
    for stale in sorted(existing - set(keys)):
        context.instance.delete_dynamic_partition(INSTANCE_PARTITIONS_NAME, stale)
    context.instance.add_dynamic_partitions(INSTANCE_PARTITIONS_NAME, [k for k in keys if k not in existing])
    largest = max(v["rows"] for v in value["instances"].values())
    return versioned_output(
        context,
        value,
        config=config,
        metadata={
            "instances": len(keys),
            "instances_required_by_plan": needed,
            "gene_coverage": coverage,
            "largest_instance_rows": largest,
            "predicted_training_peak_gb": plan.training_peak(largest) / 1024**3,
            "partitions": dg.MetadataValue.json(keys),
        },
    )


class FoldConfig(dg.Config):
    n_folds: int = Field(default=3, description="Gene-aware cross-validation folds per instance (>= 2).")
    seed: int = Field(default=0, description="Seed of the fold assignment.")
    fast: bool = Field(
        default=False,
        description="Fast mode: instead of k folds, one gene-aware 95%/5% split; phase 1 trains once and "
        "early-stops on the 5% (n_folds is ignored).",
    )


@dg.asset(code_version="1", group_name="splits", partitions_def=instance_partitions)
def cv_folds(
    context: dg.AssetExecutionContext, config: FoldConfig, instance_assignment: dict, dataset_metadata: dict
) -> dg.Output[dict]:
    """Per instance: gene -> fold, stratified by per-gene class counts; no gene spans two folds."""
    instance = instance_assignment["instances"].get(context.partition_key)
    if instance is None:
        raise dg.Failure(
            f"partition {context.partition_key} is not in the current instance_assignment "
            f"({sorted(instance_assignment['instances'])}); re-materialize instance_assignment first"
        )
    metadata = DatasetMetadata.from_dict(dataset_metadata)
    stats = metadata.read_gene_stats().filter(pl.col("gene").is_in(instance["genes"]))
    try:
        if config.fast:
            folds = fast_validation_split(stats, seed=config.seed)
            value = {"fold_of_gene": folds, "n_folds": 2, "validation_folds": [1], "mode": "fast"}
        else:
            folds = gene_folds(stats, n_folds=config.n_folds, seed=config.seed)
            value = {"fold_of_gene": folds, "n_folds": config.n_folds, "mode": "kfold"}
    except ValueError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from error
    per_fold = fold_class_counts(stats, folds)
    return versioned_output(
        context,
        value,
        config=config,
        metadata={
            "mode": value["mode"],
            "genes": len(folds),
            "rows": int(stats["rows"].sum()),
            "fold_rows": dg.MetadataValue.json(per_fold["rows"].to_list()),
            "fold_class_counts": dg.MetadataValue.md(_fold_class_table(per_fold, metadata.classes)),
        },
    )


def _fold_class_table(per_fold: pl.DataFrame, classes: list) -> str:
    """Rows per fold and class, the classes by name: fold_class_counts names its columns by class
    index (``n_class_<i>``, in ``classes`` order)."""
    columns = ["fold", "rows", *class_count_columns(len(classes))]
    return markdown_table(["fold", "rows", *map(str, classes)], per_fold.select(columns).iter_rows())
