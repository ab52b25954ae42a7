import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.dataset import list_shards, scan_dataset
from memopt_pipeline.core.data.screening import screen_features


def _dataset(tmp_path, rows=3_000):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, rows)
    signal = label + rng.normal(0, 1.5, rows)  # informative, far from leaky
    table = pa.table(
        {
            "gene": [f"g{i // 30:04d}" for i in range(rows)],
            "label": label,
            "signal": signal,
            "noise": rng.normal(size=rows),
            "label_copy": label * 10.0 + rng.normal(0, 0.01, rows),  # the label in disguise
            "constant": np.full(rows, 7.0),
            "signal_twin": signal * 2.0 + 1.0,  # perfectly correlated with signal
            "mostly_missing": np.where(rng.random(rows) < 0.5, np.nan, rng.normal(size=rows)),
        }
    )
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / "a.parquet")
    meta = scan_dataset(list_shards(tmp_path / "d"), gene_column="gene", label_column="label", gene_stats_path=tmp_path / "s.parquet")
    return meta, sorted(set(table["gene"].to_pylist()))


def test_leaky_constant_and_duplicate_features_are_dropped_with_reasons(tmp_path):
    meta, genes = _dataset(tmp_path)
    result = screen_features(BatchReader(meta), genes, sample_rows=2_000)
    assert result.kept == ["signal", "noise", "mostly_missing"]
    assert list(result.leaky) == ["label_copy"] and result.leaky["label_copy"] >= 0.99
    assert result.constant == ["constant"]
    assert result.duplicates == {"signal_twin": "signal"}
    assert 1_900 <= result.sample_rows <= 2_000  # whole genes of 30 rows up to the bound


def test_keep_overrides_and_reader_feature_subset(tmp_path):
    meta, genes = _dataset(tmp_path)
    result = screen_features(BatchReader(meta), genes, sample_rows=1_000, keep=["label_copy"])
    assert "label_copy" in result.kept and not result.leaky
    reader = BatchReader(meta, features=result.kept)
    batch = next(reader.iter_batches(genes[:2], batch_rows=100))
    assert batch.features.shape[1] == len(result.kept)


def test_demo_data_has_no_leaky_feature(tiny_metadata):
    genes = tiny_metadata.read_gene_stats()["gene"].to_list()
    result = screen_features(BatchReader(tiny_metadata), genes, sample_rows=3_000)
    assert not result.leaky  # the base-model scores are informative but not leaky
    assert "donor_score" in result.kept and "acceptor_score" in result.kept


class _Stop(Exception):
    """What a test's checkpoint raises, as the memory guard's check raises MemoryBudgetExceeded."""


def test_checkpoint_runs_per_class_of_the_auc_and_after_the_correlations(tmp_path):
    meta, genes = _dataset(tmp_path)
    callers = []
    screen_features(
        BatchReader(meta), genes, sample_rows=1_000, checkpoint=lambda: callers.append(sys._getframe(1).f_code.co_name)
    )
    assert callers == ["single_feature_auc"] * meta.n_classes + ["screen_features"]


def test_a_checkpoint_that_raises_stops_the_screening(tmp_path):
    meta, genes = _dataset(tmp_path)
    calls = []

    def checkpoint():
        calls.append(1)
        if len(calls) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        screen_features(BatchReader(meta), genes, sample_rows=1_000, checkpoint=checkpoint)
    assert len(calls) == 2
