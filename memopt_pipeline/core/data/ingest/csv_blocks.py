"""Reading one CSV file as record batches: :class:`BlockStream`, its header and error messages.

:class:`BlockStream` parses line-aligned pieces of the file (:mod:`.line_chunks`) on a
background thread, with at most two parsed blocks queued ahead of the caller.

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
1.75 s for the 295 MB file with 2 cores).

Widening: a block holding a value that does not fit its column's given type (a column of
integers in the first block holds ``0.5`` further down, or ``X`` in a chromosome column) is
parsed again with the column widened (integer/boolean/null -> float64, anything -> string);
nothing is re-read.
"""

from __future__ import annotations

import queue
import re
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv

from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.core.data.ingest.inputs import open_input
from memopt_pipeline.core.data.ingest.line_chunks import line_chunks, native

_QUEUE_BLOCKS = 2  # parsed blocks waiting for the consumer
_PUT_POLL_S = 0.1
_CONVERSION_ERROR = re.compile(
    r"In CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to ([^:]+): invalid value '(.*)'", re.S
)


class BlockStream:
    """Record batches of one CSV file, read and parsed by a background thread.

    Use as ``with BlockStream(...) as stream: for batch in stream: ...``. The thread cuts the
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

    def __enter__(self) -> "BlockStream":
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
            with open_input(self.path) as stream:
                pieces = line_chunks(stream, self.block_bytes, self.path)
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
                    schema = self._parse(native(b"\n"), names).schema
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


def read_header(path: Path, parse_options: pacsv.ParseOptions) -> list[str]:
    """Column names from the first line, parsed by Arrow's CSV parser; nothing else is read."""
    try:
        with open_input(path) as stream:
            header = next(line_chunks(stream, 64 * 1024, path), None)
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

