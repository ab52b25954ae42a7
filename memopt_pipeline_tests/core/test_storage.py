import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memopt_pipeline.core.storage import IncrementalParquetWriter, atomic_path, read_json, write_json


def test_write_json_is_deterministic_and_round_trips(tmp_path):
    path = tmp_path / "a" / "value.json"
    write_json(path, {"b": 1, "a": [1.5, float("nan")]})
    first = path.read_bytes()
    write_json(path, {"a": [1.5, float("nan")], "b": 1})
    assert path.read_bytes() == first
    assert read_json(path) == {"a": [1.5, None], "b": 1}


def test_failed_atomic_write_keeps_previous_file(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed")
    assert path.read_text() == "good"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_incremental_parquet_writer_appears_only_when_closed(tmp_path):
    path = tmp_path / "predictions.parquet"
    table = pa.table({"x": [1, 2, 3]})
    with IncrementalParquetWriter(path, table.schema) as writer:
        writer.write(table)
        assert not path.exists()
        writer.write(table)
    assert pq.read_table(path).num_rows == 6


def test_incremental_parquet_writer_abort_keeps_previous_file(tmp_path):
    path = tmp_path / "predictions.parquet"
    table = pa.table({"x": [1, 2, 3]})
    pq.write_table(table, path)
    with pytest.raises(ValueError):
        with IncrementalParquetWriter(path, table.schema) as writer:
            writer.write(pa.table({"x": [9]}))
            raise ValueError("out of memory half-way")
    assert pq.read_table(path)["x"].to_pylist() == [1, 2, 3]
    assert list(tmp_path.iterdir()) == [path]


def test_read_json_missing_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize"):
        read_json(tmp_path / "nope.json")


def test_file_sha256_streams_in_chunks_and_matches_hashlib(tmp_path):
    import hashlib

    from memopt_pipeline.core.storage import file_reference, file_sha256

    path = tmp_path / "model.txt"
    path.write_bytes(bytes(range(256)) * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path, chunk_bytes=1000) == file_sha256(path) == expected  # chunk size does not matter
    assert file_reference(path) == {"path": str(path.resolve()), "sha256": expected, "bytes": 256_000}
