"""Planning the output shards: gene ranges, rows per shard, and how many spill files may be open.

The sorted gene list is cut into contiguous ranges of about ``rows_per_shard`` rows; a gene is
never split, so a range holding one huge gene may be bigger. ``rows_per_shard`` defaults to
``budget * 0.25 / bytes per row`` (bytes per row of the Arrow data, from the first block),
clamped to [10,000, 2,000,000]. Pass 2 keeps at most :func:`max_open_spills` spill files open
at once, to stay within the open-file limit.
"""

from __future__ import annotations

import math
import resource
from collections import Counter
from dataclasses import dataclass

SHARD_BUDGET_FRACTION = 0.25  # share of the budget one shard may take as Arrow data
MIN_ROWS_PER_SHARD = 10_000
MAX_ROWS_PER_SHARD = 2_000_000


@dataclass
class GeneRange:
    """Contiguous genes in sorted order, whole: the rows of one output shard."""

    first_gene: str
    last_gene: str
    genes: int
    rows: int


def plan_ranges(counts: Counter, rows_per_shard: int) -> list[GeneRange]:
    """Cut the sorted genes into contiguous ranges of at most rows_per_shard rows (whole genes).

    Ranges aim at an even size (total / number of shards needed) rather than filling each to
    rows_per_shard and leaving a small remainder; only a gene bigger than rows_per_shard
    makes a range bigger than that.
    """
    total = sum(counts.values())
    target = total / max(1, math.ceil(total / rows_per_shard))
    ranges: list[GeneRange] = []
    current: GeneRange | None = None
    for gene in sorted(counts):  # code-point order == UTF-8 byte order == Arrow's string sort
        rows = counts[gene]
        if current is None or (
            current.rows and (current.rows + rows > rows_per_shard or current.rows + rows / 2 > target)
        ):
            current = GeneRange(first_gene=gene, last_gene=gene, genes=0, rows=0)
            ranges.append(current)
        current.last_gene = gene
        current.genes += 1
        current.rows += rows
    return ranges


def default_rows_per_shard(budget_bytes: int, bytes_per_row: float) -> int:
    rows = int(budget_bytes * SHARD_BUDGET_FRACTION / max(bytes_per_row, 1.0))
    return min(max(rows, MIN_ROWS_PER_SHARD), MAX_ROWS_PER_SHARD)


def max_open_spills() -> int:
    """Spill files open at once: a quarter of the open-file limit, between 8 and 512."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError):
        soft = 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 4096
    return max(8, min(512, soft // 4))

