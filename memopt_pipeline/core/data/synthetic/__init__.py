"""Deterministic generator of a demo splice-site dataset, written as gene-sorted Parquet shards.

The data imitate a splice-site training table rather than noise: every gene is a random DNA
sequence with an exon/intron structure, each intron starts with ``GT`` inside a weak donor
consensus and ends with a polypyrimidine tract followed by ``AG``. Rows are the true donor
and acceptor sites plus "neither" positions, many of them hard negatives (near a true site,
or on a ``GT``/``AG`` that is not a site, including planted cryptic sites with a partial
consensus). Features are k-mer counts in windows around each row's position plus two noisy
base-model scores.

Conventions
-----------
- Sequences are ``uint8`` codes 0..3 for A, C, G, T, always in transcript (5'->3')
  orientation; ``strand`` is per-gene metadata only.
- A **donor** row sits on the G of the intron's leading ``GT`` (the first intron base):
  ``seq[p:p + 2] == "GT"``.
- An **acceptor** row sits on the G of the intron's trailing ``AG`` (the last intron base):
  ``seq[p - 1:p + 1] == "AG"``.
- Each gene body is padded on both sides with random flanking sequence as long as the
  largest window reaches, and rows are drawn from the body only, so every window of every
  row lies inside the sequence (no clipping, no padding values).
- ``position`` is a per-gene genomic offset plus the index into that padded sequence.
- The k-mer count feature ``w{a}_{b}_k{k}_{KMER}`` is the number of occurrences of KMER
  whose first base lies in ``[position + a, position + b)``; negative offsets are written
  with ``m`` (``wm10_0_k2_GT`` is "GT" starting in the 10 bases upstream).

Determinism and memory
----------------------
Each gene draws from its own generators seeded by ``(seed, gene_index)``, so a gene's rows
do not depend on the shard layout, and the same spec gives byte-identical shards. Only one
shard's rows are in memory at a time, so memory stays flat however many genes are made.

Modules: ``spec`` (the dataset's shape and column names), ``genes`` (one simulated gene and
its rows), ``shards`` (writing and reusing the Parquet shards), ``cli``
(``python -m memopt_pipeline.core.data.synthetic OUT_DIR``).
"""

from memopt_pipeline.core.data.synthetic.cli import main
from memopt_pipeline.core.data.synthetic.shards import generate_dataset
from memopt_pipeline.core.data.synthetic.spec import (
    GENE_COLUMN,
    GENERATOR_VERSION,
    ID_COLUMNS,
    LABEL_COLUMN,
    LABELS,
    SCORE_COLUMNS,
    SPEC_FILE,
    SyntheticSpec,
)

__all__ = [
    "GENE_COLUMN",
    "GENERATOR_VERSION",
    "ID_COLUMNS",
    "LABEL_COLUMN",
    "LABELS",
    "SCORE_COLUMNS",
    "SPEC_FILE",
    "SyntheticSpec",
    "generate_dataset",
    "main",
]
