"""Finalize: each range's spill files become one gene-sorted Parquet shard, ``part-00000.parquet`` ...

Range by range, the spill file is read (bounded by ``rows_per_shard``), sorted by gene then
``position`` (if that column exists) and written in 65,536-row slices (zstd, one row group per
slice, dictionary pages capped at 128 KiB per column) through :func:`storage.atomic_path`; the
spill file is then deleted. Peak memory here is one shard plus one row group. ``checkpoint``
runs once a shard is in memory (its largest moment) and after each row group written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memopt_pipeline.core.data.ingest.progress import IngestProgress
from memopt_pipeline.core.data.ingest.shard_plan import GeneRange
from memopt_pipeline.core.data.ingest.spills import Spills
from memopt_pipeline.core.storage import atomic_path

SHARD_NAME = "part-{:05d}.parquet"
OUTPUT_ROW_GROUP_ROWS = 65_536
# Parquet keeps a dictionary per column until it passes this size; the default 1 MiB costs up
# to 1 MiB per column for high-cardinality floats (1,000 features: 1 GiB) while writing.
_DICTIONARY_PAGE_BYTES = 128 * 1024


def write_shards(
    out_dir: Path,
    ranges: list[GeneRange],
    spills: Spills,
    schema: pa.Schema,
    gene_column: str,
    tracker: IngestProgress,
    *,
    checkpoint: Callable[[], None] | None = None,
    label: str = "ingest",
) -> list[Path]:
    """Write ``out_dir/part-NNNNN.parquet`` for every range, deleting its spill files; the shard paths.

    ``spills`` is a :class:`Spills` or anything with its ``read(index, schema)`` and ``remove(index)``;
    ``label`` starts the log lines."""
    sort_keys = [(gene_column, "ascending")]
    if "position" in schema.names:
        sort_keys.append(("position", "ascending"))
    shards = []
    for index, plan in enumerate(ranges):
        table = spills.read(index, schema)
        tracker.sample()
        order = pc.sort_indices(table, sort_keys=sort_keys)
        if checkpoint is not None:
            checkpoint()
        destination = out_dir / SHARD_NAME.format(index)
        with atomic_path(destination) as tmp:
            with pq.ParquetWriter(
                tmp, schema, compression="zstd", dictionary_pagesize_limit=_DICTIONARY_PAGE_BYTES
            ) as writer:
                for start in range(0, table.num_rows, OUTPUT_ROW_GROUP_ROWS):
                    part = table.take(order.slice(start, OUTPUT_ROW_GROUP_ROWS))
                    writer.write_table(part, row_group_size=OUTPUT_ROW_GROUP_ROWS)
                    tracker.sample()
                    del part
                    if checkpoint is not None:
                        checkpoint()
        rows = table.num_rows
        del table, order
        spills.remove(index)
        shards.append(destination)
        rss = tracker.sample()
        tracker.log(
            f"{label}: shard {index + 1}/{len(ranges)} {destination.name}: {rows:,} rows, "
            f"{plan.genes:,} genes ({plan.first_gene}..{plan.last_gene}), {tracker.rss_text(rss)}"
        )
    return shards
