"""CSV ingest: CSV input (a file, ``.csv.gz``, or a folder of them) into gene-sorted Parquet shards.

Covers: finding the CSV input (:mod:`.inputs`), reading it in bounded memory (:mod:`.line_chunks`,
:mod:`.csv_blocks`), checking its columns and their types (:mod:`.columns`), planning the
shards (:mod:`.shard_plan`), the spill files between the passes (:mod:`.spills`), writing the
shards (:mod:`.shard_writer`), reusing an unchanged ingest (:mod:`.manifest`), progress lines
and peak RSS (:mod:`.progress`), and the passes that tie them together in :func:`ingest_csv`
(:mod:`.run`).
"""

from memopt_pipeline.core.data.ingest.inputs import find_csv_inputs, is_csv_input
from memopt_pipeline.core.data.ingest.run import IngestResult, ingest_csv

__all__ = ["IngestResult", "find_csv_inputs", "ingest_csv", "is_csv_input"]
