"""Chunked SHAP: running sums, the bounded reservoir and the per-row Parquet file."""

import lightgbm as lgb
import numpy as np
import pyarrow.parquet as pq
import pytest

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.evaluate.ensemble import Ensemble, EnsembleMember
from memopt_pipeline.core.evaluate.shap_summary import ShapReservoir, chunked_shap, reservoir_bytes


@pytest.fixture(scope="module")
def model_and_genes(tiny_metadata, tmp_path_factory):
    """A small LightGBM multiclass model on half the genes; the other half (~1,200 rows) to explain."""
    genes = tiny_metadata.read_gene_stats()["gene"].to_list()
    reader = BatchReader(tiny_metadata)
    batches = list(reader.iter_batches(genes[:18], batch_rows=5_000))
    features = np.concatenate([b.features for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    params = {"objective": "multiclass", "num_class": 3, "num_leaves": 15, "min_data_in_leaf": 5, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(features, labels, feature_name=list(reader.features)), num_boost_round=15)
    path = tmp_path_factory.mktemp("explain") / "model.txt"
    booster.save_model(str(path))
    return Ensemble([EnsembleMember("instance_0", str(path))]), genes[18:]


def _rows_named(metadata, genes, table):
    """Features of the rows ``table`` names by (gene, position), from one read of every row of
    ``genes`` (the one-shot reference), in ``table``'s order."""
    batches = list(BatchReader(metadata).iter_batches(genes, batch_rows=100_000, with_ids=True))
    features = np.concatenate([b.features for b in batches])
    keys = [
        (gene, position)
        for b in batches
        for gene, position in zip(b.ids.column(metadata.gene_column).to_pylist(), b.ids.column("position").to_pylist())
    ]
    where = {key: index for index, key in enumerate(keys)}
    named = zip(table.column(metadata.gene_column).to_pylist(), table.column("position").to_pylist())
    return features[[where[key] for key in named]]


def test_chunked_sums_rows_file_and_reservoir_match_a_one_shot_computation(model_and_genes, tiny_metadata, tmp_path):
    ensemble, genes = model_and_genes
    rows_path = tmp_path / "rows.parquet"
    summary = chunked_shap(
        ensemble, BatchReader(tiny_metadata), genes, sample_rows=900, chunk_rows=150,
        reservoir_rows=300, seed=3, rows_path=rows_path, row_top_k=3,
    )
    assert summary.rows == 900 and summary.chunks >= 900 // 150
    assert summary.additivity_max_error < 1e-6 and summary.additivity_rows == 5

    # One Parquet row per explained row, in order: ids, raw scores, strongest features.
    table = pq.read_table(rows_path)
    assert table.num_rows == summary.rows
    features = _rows_named(tiny_metadata, genes, table)
    one_shot = ensemble.predict_contributions(features)  # (rows, classes, features + 1)
    np.testing.assert_allclose(summary.mean_abs, np.abs(one_shot[:, :, :-1]).mean(axis=0), rtol=1e-9, atol=1e-12)
    raw = ensemble.predict_raw(features)
    for c, name in enumerate(summary.classes):
        np.testing.assert_allclose(table.column(f"raw_{name}").to_numpy(), raw[:, c], rtol=1e-5, atol=1e-5)
        per_class = one_shot[:, c, :-1]
        strongest = np.abs(per_class).argmax(axis=1)
        assert table.column(f"top1_feature_{name}").to_pylist() == [summary.features[j] for j in strongest]
        np.testing.assert_allclose(
            table.column(f"top1_shap_{name}").to_numpy(), per_class[np.arange(len(per_class)), strongest], rtol=1e-5
        )
        # Ordered by magnitude: |top1| >= |top2| >= |top3|.
        magnitudes = np.abs(np.column_stack([table.column(f"top{r}_shap_{name}").to_numpy() for r in (1, 2, 3)]))
        assert (np.diff(magnitudes, axis=1) <= 1e-7).all()

    # The reservoir holds the values and contributions of the rows it names.
    values, contributions = summary.reservoir.sample()
    assert len(values) == summary.reservoir.size == 300
    index = summary.reservoir.row_index[:300]
    np.testing.assert_array_equal(values, features[index])
    np.testing.assert_allclose(contributions, one_shot[index, :, :-1], rtol=1e-5, atol=1e-6)


def test_reservoir_size_is_bounded_whatever_the_sample(model_and_genes, tiny_metadata):
    ensemble, genes = model_and_genes
    sizes = {}
    every_row = BatchReader(tiny_metadata).count_rows(genes)
    for sample_rows in (300, every_row):
        summary = chunked_shap(ensemble, BatchReader(tiny_metadata), genes, sample_rows=sample_rows, chunk_rows=200, reservoir_rows=150)
        reservoir = summary.reservoir
        assert reservoir.seen == sample_rows and reservoir.size == 150
        sizes[sample_rows] = reservoir.values.nbytes + reservoir.contributions.nbytes
    assert sizes[300] == sizes[every_row] <= reservoir_bytes(150, len(summary.features), len(summary.classes))


def test_reservoir_keeps_late_rows_as_often_as_early_ones():
    """Algorithm R: every offered row is kept with probability capacity / rows, wherever its chunk is."""
    capacity, rows, chunk, trials = 10, 200, 17, 400
    kept = np.zeros(rows)
    for seed in range(trials):
        reservoir = ShapReservoir(capacity, n_features=1, n_classes=1, seed=seed)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            values = np.arange(start, stop, dtype=np.float32).reshape(-1, 1)
            reservoir.offer(values, values.reshape(-1, 1, 1), np.zeros(stop - start, dtype=np.int32))
        assert reservoir.size == capacity and len(set(reservoir.row_index)) == capacity
        # Each slot's stored value is the row it claims to be.
        np.testing.assert_array_equal(reservoir.values[:, 0], reservoir.row_index)
        kept[reservoir.row_index] += 1
    expected = trials * capacity / rows  # 20 per row
    first_chunk, last_chunks = kept[:chunk].mean(), kept[-3 * chunk :].mean()
    assert first_chunk == pytest.approx(expected, rel=0.25)
    assert last_chunks == pytest.approx(expected, rel=0.25)
    assert kept[-chunk:].sum() > 0  # rows of the last chunk do get in


def test_a_failure_half_way_leaves_no_partial_rows_file(model_and_genes, tiny_metadata, tmp_path):
    ensemble, genes = model_and_genes
    calls = []

    def checkpoint():
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated")

    rows_path = tmp_path / "rows.parquet"
    with pytest.raises(MemoryError):
        chunked_shap(ensemble, BatchReader(tiny_metadata, checkpoint=checkpoint), genes, sample_rows=1_000, chunk_rows=100, rows_path=rows_path)
    assert not rows_path.exists() and not list(tmp_path.iterdir())


def test_the_explained_rows_cover_every_class_and_the_whole_holdout_gene_list(model_and_genes, tiny_metadata, tmp_path):
    """Not the first rows in file order (the alphabetically first genes, mostly "neither"): equal
    rows per class, from genes across the sorted holdout list."""
    ensemble, genes = model_and_genes  # 18 genes: 1,032 neither, 86 donors, 86 acceptors
    rows_path = tmp_path / "rows.parquet"
    summary = chunked_shap(ensemble, BatchReader(tiny_metadata), genes, sample_rows=150, chunk_rows=40, seed=1, rows_path=rows_path)
    assert summary.rows_per_class == {"neither": 50, "donor": 50, "acceptor": 50}
    table = pq.read_table(rows_path)
    assert np.bincount(table.column("label").to_numpy(), minlength=3).tolist() == [50, 50, 50]
    explained_genes = sorted(set(table.column(tiny_metadata.gene_column).to_pylist()))
    assert explained_genes[0] == sorted(genes)[0] and explained_genes[-1] == sorted(genes)[-1]
    assert summary.genes == len(explained_genes) >= 15
    assert summary.plan.rows_per_class == [50, 50, 50]
    # What is explained, said in words: one LightGBM softmax member's margin, not the output probabilities.
    assert summary.explained["members"] == [{"partition": "instance_0", "format": "lightgbm", "objective": "softmax", "weight": 1.0}]
    assert "raw margin" in summary.explained["text"] and not summary.explained["mixed_objectives"]
