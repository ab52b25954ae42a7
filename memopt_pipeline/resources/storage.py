"""Where heavy artifacts (models, gene stats, predictions) live on disk."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

OUTPUT_DIR_ENV = "MEMOPT_OUTPUT_DIR"


def default_output_dir() -> str:
    """``$MEMOPT_OUTPUT_DIR`` when set, else ``data/output`` under the working directory."""
    return os.environ.get(OUTPUT_DIR_ENV, "data/output")


class ArtifactStore(dg.ConfigurableResource):
    """Folder for the files assets write: models in native formats, Parquet tables, plots."""

    base_dir: str = Field(default_factory=default_output_dir, description="Folder for artifacts (models, tables).")

    def path(self, *parts: str) -> Path:
        """An absolute path under ``base_dir`` (parents created)."""
        path = Path(self.base_dir, "artifacts", *parts).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
