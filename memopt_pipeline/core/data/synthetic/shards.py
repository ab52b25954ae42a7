"""Writing the generated dataset as gene-sorted Parquet shards, and reusing a complete earlier run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memopt_pipeline.core.data.synthetic.genes import gene_id_for, gene_rows
from memopt_pipeline.core.data.synthetic.spec import ID_COLUMNS, LABELS, SPEC_FILE, SyntheticSpec
from memopt_pipeline.core.storage import atomic_path, write_json

SHARD_NAME = "part-{:05d}.parquet"


def _schema(spec: SyntheticSpec) -> pa.Schema:
    id_types = (pa.string(), pa.string(), pa.string(), pa.string(), pa.int64(), pa.string())
    id_fields = [pa.field(name, arrow_type) for name, arrow_type in zip(ID_COLUMNS, id_types)]
    return pa.schema(id_fields + [pa.field(name, pa.float32()) for name in spec.feature_columns()])


def _shard_table(spec: SyntheticSpec, gene_indices: range) -> pa.Table:
    """All rows of the given genes, sorted by gene then position, as one Arrow table."""
    genes, positions, labels, features = [], [], [], []
    for gene_index in gene_indices:
        gene, gene_positions, gene_labels, gene_features = gene_rows(spec, gene_index)
        genes.append(gene)
        positions.append(gene.genomic_start + gene_positions)
        labels.append(gene_labels)
        features.append(gene_features)
    row_gene = pa.array(np.repeat(np.arange(len(genes)), [p.size for p in positions]))
    per_gene = {
        "gene_id": [g.gene_id for g in genes],
        "transcript_id": [f"{g.gene_id}.1" for g in genes],
        "chrom": [g.chrom for g in genes],
        "strand": [g.strand for g in genes],
    }
    columns = [pa.array(values, pa.string()).take(row_gene) for values in per_gene.values()]
    columns.append(pa.array(np.concatenate(positions), pa.int64()))
    columns.append(pa.array(LABELS, pa.string()).take(pa.array(np.concatenate(labels))))
    # Feature-major copy so each column is one contiguous float32 buffer (zero-copy to Arrow).
    by_feature = np.ascontiguousarray(np.concatenate(features).T)
    columns.extend(pa.array(column) for column in by_feature)
    return pa.Table.from_arrays(columns, schema=_schema(spec))


def _reusable(out_dir: Path, spec: SyntheticSpec) -> list[Path] | None:
    """Shard paths of a complete earlier run of the same spec and generator, else None."""
    spec_path = out_dir / SPEC_FILE
    if not spec_path.exists():
        return None
    try:
        stored = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if {k: v for k, v in stored.items() if k not in ("rows", "shards")} != spec.to_dict():
        return None
    shards = [out_dir / name for name in stored.get("shards", [])]
    return shards if shards and all(p.is_file() for p in shards) else None


def generate_dataset(
    out_dir: str | Path,
    spec: SyntheticSpec = SyntheticSpec(),
    *,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``out_dir/part-00000.parquet ...`` plus ``out_dir/_spec.json``; return the shard paths.

    Shards hold ``spec.genes_per_shard`` whole genes each, in gene order, rows sorted by
    gene then position. Each shard is written to a hidden temporary file and renamed into
    place; ``_spec.json`` (``spec.to_dict()`` plus ``rows`` and ``shards``) is written last,
    so an interrupted run is never mistaken for a complete one. If ``_spec.json`` matches
    this spec and every shard exists, the shards are reused as they are. Shard files of an
    earlier, different spec are removed so the folder only holds this dataset.
    ``progress(msg)`` is called once per shard written (or once when reusing).
    """
    out_dir = Path(out_dir)
    reused = _reusable(out_dir, spec)
    if reused is not None:
        if progress:
            progress(f"reusing {len(reused)} synthetic shards in {out_dir}")
        return reused

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC_FILE).unlink(missing_ok=True)
    n_shards = math.ceil(spec.n_genes / spec.genes_per_shard)
    shards, rows = [], 0
    for shard_index in range(n_shards):
        first = shard_index * spec.genes_per_shard
        genes = range(first, min(first + spec.genes_per_shard, spec.n_genes))
        table = _shard_table(spec, genes)
        path = out_dir / SHARD_NAME.format(shard_index)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, row_group_size=spec.row_group_rows, compression="zstd")
        rows += table.num_rows
        shards.append(path)
        del table  # only one shard's rows in memory at a time
        if progress:
            progress(
                f"synthetic shard {shard_index + 1}/{n_shards} written ({gene_id_for(spec, genes[0])}.."
                f"{gene_id_for(spec, genes[-1])}), {rows:,} rows so far"
            )
    current = {p.name for p in shards}
    for stale in out_dir.glob("part-*.parquet"):
        if stale.name not in current:
            stale.unlink()
    write_json(out_dir / SPEC_FILE, {**spec.to_dict(), "rows": rows, "shards": sorted(current)})
    return shards

