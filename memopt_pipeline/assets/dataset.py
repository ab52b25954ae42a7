"""Dataset stages: the only assets that open the dataset path."""


from pathlib import Path

import dagster as dg
from pydantic import Field

from memopt_pipeline.assets.versioning import versioned_output
from memopt_pipeline.core.data.dataset import scan_dataset
from memopt_pipeline.core.data.fingerprint import dataset_fingerprint
from memopt_pipeline.core.data.ingest import ingest_csv, is_csv_input, parquet_layout, reshard_parquet
from memopt_pipeline.core.data.synthetic import (
    GENE_COLUMN,
    GENERATOR_VERSION,
    LABEL_COLUMN,
    SyntheticSpec,
    generate_dataset,
)
from memopt_pipeline.resources import ArtifactStore, MemoryGuard

DEFAULT_DEMO_DIR = "data/demo"


class DatasetConfig(dg.Config):
    path: str = Field(
        default="",
        description="Parquet file or folder of Parquet shards (sorted by gene for best reads; one with a row "
        "group of more than 131,072 rows, as pandas writes them, or rows not grouped by gene is re-sharded once "
        "into gene-sorted shards under the output folder), or a CSV file / folder of CSVs (.csv, .csv.gz), which "
        "is streamed into gene-sorted Parquet shards under the output folder. Empty: generate the demo "
        "splice-site dataset in demo_dir.",
    )
    gene_column: str = Field(default=GENE_COLUMN, description="Column holding the group (gene) id of each row.")
    label_column: str = Field(default=LABEL_COLUMN, description="Column holding the class label of each row.")
    exclude_columns: list[str] = Field(
        default_factory=list,
        description="Numeric columns to keep out of the features (string and id columns are excluded automatically).",
    )
    demo_dir: str = Field(default=DEFAULT_DEMO_DIR, description="Where the demo dataset is generated.")
    demo_genes: int = Field(default=SyntheticSpec().n_genes, description="Genes in the generated demo dataset.")
    demo_seed: int = Field(default=SyntheticSpec().seed, description="Seed of the generated demo dataset.")


def source_version_settings(config: DatasetConfig) -> dict:
    """What besides the config makes the source what it is: the input files' fingerprint (names,
    sizes, modification times; nothing is read), or, for the demo data, the generator's version
    (it is deterministic for a given config)."""
    if not config.path:
        return {"generator_version": GENERATOR_VERSION}
    return {"input_fingerprint": dataset_fingerprint(config.path).digest}


@dg.asset(code_version="1", group_name="dataset")
def source_dataset(
    context: dg.AssetExecutionContext, config: DatasetConfig, memory_guard: MemoryGuard, artifacts: ArtifactStore
) -> dg.Output[dict]:
    """The Parquet shards to train on: the configured Parquet path (re-sharded into gene-sorted shards
    with small row groups if its layout would make every pass decode it whole), CSV input streamed into
    gene-sorted Parquet shards, or the generated demo splice-site dataset."""
    generated = not config.path
    ingested = bool(config.path) and is_csv_input(config.path)
    resharded = False
    ingest_metadata: dict = {}
    if generated:
        spec = SyntheticSpec(n_genes=config.demo_genes, seed=config.demo_seed)
        shards = generate_dataset(config.demo_dir, spec, progress=context.log.info)
        root = Path(config.demo_dir)
    elif ingested:
        # A fixed folder, not a run folder: the ingest reuses it across runs by its manifest (re-ingesting
        # a large CSV per run would cost hours and a copy of the data each time) and rewrites it only
        # when the CSV changed, which changes source_dataset's data version and so stales everything
        # that read the old shards.
        root = artifacts.path("source_dataset", "ingested")
        with memory_guard.stage(context, "csv_ingest") as monitor:
            result = ingest_csv(
                config.path,
                root,
                gene_column=config.gene_column,
                budget_bytes=memory_guard.budget_bytes(),
                progress=context.log.info,
                checkpoint=monitor.check,
            )
        shards = result.shards
        ingest_metadata = {"csv_rows": result.rows, "csv_gb": result.input_bytes / 1024**3, **MemoryGuard.metadata(monitor)}
    else:
        layout = parquet_layout(config.path, gene_column=config.gene_column)  # footers only
        resharded = layout.needs_reshard
        if resharded:
            # Like the CSV ingest: a fixed folder, reused by its manifest while the input is unchanged.
            root = artifacts.path("source_dataset", "resharded")
            context.log.info(f"re-sharding the Parquet input into gene-sorted shards in {root}: {layout.reason}")
            with memory_guard.stage(context, "parquet_reshard") as monitor:
                result = reshard_parquet(
                    config.path,
                    root,
                    gene_column=config.gene_column,
                    budget_bytes=memory_guard.budget_bytes(),
                    progress=context.log.info,
                    checkpoint=monitor.check,
                )
            shards = result.shards
            ingest_metadata = {
                "reshard_reason": layout.reason,
                "input_rows": result.rows,
                "input_largest_row_group": layout.largest_row_group,
                **MemoryGuard.metadata(monitor),
            }
        else:
            root = Path(config.path)
            shards = layout.files
    shard_paths = [str(Path(s).resolve()) for s in shards]
    disk_bytes = sum(Path(s).stat().st_size for s in shard_paths)
    value = {
        "path": str(root.resolve()),
        "shards": shard_paths,
        "generated": generated,
        "gene_column": config.gene_column,
        "label_column": config.label_column,
        "exclude_columns": list(config.exclude_columns),
    }
    return versioned_output(
        context,
        value,
        config=config,
        input=source_version_settings(config),
        metadata={
            "shards": len(shard_paths),
            "disk_gb": disk_bytes / 1024**3,
            "generated_demo": generated,
            "ingested_from_csv": ingested,
            "resharded_from_parquet": resharded,
            **ingest_metadata,
            "dataset_path": dg.MetadataValue.path(str(root.resolve())),
        },
    )


@dg.asset(code_version="1", group_name="dataset")
def dataset_metadata(
    context: dg.AssetExecutionContext, source_dataset: dict, memory_guard: MemoryGuard, artifacts: ArtifactStore
) -> dg.Output[dict]:
    """Rows, genes, per-gene class counts, feature list and schema drift, from footers plus the gene
    and label columns only (features are never read here)."""
    with memory_guard.stage(context, "dataset_metadata") as monitor:
        metadata = scan_dataset(
            source_dataset["shards"],
            gene_column=source_dataset["gene_column"],
            label_column=source_dataset["label_column"],
            exclude_columns=source_dataset["exclude_columns"],
            gene_stats_path=artifacts.materialization_path(context, "gene_stats.parquet"),
            progress=context.log.info,
            checkpoint=monitor.check,
        )
        monitor.check()
    drift = {s.path: s.missing_features for s in metadata.shards if s.missing_features}
    if drift:
        context.log.warning(f"schema drift: features missing from some shards (read as NaN there): {drift}")
    return versioned_output(
        context,
        metadata.to_dict(),
        config=None,
        metadata={
            "rows": metadata.n_rows,
            "genes": metadata.n_genes,
            "features": metadata.n_features,
            "classes": dg.MetadataValue.json({str(c): n for c, n in zip(metadata.classes, metadata.class_counts)}),
            "excluded_columns": dg.MetadataValue.json(metadata.excluded_columns),
            "shards_with_missing_features": len(drift),
            "raw_float32_gb": metadata.raw_float32_bytes / 1024**3,
            "disk_gb": metadata.disk_bytes / 1024**3,
            **MemoryGuard.metadata(monitor),
        },
    )
