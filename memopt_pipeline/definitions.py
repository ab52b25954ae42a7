"""The code location: every asset, check, job, schedule, sensor and resource of memopt_pipeline."""

import math

import dagster as dg

from memopt_pipeline.assets import ALL_ASSETS
from memopt_pipeline.assets.evaluation import holdout_beats_class_prior
from memopt_pipeline.automation.chaining import CHAIN_SENSORS
from memopt_pipeline.automation.dataset_sensor import dataset_change_sensor
from memopt_pipeline.automation.jobs import ALL_JOBS
from memopt_pipeline.automation.schedules import nightly_retrain_schedule
from memopt_pipeline.automation.sensors import oom_rematerialization_sensor
from memopt_pipeline.core.memory.limits import resolve_budget_bytes
from memopt_pipeline.core.units import GiB
from memopt_pipeline.resources import ArtifactStore, JsonIOManager, MemoryGuard
from memopt_pipeline.resources.chain_settings import CHAIN_SETTINGS_KEY, ChainSettings


def default_budget_gb() -> float | None:
    """The budget a MemoryGuard without budget_gb takes in this process (its default
    budget_fraction of the memory this process may use), in GiB rounded down to 0.01."""
    return math.floor(resolve_budget_bytes(None) / GiB * 100) / 100 or None


def build_resources(*, budget_gb: float | None = None, output_dir: str | None = None) -> dict:
    """Resources with optional overrides (the CLI's --budget-gb / --output).

    Without ``budget_gb`` the guard is built with :func:`default_budget_gb`, so the Launchpad
    shows the budget a run would get: Dagster pre-fills a resource's config from the values it
    was built with, and shows nothing for a None. Each process that loads the code location
    computes its own, so a run whose config leaves memory_guard out still gets the budget of the
    machine it runs on; a run that configures memory_guard at all gets the field defaults for
    what it leaves out (Dagster replaces the built values as a whole), so a budget_gb left out
    there is budget_fraction of the memory of the machine the step runs on.
    """
    storage = {"base_dir": output_dir} if output_dir else {}
    return {
        "memory_guard": MemoryGuard(budget_gb=budget_gb if budget_gb is not None else default_budget_gb()),
        "artifacts": ArtifactStore(**storage),
        "io_manager": JsonIOManager(**storage),
        CHAIN_SETTINGS_KEY: ChainSettings(),
    }


defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=[holdout_beats_class_prior],
    jobs=ALL_JOBS,
    schedules=[nightly_retrain_schedule],
    sensors=[oom_rematerialization_sensor, *CHAIN_SENSORS, dataset_change_sensor],
    resources=build_resources(),
)
