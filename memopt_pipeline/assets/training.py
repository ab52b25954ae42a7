"""Training stages: one model per instance (dynamic partition), then their ensemble."""


from typing import Literal

import dagster as dg
from pydantic import Field

from memopt_pipeline.assets.lineage import coverage_of, load_instance_card
from memopt_pipeline.assets.memory_heavy import MEMORY_POOL, MEMORY_RETRY_POLICY, current_ladder_level, guarded_reader
from memopt_pipeline.assets.partitions import instance_partitions
from memopt_pipeline.assets.versioning import versioned_output
from memopt_pipeline.core.data.dataset import DatasetMetadata
from memopt_pipeline.core.data.folds import largest_training_share
from memopt_pipeline.core.evaluate.ensemble import validation_weights
from memopt_pipeline.core.memory.ladder import settings_for
from memopt_pipeline.core.memory.planner import LightGBMLayout, MemoryPlan, external_memory_bin_sample_rows
from memopt_pipeline.core.memory.release import release_memory
from memopt_pipeline.core.report.run_report import markdown_table
from memopt_pipeline.core.storage import atomic_path, file_sha256, write_json
from memopt_pipeline.core.train.calibration import apply_calibration, expected_calibration_error, fit_calibration
from memopt_pipeline.core.train.callbacks import lightgbm_callback, xgboost_callback
from memopt_pipeline.core.train.dask_cluster import DEFAULT_WORKERS, dask_client, local_worker_memory
from memopt_pipeline.core.train.instance import BoostingParams
from memopt_pipeline.core.train.lightgbm_backend import train_instance
from memopt_pipeline.core.train.xgboost_backend import train_instance_xgboost
from memopt_pipeline.core.train.xgboost_dask import train_instance_xgboost_dask
from memopt_pipeline.core.train.xgboost_model import save_xgboost_model
from memopt_pipeline.core.units import GiB
from memopt_pipeline.resources import ArtifactStore, MemoryGuard

_DEFAULTS = BoostingParams()


class TrainingConfig(dg.Config):
    backend: Literal["lightgbm", "xgboost", "xgboost_dask"] = Field(
        default="lightgbm",
        description="Boosting library. XGBoost uses the GPU when one is detected. xgboost_dask: XGBoost on a "
        "Dask cluster (see dask_scheduler_address), for an instance bigger than one machine.",
    )
    dask_scheduler_address: str = Field(
        default="",
        description="xgboost_dask only: the Dask scheduler, e.g. tcp://scheduler:8786; its workers read the "
        "Parquet shards (shared storage) and need memopt_pipeline installed. Empty: a LocalCluster of "
        "dask_workers worker processes started for the step.",
    )
    dask_workers: int = Field(
        default=DEFAULT_WORKERS,
        description="xgboost_dask, empty dask_scheduler_address: the LocalCluster's worker processes, each with "
        "num_threads / dask_workers threads and a share of the plan's predicted training peak as its memory "
        "limit; a worker killed by its nanny at that limit fails the step as out of memory (retried lower).",
    )
    objective: Literal["softmax", "ovr"] = Field(
        default="softmax",
        description="softmax: one multiclass model; ovr: one-vs-rest, one binary model per class "
        "(LightGBM multiclassova, XGBoost binary:logistic on one-hot labels); probabilities renormalised.",
    )
    calibration: Literal["platt", "isotonic", "none"] = Field(
        default="platt",
        description="Per-class probability calibration fitted on the out-of-fold predictions of phase 1, "
        "stored in the model card and applied at prediction time. platt: logistic on the logit (2 numbers "
        "per class); isotonic: monotone steps (needs more rows); none: renormalise only.",
    )
    external_memory: bool = Field(
        default=False,
        description="XGBoost only: keep binned data on disk (ExtMemQuantileDMatrix). The memory ladder's "
        "last level switches to it automatically.",
    )
    learning_rate: float = Field(default=_DEFAULTS.learning_rate, description="Boosting learning rate.")
    max_rounds: int = Field(default=_DEFAULTS.max_rounds, description="Upper bound on boosting rounds in phase 1.")
    early_stopping_rounds: int = Field(
        default=_DEFAULTS.early_stopping_rounds, description="Phase 1 stops after this many rounds without improvement."
    )
    min_data_in_leaf: int = Field(default=_DEFAULTS.min_data_in_leaf, description="Minimum rows per leaf.")
    feature_fraction: float = Field(default=_DEFAULTS.feature_fraction, description="Share of features per tree.")
    lambda_l2: float = Field(default=_DEFAULTS.lambda_l2, description="L2 regularisation.")
    bagging_fraction: float = Field(default=1.0, description="Share of rows sampled per tree (1 = no bagging).")
    quantized_gradients: bool = Field(
        default=False,
        description="LightGBM only: quantized (low-precision) gradients, faster and lighter, akin to mixed "
        "precision. Cannot be combined with bagging.",
    )
    num_threads: int = Field(default=0, description="Training threads (0 = the CPUs this process may use: its affinity, capped by a cgroup CPU quota).")
    seed: int = Field(default=0, description="Training seed.")


@dg.asset(
    code_version="1",
    group_name="training",
    partitions_def=instance_partitions,
    pool=MEMORY_POOL,
    retry_policy=MEMORY_RETRY_POLICY,
)
def instance_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    cv_folds: dict,
    dataset_metadata: dict,
    memory_plan: dict,
    feature_screening: dict,
    memory_guard: MemoryGuard,
    artifacts: ArtifactStore,
) -> dg.Output[dict]:
    """Phase 1: gene-aware k-fold early stopping finds the number of rounds; phase 2: refit on all of
    the instance's genes with that many rounds. Rows stream from the batch reader into LightGBM bins."""
    metadata = DatasetMetadata.from_dict(dataset_metadata)
    plan = MemoryPlan.from_dict(memory_plan)
    settings = settings_for(
        current_ladder_level(context), batch_rows=plan.batch_rows, max_bin=plan.max_bin, bin_sample_rows=plan.bin_sample_rows
    )
    if settings.level:
        context.log.warning(f"instance_model: retry at ladder level {settings.level}: {settings.description}")
    try:
        params = BoostingParams(
            learning_rate=config.learning_rate,
            num_leaves=plan.num_leaves,
            max_bin=settings.max_bin,
            histogram_pool_mb=settings.histogram_pool_mb,
            min_data_in_leaf=config.min_data_in_leaf,
            feature_fraction=config.feature_fraction,
            lambda_l2=config.lambda_l2,
            max_rounds=config.max_rounds,
            early_stopping_rounds=config.early_stopping_rounds,
            num_threads=config.num_threads,
            seed=config.seed,
            bagging_fraction=config.bagging_fraction,
            quantized_gradients=config.quantized_gradients,
            objective=config.objective,
        )
    except ValueError as error:  # a configuration error: retrying at a lower memory level cannot help
        raise dg.Failure(description=str(error), allow_retries=False) from error
    fold_of_gene = cv_folds["fold_of_gene"]
    # Fast mode validates on one 5% fold only; k-fold cv_folds validate on every fold.
    validation_folds = cv_folds.get("validation_folds")
    if config.backend == "xgboost_dask" and config.external_memory:
        raise dg.Failure(
            description="external_memory is for the local xgboost backend; xgboost_dask keeps binned data in the "
            "Dask workers' memory. Turn one of them off",
            allow_retries=False,
        )
    # xgboost_dask's binned data lives on the Dask workers, not in this step: the plan's and
    # the memory ladder's switch to local external memory does not apply to it.
    external_memory = config.backend != "xgboost_dask" and (
        settings.external_memory
        or plan.strategy == "external_memory"
        or (config.backend == "xgboost" and config.external_memory)
    )
    backend = "xgboost" if external_memory else config.backend
    # This materialization's own folder: the model an older ensemble recorded is never overwritten.
    partition_dir = artifacts.run_dir(context)
    layout: LightGBMLayout | None = None
    with memory_guard.stage(context, "instance_model", advice="use more instances or a smaller max_bin") as monitor:
        reader = guarded_reader(context, metadata, monitor, features=feature_screening["kept"])
        instance_rows = reader.count_rows(fold_of_gene)
        if backend == "xgboost":
            training = train_instance_xgboost(
                reader,
                fold_of_gene,
                params=params,
                batch_rows=settings.batch_rows,
                bin_sample_rows=(
                    external_memory_bin_sample_rows(
                        batch_rows=settings.batch_rows, bin_sample_rows=settings.bin_sample_rows, max_bin=params.max_bin
                    )
                    if external_memory
                    else settings.bin_sample_rows
                ),
                external_memory_dir=partition_dir / "extmem_cache" if external_memory else None,
                # Pages sized by the plan at level 0; after running out of memory, one batch each.
                page_rows=plan.external_memory_page_rows(instance_rows) if external_memory and settings.level == 0 else None,
                callbacks=[xgboost_callback(monitor)],
                log=context.log.info,
                release=release_memory,
                validation_folds=validation_folds,
            )
            model_path = partition_dir / "model.ubj"
            save_xgboost_model(training.booster, model_path)
        elif backend == "xgboost_dask":
            # A local cluster's workers share the plan's predicted training peak (core/train/dask_cluster.py).
            local = not config.dask_scheduler_address
            worker_memory = local_worker_memory(plan, instance_rows, config.dask_workers) if local else None
            with dask_client(
                config.dask_scheduler_address, threads=config.num_threads, n_workers=config.dask_workers,
                worker_memory_bytes=worker_memory, log=context.log.info,
            ) as session:  # fmt: skip
                training = train_instance_xgboost_dask(
                    reader,
                    fold_of_gene,
                    params=params,
                    session=session,
                    # One partition of the lazy frame holds about as many rows as the plan's batch.
                    partition_rows=settings.batch_rows,
                    batch_rows=settings.batch_rows,
                    log=context.log.info,
                    validation_folds=validation_folds,
                )
            model_path = partition_dir / "model.ubj"
            save_xgboost_model(training.booster, model_path)
        else:
            train_share = largest_training_share(fold_of_gene, reader.count_rows, validation_folds)
            layout = _lightgbm_layout(plan, instance_rows, settings.level, train_share)
            context.log.info(f"instance_model: {layout.describe()} (predicted peak {layout.predicted_peak / GiB:.2f} GiB)")
            training = train_instance(
                reader,
                fold_of_gene,
                params=params,
                batch_rows=settings.batch_rows,
                bin_sample_rows=settings.bin_sample_rows,
                callbacks=[lightgbm_callback(monitor)],
                log=context.log.info,
                release=release_memory,
                validation_folds=validation_folds,
                cut_folds=layout.cut_folds,
                row_wise=layout.row_wise,
            )
            model_path = partition_dir / "model.txt"
            with atomic_path(model_path) as tmp:
                training.booster.save_model(str(tmp))
    # A model of the other format from an earlier attempt of this run (a retry at another ladder
    # level) would be ambiguous next to this one.
    for stale in (partition_dir / "model.txt", partition_dir / "model.ubj"):
        if stale != model_path and stale.exists():
            stale.unlink()
    fold_summary = training.fold_summary()
    calibration, calibration_report = _calibrate(context, training, config.calibration)
    card = {
        "partition": context.partition_key,
        "model_path": str(model_path),
        # The bytes this card describes: the ensemble checks them before it records the model.
        "model_sha256": file_sha256(model_path),
        "model_card_path": str(model_path.with_name("model_card.json")),
        "model_format": "xgboost-ubj" if model_path.suffix == ".ubj" else "lightgbm-text",
        "backend": backend,
        "external_memory": external_memory,
        "features": feature_screening["kept"],
        "screened_out": {k: feature_screening[k] for k in ("leaky", "constant", "duplicates")},
        "classes": metadata.classes,
        "params": params.to_dict(),
        "num_rounds": training.num_rounds,
        "train_genes": training.train_genes,
        "train_rows": training.train_rows,
        "genes": sorted(fold_of_gene),  # exactly which genes this model has seen
        "rows_read": reader.stats.rows_read,
        "ladder": settings.to_dict(),
        "lightgbm_layout": layout.describe() if layout else None,
        "objective": config.objective,
        "cv_mode": cv_folds.get("mode", "kfold"),
        "calibration": calibration,
        "calibration_report": calibration_report,
        **fold_summary,
    }
    write_json(card["model_card_path"], card)
    return versioned_output(
        context,
        card,
        config=config,
        metadata={
            "num_rounds": training.num_rounds,
            "cv_logloss_mean": fold_summary["cv_logloss_mean"],
            "cv_logloss_std": fold_summary["cv_logloss_std"],
            **{f"cv_pr_auc_{c}_mean": v["mean"] for c, v in fold_summary["cv_pr_auc"].items()},
            **{f"cv_pr_auc_{c}_std": v["std"] for c, v in fold_summary["cv_pr_auc"].items()},
            "objective": config.objective,
            "calibration": config.calibration,
            "oof_ece_before": calibration_report["ece_before"]["mean"],
            "oof_ece_after": calibration_report["ece_after"]["mean"],
            "fold_metrics": dg.MetadataValue.md(_fold_table(fold_summary)),
            "train_rows": training.train_rows,
            "train_genes": training.train_genes,
            "rows_read": reader.stats.rows_read,
            "backend": backend,
            "external_memory": external_memory,
            "ladder_level": settings.level,
            **({"lightgbm_layout": layout.describe()} if layout else {}),
            "ladder_settings": settings.description,
            "batch_rows": settings.batch_rows,
            "max_bin": settings.max_bin,
            "model_path": dg.MetadataValue.path(str(model_path)),
            **MemoryGuard.metadata(
                monitor,
                predicted_peak_bytes=_predicted_peak(plan, training.train_rows, layout, external_memory, settings.level),
            ),
        },
    )


def _predicted_peak(plan: MemoryPlan, rows: int, layout: LightGBMLayout | None, external_memory: bool, level: int) -> int:
    """The plan's prediction for what actually ran: LightGBM's layout, external memory with the
    pages it used, or in-memory XGBoost."""
    if layout is not None:
        return layout.predicted_peak
    if external_memory:
        return plan.external_memory_training_peak(rows, page_rows=None if level == 0 else plan.batch_rows)
    return plan.training_peak(rows)


def _lightgbm_layout(plan: MemoryPlan, rows: int, ladder_level: int, train_share: float) -> LightGBMLayout:
    """The plan's choice by headroom; after running out of memory, the layout that needs least."""
    if ladder_level > 0:
        return LightGBMLayout.conservative(plan.training_peak(rows, train_share=train_share))
    return plan.lightgbm_layout(rows, train_share=train_share)


def _calibrate(context: dg.AssetExecutionContext, training, method: str) -> tuple[dict, dict]:
    """Fit the per-class calibration on the out-of-fold predictions; ECE before and after.

    The "after" figure is measured on the rows the map was fitted on, so it is optimistic;
    holdout_evaluation reports both on genes no model has seen."""
    labels, proba = training.oof_labels, training.oof_proba
    if labels is None:
        raise dg.Failure(
            "this backend produced no out-of-fold predictions to calibrate on; set calibration to 'none'",
            allow_retries=False,
        )
    calibration = fit_calibration(labels, proba, method=method)
    before = expected_calibration_error(labels, proba)
    after = expected_calibration_error(labels, apply_calibration(calibration, proba))
    context.log.info(
        f"calibration ({method}) on {len(labels):,} out-of-fold rows: mean ECE {before['mean']:.4f} -> {after['mean']:.4f}"
    )
    return calibration, {"rows": int(len(labels)), "ece_before": before, "ece_after": after}


def _fold_table(summary: dict) -> str:
    classes = list(summary["cv_pr_auc"])
    rows = [
        [f["fold"], f["best_iteration"], f"{f['valid_logloss']:.4f}"]
        + [f"{f['pr_auc'].get(c, float('nan')):.3f}" for c in classes]
        for f in summary["folds"]
    ]
    rows.append(
        ["mean ± std", f"{summary['best_iteration_mean']:.1f}", f"{summary['cv_logloss_mean']:.4f} ± {summary['cv_logloss_std']:.4f}"]
        + [f"{v['mean']:.3f} ± {v['std']:.3f}" for v in summary["cv_pr_auc"].values()]
    )
    return markdown_table(["fold", "best iteration", "valid logloss", *(f"PR-AUC {c}" for c in classes)], rows)


# What the ensemble's metadata shows of each member: the exact files it was built from.
RECORDED_FILES = ("model_path", "model_sha256", "model_card_path", "model_card_sha256")


class EnsembleConfig(dg.Config):
    weighting: Literal["equal", "validation"] = Field(
        default="equal",
        description="equal: every instance counts the same; validation: weights proportional to 1 / the "
        "instance's cross-validated logloss.",
    )


@dg.asset(code_version="1", group_name="training")
def ensemble_model(
    context: dg.AssetExecutionContext,
    config: EnsembleConfig,
    instance_model: dict,
    instance_assignment: dict,
    gene_split: dict,
) -> dg.Output[dict]:
    """All instance models' calibrated probabilities, averaged (equal or validation weights); checks,
    from the genes the loaded model cards list, that together they cover 100% of the training genes.
    Records each member's model file and model card by path and SHA-256."""
    expected = set(instance_assignment["instances"])
    present = set(instance_model)
    if expected - present:
        raise dg.Failure(
            f"instance_model is missing partitions {sorted(expected - present)}; materialize them before the ensemble"
        )
    keys = sorted(expected)
    loaded = {key: load_instance_card(key, instance_model[key]) for key in keys}
    cards = {key: card for key, (card, _, _) in loaded.items()}
    coverage = coverage_of(cards, instance_assignment, gene_split["train_genes"])
    if config.weighting == "validation":
        weights = validation_weights([cards[k]["cv_logloss_mean"] for k in keys])
    else:
        weights = [1.0 / len(keys)] * len(keys)
    members = []
    for key, weight in zip(keys, weights):
        card, model_ref, card_ref = loaded[key]
        members.append(
            {
                "partition": key,
                "model_path": model_ref["path"],
                "model_sha256": model_ref["sha256"],
                "model_bytes": model_ref["bytes"],
                "model_card_path": card_ref["path"],
                "model_card_sha256": card_ref["sha256"],
                "weight": weight,
                "calibration": card.get("calibration"),
            }
        )
    return versioned_output(
        context,
        {"members": members, "coverage": coverage, "weighting": config.weighting},
        config=config,
        metadata={
            "instances": len(members),
            "gene_coverage": coverage,
            "weighting": config.weighting,
            "weights": dg.MetadataValue.json({m["partition"]: m["weight"] for m in members}),
            "per_instance_cv_logloss": dg.MetadataValue.json({k: cards[k]["cv_logloss_mean"] for k in keys}),
            "models": dg.MetadataValue.json({m["partition"]: {k: m[k] for k in RECORDED_FILES} for m in members}),
        },
    )
