"""Holdout evaluation and chunked SHAP on genes no model has seen.

Both retry an out-of-memory failure one level down the evaluation ladder
(core/memory/ladder.py: smaller batches and chunks, then models loaded one at a time, then
fewer SHAP rows), and record the level and the settings used in their metadata.
"""


import dagster as dg
import pyarrow as pa
from pydantic import Field

from memopt_pipeline.assets.display import display_metadata
from memopt_pipeline.assets.lineage import loaded_models
from memopt_pipeline.assets.memory_heavy import MEMORY_POOL, MEMORY_RETRY_POLICY, current_ladder_level, guarded_reader
from memopt_pipeline.assets.versioning import versioned_output
from memopt_pipeline.core.data.dataset import DatasetMetadata
from memopt_pipeline.core.data.stratified_sample import sample_bytes
from memopt_pipeline.core.evaluate.ensemble import Ensemble
from memopt_pipeline.core.evaluate.holdout import evaluate_holdout
from memopt_pipeline.core.evaluate.shap_summary import (
    DEFAULT_RESERVOIR_ROWS,
    DEFAULT_ROW_TOP_K,
    chunked_shap,
    reservoir_bytes,
)
from memopt_pipeline.core.memory.ladder import EvaluationSettings, evaluation_settings_for
from memopt_pipeline.core.memory.planner import MemoryPlan
from memopt_pipeline.core.report.plots import (
    calibration_png,
    pr_curves_png,
    save_markdown_image,
    shap_beeswarm_png,
    shap_importance_png,
)
from memopt_pipeline.core.report.run_report import markdown_table
from memopt_pipeline.core.storage import write_parquet
from memopt_pipeline.resources import ArtifactStore, MemoryGuard

# Share of the budget the loaded instance models may take together; above it they are
# loaded one at a time (the rest of the budget is for the batches and the predictions).
MODELS_BUDGET_SHARE = 0.25


def _load_ensemble(ensemble_model: dict, plan: MemoryPlan, settings: EvaluationSettings) -> tuple[Ensemble, list[dict]]:
    """The ensemble, and the model files it loads (path + sha256, checked against the ensemble's record)."""
    # A limit of 0 makes every model too large to keep: the ladder's lower levels hold no model
    # between uses, whatever the models' size.
    limit = 0 if settings.models_one_at_a_time else int(plan.budget_bytes * MODELS_BUDGET_SHARE)
    members, models = loaded_models(ensemble_model)
    return Ensemble(members, max_resident_bytes=limit), models


def _ladder_settings(context: dg.AssetExecutionContext, *, batch_rows: int, shap_rows: int = 0) -> EvaluationSettings:
    settings = evaluation_settings_for(current_ladder_level(context), batch_rows=batch_rows, shap_rows=shap_rows)
    if settings.level:
        context.log.warning(
            f"{context.asset_key.to_user_string()}: retry at ladder level {settings.level}: {settings.description}"
        )
    return settings


def _ladder_metadata(settings: EvaluationSettings) -> dict:
    return {"ladder_level": settings.level, "ladder_settings": settings.description}


class EvaluationConfig(dg.Config):
    batch_rows: int = Field(default=0, description="Rows per prediction chunk (0 = the memory plan's batch rows).")


@dg.asset(code_version="1", group_name="evaluation", pool=MEMORY_POOL, retry_policy=MEMORY_RETRY_POLICY)
def holdout_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    ensemble_model: dict,
    gene_split: dict,
    dataset_metadata: dict,
    memory_plan: dict,
    memory_guard: MemoryGuard,
    artifacts: ArtifactStore,
) -> dg.Output[dict]:
    """Streamed, chunked predictions on the holdout genes; multi-logloss and per-class PR-AUC / ROC-AUC
    beside the class-prior baseline. Predictions are written to Parquet chunk by chunk."""
    metadata = DatasetMetadata.from_dict(dataset_metadata)
    plan = MemoryPlan.from_dict(memory_plan)
    settings = _ladder_settings(context, batch_rows=config.batch_rows or plan.batch_rows)
    with memory_guard.stage(context, "holdout_evaluation") as monitor:
        ensemble, models = _load_ensemble(ensemble_model, plan, settings)
        reader = guarded_reader(context, metadata, monitor, features=ensemble.feature_names)
        predictions_path = artifacts.materialization_path(context, "predictions.parquet")
        metrics = evaluate_holdout(
            ensemble,
            reader,
            gene_split["holdout_genes"],
            batch_rows=settings.batch_rows,
            predictions_path=predictions_path,
            checkpoint=monitor.check,
        )
    metrics["ladder"] = settings.to_dict()
    metrics["predictions_path"] = str(predictions_path)
    metrics["models"] = models
    metrics["rows_read"] = reader.stats.rows_read
    ece = dict(zip(metrics["per_class"], metrics["ece_after_calibration"]["per_class"]))
    # Class by class, each class's entries together (the UI lists metadata in this order).
    per_class = {}
    for name, values in metrics["per_class"].items():
        for metric in ("pr_auc", "roc_auc", "best_f1", "top_k_accuracy", "prevalence"):
            per_class[f"{name}_{metric}"] = float(values[metric])
        per_class[f"{name}_ece"] = float(ece[name])
    plot_dir = predictions_path.parent
    metrics["plots"] = {
        "pr_curves": str(plot_dir / "pr_curves.png"),
        "calibration": str(plot_dir / "calibration.png"),
        "memory_timeline": str(plot_dir / "memory_timeline.png"),
    }
    pr_markdown = save_markdown_image(
        pr_curves_png(metrics["curves"]["pr"], metrics["per_class"]), metrics["plots"]["pr_curves"], "PR curves (holdout)"
    )
    calibration_markdown = save_markdown_image(
        calibration_png(metrics["curves"]["reliability"], ece), metrics["plots"]["calibration"], "calibration (holdout)"
    )
    context.log.info(
        f"holdout: logloss {metrics['logloss']:.4f} (class prior {metrics['baseline_logloss']:.4f}); "
        + ", ".join(f"{k} {v:.3f}" for k, v in per_class.items() if k.endswith("pr_auc"))
    )
    return versioned_output(
        context,
        metrics,
        config=config,
        metadata={
            "logloss": metrics["logloss"],
            "baseline_logloss": metrics["baseline_logloss"],
            "accuracy": metrics["accuracy"],
            "uncalibrated_logloss": metrics["uncalibrated_logloss"],
            "ece_before_calibration": metrics["ece_before_calibration"]["mean"],
            "ece_after_calibration": metrics["ece_after_calibration"]["mean"],
            "per_gene_logloss_median": metrics["per_gene_logloss"]["median"],
            "per_gene_logloss_p90": metrics["per_gene_logloss"]["p90"],
            **per_class,
            "holdout_rows": metrics["rows"],
            "holdout_genes": metrics["genes"],
            "batch_rows": settings.batch_rows,
            **_ladder_metadata(settings),
            "models_loaded_one_at_a_time": metrics["models_loaded_one_at_a_time"],
            "confusion_matrix": dg.MetadataValue.md(_confusion_markdown(metrics["confusion_matrix"], metadata.classes)),
            "predictions_path": dg.MetadataValue.path(str(predictions_path)),
            "models": dg.MetadataValue.json(models),
            "pr_curves": dg.MetadataValue.md(pr_markdown),
            "calibration_curve": dg.MetadataValue.md(calibration_markdown),
            **MemoryGuard.metadata(
                monitor,
                predicted_peak_bytes=plan.holdout_peak(metrics["rows"], model_bytes=ensemble.resident_bytes),
                timeline_path=metrics["plots"]["memory_timeline"],
            ),
        },
    )


def _confusion_markdown(matrix: list[list[int]], classes: list) -> str:
    return markdown_table(["true \\ predicted", *map(str, classes)], ([c, *row] for c, row in zip(classes, matrix)))


@dg.asset_check(asset=holdout_evaluation, blocking=True, description="The model must beat the class prior.")
def holdout_beats_class_prior(holdout_evaluation: dict) -> dg.AssetCheckResult:
    logloss, baseline = holdout_evaluation["logloss"], holdout_evaluation["baseline_logloss"]
    return dg.AssetCheckResult(
        passed=bool(logloss < baseline),
        metadata=display_metadata(
            {"logloss": logloss, "baseline_logloss": baseline, "improvement": 1.0 - logloss / baseline}
        ),
        description=None if logloss < baseline else "holdout logloss is no better than predicting the class prior",
    )


# Features drawn in the beeswarm and kept in the saved reservoir: what a reader can take in
# at a glance; the full ranking is in mean_abs_shap.parquet.
BEESWARM_FEATURES = 10
RESERVOIR_TABLE_FEATURES = 20


class ShapConfig(dg.Config):
    sample_rows: int = Field(
        default=2_000,
        description="Holdout rows to explain: a seeded sample with equal rows per class (a class with fewer rows "
        "gives the rest to the others), spread over the holdout genes (the smallest per-gene cap that fills each class).",
    )
    chunk_rows: int = Field(
        default=2_000,
        description="Rows per contribution chunk (bounds memory: rows x classes x (features + 1) doubles). "
        "Shrunk automatically when the memory plan says it would not fit.",
    )
    reservoir_rows: int = Field(
        default=DEFAULT_RESERVOIR_ROWS,
        description="Rows kept (a uniform random sample of the explained rows) for the beeswarm plot.",
    )
    row_top_k: int = Field(
        default=DEFAULT_ROW_TOP_K, description="Per explained row and class, the features with the largest |SHAP| saved."
    )
    seed: int = Field(default=0, description="Seed of the explained rows' sample and of the beeswarm's row sample.")


@dg.asset(code_version="1", group_name="evaluation", pool=MEMORY_POOL, retry_policy=MEMORY_RETRY_POLICY)
def shap_summary(
    context: dg.AssetExecutionContext,
    config: ShapConfig,
    ensemble_model: dict,
    gene_split: dict,
    dataset_metadata: dict,
    memory_plan: dict,
    memory_guard: MemoryGuard,
    artifacts: ArtifactStore,
) -> dg.Output[dict]:
    """Mean |SHAP| per feature and class from the models' native contributions, computed chunk by chunk
    on a holdout sample stratified by class and spread over genes (raw margins before calibration,
    averaged over the instance models: not the output probabilities, see ``shap_explains``); a uniform
    sample of rows for a beeswarm; per row, its strongest features per class (Parquet, chunk by chunk)."""
    metadata = DatasetMetadata.from_dict(dataset_metadata)
    plan = MemoryPlan.from_dict(memory_plan)
    settings = _ladder_settings(context, batch_rows=config.chunk_rows, shap_rows=config.sample_rows)
    shap_rows_reduced = settings.shap_rows < config.sample_rows
    if shap_rows_reduced:
        context.log.warning(f"shap: explaining {settings.shap_rows:,} rows, not the configured {config.sample_rows:,}")
    # The reservoir is allocated once at its full size; it counts against the budget like a chunk,
    # and so does the stratified sample of rows being explained (held whole, drawn in one pass).
    kept = reservoir_bytes(min(config.reservoir_rows, settings.shap_rows), plan.n_features, plan.n_classes)
    kept += sample_bytes(settings.shap_rows, plan.n_features)
    # Contributions are rows x classes x (features + 1) doubles per chunk: shrink the chunk
    # (never the sample) until the plan says it fits, and say so.
    chunk_rows = settings.batch_rows
    while chunk_rows > 1 and plan.shap_peak(chunk_rows) + kept > plan.budget_bytes * plan.safety:
        chunk_rows //= 2
    if chunk_rows != settings.batch_rows:
        context.log.warning(f"shap: chunk_rows {settings.batch_rows} would not fit the budget; using {chunk_rows}")
    rows_path = artifacts.materialization_path(context, "rows.parquet")
    with memory_guard.stage(context, "shap_summary") as monitor:
        ensemble, models = _load_ensemble(ensemble_model, plan, settings)
        reader = guarded_reader(context, metadata, monitor, features=ensemble.feature_names)
        summary = chunked_shap(
            ensemble,
            reader,
            gene_split["holdout_genes"],
            sample_rows=settings.shap_rows,
            chunk_rows=chunk_rows,
            reservoir_rows=config.reservoir_rows,
            seed=config.seed,
            rows_path=rows_path,
            row_top_k=config.row_top_k,
            log=context.log.info,
        )
    table = pa.table(
        {"feature": summary.features}
        | {f"mean_abs_{c}": summary.mean_abs[i] for i, c in enumerate(summary.classes)}
    )
    importance_path = write_parquet(artifacts.materialization_path(context, "mean_abs_shap.parquet"), table)
    reservoir_path = write_parquet(
        artifacts.materialization_path(context, "reservoir.parquet"),
        summary.reservoir.table(summary.features, summary.classes, summary.top_feature_indices(RESERVOIR_TABLE_FEATURES)),
    )
    plot_dir = importance_path.parent
    plots = {
        "importance": str(plot_dir / "importance.png"),
        "beeswarm": str(plot_dir / "beeswarm.png"),
        "memory_timeline": str(plot_dir / "memory_timeline.png"),
    }
    importance_markdown = save_markdown_image(
        shap_importance_png(summary.features, summary.mean_abs, summary.classes, top=15),
        plots["importance"],
        "mean |SHAP| per feature and class",
    )
    values, contributions = summary.reservoir.sample()
    beeswarm_markdown = save_markdown_image(
        shap_beeswarm_png(
            summary.features, values, contributions, summary.classes, summary.top_feature_indices(BEESWARM_FEATURES)
        ),
        plots["beeswarm"],
        "SHAP beeswarm of the top features",
    )
    top = summary.top_features(15)
    value = {
        "rows": summary.rows,
        "chunks": summary.chunks,
        "chunk_rows": chunk_rows,
        "additivity_max_error": summary.additivity_max_error,
        "top_features": top,
        "importance_path": str(importance_path),
        "rows_path": str(summary.rows_path),
        "reservoir_path": str(reservoir_path),
        "reservoir_rows": summary.reservoir.size,
        "sample_genes": summary.genes,
        "sample_rows_per_class": summary.rows_per_class,
        "explained": summary.explained,
        "plots": plots,
        "ladder": settings.to_dict(),
        "models": models,
    }
    return versioned_output(
        context,
        value,
        config=config,
        metadata={
            "rows_explained": summary.rows,
            "chunks": summary.chunks,
            "chunk_rows": chunk_rows,
            "chunk_rows_shrunk_to_fit": chunk_rows != settings.batch_rows,
            **_ladder_metadata(settings),
            "shap_rows": settings.shap_rows,
            "shap_rows_configured": config.sample_rows,
            "shap_rows_reduced": shap_rows_reduced,
            "models_loaded_one_at_a_time": ensemble.one_at_a_time,
            "reservoir_rows": summary.reservoir.size,
            "additivity_max_error": summary.additivity_max_error,
            "additivity_checks": f"contributions + bias = the explained margin, on {summary.additivity_rows} sampled rows",
            "shap_explains": summary.explained["text"],
            "shap_members": dg.MetadataValue.json(summary.explained["members"]),
            "shap_mixed_objectives": summary.explained["mixed_objectives"],
            "sample_genes": summary.genes,
            "sample_holdout_genes": len(gene_split["holdout_genes"]),
            "sample_rows_per_class": dg.MetadataValue.json(summary.rows_per_class),
            **{f"sample_rows_{name}": n for name, n in summary.rows_per_class.items()},
            "top_features": dg.MetadataValue.md(
                markdown_table(["feature", "mean abs SHAP"], ((f, f"{v:.4f}") for f, v in top))
            ),
            "shap_importance": dg.MetadataValue.md(importance_markdown),
            "shap_beeswarm": dg.MetadataValue.md(beeswarm_markdown),
            "rows_path": dg.MetadataValue.path(str(summary.rows_path)),
            "models": dg.MetadataValue.json(models),
            **MemoryGuard.metadata(
                monitor, predicted_peak_bytes=plan.shap_peak(chunk_rows) + kept, timeline_path=plots["memory_timeline"]
            ),
        },
    )
