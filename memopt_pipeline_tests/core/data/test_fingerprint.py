"""The dataset fingerprint changes with the files' names, sizes and mtimes, and nothing else."""

import os
import shutil

import pytest

from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.core.data.fingerprint import dataset_fingerprint


@pytest.fixture
def dataset(tiny_dataset, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_dataset, folder)
    return folder


def test_unchanged_files_give_the_same_fingerprint_even_after_moving_the_folder(dataset, tmp_path):
    first = dataset_fingerprint(dataset)
    assert first == dataset_fingerprint(dataset)
    assert first.files == 3 and first.total_bytes > 0
    moved = tmp_path / "moved"
    # copytree keeps mtimes (copy2), so only the location differs.
    shutil.copytree(dataset, moved)
    assert dataset_fingerprint(moved) == first


def test_new_rewritten_or_removed_shards_change_the_fingerprint(dataset):
    shards = sorted(dataset.glob("*.parquet"))
    before = dataset_fingerprint(dataset)

    shutil.copy(shards[0], dataset / "extra.parquet")
    added = dataset_fingerprint(dataset)
    assert added.digest != before.digest and added.files == before.files + 1

    stat = shards[1].stat()
    os.utime(shards[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = dataset_fingerprint(dataset)
    assert touched.digest != added.digest

    (dataset / "extra.parquet").unlink()
    assert dataset_fingerprint(dataset).digest not in {before.digest, added.digest, touched.digest}


def test_sidecar_and_temporary_files_are_not_inputs(dataset):
    before = dataset_fingerprint(dataset)
    (dataset / "_SUCCESS").write_text("")
    (dataset / ".part-0.parquet.tmp").write_text("half written")
    assert dataset_fingerprint(dataset) == before


def test_csv_inputs_are_fingerprinted_too(tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "a.csv").write_text("gene_id,splice_type,x\ng1,donor,1\n")
    before = dataset_fingerprint(folder)
    assert before.files == 1
    (folder / "b.csv.gz").write_bytes(b"not read, only listed")
    assert dataset_fingerprint(folder).digest != before.digest


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        dataset_fingerprint(tmp_path / "missing")
