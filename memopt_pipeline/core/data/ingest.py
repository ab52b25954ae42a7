"""Stream CSV input (a file, ``.csv.gz``, or a folder of them) into gene-sorted Parquet shards.

The input may be far bigger than memory, so nothing here ever holds a whole file: memory is
bounded by a few CSV blocks while reading and by one output shard while writing, and the
shard size follows from the memory budget.

Reading
-------
Every pass reads through :class:`_BlockStream`: a background thread cuts the (decompressed)
file into line-aligned pieces of about ``block_bytes``, parses each with
``pyarrow.csv.read_csv`` and puts the batch into a ``queue.Queue(maxsize=2)``, so parsing the
next block overlaps routing/writing the current one. An exception in that thread is handed
through the queue and re-raised in the caller (as :class:`DatasetError` naming the file);
leaving the ``with`` block, normally or on error, stops and joins the thread.

Why not ``pyarrow.csv.open_csv`` (the streaming reader): its own I/O thread reads up to 32
raw blocks ahead, with no option to change that (ARROW-12090), so for inputs of a few hundred
MB it buffers the whole raw file (measured: 4 MiB blocks over a 295 MB CSV cost 211 MB of RSS,
16 MiB blocks 351 MB). Throttling it needs a Python file object that Arrow's I/O thread calls
into, and that thread then needs the GIL after the reader is gone, which hung interpreter
exit in 1 run of 4. Cutting at line ends ourselves is what Arrow's chunker does when values
may not contain newlines (its default), parses the same rows, keeps every buffer Arrow-owned,
and bounds the reader at the queued blocks plus the one being parsed (measured: a pass over
the 295 MB file with 4 MiB blocks adds 50-60 MB of RSS, 22 MB of it live Arrow memory);
``read_csv`` with ``use_threads`` converts a block's columns in parallel (1.1 s instead of
1.75 s for the 295 MB file with 2 cores). ``block_bytes`` is capped at
``budget_bytes / 64``.

Column types are inferred once, from the first block of the first file with rows, and then
passed explicitly (``column_types`` for every column) to every later block and file, so all
batches share one schema; the gene column is always read as a string. A later file with
different columns is a :class:`DatasetError` (the same columns in another order are fine).
If a later block holds a value that does not fit its column's inferred type (a column of
integers in the first block holds ``0.5`` further down, or ``X`` in a chromosome column),
the reader parses that block again with the column widened (integer/boolean/null -> float64,
anything -> string) and goes on; the spill files written so far are cast to the wider type
when their shard is written. Nothing is re-read.

Passes
------
1. **Gene counts** (cheap): only the gene column is converted
   (``ConvertOptions(include_columns=[gene_column])``); rows are counted per gene, and empty
   or null gene values are rejected. The sorted gene list is then cut into contiguous ranges
   of about ``rows_per_shard`` rows; a gene is never split, so a range holding one huge gene
   may be bigger. ``rows_per_shard`` defaults to ``budget * 0.25 / bytes per row`` (bytes per
   row of the Arrow data, from the first block), clamped to [10,000, 2,000,000].
2. **Routing**: all columns are read; each block's rows are assigned to their range
   (``np.searchsorted`` of the block's distinct genes in the sorted range boundaries), the
   block is reordered by range once (``take``) and each range's slice is appended to that
   range's spill file in ``out_dir/.ingest-spill-*``. Memory stays at about one block.

   Spill files are uncompressed Arrow IPC streams, not Parquet: a ``ParquetWriter`` keeps
   ~0.9 KB of footer metadata in memory per column chunk until it is closed (measured: 1,000
   row groups x 200 columns = 178 MB), i.e. per block x range x column, which grows with the
   input. An IPC stream keeps nothing per written batch, and uncompressed it writes 5x and
   reads 8x faster than with lz4 (each spill is read once, soon after). To stay within the
   open-file limit at most ``_max_open_spills()`` spill files are open at once; with more
   ranges pass 2 runs in sweeps, each re-reading the input for a subset of ranges.
3. **Finalize**: range by range, the spill file is read (bounded by ``rows_per_shard``),
   sorted by gene then ``position`` (if that column exists) and written in 65,536-row slices
   to ``part-00000.parquet`` ... (zstd, one row group per slice, dictionary pages capped at
   128 KiB per column) through :func:`storage.atomic_path`; the spill file is deleted. Peak
   memory here is one shard plus one row group. Output files from an earlier, different
   ingest are removed first.

``_ingest.json`` (source paths, sizes, mtimes, gene column, rows, genes, shard names) is
written last. A later call whose sources, sizes, mtimes and gene column match it, and whose
shards all exist, returns those shards without reading the CSV ("reusing"). The spill folder
is removed on success and on error; folders left by a killed run are removed at the next start.

Disk: spill files take about the Arrow size of the data, on the disk of ``out_dir``, until
their shard is written. No Dagster import here.
"""

from __future__ import annotations

import math
import queue
import re
import resource
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.core.memory.measure import process_rss_bytes
from memopt_pipeline.core.storage import atomic_path, read_json, write_json
from memopt_pipeline.core.units import GiB, MiB

MANIFEST_NAME = "_ingest.json"
SHARD_NAME = "part-{:05d}.parquet"
SPILL_PREFIX = ".ingest-spill-"
INGEST_VERSION = 1  # part of the reuse key: bump when the output of an unchanged input changes

OUTPUT_ROW_GROUP_ROWS = 65_536
SHARD_BUDGET_FRACTION = 0.25  # share of the budget one shard may take as Arrow data
MIN_ROWS_PER_SHARD = 10_000
MAX_ROWS_PER_SHARD = 2_000_000
PROGRESS_INTERVAL_S = 5.0  # module-level so tests can lower it
MIN_BLOCK_BYTES = 1024
BLOCKS_PER_BUDGET = 64  # block_bytes <= budget / 64: the few blocks in flight stay far below it

_QUEUE_BLOCKS = 2  # parsed blocks waiting for the consumer
_PUT_POLL_S = 0.1
_MAX_LINE_BYTES = 256 * MiB
# Parquet keeps a dictionary per column until it passes this size; the default 1 MiB costs up
# to 1 MiB per column for high-cardinality floats (1,000 features: 1 GiB) while writing.
_DICTIONARY_PAGE_BYTES = 128 * 1024
_CSV_SUFFIXES = (".csv", ".csv.gz")
_CONVERSION_ERROR = re.compile(
    r"In CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to ([^:]+): invalid value '(.*)'", re.S
)


@dataclass
class IngestResult:
    shards: list[Path]
    rows: int
    genes: int
    input_bytes: int
    seconds: float
    peak_rss_bytes: int  # highest process_rss_bytes() sampled at each block and shard


# --- inputs ----------------------------------------------------------------------------------


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


# --- reading ---------------------------------------------------------------------------------


def _open_input(path: Path) -> pa.NativeFile:
    """The file's bytes, gunzipped for ``.gz`` (any case)."""
    compression = "gzip" if path.name.lower().endswith(".gz") else None
    return pa.input_stream(str(path), compression=compression)


def _native(data: bytes | memoryview) -> pa.Buffer:
    """An Arrow-owned copy of ``data``: Arrow threads may free it without taking the GIL."""
    sink = pa.BufferOutputStream()
    sink.write(data)
    return sink.getvalue()


def _bytes_view(buffer: pa.Buffer) -> np.ndarray:
    return np.frombuffer(buffer, dtype=np.uint8) if buffer.size else np.empty(0, np.uint8)


def _line_end(buffer: pa.Buffer, *, last: bool) -> int:
    r"""Offset just past the first (or last) ``\n``/``\r`` in ``buffer``; 0 if there is none."""
    view = _bytes_view(buffer)
    window = 64 * 1024
    if last:
        end = view.size
        while end > 0:
            start = max(0, end - window)
            hits = np.flatnonzero((view[start:end] == 10) | (view[start:end] == 13))
            if hits.size:
                return start + int(hits[-1]) + 1
            end, window = start, window * 4
        return 0
    start = 0
    while start < view.size:
        end = min(view.size, start + window)
        hits = np.flatnonzero((view[start:end] == 10) | (view[start:end] == 13))
        if hits.size:
            return start + int(hits[0]) + 1
        start, window = end, window * 4
    return 0


def _concat(head: pa.Buffer | None, tail: pa.Buffer) -> pa.Buffer:
    """``head + tail`` in one new Arrow buffer (no copy when ``head`` is empty)."""
    if head is None or head.size == 0:
        return tail
    joined = pa.allocate_buffer(head.size + tail.size)
    view = np.frombuffer(joined, dtype=np.uint8)
    view[: head.size] = _bytes_view(head)
    view[head.size :] = _bytes_view(tail)
    return joined


def _line_chunks(stream: pa.NativeFile, block_bytes: int, path: Path) -> Iterator[pa.Buffer]:
    r"""Consecutive pieces of ``stream`` of about ``block_bytes``, each ending at a line end.

    The first piece is the header line alone. Cutting at the last ``\n``/``\r`` of a block
    is what Arrow's own chunker does when values may not contain newlines (the default), so
    parsing the pieces one by one reads the same rows as parsing the file (a ``\r\n`` cut in
    two leaves an empty line, which the parser skips). A line longer than a block extends its
    piece, up to _MAX_LINE_BYTES. All data stay in Arrow buffers, which Arrow's threads can
    free without the GIL.
    """
    carry: pa.Buffer | None = None
    header_done = False
    while True:
        data = stream.read_buffer(block_bytes)
        if data.size == 0:
            if carry is not None and carry.size:
                yield carry
            return
        buffer = _concat(carry, data)
        del data
        if not header_done:
            end = _line_end(buffer, last=False)
            if end == 0:
                carry = buffer
                if carry.size > _MAX_LINE_BYTES:
                    raise DatasetError(
                        f"{path}: no line end in the first {_MAX_LINE_BYTES // MiB} MiB; is this a CSV file?"
                    )
                continue
            yield buffer.slice(0, end)
            header_done = True
            buffer = buffer.slice(end)
        cut = _line_end(buffer, last=True)
        if cut == 0:
            carry = buffer
            if carry.size > _MAX_LINE_BYTES:
                raise DatasetError(f"{path}: a line is longer than {_MAX_LINE_BYTES // MiB} MiB; is this a CSV file?")
            continue
        yield buffer.slice(0, cut)
        carry = buffer.slice(cut)
        del buffer


class _BlockStream:
    """Record batches of one CSV file, read and parsed by a background thread.

    Use as ``with _BlockStream(...) as stream: for batch in stream: ...``. The thread cuts the
    (decompressed) file into line-aligned pieces of about ``block_bytes``, parses each with
    ``pyarrow.csv.read_csv`` (column names from the header line) and puts the batch into a
    ``queue.Queue(maxsize=2)``, so the next block is parsed while the caller works on this
    one. Reader errors are raised from the iteration as :class:`DatasetError` naming the file;
    leaving the block stops the thread (after at most the block it is parsing) and joins it.

    ``column_types`` are passed to the parser; with ``widen=True`` a block holding a value
    that does not fit its column's type is parsed again with that column widened (see
    :func:`_widened_type`), and the batches from then on carry the wider type; ``log``
    receives a note about it, called from the iterating thread. ``schema`` is set once the
    stream is exhausted.
    """

    def __init__(
        self,
        path: Path,
        *,
        block_bytes: int,
        column_types: dict[str, pa.DataType] | None = None,
        include_columns: Sequence[str] | None = None,
        widen: bool = False,
        parse_options: pacsv.ParseOptions | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.path = path
        self.block_bytes = block_bytes
        self.rows_delivered = 0
        self.schema: pa.Schema | None = None
        self._column_types = dict(column_types or {})
        self._include_columns = list(include_columns or [])
        self._widen = widen
        self._parse_options = parse_options or pacsv.ParseOptions()
        self._log = log
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_BLOCKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=f"csv-prefetch[{path.name}]", daemon=True)

    def __enter__(self) -> "_BlockStream":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _parse(self, piece: pa.Buffer, names: list[str]) -> pa.Table:
        # One Arrow block per piece, so a piece gives one batch; use_threads converts the
        # columns in parallel.
        read_options = pacsv.ReadOptions(column_names=names, block_size=max(piece.size, 1) + 1, use_threads=True)
        convert_options = pacsv.ConvertOptions(column_types=self._column_types, include_columns=self._include_columns)
        return pacsv.read_csv(
            pa.BufferReader(piece), read_options=read_options, parse_options=self._parse_options,
            convert_options=convert_options,
        )

    def _parse_widening(self, piece: pa.Buffer, names: list[str], rows_before: int) -> pa.Table:
        for _ in range(2 * len(names) + 1):  # every retry widens one column, at most twice
            try:
                return self._parse(piece, names)
            except pa.ArrowInvalid as exc:
                match = _CONVERSION_ERROR.search(str(exc))
                if not (self._widen and match):
                    raise
                column = names[int(match.group(1))]
                value = match.group(4)
                old = self._column_types.get(column)
                new = _widened_type(old, value) if old is not None else None
                if new is None or new == old:
                    raise
                self._column_types[column] = new
                self._put(("note", (
                    f"ingest: column {column!r} of {self.path.name} holds {value!r} after data row {rows_before:,}, "
                    f"which is not {old}; reading it as {new} from here on (earlier rows are converted)"
                )))
        raise DatasetError(f"{self.path}: column types did not settle; check the CSV")

    def _produce(self) -> None:
        try:
            with _open_input(self.path) as stream:
                pieces = _line_chunks(stream, self.block_bytes, self.path)
                header = next(pieces, None)
                if header is None:
                    raise pa.ArrowInvalid("Empty CSV file")
                names = pacsv.read_csv(pa.BufferReader(header), parse_options=self._parse_options).column_names
                rows = 0
                schema = None
                for piece in pieces:
                    if self._stop.is_set():
                        return
                    table = self._parse_widening(piece, names, rows)
                    del piece
                    schema = table.schema
                    rows += table.num_rows
                    for batch in table.to_batches():
                        if batch.num_rows and not self._put(("batch", batch)):
                            return
                if schema is None:  # header only: the types the options give to no rows
                    schema = self._parse(_native(b"\n"), names).schema
                self._put(("end", schema))
        except BaseException as exc:  # handed to the consumer, re-raised there
            self._put(("error", exc))

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while True:
            kind, payload = self._queue.get()
            if kind == "batch":
                self.rows_delivered += payload.num_rows
                yield payload
            elif kind == "note":
                if self._log is not None:
                    self._log(payload)
            elif kind == "end":
                self.schema = payload
                return
            else:
                raise _translate_read_error(payload, self.path, self.rows_delivered, self.block_bytes) from payload


def _translate_read_error(exc: BaseException, path: Path, rows_before: int, block_bytes: int) -> BaseException:
    """A reader exception as a DatasetError naming the file, the place and the fix."""
    if isinstance(exc, DatasetError):
        return exc
    message = str(exc).strip()
    where = f"after data row {rows_before:,}" if rows_before else "in the first block"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return DatasetError(f"{path}: cannot open ({exc}); check the input path")
    if not isinstance(exc, (pa.ArrowException, OSError, EOFError)):
        return exc  # a bug, not bad input: keep its type
    if message == "Empty CSV file":
        return DatasetError(f"{path} is empty (no header line); remove the file or write its header and rows")
    match = _CONVERSION_ERROR.search(message)
    if match:
        return DatasetError(
            f"{path}: value {match.group(4)!r} {where} does not fit column #{match.group(1)} read as "
            f"{match.group(3)}; fix the value"
        )
    if "CSV parse error" in message:
        return DatasetError(
            f"{path}: malformed CSV line {where} (within the next {block_bytes:,} bytes): {message}; "
            "fix or remove that line (every line needs as many fields as the header)"
        )
    return DatasetError(f"{path}: cannot read CSV {where}: {message}; check that the file is a complete CSV")


def _read_header(path: Path, parse_options: pacsv.ParseOptions) -> list[str]:
    """Column names from the first line, parsed by Arrow's CSV parser; nothing else is read."""
    try:
        with _open_input(path) as stream:
            header = next(_line_chunks(stream, 64 * 1024, path), None)
    except DatasetError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{path}: cannot read ({exc}); check the file (a .gz must be a complete gzip file)") from exc
    if header is None or not header.to_pybytes().strip():
        raise DatasetError(f"{path} is empty (no header line); remove the file or write its header and rows")
    try:
        return pacsv.read_csv(pa.BufferReader(header), parse_options=parse_options).column_names
    except pa.ArrowException as exc:
        raise DatasetError(f"{path}: cannot parse the header line ({exc}); fix the first line") from exc


# --- progress and memory ---------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class _Tracker:
    """Samples RSS at every block (for the peak) and logs a line every PROGRESS_INTERVAL_S."""

    def __init__(self, budget_bytes: int, progress: Callable[[str], None] | None):
        self.budget_bytes = budget_bytes
        self.progress = progress
        self.peak_rss = process_rss_bytes()
        self._label = ""
        self._total: int | None = None
        self._done = 0
        self._started = self._last = time.monotonic()

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def sample(self) -> int:
        rss = process_rss_bytes()
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def rss_text(self, rss: int) -> str:
        return f"RSS {rss / GiB:.2f}/{self.budget_bytes / GiB:.2f} GiB"

    def phase(self, label: str, total: int | None = None) -> None:
        self._label, self._total, self._done = label, total, 0
        self._started = self._last = time.monotonic()

    def advance(self, rows: int) -> None:
        self._done += rows
        rss = self.sample()
        now = time.monotonic()
        if self.progress is None or now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        rate = self._done / max(now - self._started, 1e-9)
        if self._total:
            left = max(self._total - self._done, 0)
            eta = _format_duration(left / rate) if rate > 0 else "?"
            text = (
                f"{self._label}: {self._done:,}/{self._total:,} rows ({self._done / self._total:.0%}), "
                f"{rate:,.0f} rows/s, ETA {eta}"
            )
        else:
            text = f"{self._label}: {self._done:,} rows, {rate:,.0f} rows/s"
        self.progress(f"{text}, {self.rss_text(rss)}")


# --- plan ------------------------------------------------------------------------------------


@dataclass
class _Range:
    first_gene: str
    last_gene: str
    genes: int
    rows: int


def _plan_ranges(counts: Counter, rows_per_shard: int) -> list[_Range]:
    """Cut the sorted genes into contiguous ranges of at most rows_per_shard rows (whole genes).

    Ranges aim at an even size (total / number of shards needed) rather than filling each to
    rows_per_shard and leaving a small remainder; only a gene bigger than rows_per_shard
    makes a range bigger than that.
    """
    total = sum(counts.values())
    target = total / max(1, math.ceil(total / rows_per_shard))
    ranges: list[_Range] = []
    current: _Range | None = None
    for gene in sorted(counts):  # code-point order == UTF-8 byte order == Arrow's string sort
        rows = counts[gene]
        if current is None or (
            current.rows and (current.rows + rows > rows_per_shard or current.rows + rows / 2 > target)
        ):
            current = _Range(first_gene=gene, last_gene=gene, genes=0, rows=0)
            ranges.append(current)
        current.last_gene = gene
        current.genes += 1
        current.rows += rows
    return ranges


def _default_rows_per_shard(budget_bytes: int, bytes_per_row: float) -> int:
    rows = int(budget_bytes * SHARD_BUDGET_FRACTION / max(bytes_per_row, 1.0))
    return min(max(rows, MIN_ROWS_PER_SHARD), MAX_ROWS_PER_SHARD)


def _max_open_spills() -> int:
    """Spill files open at once: a quarter of the open-file limit, between 8 and 512."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError):
        soft = 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 4096
    return max(8, min(512, soft // 4))


# --- type handling ---------------------------------------------------------------------------


def _widened_type(current: pa.DataType, value: str) -> pa.DataType:
    """The type a column needs to hold ``value`` as well as what its type already holds."""
    try:
        float(value)
        numeric = True
    except ValueError:
        numeric = False
    if numeric and (pa.types.is_integer(current) or pa.types.is_null(current) or pa.types.is_boolean(current)):
        return pa.float64()
    return pa.string()


# --- the ingest ------------------------------------------------------------------------------


def _source_entries(files: Sequence[Path]) -> list[dict]:
    entries = []
    for path in files:
        stat = path.stat()
        entries.append({"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return entries


def _reusable(out_dir: Path, sources: list[dict], gene_column: str) -> dict | None:
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


def _remove_stale_spills(out_dir: Path) -> None:
    # Left behind only by a killed run (errors remove their own): nothing can still use them.
    for stale in out_dir.glob(f"{SPILL_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _remove_previous_output(out_dir: Path) -> None:
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in out_dir.glob("part-*.parquet"):
        stale.unlink()
    for stale in out_dir.glob(".part-*.parquet.*.tmp"):  # atomic_path leftovers of a killed run
        stale.unlink()


class _Ingest:
    """State of one ingest_csv call; see the module docstring for the passes."""

    def __init__(self, files, out_dir, spill_dir, gene_column, budget_bytes, block_bytes, tracker):
        self.files: list[Path] = files
        self.out_dir: Path = out_dir
        self.spill_dir: Path = spill_dir
        self.gene_column: str = gene_column
        self.budget_bytes: int = budget_bytes
        self.block_bytes: int = block_bytes
        self.tracker: _Tracker = tracker
        self.parse_options = pacsv.ParseOptions()
        self.names: list[str] = []
        self.headers: dict[Path, list[str]] = {}
        self.types: dict[str, pa.DataType] = {}
        self.bytes_per_row = 0.0
        self.file_rows: dict[Path, int] = {}
        self.gene_counts: Counter = Counter()

    # -- headers and types

    def check_headers(self) -> None:
        first = self.files[0]
        for path in self.files:
            names = _read_header(path, self.parse_options)
            if self.gene_column not in names:
                shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
                raise DatasetError(
                    f"{path}: gene column {self.gene_column!r} not found; columns found: {shown}. "
                    "Set the gene column name to one of them"
                )
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise DatasetError(f"{path}: duplicate column names {duplicates}; give every column a unique name")
            if not self.names:
                self.names = names
            elif set(names) != set(self.names):
                missing = sorted(set(self.names) - set(names))
                extra = sorted(set(names) - set(self.names))
                raise DatasetError(
                    f"{path}: columns differ from {first}: missing {missing}, extra {extra}; "
                    "all CSV files of one input need the same columns"
                )
            self.headers[path] = names

    def infer_types(self) -> None:
        """Column types and Arrow bytes per row from the first block of the first file with rows."""
        for path in self.files:
            with _BlockStream(path, block_bytes=self.block_bytes, column_types={self.gene_column: pa.string()},
                              parse_options=self.parse_options) as stream:
                batch = next(iter(stream), None)
            self.tracker.sample()
            if batch is not None and batch.num_rows:
                self.types = {field.name: field.type for field in batch.schema}
                self.types[self.gene_column] = pa.string()
                self.bytes_per_row = batch.nbytes / batch.num_rows
                return
        which = f"{self.files[0]} has" if len(self.files) == 1 else f"all {len(self.files)} CSV files have"
        raise DatasetError(f"{which} a header but no data rows; write the rows or point at the right input")

    # -- pass 1

    def count_genes(self) -> None:
        self.tracker.phase("ingest pass 1/2 (gene counts)")
        for path in self.files:
            rows = 0
            with _BlockStream(path, block_bytes=self.block_bytes, column_types={self.gene_column: pa.string()},
                              include_columns=[self.gene_column], parse_options=self.parse_options) as stream:
                for batch in stream:
                    genes = batch.column(0)
                    self._check_genes(genes, path, rows)
                    counted = pc.value_counts(genes)
                    self.gene_counts.update(
                        dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))
                    )
                    rows += batch.num_rows
                    self.tracker.advance(batch.num_rows)
            self.file_rows[path] = rows
            if rows == 0 and len(self.files) > 1:
                self.tracker.log(f"ingest: {path} has a header but no rows; skipping it")
        if not any(self.file_rows.values()):
            raise DatasetError(
                f"{self.files[0]} has a header but no data rows; write the rows or point at the right input"
            )

    def _check_genes(self, genes: pa.Array, path: Path, rows_before: int) -> None:
        blank = pc.or_kleene(pc.is_null(genes), pc.equal(pc.utf8_trim_whitespace(genes), ""))
        bad = int(pc.sum(pc.cast(pc.fill_null(blank, True), pa.int64())).as_py() or 0)
        if bad:
            first = rows_before + int(np.flatnonzero(pc.fill_null(blank, True).to_numpy(zero_copy_only=False))[0]) + 1
            raise DatasetError(
                f"{path}: {bad} row(s) in this block have an empty {self.gene_column!r} (first: data row {first:,}); "
                "every row needs a gene: fill in or drop those rows"
            )

    # -- pass 2

    def spill(self, ranges: list[_Range]) -> "_Spills":
        """Route every row to its range's spill files."""
        starts = np.array([r.first_gene for r in ranges])
        expected = np.array([r.rows for r in ranges], dtype=np.int64)
        spills = _Spills(self.spill_dir, len(ranges))
        max_open = _max_open_spills()
        sweeps = [(lo, min(lo + max_open, len(ranges))) for lo in range(0, len(ranges), max_open)]
        total = sum(self.file_rows.values())
        self.tracker.phase("ingest pass 2/2 (routing)", total * len(sweeps))
        if len(sweeps) > 1:
            self.tracker.log(
                f"ingest: {len(ranges)} ranges > {max_open} open files: pass 2 reads the input {len(sweeps)} times"
            )
        routed = np.zeros(len(ranges), dtype=np.int64)
        gene_index = self.names.index(self.gene_column)

        try:
            for lo, hi in sweeps:
                for path in self.files:
                    if not self.file_rows.get(path):
                        continue
                    reorder = self.headers[path] != self.names
                    schema = self.schema()
                    with _BlockStream(path, block_bytes=self.block_bytes, column_types=self.types, widen=True,
                                      parse_options=self.parse_options, log=self.tracker.log) as stream:
                        for batch in stream:
                            if reorder:
                                batch = batch.select(self.names)
                            if batch.schema != schema:  # the reader widened a column
                                self.types.update((field.name, field.type) for field in batch.schema)
                                schema = self.schema()
                                spills.new_generation()
                            self._route(batch, gene_index, starts, lo, hi, routed, spills, path)
                            self.tracker.advance(batch.num_rows)
                spills.close()
        finally:
            spills.close()

        if not np.array_equal(routed, expected):
            bad = int(np.flatnonzero(routed != expected)[0])
            raise DatasetError(
                f"the input changed while it was ingested: pass 1 counted {int(expected[bad]):,} rows for genes "
                f"{ranges[bad].first_gene}..{ranges[bad].last_gene}, pass 2 read {int(routed[bad]):,}; "
                "re-run once the CSV files are no longer being written"
            )
        return spills

    def schema(self) -> pa.Schema:
        return pa.schema([(name, self.types[name]) for name in self.names])

    def _route(self, batch, gene_index, starts, lo, hi, routed, spills, path) -> None:
        if batch.num_rows == 0:
            return
        encoded = pc.dictionary_encode(batch.column(gene_index))
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

    # -- finalize

    def finalize(self, ranges: list[_Range], spills: "_Spills") -> list[Path]:
        sort_keys = [(self.gene_column, "ascending")]
        if "position" in self.names:
            sort_keys.append(("position", "ascending"))
        schema = self.schema()
        shards = []
        for index, plan in enumerate(ranges):
            table = spills.read(index, schema)
            self.tracker.sample()
            order = pc.sort_indices(table, sort_keys=sort_keys)
            destination = self.out_dir / SHARD_NAME.format(index)
            with atomic_path(destination) as tmp:
                with pq.ParquetWriter(
                    tmp, schema, compression="zstd", dictionary_pagesize_limit=_DICTIONARY_PAGE_BYTES
                ) as writer:
                    for start in range(0, table.num_rows, OUTPUT_ROW_GROUP_ROWS):
                        part = table.take(order.slice(start, OUTPUT_ROW_GROUP_ROWS))
                        writer.write_table(part, row_group_size=OUTPUT_ROW_GROUP_ROWS)
                        self.tracker.sample()
                        del part
            rows = table.num_rows
            del table, order
            spills.remove(index)
            shards.append(destination)
            rss = self.tracker.sample()
            self.tracker.log(
                f"ingest: shard {index + 1}/{len(ranges)} {destination.name}: {rows:,} rows, "
                f"{plan.genes:,} genes ({plan.first_gene}..{plan.last_gene}), {self.tracker.rss_text(rss)}"
            )
        return shards


class _Spills:
    """Pass-2 spill files: an Arrow IPC stream per range and schema generation.

    Uncompressed IPC streams rather than Parquet: a ParquetWriter keeps ~0.9 KB of footer
    metadata per column chunk in memory until closed, i.e. per block x range x column; an IPC
    stream keeps nothing per batch. When the reader widens a column the open streams are
    closed and a new generation starts; :meth:`read` casts earlier generations to the final
    schema.
    """

    def __init__(self, folder: Path, n_ranges: int):
        self.folder = folder
        self.generation = 0
        self.files: list[list[Path]] = [[] for _ in range(n_ranges)]
        self._open: dict[int, tuple[pa.NativeFile, ipc.RecordBatchStreamWriter]] = {}

    def write(self, index: int, batch: pa.RecordBatch) -> None:
        entry = self._open.get(index)
        if entry is None:
            path = self.folder / f"range-{index:05d}-g{self.generation:03d}.arrows"
            sink = pa.OSFile(str(path), "wb")
            entry = self._open[index] = (sink, ipc.new_stream(sink, batch.schema))
            self.files[index].append(path)
        entry[1].write_batch(batch)

    def new_generation(self) -> None:
        self.close()
        self.generation += 1

    def close(self) -> None:
        while self._open:
            _, (sink, writer) = self._open.popitem()
            try:
                writer.close()
            finally:
                sink.close()

    def read(self, index: int, schema: pa.Schema) -> pa.Table:
        tables = []
        for path in self.files[index]:
            with pa.OSFile(str(path), "rb") as source:
                table = ipc.open_stream(source).read_all()
            tables.append(table if table.schema == schema else table.cast(schema))
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def remove(self, index: int) -> None:
        for path in self.files[index]:
            path.unlink(missing_ok=True)


def ingest_csv(
    path: str | Path,
    out_dir: str | Path,
    *,
    gene_column: str,
    budget_bytes: int,
    rows_per_shard: int | None = None,
    block_bytes: int = 16 * 2**20,
    progress: Callable[[str], None] | None = None,
) -> IngestResult:
    """Ingest a CSV file, ``.csv.gz`` or folder of them into gene-sorted ``out_dir/part-*.parquet``.

    ``budget_bytes`` bounds memory: it caps ``block_bytes`` (at budget / 64) and sets the
    default ``rows_per_shard``. A shard holds whole genes, sorted by gene then ``position``.
    ``out_dir`` belongs to the ingest: ``part-*.parquet`` files of a different earlier ingest
    are removed. An identical earlier ingest (same files, sizes, mtimes, gene column) is
    reused. Raises :class:`DatasetError` for input that cannot be used, naming file and fix.
    """
    started = time.monotonic()
    if not (budget_bytes > 0):
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
    if rows_per_shard is not None and not (rows_per_shard >= 1):
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard!r}")
    if not (block_bytes >= MIN_BLOCK_BYTES):
        raise ValueError(f"block_bytes must be >= {MIN_BLOCK_BYTES}, got {block_bytes!r}")
    budget_bytes, block_bytes = int(budget_bytes), int(block_bytes)

    files = find_csv_inputs(path)
    out_dir = Path(out_dir)
    tracker = _Tracker(budget_bytes, progress)
    sources = _source_entries(files)
    input_bytes = sum(entry["bytes"] for entry in sources)

    manifest = _reusable(out_dir, sources, gene_column) if out_dir.is_dir() else None
    if manifest is not None:
        tracker.log(f"ingest: reusing {len(manifest['shards'])} shards in {out_dir} (the CSV input is unchanged)")
        return IngestResult(
            shards=[out_dir / name for name in manifest["shards"]],
            rows=int(manifest["rows"]),
            genes=int(manifest["genes"]),
            input_bytes=input_bytes,
            seconds=time.monotonic() - started,
            peak_rss_bytes=tracker.sample(),
        )

    cap = max(MiB, budget_bytes // BLOCKS_PER_BUDGET)
    if block_bytes > cap:
        tracker.log(
            f"ingest: block_bytes {block_bytes / MiB:.1f} MiB > budget/{BLOCKS_PER_BUDGET}; using {cap / MiB:.1f} MiB"
        )
        block_bytes = cap
    tracker.log(
        f"ingest: {input_bytes / GiB:.2f} GiB in {len(files)} CSV file(s) from {path}; "
        f"budget {budget_bytes / GiB:.2f} GiB, blocks of {block_bytes / MiB:.1f} MiB"
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_spills(out_dir)
    spill_dir = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=out_dir))
    try:
        job = _Ingest(files, out_dir, spill_dir, gene_column, budget_bytes, block_bytes, tracker)
        job.check_headers()
        job.infer_types()
        job.count_genes()

        derived = rows_per_shard is None
        if derived:
            rows_per_shard = _default_rows_per_shard(budget_bytes, job.bytes_per_row)
        ranges = _plan_ranges(job.gene_counts, rows_per_shard)
        total_rows = sum(job.file_rows.values())
        biggest = max(r.rows for r in ranges)
        tracker.log(
            f"ingest plan: {input_bytes / GiB:.1f} GiB in {len(files)} file(s) -> {len(ranges)} shards of "
            f"~{rows_per_shard:,} rows ({total_rows:,} rows, {len(job.gene_counts):,} genes, "
            f"~{job.bytes_per_row:,.0f} B/row in Arrow"
            + (f", rows_per_shard from {SHARD_BUDGET_FRACTION:.0%} of the budget)" if derived else ")")
            + (f"; largest shard {biggest:,} rows (a gene is never split)" if biggest > rows_per_shard else "")
        )

        spills = job.spill(ranges)

        if _source_entries(files) != sources:
            raise DatasetError(f"{path}: the CSV input changed while it was ingested; re-run once it is complete")
        _remove_previous_output(out_dir)
        shards = job.finalize(ranges, spills)
        write_json(
            out_dir / MANIFEST_NAME,
            {
                "version": INGEST_VERSION,
                "gene_column": gene_column,
                "sources": sources,
                "rows": total_rows,
                "genes": len(job.gene_counts),
                "rows_per_shard": rows_per_shard,
                "shards": [shard.name for shard in shards],
                "shard_rows": [r.rows for r in ranges],
                "columns": {name: str(job.types[name]) for name in job.names},
            },
        )
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    seconds = time.monotonic() - started
    rate = total_rows / max(seconds, 1e-9)
    tracker.log(
        f"ingest: {total_rows:,} rows, {len(job.gene_counts):,} genes -> {len(shards)} shards in {out_dir} "
        f"({_format_duration(seconds)}, {rate:,.0f} rows/s, peak {tracker.peak_rss / GiB:.2f} GiB)"
    )
    return IngestResult(
        shards=shards,
        rows=total_rows,
        genes=len(job.gene_counts),
        input_bytes=input_bytes,
        seconds=seconds,
        peak_rss_bytes=tracker.peak_rss,
    )
