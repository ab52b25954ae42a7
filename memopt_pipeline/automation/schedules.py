"""Nightly retrain: re-train every instance of the current plan and re-evaluate.

The schedule launches retrain_from_current_plan; the chain sensors (automation/chaining.py)
then launch one train_instances run per instance partition and evaluate_and_explain. It is
stopped by default: start it in the UI (Automation) once a full_training run has made a plan.
Cron from ``$MEMOPT_RETRAIN_CRON`` (default 02:00 every day, in UTC); settings of the runs from
the file named by ``$MEMOPT_AUTOMATION_CONFIG`` (automation/run_config.py): its resources, and
the train and evaluate stages' ops as the chain settings. On Kubernetes the chain's train runs
get their plan-sized instance_model pods from chain_train_instances (automation/chaining.py).
"""

from __future__ import annotations

import os

import dagster as dg

from memopt_pipeline.automation.jobs import retrain_from_current_plan_job
from memopt_pipeline.automation.run_config import chain_start_run_config, load_automation_config

RETRAIN_CRON_ENV = "MEMOPT_RETRAIN_CRON"
DEFAULT_RETRAIN_CRON = "0 2 * * *"


def retrain_cron() -> str:
    return os.environ.get(RETRAIN_CRON_ENV, "").strip() or DEFAULT_RETRAIN_CRON


def build_nightly_retrain_schedule(cron: str) -> dg.ScheduleDefinition:
    def nightly_retrain(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        # Read at every tick, so editing the file takes effect without reloading the code location.
        # No pod sizing here, on Kubernetes either: retrain_from_current_plan has no instance_model
        # step, and the train runs of its chain are sized by chain_train_instances once this run
        # has checked the plan (automation/chaining.py, deploy/k8s.py).
        return dg.RunRequest(run_config=chain_start_run_config(load_automation_config(), start_assets=[]))

    try:
        return dg.ScheduleDefinition(
            name="nightly_retrain",
            cron_schedule=cron,
            job=retrain_from_current_plan_job,
            execution_fn=nightly_retrain,
            default_status=dg.DefaultScheduleStatus.STOPPED,
            description=__doc__,
        )
    except dg.DagsterInvalidDefinitionError as error:
        raise ValueError(
            f"{RETRAIN_CRON_ENV}={cron!r} is not a valid cron expression (five fields, e.g. {DEFAULT_RETRAIN_CRON!r} "
            f"for 02:00 every day): {error}"
        ) from error


nightly_retrain_schedule = build_nightly_retrain_schedule(retrain_cron())
