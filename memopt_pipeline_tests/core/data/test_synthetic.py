import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from memopt_pipeline.core.data.synthetic import (
    GENE_COLUMN,
    LABEL_COLUMN,
    LABELS,
    SyntheticSpec,
    generate_dataset,
    main,
)
from memopt_pipeline.core.data.synthetic.genes import simulate_gene

# 3 shards (15 + 15 + 10 genes), several row groups each, ~2,800 rows.
SPEC = SyntheticSpec(n_genes=40, genes_per_shard=15, row_group_rows=500, seed=3)
ID_COLUMNS = ["gene_id", "transcript_id", "chrom", "strand", "position", "splice_type"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), SPEC)


@pytest.fixture(scope="module")
def rows(shards) -> pl.DataFrame:
    return pl.read_parquet(shards)


def _decode(codes: np.ndarray) -> str:
    return "".join("ACGT"[c] for c in codes)


def test_default_features_are_338_stable_identifiers():
    names = SyntheticSpec().feature_columns()
    assert len(names) == 4 * (4 + 16 + 64) + 2 == 338
    assert len(set(names)) == len(names) and all(n.isidentifier() for n in names)
    assert names[:2] == ["wm10_0_k1_A", "wm10_0_k1_C"]
    assert "w0_10_k2_GT" in names and "wm60_0_k3_TAG" in names
    assert names[-2:] == ["donor_score", "acceptor_score"]
    assert SyntheticSpec().feature_columns() == names


def test_invalid_spec_is_rejected():
    with pytest.raises(ValueError, match="mean_exons"):
        SyntheticSpec(mean_exons=1)
    with pytest.raises(ValueError, match="windows"):
        SyntheticSpec(windows=((5, 5),))


def test_schema_columns_and_dtypes(shards):
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for path in shards:
        schema = pq.read_schema(path)
        assert schema.names == ID_COLUMNS + SPEC.feature_columns()
        assert [schema.field(c).type for c in ID_COLUMNS] == [pa.string()] * 4 + [pa.int64(), pa.string()]
        assert all(schema.field(c).type == pa.float32() for c in SPEC.feature_columns())
        assert pq.ParquetFile(path).metadata.num_row_groups > 1


def test_rows_are_sorted_by_gene_within_and_across_shards(shards, rows):
    assert rows[GENE_COLUMN].n_unique() == SPEC.n_genes
    assert rows.select(GENE_COLUMN, "position").equals(rows.select(GENE_COLUMN, "position").sort(GENE_COLUMN, "position"))
    assert rows.select(GENE_COLUMN, "position").is_duplicated().sum() == 0
    genes_per_shard = [pl.read_parquet(p, columns=[GENE_COLUMN])[GENE_COLUMN].unique().sort().to_list() for p in shards]
    assert [len(g) for g in genes_per_shard] == [15, 15, 10]
    assert all(a[-1] < b[0] for a, b in zip(genes_per_shard, genes_per_shard[1:]))  # whole genes, increasing
    # Row-group statistics on the gene column let readers skip row groups by gene range.
    stats = pq.ParquetFile(shards[0]).metadata.row_group(0).column(0).statistics
    assert stats.has_min_max and stats.min == genes_per_shard[0][0]
    per_gene = rows.group_by(GENE_COLUMN).agg(pl.col("transcript_id", "chrom", "strand").n_unique())
    assert per_gene.select(pl.col("transcript_id", "chrom", "strand").max()).row(0) == (1, 1, 1)
    assert set(rows["strand"].unique()) == {"+", "-"}


def test_all_labels_present_in_sane_proportions(rows):
    counts = dict(rows[LABEL_COLUMN].value_counts().iter_rows())
    assert set(counts) == set(LABELS)
    assert counts["donor"] == counts["acceptor"] > 5 * SPEC.n_genes  # one of each per intron
    ratio = counts["neither"] / (counts["donor"] + counts["acceptor"])
    assert 0.9 * SPEC.neither_per_site <= ratio <= 1.05 * SPEC.neither_per_site


def test_sites_carry_canonical_dinucleotides_and_negatives_are_hard(rows):
    near = decoys = neither = 0
    for index in (0, 17, 39):
        gene = simulate_gene(SPEC, index)
        seq = _decode(gene.sequence)
        gene_rows = rows.filter(pl.col(GENE_COLUMN) == gene.gene_id)
        at = gene_rows["position"].to_numpy() - gene.genomic_start
        labels = gene_rows[LABEL_COLUMN].to_numpy()
        np.testing.assert_array_equal(at[labels == "donor"], gene.donors)
        np.testing.assert_array_equal(at[labels == "acceptor"], gene.acceptors)
        assert all(seq[p : p + 2] == "GT" for p in gene.donors)
        assert all(seq[p - 1 : p + 1] == "AG" for p in gene.acceptors)
        # Polypyrimidine tract: the 10 bases before an acceptor's AG are mostly C/T.
        tracts = "".join(seq[p - 11 : p - 1] for p in gene.acceptors)
        assert (tracts.count("C") + tracts.count("T")) / len(tracts) > 0.75
        sites = np.concatenate((gene.donors, gene.acceptors))
        negatives = at[labels == "neither"]
        neither += negatives.size
        near += int((np.abs(negatives[:, None] - sites[None, :]).min(axis=1) <= 60).sum())
        decoys += sum(seq[p : p + 2] == "GT" or seq[p - 1 : p + 1] == "AG" for p in negatives)
    assert near / neither >= SPEC.near_fraction - 0.05
    assert decoys / neither > 0.25  # planted + natural decoys, well above the ~12% of random DNA


def test_kmer_counts_match_the_sequence(rows):
    gene = simulate_gene(SPEC, 5)
    seq = _decode(gene.sequence)
    gene_rows = rows.filter(pl.col(GENE_COLUMN) == gene.gene_id)
    for row in gene_rows.head(20).iter_rows(named=True):
        p = row["position"] - gene.genomic_start
        for kmer, (start, end), name in (("GT", (0, 10), "w0_10_k2_GT"), ("TAG", (-60, 0), "wm60_0_k3_TAG")):
            expected = sum(seq[s : s + len(kmer)] == kmer for s in range(p + start, p + end))
            assert row[name] == expected


def test_kmer_windows_are_informative(rows):
    means = rows.group_by(LABEL_COLUMN).agg(
        pl.col("w0_10_k2_GT").mean(),
        (pl.col("wm10_0_k1_C") + pl.col("wm10_0_k1_T")).mean().alias("pyrimidines_upstream"),
    )
    by_label = {r[LABEL_COLUMN]: r for r in means.iter_rows(named=True)}
    assert by_label["donor"]["w0_10_k2_GT"] > by_label["neither"]["w0_10_k2_GT"] + 0.5
    assert by_label["acceptor"]["pyrimidines_upstream"] > by_label["neither"]["pyrimidines_upstream"] + 1.5


def test_scores_are_informative_but_not_leaky(rows):
    labels = rows[LABEL_COLUMN].to_numpy()
    for label in ("donor", "acceptor"):
        score = rows[f"{label}_score"].to_numpy()
        assert 0.0 < score.min() and score.max() < 1.0
        assert 0.7 < roc_auc_score(labels == label, score) < 0.99


def test_same_spec_gives_byte_identical_files(tmp_path):
    spec = SyntheticSpec(n_genes=6, genes_per_shard=4, seed=5)
    first = generate_dataset(tmp_path / "a", spec)
    second = generate_dataset(tmp_path / "b", spec)
    assert len(first) == 2
    for a, b in zip(first + [tmp_path / "a" / "_spec.json"], second + [tmp_path / "b" / "_spec.json"]):
        assert a.read_bytes() == b.read_bytes()
    other_seed = generate_dataset(tmp_path / "c", SyntheticSpec(n_genes=6, genes_per_shard=4, seed=6))
    assert other_seed[0].read_bytes() != first[0].read_bytes()


def test_gene_content_does_not_depend_on_shard_layout(tmp_path):
    one = generate_dataset(tmp_path / "one", SyntheticSpec(n_genes=6, genes_per_shard=6))
    three = generate_dataset(tmp_path / "three", SyntheticSpec(n_genes=6, genes_per_shard=2))
    assert len(one) == 1 and len(three) == 3
    assert pl.read_parquet(one).equals(pl.read_parquet(three))


def test_second_call_reuses_shards_and_a_new_spec_replaces_them(tmp_path):
    spec = SyntheticSpec(n_genes=6, genes_per_shard=2)
    messages = []
    first = generate_dataset(tmp_path, spec, progress=messages.append)
    assert len(messages) == 3 and "rows so far" in messages[-1]
    mtimes = [p.stat().st_mtime_ns for p in first]
    again = generate_dataset(tmp_path, spec, progress=messages.append)
    assert again == first and [p.stat().st_mtime_ns for p in again] == mtimes
    assert "reusing" in messages[-1]
    # A different spec regenerates and leaves no shard of the old one behind.
    smaller = generate_dataset(tmp_path, SyntheticSpec(n_genes=6, genes_per_shard=3))
    assert sorted(tmp_path.glob("*.parquet")) == smaller and len(smaller) == 2


def test_cli_writes_shards(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(out), "--genes", "5", "--seed", "2", "--kmer-sizes", "1,2", "--genes-per-shard", "2"]) == 0
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == 3 and (out / "_spec.json").exists()
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    assert f"3 shards, {total:,} rows x {4 * (4 + 16) + 2} features" in capsys.readouterr().out
