"""Pass-2 spill files: each gene range's rows, appended block by block until its shard is written.

Spill files are uncompressed Arrow IPC streams in ``out_dir/.ingest-spill-*``, not Parquet: a
``ParquetWriter`` keeps ~0.9 KB of footer metadata in memory per column chunk until it is
closed (measured: 1,000 row groups x 200 columns = 178 MB), i.e. per block x range x column,
which grows with the input. An IPC stream keeps nothing per written batch, and uncompressed it
writes 5x and reads 8x faster than with lz4 (each spill is read once, soon after).

The Parquet re-shard reads wide input a column group at a time (:mod:`.parquet_reshard`); its
:class:`ColumnGroupSpills` keeps a :class:`Spills` per group and joins them column-wise per range.

Disk: spill files take about the Arrow size of the data, on the disk of ``out_dir``, until
their shard is written. The spill folder is removed on success and on error; folders left by
a killed run are removed at the next start (:func:`remove_stale_spills`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

SPILL_PREFIX = ".ingest-spill-"


class Spills:
    """The spill files of one ingest: an Arrow IPC stream per range and schema generation.

    When the reader widens a column the open streams are closed and a new generation starts;
    :meth:`read` casts earlier generations to the final schema.
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


class ColumnGroupSpills:
    """Spill files per column group (:class:`Spills` each), read back joined column-wise."""

    def __init__(self, folder: Path, n_ranges: int, schemas: list[pa.Schema]):
        self.schemas = schemas
        self.groups: list[Spills] = []
        for index in range(len(schemas)):
            sub = folder / f"columns-{index:03d}"
            sub.mkdir()
            self.groups.append(Spills(sub, n_ranges))

    def read(self, index: int, schema: pa.Schema) -> pa.Table:
        columns: dict[str, pa.ChunkedArray] = {}
        for spills, group_schema in zip(self.groups, self.schemas):
            table = spills.read(index, group_schema)
            columns.update(zip(table.column_names, table.columns))
            del table
        return pa.Table.from_arrays([columns[field.name] for field in schema], schema=schema)

    def remove(self, index: int) -> None:
        for spills in self.groups:
            spills.remove(index)

    def close(self) -> None:
        for spills in self.groups:
            spills.close()


def remove_stale_spills(out_dir: Path) -> None:
    # Left behind only by a killed run (errors remove their own): nothing can still use them.
    for stale in out_dir.glob(f"{SPILL_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)

