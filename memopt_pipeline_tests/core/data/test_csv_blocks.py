"""BlockStream's prefetch thread: reader errors reach the caller, and the thread stops however the caller leaves."""

import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.core.data.ingest import ingest_csv
from memopt_pipeline.core.data.ingest.csv_blocks import BlockStream
from memopt_pipeline.core.units import GiB
from memopt_pipeline_tests.core.data.csv_files import HEADER, simple_rows, write_rows


def _csv_with_bad_line_in_block_two(path: Path, block_bytes: int) -> Path:
    rows = simple_rows(3000)
    path.write_text(HEADER + "\n" + "".join(r + "\n" for r in rows))
    assert path.stat().st_size > 3 * block_bytes
    bad_at = int(len(rows) * 1.5 * block_bytes / path.stat().st_size)  # inside the second block
    rows[bad_at] += ",EXTRA"
    return write_rows(path, HEADER, rows)


def test_reader_error_in_a_later_block_reaches_the_caller_and_stops_the_thread(tmp_path):
    block = 16 * 1024
    path = _csv_with_bad_line_in_block_two(tmp_path / "late_error.csv", block)
    threads_before = threading.active_count()
    with pytest.raises(DatasetError, match=r"late_error\.csv: malformed CSV line after data row") as raised:
        ingest_csv(path, tmp_path / "out", gene_column="gene", budget_bytes=GiB, block_bytes=block)
    assert "Expected 4 columns, got 5" in str(raised.value)
    assert isinstance(raised.value.__cause__, pa.ArrowInvalid)
    assert threading.active_count() == threads_before

    # Directly: the blocks before the bad one arrive, then the error.
    seen = 0
    with pytest.raises(DatasetError, match="malformed"):
        with BlockStream(path, block_bytes=block, column_types={"gene": pa.string()}) as stream:
            for batch in stream:
                seen += batch.num_rows
    assert 0 < seen < 3000
    assert threading.active_count() == threads_before


def test_consumer_leaving_early_or_failing_stops_the_thread(tmp_path):
    path = write_rows(tmp_path / "rows.csv", HEADER, simple_rows(5000))
    options = {"column_types": {"gene": pa.string()}}
    threads_before = threading.active_count()
    with BlockStream(path, block_bytes=4096, **options) as stream:
        for _ in stream:
            time.sleep(0.2)  # the producer fills the queue and blocks on it
            break
    assert threading.active_count() == threads_before

    with pytest.raises(RuntimeError, match="consumer failed"):
        with BlockStream(path, block_bytes=4096, **options) as stream:
            for _ in stream:
                raise RuntimeError("consumer failed")
    assert threading.active_count() == threads_before

    with BlockStream(path, block_bytes=4096, **options) as stream:
        assert sum(batch.num_rows for batch in stream) == 5000
        assert stream.schema.names == HEADER.split(",")

