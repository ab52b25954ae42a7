"""What the CSV ingest and the Parquet re-shard share around their input-specific passes.

Both turn an input into gene-sorted ``out_dir/part-*.parquet`` the same way: an identical
earlier run is reused by its manifest (:func:`reused_result`); pass 1 counts rows per gene
(rejecting empty genes, :func:`check_genes`) and the sorted genes are cut into one range per
shard (:func:`plan_shards`); pass 2 routes each batch's rows into their range's spill file
(:func:`route_batch`, checked by :func:`check_routed`) inside a spill folder that is removed
on success and on error (:func:`spill_folder`); and :func:`finish` replaces the earlier
output with the new shards and writes the manifest last. Only reading the input differs
(:mod:`.run` for CSV, :mod:`.parquet_reshard` for Parquet). ``label`` ("ingest", "reshard")
starts their log lines; ``what`` ("CSV", "Parquet") names the input in messages.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.core.data.ingest.manifest import (
    remove_previous_output,
    reusable_manifest,
    source_entries,
    write_manifest,
)
from memopt_pipeline.core.data.ingest.progress import IngestProgress, format_duration
from memopt_pipeline.core.data.ingest.shard_plan import (
    SHARD_BUDGET_FRACTION,
    GeneRange,
    default_rows_per_shard,
    plan_ranges,
)
from memopt_pipeline.core.data.ingest.shard_writer import write_shards
from memopt_pipeline.core.data.ingest.spills import SPILL_PREFIX, Spills, remove_stale_spills
from memopt_pipeline.core.units import GiB


@dataclass
class IngestResult:
    shards: list[Path]
    rows: int
    genes: int
    input_bytes: int
    seconds: float
    peak_rss_bytes: int  # highest process_rss_bytes() sampled at each block and shard


def reused_result(
    out_dir: Path, sources: list[dict], gene_column: str, tracker: IngestProgress, started: float, *,
    label: str, what: str,
) -> IngestResult | None:
    """The shards of an identical earlier run in ``out_dir`` (same sources, gene column), else None."""
    manifest = reusable_manifest(out_dir, sources, gene_column) if out_dir.is_dir() else None
    if manifest is None:
        return None
    tracker.log(f"{label}: reusing {len(manifest['shards'])} shards in {out_dir} (the {what} input is unchanged)")
    return IngestResult(
        shards=[out_dir / name for name in manifest["shards"]],
        rows=int(manifest["rows"]),
        genes=int(manifest["genes"]),
        input_bytes=sum(entry["bytes"] for entry in sources),
        seconds=time.monotonic() - started,
        peak_rss_bytes=tracker.sample(),
    )


def check_genes(genes: pa.Array, path: Path, rows_before: int, gene_column: str) -> None:
    """Every row needs a gene: null, empty or blank values are a :class:`DatasetError` naming the row."""
    blank = pc.or_kleene(pc.is_null(genes), pc.equal(pc.utf8_trim_whitespace(genes), ""))
    bad = int(pc.sum(pc.cast(pc.fill_null(blank, True), pa.int64())).as_py() or 0)
    if bad:
        first = rows_before + int(np.flatnonzero(pc.fill_null(blank, True).to_numpy(zero_copy_only=False))[0]) + 1
        raise DatasetError(
            f"{path}: {bad} row(s) in this block have an empty {gene_column!r} (first: data row {first:,}); "
            "every row needs a gene: fill in or drop those rows"
        )


def count_genes(genes: pa.Array, counts: Counter) -> None:
    counted = pc.value_counts(genes)
    counts.update(dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())))


def plan_shards(
    gene_counts: Counter, *, rows_per_shard: int | None, budget_bytes: int, bytes_per_row: float,
    input_bytes: int, n_files: int, tracker: IngestProgress, label: str,
) -> tuple[list[GeneRange], int]:
    """The gene ranges (one per shard) and the rows per shard they aim at, logged as the plan."""
    derived = rows_per_shard is None
    if derived:
        rows_per_shard = default_rows_per_shard(budget_bytes, bytes_per_row)
    ranges = plan_ranges(gene_counts, rows_per_shard)
    total_rows = sum(gene_counts.values())
    biggest = max(r.rows for r in ranges)
    tracker.log(
        f"{label} plan: {input_bytes / GiB:.1f} GiB in {n_files} file(s) -> {len(ranges)} shards of "
        f"~{rows_per_shard:,} rows ({total_rows:,} rows, {len(gene_counts):,} genes, "
        f"~{bytes_per_row:,.0f} B/row in Arrow"
        + (f", rows_per_shard from {SHARD_BUDGET_FRACTION:.0%} of the budget)" if derived else ")")
        + (f"; largest shard {biggest:,} rows (a gene is never split)" if biggest > rows_per_shard else "")
    )
    return ranges, rows_per_shard


@contextlib.contextmanager
def spill_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh ``out_dir/.ingest-spill-*`` folder (``out_dir`` created, stale ones removed), removed at exit."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_spills(out_dir)
    folder = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=out_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def route_batch(
    batch: pa.RecordBatch, genes: pa.Array, starts: np.ndarray, lo: int, hi: int, routed: np.ndarray,
    spills: Spills, path: Path,
) -> None:
    """Append the rows of ``batch`` whose range (by ``genes``, one per row) is in [lo, hi) to their spills.

    The batch is reordered by range once (a stable sort, so each range keeps the input's row
    order) and each range's slice is appended to its spill file; ``routed`` counts rows per range.
    """
    if batch.num_rows == 0:
        return
    encoded = pc.dictionary_encode(genes)
    distinct = np.array(encoded.dictionary.to_pylist())
    range_of_distinct = np.searchsorted(starts, distinct, side="right") - 1
    if (range_of_distinct < 0).any():
        raise DatasetError(
            f"{path}: gene {distinct[range_of_distinct < 0][0]!r} was not there in pass 1; "
            "the input changed while it was ingested, re-run once it is complete"
        )
    row_range = range_of_distinct[encoded.indices.to_numpy(zero_copy_only=False)]
    if lo > 0 or hi < len(starts):
        selected = np.flatnonzero((row_range >= lo) & (row_range < hi))
        order = selected[np.argsort(row_range[selected], kind="stable")]
    else:
        order = np.argsort(row_range, kind="stable")
    if order.size == 0:
        return
    per_range = np.bincount(row_range[order] - lo, minlength=hi - lo)
    by_range = batch.take(pa.array(order))
    offset = 0
    for local in np.flatnonzero(per_range):
        count = int(per_range[local])
        index = lo + int(local)
        spills.write(index, by_range.slice(offset, count))
        routed[index] += count
        offset += count


def check_routed(routed: np.ndarray, ranges: list[GeneRange], what: str) -> None:
    """Pass 2 must have routed exactly the rows pass 1 counted for every range."""
    expected = np.array([r.rows for r in ranges], dtype=np.int64)
    if not np.array_equal(routed, expected):
        bad = int(np.flatnonzero(routed != expected)[0])
        raise DatasetError(
            f"the input changed while it was ingested: pass 1 counted {int(expected[bad]):,} rows for genes "
            f"{ranges[bad].first_gene}..{ranges[bad].last_gene}, pass 2 read {int(routed[bad]):,}; "
            f"re-run once the {what} files are no longer being written"
        )


def finish(
    out_dir: Path, *, files: list[Path], sources: list[dict], input_path: str | Path, ranges: list[GeneRange],
    spills, schema: pa.Schema, gene_column: str, rows_per_shard: int, genes: int, tracker: IngestProgress,
    checkpoint: Callable[[], None], started: float, label: str, what: str,
) -> IngestResult:
    """Replace any earlier output in ``out_dir`` by the shards of ``spills``; write the manifest last.

    Nothing of an earlier output is removed before every row has been routed and the input is
    found unchanged; ``spills`` is a :class:`Spills` or anything with its ``read``/``remove``.
    """
    if source_entries(files) != sources:
        raise DatasetError(f"{input_path}: the {what} input changed while it was ingested; re-run once it is complete")
    remove_previous_output(out_dir)
    shards = write_shards(out_dir, ranges, spills, schema, gene_column, tracker, checkpoint=checkpoint, label=label)
    total_rows = sum(r.rows for r in ranges)
    write_manifest(
        out_dir,
        gene_column=gene_column,
        sources=sources,
        rows=total_rows,
        genes=genes,
        rows_per_shard=rows_per_shard,
        shards=shards,
        shard_rows=[r.rows for r in ranges],
        columns={field.name: str(field.type) for field in schema},
    )
    seconds = time.monotonic() - started
    rate = total_rows / max(seconds, 1e-9)
    tracker.log(
        f"{label}: {total_rows:,} rows, {genes:,} genes -> {len(shards)} shards in {out_dir} "
        f"({format_duration(seconds)}, {rate:,.0f} rows/s, peak {tracker.peak_rss / GiB:.2f} GiB)"
    )
    return IngestResult(
        shards=shards,
        rows=total_rows,
        genes=genes,
        input_bytes=sum(entry["bytes"] for entry in sources),
        seconds=seconds,
        peak_rss_bytes=tracker.peak_rss,
    )
