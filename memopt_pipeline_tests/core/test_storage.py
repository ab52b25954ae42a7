import os
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memopt_pipeline.core.storage import IncrementalParquetWriter, atomic_path, read_json, write_json, write_parquet


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


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards (other tests assume the usual one)."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(
    ("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)], ids=["umask-022", "umask-077"]
)
def test_outputs_get_the_umask_mode_not_mkstemp_0600(tmp_path, umask, mask, file_mode, folder_mode):
    """A colleague (or a pod running as another user) must be able to read reports and models."""
    umask(mask)
    json_path = write_json(tmp_path / "new" / "model_card.json", {"a": 1})
    parquet_path = write_parquet(tmp_path / "table.parquet", pa.table({"x": [1]}))
    with IncrementalParquetWriter(tmp_path / "predictions.parquet", pa.schema([("x", pa.int64())])) as writer:
        writer.write(pa.table({"x": [1]}))
    with atomic_path(tmp_path / "model.txt") as tmp:
        tmp.write_text("trees")
    json_path.write_text("{}")  # replacing a file keeps the mode too
    write_json(json_path, {"a": 2})
    for path in (json_path, parquet_path, tmp_path / "predictions.parquet", tmp_path / "model.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE(json_path.parent.stat().st_mode) == folder_mode  # created by atomic_path


def test_generated_dataset_is_readable_by_others_under_umask_022(tmp_path, umask):
    from memopt_pipeline.core.data.synthetic import SyntheticSpec, generate_dataset

    umask(0o022)
    out = tmp_path / "demo"
    spec = SyntheticSpec(n_genes=3, kmer_sizes=(1,), windows=((-2, 0),), genes_per_shard=2, row_group_rows=1_000)
    shards = generate_dataset(out, spec)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert set(shards) <= set(written) and len(written) > len(shards)  # shards and the spec JSON
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {oct(0o644)}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_atomic_path_never_reuses_an_existing_temporary_name(tmp_path, monkeypatch):
    from memopt_pipeline.core import storage

    names = iter(["taken", "taken", "free"])
    monkeypatch.setattr(storage.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".model.txt.taken.tmp").write_text("someone else's")
    with atomic_path(tmp_path / "model.txt") as tmp:
        assert tmp.name == ".model.txt.free.tmp"
        tmp.write_text("mine")
    assert (tmp_path / ".model.txt.taken.tmp").read_text() == "someone else's"
    assert (tmp_path / "model.txt").read_text() == "mine"
