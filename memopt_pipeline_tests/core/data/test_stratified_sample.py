"""The stratified, gene-spread sample: its rule, and one streamed pass giving that rule's rows."""

import numpy as np
import polars as pl
import pytest

from memopt_pipeline.core.data import stratified_sample as ss
from memopt_pipeline.core.data.batch_reader import BatchReader


def test_plan_shares_rows_equally_and_gives_what_a_small_class_cannot_use_to_the_others():
    stats = pl.DataFrame(
        {
            "gene": ["a", "b", "c", "d", "e", "other"],
            "n_class_0": [100, 50, 10, 0, 40, 1_000],
            "n_class_1": [2, 1, 0, 3, 0, 1_000],
            "n_class_2": [1, 1, 1, 1, 1, 1_000],
        }
    )
    plan = ss.plan_sample(stats, ["a", "b", "c", "d", "e"], 3, 60)
    # Shares of 20: class 2 has 5 rows, class 1 has 6, class 0 takes the remaining 49.
    assert plan.rows_per_class == [49, 6, 5] and plan.available == [200, 6, 5] and plan.rows == 60
    # Class 0: at most 13 per gene (13 + 13 + 10 + 0 + 13 = 49; 12 per gene would give 46).
    # Classes 1 and 2 need every row: caps 3 and 1.
    assert plan.gene_cap == [13, 3, 1]
    plan = ss.plan_sample(stats, ["a", "b", "c", "d", "e"], 3, 3)
    assert plan.rows_per_class == [1, 1, 1] and plan.gene_cap == [1, 1, 1]
    with pytest.raises(ValueError, match="sample_rows"):
        ss.plan_sample(stats, ["a"], 3, 0)


@pytest.fixture(scope="module")
def holdout(tiny_metadata):
    """The last 18 genes (1,204 rows: 1,032 neither, 86 donors, 86 acceptors), read whole with ids."""
    genes = tiny_metadata.read_gene_stats()["gene"].to_list()[18:]
    batches = list(BatchReader(tiny_metadata).iter_batches(genes, 100_000, with_ids=True))
    features = np.concatenate([b.features for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    gene_of_row = np.concatenate([b.ids.column(tiny_metadata.gene_column).to_numpy(zero_copy_only=False) for b in batches])
    return genes, features, labels, gene_of_row.astype(str)


def test_sample_has_the_requested_rows_per_class_spread_over_the_whole_gene_list(tiny_metadata, holdout):
    genes, features, labels, gene_of_row = holdout
    sample = ss.stratified_sample(BatchReader(tiny_metadata), genes, 150, seed=4, batch_rows=200)
    assert sample.class_counts(3) == [50, 50, 50]  # equal shares; every class has 86 or more rows
    sampled_genes = sorted(set(sample.genes))
    # The holdout's first and last genes (alphabetically) are both in, and most genes in between:
    # 50 donors from 18 genes of 4 to 9 donors each is at most 3 per gene.
    assert sampled_genes[0] == genes[0] and sampled_genes[-1] == genes[-1] and len(sampled_genes) >= 15
    per_gene_class = pl.DataFrame({"gene": sample.genes, "label": sample.labels}).group_by("gene", "label").len()
    assert per_gene_class.filter(pl.col("label") == 1)["len"].max() <= 3
    # Real rows, in reader order, with their own labels, features and ids.
    assert (np.diff(sample.row_index) > 0).all()
    np.testing.assert_array_equal(sample.labels, labels[sample.row_index])
    np.testing.assert_array_equal(sample.features, features[sample.row_index])
    np.testing.assert_array_equal(sample.genes, gene_of_row[sample.row_index])
    assert sample.ids.column(tiny_metadata.gene_column).to_pylist() == sample.genes.tolist()


def test_a_class_short_of_its_share_gives_all_its_rows_and_the_rest_go_to_the_others(tiny_metadata, holdout):
    genes, _, labels, _ = holdout
    sample = ss.stratified_sample(BatchReader(tiny_metadata), genes, 300, seed=0, batch_rows=500)
    assert sample.class_counts(3) == [128, 86, 86]  # shares of 100; donors and acceptors have 86
    donors = np.flatnonzero(labels == 1)
    np.testing.assert_array_equal(sample.row_index[sample.labels == 1], donors)


def test_one_pass_gives_the_rows_of_the_rule_applied_to_all_rows_at_once(tiny_metadata, holdout, monkeypatch):
    """The streamed reservoirs against the rule written directly (polars ranks over every row):
    same rows, whatever the batch size; no reservoir ever holds more than its class's share."""
    genes, _, labels, gene_of_row = holdout
    sample_rows, seed = 120, 9
    plan = ss.plan_sample(tiny_metadata.read_gene_stats(), genes, 3, sample_rows)
    keys = np.random.default_rng(seed).random(len(labels))  # one key per row, in reader order
    rows = (
        pl.DataFrame({"row": np.arange(len(labels)), "gene": gene_of_row, "label": labels, "key": keys})
        .with_columns(pl.col("key").rank("ordinal").over("gene", "label").alias("rank_in_gene"))
        .filter(pl.col("rank_in_gene") <= pl.col("label").replace_strict(dict(enumerate(plan.gene_cap))))
        .with_columns(pl.col("key").rank("ordinal").over("label").alias("rank_in_class"))
        .filter(pl.col("rank_in_class") <= pl.col("label").replace_strict(dict(enumerate(plan.rows_per_class))))
    )
    expected = np.sort(rows["row"].to_numpy())

    sizes = []
    merge = ss._Reservoir.merge

    def recording_merge(self, other, *, cap, capacity):
        merged = merge(self, other, cap=cap, capacity=capacity)
        sizes.append((len(merged.keys), capacity))
        return merged

    monkeypatch.setattr(ss._Reservoir, "merge", recording_merge)
    for batch_rows in (37, 1_000):
        sample = ss.stratified_sample(BatchReader(tiny_metadata), genes, sample_rows, seed=seed, batch_rows=batch_rows)
        np.testing.assert_array_equal(sample.row_index, expected)
    assert sizes and all(size <= capacity for size, capacity in sizes)


def test_genes_without_rows_are_an_error(tiny_metadata):
    with pytest.raises(ValueError, match="no rows"):
        ss.stratified_sample(BatchReader(tiny_metadata), ["not-a-gene"], 10, seed=0, batch_rows=10)
