import polars as pl
import pytest

from memopt_pipeline.core.data.sampling import SamplingError, split_genes


def _stats(n: int) -> pl.DataFrame:
    return pl.DataFrame({"gene": [f"G{i:03d}" for i in range(n)], "rows": [10 + i for i in range(n)]})


def test_split_is_deterministic_disjoint_and_covers_the_sample():
    first = split_genes(_stats(50), holdout_fraction=0.2, seed=3)
    again = split_genes(_stats(50), holdout_fraction=0.2, seed=3)
    other = split_genes(_stats(50), holdout_fraction=0.2, seed=4)
    assert first == again
    assert first.holdout_genes != other.holdout_genes
    assert not set(first.train_genes) & set(first.holdout_genes)
    assert len(first.train_genes) + len(first.holdout_genes) == 50
    assert len(first.holdout_genes) == 10
    assert first.train_rows + first.holdout_rows == _stats(50)["rows"].sum()


def test_gene_sample_limits_both_sides():
    split = split_genes(_stats(50), holdout_fraction=0.25, sample_genes=20, seed=0)
    assert split.sampled_genes == 20
    assert len(split.train_genes) + len(split.holdout_genes) == 20


def test_sample_bigger_than_the_data_is_a_clear_error():
    with pytest.raises(SamplingError, match="larger than the 50 genes"):
        split_genes(_stats(50), holdout_fraction=0.2, sample_genes=51)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_holdout_fraction_must_be_a_proper_share(fraction):
    with pytest.raises(SamplingError, match="holdout_fraction"):
        split_genes(_stats(50), holdout_fraction=fraction)


def test_too_few_genes_left_for_training():
    with pytest.raises(SamplingError, match="training genes"):
        split_genes(_stats(3), holdout_fraction=0.5)
