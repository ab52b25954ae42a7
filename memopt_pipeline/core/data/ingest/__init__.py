"""Input into gene-sorted Parquet shards: CSV ingest, and re-sharding Parquet that streams badly.

Covers: finding the CSV input (:mod:`.inputs`), reading it in bounded memory (:mod:`.line_chunks`,
:mod:`.csv_blocks`), checking its columns and their types (:mod:`.columns`), planning the
shards (:mod:`.shard_plan`), the spill files between the passes (:mod:`.spills`), writing the
shards (:mod:`.shard_writer`), reusing an unchanged ingest (:mod:`.manifest`), progress lines
and peak RSS (:mod:`.progress`), the passes that tie them together in :func:`ingest_csv`
(:mod:`.run`), and what that shares with the Parquet re-shard (:mod:`.common`).

Parquet input is used as it is unless :func:`parquet_layout` (:mod:`.parquet_layout`, footers
only) finds a row group too big to stream or rows not grouped by gene; then
:func:`reshard_parquet` (:mod:`.parquet_reshard`) writes it once into the same kind of shards.
"""

from memopt_pipeline.core.data.ingest.common import IngestResult
from memopt_pipeline.core.data.ingest.inputs import find_csv_inputs, is_csv_input
from memopt_pipeline.core.data.ingest.parquet_layout import MAX_INPUT_ROW_GROUP_ROWS, ParquetLayout, parquet_layout
from memopt_pipeline.core.data.ingest.parquet_reshard import reshard_parquet
from memopt_pipeline.core.data.ingest.run import ingest_csv

__all__ = [
    "MAX_INPUT_ROW_GROUP_ROWS",
    "IngestResult",
    "ParquetLayout",
    "find_csv_inputs",
    "ingest_csv",
    "is_csv_input",
    "parquet_layout",
    "reshard_parquet",
]
