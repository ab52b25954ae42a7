"""Retrain when the dataset changes: new, removed, replaced or rewritten shards.

The sensor watches the folder (or file) named by ``$MEMOPT_DATA_DIR`` - set it in the
environment of the code location and of the daemon - and fingerprints its input files by
name, size and modification time, never reading them (core/data/fingerprint.py). The cursor keeps
the fingerprint last trained on. A change launches full_training on that path, whose chain
re-materializes the dataset metadata and everything that depends on it. It is stopped by
default: start it in the UI (Automation) once the variable is set.

- The first tick only records the fingerprint: starting the sensor is not a change.
- A change must hold for two consecutive ticks before a run is launched, so a shard still
  being copied is not read half-written.
- Settings of the runs come from ``$MEMOPT_AUTOMATION_CONFIG`` (automation/run_config.py), with
  the source_dataset path set to the watched folder; the train and evaluate stages' ops become
  the run's chain settings.
- On Kubernetes the chain's train runs get their instance_model pods sized from the plan this
  run makes, by chain_train_instances (automation/chaining.py), not here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from memopt_pipeline.assets import PREPARE_ASSETS
from memopt_pipeline.automation.jobs import full_training_job
from memopt_pipeline.automation.run_config import ChainConfigError, chain_start_run_config, load_automation_config
from memopt_pipeline.core.data.fingerprint import dataset_fingerprint

DATA_DIR_ENV = "MEMOPT_DATA_DIR"
INTERVAL_ENV = "MEMOPT_DATASET_SENSOR_INTERVAL_SECONDS"
DEFAULT_INTERVAL_SECONDS = 60
FINGERPRINT_TAG = "memopt/dataset_fingerprint"


def sensor_interval_seconds() -> int:
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_SECONDS
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"{INTERVAL_ENV}={text!r}: expected a whole number of seconds >= 1 (default {DEFAULT_INTERVAL_SECONDS})")
    return seconds


def full_training_request(path: str, fingerprint: str, previous: str) -> dg.RunRequest:
    # Absolute, so the run reads the watched folder whatever its working directory.
    path = str(Path(path).resolve())
    config = load_automation_config()
    ops = dict(config.get("ops") or {})
    source = dict((ops.get("source_dataset") or {}).get("config") or {})
    if source.get("path") and source["path"] != path:
        raise ChainConfigError(
            f"{DATA_DIR_ENV}={path} but the automation config sets source_dataset path {source['path']}; "
            "remove the path from the automation config (the sensor sets it to the watched folder)"
        )
    ops["source_dataset"] = {"config": {**source, "path": path}}
    # No pod sizing here, on Kubernetes either: this run makes the memory plan and instance
    # assignment the pods are sized from (the dataset changed, so the current ones are stale),
    # and it has no instance_model step. chain_train_instances sizes the train runs of its chain
    # once it has succeeded (automation/chaining.py, deploy/k8s.py).
    return dg.RunRequest(
        # One run per transition: a dataset that changes back to an earlier state trains again.
        run_key=f"dataset:{previous[:16]}->{fingerprint[:16]}",
        run_config=chain_start_run_config({**config, "ops": ops}, PREPARE_ASSETS),
        tags={FINGERPRINT_TAG: fingerprint[:16]},
    )


@dg.sensor(
    name="dataset_change_sensor",
    job=full_training_job,
    minimum_interval_seconds=sensor_interval_seconds(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description=__doc__,
)
def dataset_change_sensor(context: dg.SensorEvaluationContext):
    path = os.environ.get(DATA_DIR_ENV, "").strip()
    if not path:
        return dg.SkipReason(
            f"{DATA_DIR_ENV} is not set: set it to the dataset folder to watch, in the environment of the code "
            "location and of the daemon"
        )
    current = dataset_fingerprint(path)  # a missing or empty folder raises DatasetError: the tick shows it
    state = json.loads(context.cursor) if context.cursor else None
    if state is None:
        context.update_cursor(json.dumps({"trained": current.digest, "pending": None}))
        return dg.SkipReason(f"watching {path} ({current.describe()}); a later change launches full_training")
    if current.digest == state["trained"]:
        if state["pending"]:  # a change that was undone before it settled
            context.update_cursor(json.dumps({"trained": state["trained"], "pending": None}))
        return dg.SkipReason(f"no change in {path} ({current.describe()})")
    if current.digest != state["pending"]:
        context.update_cursor(json.dumps({"trained": state["trained"], "pending": current.digest}))
        return dg.SkipReason(f"{path} changed ({current.describe()}); waiting one more tick for writes to settle")
    request = full_training_request(path, current.digest, state["trained"])
    context.update_cursor(json.dumps({"trained": current.digest, "pending": None}))
    context.log.info(f"{path} changed ({current.describe()}): launching full_training")
    return request
