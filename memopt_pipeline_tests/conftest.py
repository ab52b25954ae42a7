"""Shared fixtures: a small generated splice-site dataset and its metadata."""

from pathlib import Path

import pytest

from memopt_pipeline.core.data.dataset import DatasetMetadata, list_shards, scan_dataset
from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN, SyntheticSpec, generate_dataset

# Small but real: 3 shards, several row groups each, all three classes, 170 features.
TINY_SPEC = SyntheticSpec(n_genes=36, kmer_sizes=(1, 2, 3), windows=((-10, 0), (0, 10)), genes_per_shard=12, row_group_rows=1_000, seed=11)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_dataset")
    generate_dataset(folder, TINY_SPEC)
    return folder


@pytest.fixture(scope="session")
def tiny_metadata(tiny_dataset, tmp_path_factory) -> DatasetMetadata:
    return scan_dataset(
        list_shards(tiny_dataset),
        gene_column=GENE_COLUMN,
        label_column=LABEL_COLUMN,
        gene_stats_path=tmp_path_factory.mktemp("tiny_stats") / "gene_stats.parquet",
    )
