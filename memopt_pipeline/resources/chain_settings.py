"""ChainSettings: the settings of the runs a chain launches after its first run, as typed config.

full_training and retrain_from_current_plan run their first stage; the chain sensors
(automation/chaining.py) launch the train and evaluate runs. A run's config may only name the
ops of its own job, so the later stages' settings are the config of this resource in the
starting run: the Launchpad shows them with their defaults and descriptions, and Dagster
refuses a misspelt name or a wrong type when the run is launched, before anything runs. The
fields are the later assets' own Config classes, named after the assets: the starting run's
``resources.chain_settings.config.instance_model`` becomes ``ops.instance_model.config`` of
every train run (automation/run_config.py, chained_run_config).

A resource shows in a job's Launchpad only when an op of the job requires it: here the last
prepare stage, instance_assignment, and retrain_from_current_plan's check_current_plan. In a
chain run they log the settings and refuse, before any training run starts, those that cannot
work on the instances (:meth:`ChainSettings.check_chain_start`); outside a chain
(prepare_instances) the settings are ignored.

Not exported by memopt_pipeline.resources: this module is built from the assets' Config
classes, and the asset modules import that package.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import dagster as dg
from pydantic import Field

from memopt_pipeline.assets.evaluation import EvaluationConfig, ShapConfig
from memopt_pipeline.assets.splits import FoldConfig
from memopt_pipeline.assets.training import EnsembleConfig, TrainingConfig
from memopt_pipeline.core.data.folds import fold_groups
from memopt_pipeline.core.train.instance import BoostingParams

CHAIN_SETTINGS_KEY = "chain_settings"
# Tags of chained runs. CHAIN_TAG names the kind of chain (a tag of the two starting jobs);
# CHAIN_ID_TAG the run that started it (on that run itself and on every run the chain
# sensors launch). Defined here, beside the settings, because the check below tells a chain
# run by its tag and the asset modules cannot import automation/jobs.py (which imports them).
CHAIN_TAG = "memopt/chain"
CHAIN_ID_TAG = "memopt/chain_id"


class ChainSettings(dg.ConfigurableResource):
    """Settings of the train_instances and evaluate_and_explain runs a chain launches (folds,
    boosting, ensemble, evaluation, SHAP); each field is that asset's config."""

    cv_folds: FoldConfig = Field(
        default_factory=FoldConfig, description="Cross-validation folds of each instance (every train_instances run)."
    )
    instance_model: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="Each instance model: backend, objective, calibration, learning rate, rounds, threads "
        "(every train_instances run).",
    )
    ensemble_model: EnsembleConfig = Field(
        default_factory=EnsembleConfig, description="How the instance models are combined (evaluate_and_explain)."
    )
    holdout_evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Prediction chunks of the holdout evaluation (evaluate_and_explain)."
    )
    shap_summary: ShapConfig = Field(
        default_factory=ShapConfig, description="Rows explained with SHAP and their chunks (evaluate_and_explain)."
    )

    def problems(self, genes_per_instance: Sequence[int]) -> list[str]:
        """What in these settings cannot work on instances of these sizes (genes each); [] when all can."""
        found = []
        folds = self.cv_folds
        needed = fold_groups(folds.n_folds, fast=folds.fast)
        smallest = min(genes_per_instance, default=0)
        if not folds.fast and folds.n_folds < 2:
            found.append(f"cv_folds.n_folds is {folds.n_folds}: cross-validation needs at least 2 folds")
        elif smallest < needed:
            mode = "fast mode's validation split" if folds.fast else f"{folds.n_folds} folds"
            found.append(
                f"cv_folds: {mode} needs at least {needed} genes per instance, but the smallest instance has "
                f"{smallest}; lower cv_folds.n_folds (fast: false) or use fewer, bigger instances"
            )
        # The same checks instance_model makes before loading any data, made before any run starts.
        shared = {f.name for f in dataclasses.fields(BoostingParams)} & set(TrainingConfig.model_fields)
        try:
            BoostingParams(**{name: getattr(self.instance_model, name) for name in shared})
        except ValueError as error:
            found.append(f"instance_model: {error}")
        return found

    def check_chain_start(
        self, context: dg.OpExecutionContext | dg.AssetExecutionContext, genes_per_instance: Sequence[int]
    ) -> None:
        """In a chain run: log the settings its later runs will use, and fail (no retry) when some
        cannot work on these instances, before any of those runs is launched. Elsewhere: nothing."""
        if CHAIN_TAG not in context.run.tags:
            return
        context.log.info(f"chain settings of the train and evaluate runs: {json.dumps(self.model_dump(), sort_keys=True)}")
        found = self.problems(genes_per_instance)
        if found:
            raise dg.Failure(
                description="the chain's settings cannot work on these instances, so no training run is launched: "
                + "; ".join(found)
                + f". Fix resources.{CHAIN_SETTINGS_KEY} in the run config and launch the chain again.",
                allow_retries=False,
            )
