"""Where tests find a materialization's value and files: through its record, never a fixed name.

Values live in ``<output>/assets/<asset>/[<partition>/]<run_id>.json`` and files in
``<output>/artifacts/<asset>/[<partition>/]<run_id>/`` (resources/storage.py); which run is
current is what Dagster's event log says.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from memopt_pipeline.core.storage import read_json
from memopt_pipeline.resources.checkpoints import latest_materialization, recorded_value_path


def _split(stage: str) -> tuple[str, str | None]:
    """``"asset [partition]"`` (the keys of materialize_pipeline's result) -> (asset, partition)."""
    asset, _, partition = stage.partition(" [")
    return asset, partition.removesuffix("]") or None


def stored_value(collected: dict, stage: str) -> dict:
    """The value a stage stored, from the ``path`` its materialization recorded."""
    return read_json(collected[stage]["path"])


def stage_run_dir(output: Path, collected: dict, stage: str) -> Path:
    """The artifacts folder of a stage's materialization in ``collected``: named by its run id,
    which is also the name of the value file it recorded."""
    asset, partition = _split(stage)
    run_id = Path(collected[stage]["path"]).stem
    return Path(output, "artifacts", asset, *([partition] if partition else []), run_id).resolve()


def latest_value(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> dict:
    """The value of the latest materialization of ``asset`` (``partition``) in ``instance``."""
    record = latest_materialization(instance, dg.AssetKey(asset), partition)
    assert record is not None, f"{asset} [{partition}] was never materialized"
    return read_json(recorded_value_path(record))


def latest_run_dir(instance: dg.DagsterInstance, output: Path, asset: str, partition: str | None = None) -> Path:
    record = latest_materialization(instance, dg.AssetKey(asset), partition)
    assert record is not None, f"{asset} [{partition}] was never materialized"
    return Path(output, "artifacts", asset, *([partition] if partition else []), record.run_id).resolve()
