"""Cutting a (decompressed) CSV byte stream into line-aligned pieces held in Arrow-owned buffers.

:mod:`.csv_blocks` parses the pieces one by one; its docstring says why the reader cuts the
file itself rather than using Arrow's streaming reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.core.units import MiB

_MAX_LINE_BYTES = 256 * MiB


def native(data: bytes | memoryview) -> pa.Buffer:
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


def line_chunks(stream: pa.NativeFile, block_bytes: int, path: Path) -> Iterator[pa.Buffer]:
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

