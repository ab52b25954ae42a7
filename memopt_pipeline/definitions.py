"""The code location: every asset, check, job, schedule, sensor and resource of memopt_pipeline."""

import dagster as dg

from memopt_pipeline.assets import ALL_ASSETS
from memopt_pipeline.assets.evaluation import holdout_beats_class_prior
from memopt_pipeline.automation.chaining import CHAIN_SENSORS
from memopt_pipeline.automation.dataset_sensor import dataset_change_sensor
from memopt_pipeline.automation.jobs import ALL_JOBS
from memopt_pipeline.automation.schedules import nightly_retrain_schedule
from memopt_pipeline.automation.sensors import oom_rematerialization_sensor
from memopt_pipeline.resources import ArtifactStore, JsonIOManager, MemoryGuard


def build_resources(*, budget_gb: float | None = None, output_dir: str | None = None) -> dict:
    """Resources with optional overrides (the CLI's --budget-gb / --output)."""
    storage = {"base_dir": output_dir} if output_dir else {}
    return {
        "memory_guard": MemoryGuard(budget_gb=budget_gb),
        "artifacts": ArtifactStore(**storage),
        "io_manager": JsonIOManager(**storage),
    }


defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=[holdout_beats_class_prior],
    jobs=ALL_JOBS,
    schedules=[nightly_retrain_schedule],
    sensors=[oom_rematerialization_sensor, *CHAIN_SENSORS, dataset_change_sensor],
    resources=build_resources(),
)
