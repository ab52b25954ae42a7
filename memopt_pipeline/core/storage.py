"""Atomic, pickle-free persistence for pipeline artifacts.

Every write goes to a temporary file in the destination folder and is renamed into place,
so a crash (or an out-of-memory kill) half-way never leaves a truncated file where a
previous good checkpoint used to be.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

# Fresh random temporary names tried before giving up (48 random bits each: a clash is already rare).
_TEMP_NAME_TRIES = 100


def _new_file_beside(destination: Path) -> Path:
    """Create an empty, uniquely named file beside ``destination`` and return its path.

    Unlike ``tempfile.mkstemp`` (always 0600: private scratch), the file is created the way
    ``open()`` creates one: mode 0o666 less the umask (0o644 under the usual 022; default ACLs
    apply too), without reading or changing the process-wide umask. The renamed file is an
    output that colleagues and pods running as other users read.
    """
    for _ in range(_TEMP_NAME_TRIES):
        candidate = destination.parent / f".{destination.name}.{secrets.token_hex(6)}.tmp"
        try:
            # O_EXCL: never reuse (or follow a symlink at) an existing name, as mkstemp guarantees.
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(
        f"no free temporary name beside {destination} after {_TEMP_NAME_TRIES} tries; "
        f"remove stale .{destination.name}.*.tmp files there"
    )


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it into place on success.

    The temporary file lives in the same directory so ``os.replace`` is atomic. On error
    the temporary file is removed and ``destination`` is left untouched. The file ends up with
    the umask's mode (0o644 under umask 022), as a file written in place would; folders that
    are created get 0o777 less the umask (``mkdir``'s default).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Writers that reopen the path truncate it and keep its mode.
    tmp_path = _new_file_beside(destination)
    try:
        yield tmp_path
        os.replace(tmp_path, destination)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _json_default(value: Any) -> Any:
    # numpy scalars and paths show up in metadata dicts; convert rather than fail.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf; store them as null so every JSON reader can load the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as pretty, key-sorted JSON (deterministic bytes), atomically."""
    path = Path(path)
    text = json.dumps(_finite_or_none(payload), indent=1, sort_keys=True, default=_json_default)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; materialize the stage that writes it first")
    return json.loads(path.read_text())


# Read size of file_sha256: large enough for throughput, small enough that hashing a
# multi-GiB model never holds more than this in memory.
HASH_CHUNK_BYTES = 4 * 2**20


def file_sha256(path: str | Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """The SHA-256 hex digest of a file, read in chunks (models can be bigger than memory allows)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_reference(path: str | Path) -> dict:
    """``{"path", "sha256", "bytes"}`` of a file: how a materialization records a file it used,
    so a later reader can tell whether the bytes are still the ones it used."""
    path = Path(path).resolve()
    return {"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def write_parquet(path: str | Path, table: pa.Table) -> Path:
    """Write one Arrow table to Parquet atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


class IncrementalParquetWriter:
    """Append record batches to a Parquet file that only appears, whole, on ``close()``.

    Used for outputs produced chunk by chunk (holdout predictions), so memory is bounded
    by one chunk and a failure half-way leaves the previous file in place.
    """

    def __init__(self, path: str | Path, schema: pa.Schema):
        self.path = Path(path)
        self._context = atomic_path(self.path)
        self._tmp = self._context.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self.rows_written = 0

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows_written += table.num_rows

    def close(self) -> Path:
        self._writer.close()
        self._context.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop the partial file; the destination keeps its previous content."""
        self._writer.close()
        self._context.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> "IncrementalParquetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
