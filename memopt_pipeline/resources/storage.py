"""Where heavy artifacts (models, gene stats, predictions) live on disk.

Every materialization writes under a folder of its own,
``<output>/artifacts/<asset>/[<partition>/]<run_id>/``, and never into another one: a model an
older ensemble recorded stays the bytes it recorded, and a run killed half-way leaves only an
unreferenced folder of its own (``resources/checkpoints.py`` prunes those). Retries of a step
within one run reuse the run's folder; the failed attempt recorded no materialization, so
nothing refers to what it left there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote

import dagster as dg
from pydantic import Field

OUTPUT_DIR_ENV = "MEMOPT_OUTPUT_DIR"

# Dagster run ids are UUIDs; a folder (or value file) named like one is a materialization's own,
# which is how checkpoints.prune_checkpoints tells them from anything else under the output.
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def default_output_dir() -> str:
    """``$MEMOPT_OUTPUT_DIR`` when set, else ``data/output`` under the working directory."""
    return os.environ.get(OUTPUT_DIR_ENV, "data/output")


def materialization_parts(asset_key: dg.AssetKey, partition: str | None, run_id: str) -> tuple[str, ...]:
    """``<asset>/[<partition>/]<run_id>`` as path components, shared by artifacts and asset values.

    A partition key is one folder even if it contains a slash (quoted), so the layout stays
    ``asset/partition/run`` for every key."""
    partition_part = (quote(partition, safe=""),) if partition else ()
    return (*asset_key.path, *partition_part, run_id)


def _partition_of(context: dg.AssetExecutionContext) -> str | None:
    return context.partition_key if context.has_partition_key else None


class ArtifactStore(dg.ConfigurableResource):
    """Folder for the files assets write: models in native formats, Parquet tables, plots."""

    base_dir: str = Field(default_factory=default_output_dir, description="Folder for artifacts (models, tables).")

    def root(self) -> Path:
        """The absolute ``artifacts`` folder (created)."""
        root = Path(self.base_dir, "artifacts").resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root

    def run_dir(self, context: dg.AssetExecutionContext) -> Path:
        """This materialization's own folder, ``artifacts/<asset>/[<partition>/]<run_id>`` (created)."""
        folder = self.root().joinpath(*materialization_parts(context.asset_key, _partition_of(context), context.run_id))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def materialization_path(self, context: dg.AssetExecutionContext, *parts: str) -> Path:
        """A path inside :meth:`run_dir` (parents created). Write to it atomically (core/storage.py)."""
        path = self.run_dir(context).joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def path(self, *parts: str) -> Path:
        """A fixed absolute path under ``artifacts`` (parents created), shared by every run.

        Only for data that is reused across runs and versions itself: the CSV ingest output,
        whose manifest says which input it holds and which is rewritten only when the input
        changed. Checkpoints use :meth:`materialization_path`."""
        path = self.root().joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
