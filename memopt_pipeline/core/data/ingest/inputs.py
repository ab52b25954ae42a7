"""Which files are the CSV input (a ``.csv``/``.csv.gz`` file or a folder of them), and opening one."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from memopt_pipeline.core.data.dataset import DatasetError

_CSV_SUFFIXES = (".csv", ".csv.gz")


def _is_csv_name(path: Path) -> bool:
    return path.name.lower().endswith(_CSV_SUFFIXES) and not path.name.startswith(("_", "."))


def find_csv_inputs(path: str | Path) -> list[Path]:
    """A ``.csv``/``.csv.gz`` file, or every such file under a folder (recursively, sorted).

    Names starting with ``_`` or ``.`` are skipped, as in :func:`dataset.list_shards`.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"input path {path} does not exist; point it at a CSV file or a folder of CSV files")
    if path.is_file():
        if not path.name.lower().endswith(_CSV_SUFFIXES):
            raise DatasetError(f"{path} is not a .csv or .csv.gz file; convert it or point at a folder of CSV files")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_csv_name(p))
    if not files:
        raise DatasetError(f"no *.csv or *.csv.gz files under {path}; point the input at a CSV file or folder")
    return files


def is_csv_input(path: str | Path) -> bool:
    """True for a ``.csv``/``.csv.gz`` file, or a folder holding such files and no ``.parquet``."""
    path = Path(path)
    if path.is_file():
        return path.name.lower().endswith(_CSV_SUFFIXES)
    if not path.is_dir():
        return False
    has_csv = False
    for item in path.rglob("*"):
        if item.name.endswith(".parquet"):
            return False
        has_csv = has_csv or (item.is_file() and _is_csv_name(item))
    return has_csv


def open_input(path: Path) -> pa.NativeFile:
    """The file's bytes, gunzipped for ``.gz`` (any case)."""
    compression = "gzip" if path.name.lower().endswith(".gz") else None
    return pa.input_stream(str(path), compression=compression)
