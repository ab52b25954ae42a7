"""The shape of a generated dataset (:class:`SyntheticSpec`) and its column names."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import product

LABELS = ("neither", "donor", "acceptor")  # class index = position in this tuple
NEITHER, DONOR, ACCEPTOR = range(len(LABELS))
GENE_COLUMN = "gene_id"
LABEL_COLUMN = "splice_type"
SCORE_COLUMNS = ("donor_score", "acceptor_score")
ID_COLUMNS = (GENE_COLUMN, "transcript_id", "chrom", "strand", "position", LABEL_COLUMN)  # before the features

# Bump whenever the generated content changes for an unchanged spec: it is part of the
# cache key, so data written by an older generator is regenerated instead of reused.
GENERATOR_VERSION = 1

SPEC_FILE = "_spec.json"
BASES = "ACGT"


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a generated dataset; equal specs give byte-identical shards."""

    n_genes: int = 500
    mean_gene_length: int = 4000  # bp, per gene drawn around this
    mean_exons: int = 6  # exons per gene (>=2), drawn around this
    neither_per_site: float = 6.0  # "neither" rows sampled per true splice site
    # Share of neither rows within +-60 bp of a true site (hard negatives). Half of the
    # remaining ones sit on GT/AG dinucleotides that are not sites, the rest anywhere far.
    near_fraction: float = 0.5
    kmer_sizes: tuple[int, ...] = (1, 2, 3)
    windows: tuple[tuple[int, int], ...] = ((-10, 0), (0, 10), (-60, 0), (0, 60))  # [start, end) offsets
    score_noise: float = 1.0  # noise of the base-model scores
    genes_per_shard: int = 50
    row_group_rows: int = 65536
    seed: int = 7

    def __post_init__(self) -> None:
        problems = []
        if self.n_genes < 1:
            problems.append("n_genes must be >= 1")
        if self.mean_gene_length < 1:
            problems.append("mean_gene_length must be >= 1")
        if self.mean_exons < 2:
            problems.append("mean_exons must be >= 2 (a gene needs an intron to have splice sites)")
        if self.neither_per_site < 0:
            problems.append("neither_per_site must be >= 0")
        if not 0.0 <= self.near_fraction <= 1.0:
            problems.append("near_fraction must be in [0, 1]")
        if not self.kmer_sizes or any(k < 1 for k in self.kmer_sizes) or len(set(self.kmer_sizes)) != len(self.kmer_sizes):
            problems.append("kmer_sizes must be distinct integers >= 1")
        if not self.windows or any(start >= end for start, end in self.windows):
            problems.append("windows must be non-empty (start, end) pairs with start < end")
        if len(set(self.windows)) != len(self.windows):
            problems.append("windows must be distinct")
        if self.score_noise < 0:
            problems.append("score_noise must be >= 0")
        if self.genes_per_shard < 1 or self.row_group_rows < 1:
            problems.append("genes_per_shard and row_group_rows must be >= 1")
        if problems:
            raise ValueError("invalid SyntheticSpec: " + "; ".join(problems))

    def feature_columns(self) -> list[str]:
        """Feature names in column order: window, then k, then k-mer (lexicographic), then scores."""
        names = []
        for start, end in self.windows:
            window = f"w{offset_name(start)}_{offset_name(end)}"
            for k in self.kmer_sizes:
                names.extend(f"{window}_k{k}_{''.join(kmer)}" for kmer in product(BASES, repeat=k))
        return names + list(SCORE_COLUMNS)

    def to_dict(self) -> dict:
        """JSON-able cache key: every field (tuples as lists) plus the generator version."""
        payload = json.loads(json.dumps(asdict(self)))  # tuples -> lists, as JSON reads them back
        payload["generator_version"] = GENERATOR_VERSION
        return payload


def offset_name(offset: int) -> str:
    # "-" is not valid in an identifier, so negative offsets read "m10" (minus ten).
    return f"m{-offset}" if offset < 0 else str(offset)

