import numpy as np
import polars as pl
import pytest

from memopt_pipeline.core.data.folds import assign_instances, fast_validation_split, fold_class_counts, gene_folds


def _stats(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    neither = rng.integers(50, 500, n)
    donor = rng.integers(0, 30, n)
    acceptor = rng.integers(0, 30, n)
    return pl.DataFrame(
        {
            "gene": [f"G{i:04d}" for i in range(n)],
            "rows": neither + donor + acceptor,
            "n_class_0": neither,
            "n_class_1": donor,
            "n_class_2": acceptor,
        }
    )


def test_every_gene_is_in_exactly_one_fold_and_folds_are_class_balanced():
    stats = _stats(300)
    folds = gene_folds(stats, n_folds=5, seed=1)
    assert sorted(folds) == sorted(stats["gene"].to_list())  # each gene once: never split
    per_fold = fold_class_counts(stats, folds)
    assert per_fold.height == 5
    for column in ("n_class_0", "n_class_1", "n_class_2"):
        shares = per_fold[column].to_numpy() / stats[column].sum()
        assert np.all(np.abs(shares - 0.2) < 0.02), (column, shares)


def test_folds_are_deterministic_by_seed():
    stats = _stats(100)
    assert gene_folds(stats, n_folds=3, seed=7) == gene_folds(stats, n_folds=3, seed=7)
    assert gene_folds(stats, n_folds=3, seed=7) != gene_folds(stats, n_folds=3, seed=8)


def test_no_empty_fold_even_with_few_genes():
    stats = _stats(3)
    folds = gene_folds(stats, n_folds=3)
    assert sorted(set(folds.values())) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 4 genes"):
        gene_folds(_stats(3), n_folds=4)


def test_instances_cover_all_genes_with_balanced_rows_and_overlap():
    stats = _stats(200)
    instances = assign_instances(stats, n_instances=4, overlap=0.1, seed=0)
    genes = set(stats["gene"].to_list())
    assert set().union(*map(set, instances)) == genes
    rows = dict(zip(stats["gene"].to_list(), stats["rows"].to_list()))
    loads = [sum(rows[g] for g in instance) for instance in instances]
    assert max(loads) / min(loads) < 1.25
    total_memberships = sum(len(i) for i in instances)
    assert 200 < total_memberships <= 200 + 4 * 6  # ceil(10% of ~50 core genes) extra each


def test_single_instance_has_every_gene_once():
    stats = _stats(20)
    assert assign_instances(stats, n_instances=1, overlap=0.1) == [sorted(stats["gene"].to_list())]


def test_fast_split_holds_out_five_percent_of_each_class_by_whole_genes():
    stats = _stats(400)
    split = fast_validation_split(stats, seed=3)
    assert sorted(split) == sorted(stats["gene"].to_list())  # every gene once, in one side only
    assert set(split.values()) == {0, 1}
    per_fold = fold_class_counts(stats, split)
    for column in ("n_class_0", "n_class_1", "n_class_2"):
        share = per_fold.filter(pl.col("fold") == 1)[column].item() / stats[column].sum()
        assert abs(share - 0.05) < 0.01, (column, share)
    assert split == fast_validation_split(stats, seed=3)


def test_fast_split_needs_enough_genes():
    with pytest.raises(ValueError, match="needs at least 20 genes"):
        fast_validation_split(_stats(12))


def test_largest_training_share_is_all_rows_but_the_smallest_validated_fold():
    from memopt_pipeline.core.data.folds import largest_training_share

    rows = {"a": 50, "b": 30, "c": 20}
    fold_of_gene = {"a": 0, "b": 1, "c": 2}

    def rows_of(genes):
        return sum(rows[g] for g in genes)

    # Validating on fold 2 (20 of 100 rows) trains on 80%: the largest training set of the three.
    assert largest_training_share(fold_of_gene, rows_of) == pytest.approx(0.8)
    # Only fold 0 validated (fast mode): 50% trains.
    assert largest_training_share(fold_of_gene, rows_of, validation_folds=[0]) == pytest.approx(0.5)
