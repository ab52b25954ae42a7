"""``out_dir/_ingest.json``: what an ingest read and wrote, so an unchanged input is not read again.

The manifest (source paths, sizes, mtimes, gene column, rows, genes, shard names) is written
last. A later call whose sources, sizes, mtimes and gene column match it, and whose shards all
exist, returns those shards without reading the CSV ("reusing"). Output files of an earlier,
different ingest are removed before new shards are written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from memopt_pipeline.core.storage import read_json, write_json

MANIFEST_NAME = "_ingest.json"
INGEST_VERSION = 1  # part of the reuse key: bump when the output of an unchanged input changes


def source_entries(files: Sequence[Path]) -> list[dict]:
    entries = []
    for path in files:
        stat = path.stat()
        entries.append({"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return entries


def reusable_manifest(out_dir: Path, sources: list[dict], gene_column: str) -> dict | None:
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if (
        manifest.get("version") != INGEST_VERSION
        or manifest.get("gene_column") != gene_column
        or manifest.get("sources") != sources
    ):
        return None
    shards = manifest.get("shards") or []
    if not shards or not all((out_dir / name).is_file() for name in shards):
        return None
    return manifest


def write_manifest(
    out_dir: Path,
    *,
    gene_column: str,
    sources: list[dict],
    rows: int,
    genes: int,
    rows_per_shard: int,
    shards: Sequence[Path],
    shard_rows: list[int],
    columns: dict[str, str],
) -> None:
    write_json(
        out_dir / MANIFEST_NAME,
        {
            "version": INGEST_VERSION,
            "gene_column": gene_column,
            "sources": sources,
            "rows": rows,
            "genes": genes,
            "rows_per_shard": rows_per_shard,
            "shards": [shard.name for shard in shards],
            "shard_rows": shard_rows,
            "columns": columns,
        },
    )


def remove_previous_output(out_dir: Path) -> None:
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in out_dir.glob("part-*.parquet"):
        stale.unlink()
    for stale in out_dir.glob(".part-*.parquet.*.tmp"):  # atomic_path leftovers of a killed run
        stale.unlink()
