"""run_report: one markdown file per run that can be read without the UI."""

from datetime import datetime, timezone

import dagster as dg

from memopt_pipeline.assets.versioning import versioned_output
from memopt_pipeline.core.report.run_report import StageMemory, build_report
from memopt_pipeline.resources import ArtifactStore

# Assets that run under MemoryGuard and so record peak_rss_gb in their materializations.
# source_dataset does only when it ingests CSV; a materialization without a peak is skipped.
GUARDED_ASSETS = ("source_dataset", "dataset_metadata", "feature_screening", "instance_model", "holdout_evaluation", "shap_summary")


def _stage_memory(instance: dg.DagsterInstance, asset: str, partition: str | None) -> StageMemory | None:
    """The memory record of the latest materialization of ``asset`` (one partition of it), if any."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    if not records:
        return None
    metadata = {k: v.value for k, v in records[0].asset_materialization.metadata.items()}
    if "peak_rss_gb" not in metadata:
        return None
    return StageMemory(
        stage=f"{asset} [{partition}]" if partition else asset,
        peak_rss_gb=float(metadata["peak_rss_gb"]),
        budget_gb=float(metadata["budget_gb"]),
        predicted_peak_gb=metadata.get("predicted_peak_gb"),
        seconds=metadata.get("stage_seconds"),
        run_id=records[0].run_id,
        timeline_markdown=metadata.get("memory_timeline"),
    )


@dg.asset(code_version="1", group_name="evaluation")
def run_report(
    context: dg.AssetExecutionContext,
    dataset_metadata: dict,
    memory_plan: dict,
    gene_split: dict,
    instance_model: dict,
    ensemble_model: dict,
    holdout_evaluation: dict,
    shap_summary: dict,
    artifacts: ArtifactStore,
) -> dg.Output[dict]:
    """One self-contained markdown report per run (plots embedded): data summary, memory plan vs the
    peak each stage measured, cross-validation folds, holdout metrics and SHAP."""
    stages = []
    for asset in GUARDED_ASSETS:
        # Peaks come from the stages' materializations (the metadata the UI shows), read here
        # rather than threaded through every asset's return value.
        partitions = sorted(instance_model) if asset == "instance_model" else [None]
        for partition in partitions:
            record = _stage_memory(context.instance, asset, partition)
            if record is not None:
                stages.append(record)
    report = build_report(
        run_id=context.run.run_id,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        dataset=dataset_metadata,
        plan=memory_plan,
        split=gene_split,
        stages=stages,
        instances=instance_model,
        ensemble=ensemble_model,
        holdout=holdout_evaluation,
        shap=shap_summary,
    )
    # The run id stays in the file name too: the report is often copied out of its folder.
    path = report.write(artifacts.materialization_path(context, f"report_{context.run.run_id}.md"))
    images = report.images()
    missing = [image.title for image in images if image.png is None]
    if missing:
        context.log.warning(f"run report: plots not available: {missing}")
    context.log.info(f"run report: {path}")
    value = {
        "report_path": str(path),
        "run_id": context.run.run_id,
        "sections": [heading for heading, _ in report.sections],
        "images": len(images) - len(missing),
        "images_missing": missing,
    }
    return versioned_output(
        context,
        value,
        config=None,
        metadata={
            "report_path": dg.MetadataValue.path(str(path)),
            "report_kb": path.stat().st_size / 1024,
            "images": len(images) - len(missing),
            "stages": len(stages),
            "max_stage_peak_gb": max((s.peak_rss_gb for s in stages), default=0.0),
            # The report's text; its many images are in the file (they would bloat the event log twice).
            "preview": dg.MetadataValue.md(report.markdown(embed_images=False)),
            # The three pictures that say most about a run, in one place in the UI (Dagster shows
            # markdown this long behind one "Show Markdown" dialog): memory per stage, PR, SHAP.
            "key_plots": dg.MetadataValue.md(_key_plots(images)),
        },
    )


KEY_PLOT_WORDS = ("peak RSS per stage", "PR curves", "mean |SHAP|")  # titles from core/report/run_report.py


def _key_plots(images) -> str:
    """The report's stage peaks, PR curves and SHAP importance images as one markdown entry."""
    chosen = [image for image in images if image.png is not None and any(w in image.title for w in KEY_PLOT_WORDS)]
    if not chosen:
        return "*no plots available*"
    return "\n\n".join(image.render(embed=True) for image in chosen)
