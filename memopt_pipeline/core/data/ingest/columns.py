"""The input's columns: every file's header checked against the first, and the column types.

Column types are inferred once, from the first block of the first file with rows, and then
passed explicitly (``column_types`` for every column) to every later block and file, so all
batches share one schema; the gene column is always read as a string. A later file with
different columns is a :class:`DatasetError` (the same columns in another order are fine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.csv as pacsv

from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.core.data.ingest.csv_blocks import BlockStream, read_header


def check_headers(files: list[Path], gene_column: str, parse_options: pacsv.ParseOptions) -> dict[Path, list[str]]:
    """Each file's column names; every file needs the gene column, unique names and the first file's columns."""
    first = files[0]
    headers: dict[Path, list[str]] = {}
    for path in files:
        names = read_header(path, parse_options)
        if gene_column not in names:
            shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
            raise DatasetError(
                f"{path}: gene column {gene_column!r} not found; columns found: {shown}. "
                "Set the gene column name to one of them"
            )
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DatasetError(f"{path}: duplicate column names {duplicates}; give every column a unique name")
        if headers and set(names) != set(headers[first]):
            missing = sorted(set(headers[first]) - set(names))
            extra = sorted(set(names) - set(headers[first]))
            raise DatasetError(
                f"{path}: columns differ from {first}: missing {missing}, extra {extra}; "
                "all CSV files of one input need the same columns"
            )
        headers[path] = names
    return headers


def infer_types(
    files: list[Path],
    gene_column: str,
    *,
    block_bytes: int,
    parse_options: pacsv.ParseOptions,
    sample: Callable[[], int],
) -> tuple[dict[str, pa.DataType], float]:
    """Column types and Arrow bytes per row from the first block of the first file with rows.

    ``sample`` is called after each file's first block (the caller tracks peak RSS with it).
    """
    for path in files:
        with BlockStream(path, block_bytes=block_bytes, column_types={gene_column: pa.string()},
                         parse_options=parse_options) as stream:
            batch = next(iter(stream), None)
        sample()
        if batch is not None and batch.num_rows:
            types = {field.name: field.type for field in batch.schema}
            types[gene_column] = pa.string()
            return types, batch.nbytes / batch.num_rows
    which = f"{files[0]} has" if len(files) == 1 else f"all {len(files)} CSV files have"
    raise DatasetError(f"{which} a header but no data rows; write the rows or point at the right input")
