"""IO manager for asset values: small JSON documents, written atomically.

Heavy data never passes through here: assets write models and tables with the
ArtifactStore and return JSON-able descriptions (paths, counts, metrics) of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from memopt_pipeline.core.storage import read_json, write_json
from memopt_pipeline.resources.storage import default_output_dir


class JsonIOManager(dg.ConfigurableIOManager):
    base_dir: str = Field(default_factory=default_output_dir, description="Folder for asset values (JSON).")

    def _path(self, asset_key: dg.AssetKey, partition: str | None) -> Path:
        folder = Path(self.base_dir, "assets", *asset_key.path)
        return folder / f"{partition}.json" if partition else folder.with_suffix(".json")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        partition = context.partition_key if context.has_asset_partitions else None
        path = self._path(context.asset_key, partition)
        write_json(path, obj)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path.resolve()))})

    def load_input(self, context: dg.InputContext) -> Any:
        asset_key = context.asset_key
        if not context.has_asset_partitions:
            return read_json(self._path(asset_key, None))
        if context.has_partition_key:
            # Partition k of a downstream asset reads partition k of its upstream.
            return read_json(self._path(asset_key, context.asset_partition_key))
        # An unpartitioned asset reading a partitioned one gets every partition, by key.
        return {key: read_json(self._path(asset_key, key)) for key in context.asset_partition_keys}
