"""IO manager for asset values: small JSON documents, one file per materialization, written atomically.

Heavy data never passes through here: assets write models and tables with the
ArtifactStore and return JSON-able descriptions (paths, counts, metrics) of them.

Each value goes to ``<output>/assets/<asset>/[<partition>/]<run_id>.json`` and its path is
recorded in the materialization's ``path`` metadata. Reading goes the other way: the latest
materialization of the upstream asset (partition) in Dagster's event log names the file. The
event log is the only record of which value is current, so a run that failed after writing
its file, or an older file, can never be read by mistake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from memopt_pipeline.core.storage import read_json, write_json
from memopt_pipeline.resources.checkpoints import latest_materialization, recorded_value_path
from memopt_pipeline.resources.storage import default_output_dir, materialization_parts


class JsonIOManager(dg.ConfigurableIOManager):
    base_dir: str = Field(default_factory=default_output_dir, description="Folder for asset values (JSON).")

    def value_path(self, asset_key: dg.AssetKey, partition: str | None, run_id: str) -> Path:
        """``assets/<asset>/[<partition>/]<run_id>.json`` under ``base_dir``."""
        *folders, run = materialization_parts(asset_key, partition, run_id)
        return Path(self.base_dir, "assets", *folders, f"{run}.json").resolve()

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        partition = context.partition_key if context.has_asset_partitions else None
        path = write_json(self.value_path(context.asset_key, partition, context.run_id), obj)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        asset_key = context.asset_key
        if not context.has_asset_partitions:
            return load_latest_value(context.instance, asset_key, None)
        if context.has_partition_key:
            # Partition k of a downstream asset reads partition k of its upstream.
            return load_latest_value(context.instance, asset_key, context.asset_partition_key)
        # An unpartitioned asset reading a partitioned one gets every partition, by key: each
        # partition's own latest materialization.
        return {key: load_latest_value(context.instance, asset_key, key) for key in context.asset_partition_keys}


def load_latest_value(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None) -> Any:
    """The value of the latest materialization of ``asset_key`` (``partition``); a Failure that
    says what to materialize when there is none to read. Also for ops that read an asset
    without depending on it (automation/jobs.py, check_current_plan)."""
    label = asset_key.to_user_string() + (f" [{partition}]" if partition else "")
    record = latest_materialization(instance, asset_key, partition)
    # Non-retryable: a missing input does not appear by running the same step again.
    if record is None:
        raise dg.Failure(
            description=f"{label} has no materialization in this Dagster instance; materialize {label} first",
            allow_retries=False,
        )
    path = recorded_value_path(record)
    if path is None:
        raise dg.Failure(
            description=f"the latest materialization of {label} (run {record.run_id}) records no value file "
            f"('path' metadata); materialize {label} again",
            allow_retries=False,
        )
    if not path.is_file():
        raise dg.Failure(
            description=f"the value file of the latest materialization of {label} (run {record.run_id}) is "
            f"missing: {path}; materialize {label} again",
            allow_retries=False,
        )
    return read_json(path)
