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
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memopt_pipeline.core.storage import atomic_path, write_json

LABELS = ("neither", "donor", "acceptor")  # class index = position in this tuple
_NEITHER, _DONOR, _ACCEPTOR = range(len(LABELS))
GENE_COLUMN = "gene_id"
LABEL_COLUMN = "splice_type"
SCORE_COLUMNS = ("donor_score", "acceptor_score")
ID_COLUMNS = (GENE_COLUMN, "transcript_id", "chrom", "strand", "position", LABEL_COLUMN)  # before the features

# Bump whenever the generated content changes for an unchanged spec: it is part of the
# cache key, so data written by an older generator is regenerated instead of reused.
GENERATOR_VERSION = 1

SPEC_FILE = "_spec.json"
_SHARD_NAME = "part-{:05d}.parquet"
_BASES = "ACGT"
_CODE = {base: code for code, base in enumerate(_BASES)}

_MIN_EXON = 30  # bp; keeps the acceptor (+1) and next donor (-3) motifs apart
_MIN_INTRON = 70  # bp; room for donor motif (+5) and tract + AG (-21) without overlap
_NEAR_BP = 60  # "near" negatives lie within this distance of a true site
_DECOY_SHARE = 0.5  # of the neither rows that are not near: share placed on GT/AG decoys
_CRYPTIC_CLEARANCE = 30  # bp between a planted cryptic site and any true site or body edge
_CRYPTIC_STRENGTH = 0.5  # cryptic sites get the consensus biases scaled by this

# Weak consensus around true sites: (offset from the labelled G, allowed bases, probability
# that the base is forced to one of them). Probability 1 marks the canonical dinucleotide.
# Donor: exon end "MAG" | intron "GTRAGT".
_DONOR_MOTIF = (
    (-3, "AC", 0.7), (-2, "A", 0.6), (-1, "G", 0.8),
    (0, "G", 1.0), (1, "T", 1.0),
    (2, "AG", 0.9), (3, "A", 0.7), (4, "G", 0.8), (5, "T", 0.5),
)
# Acceptor: "...YYYYYYYYYY" tract, "AG" | exon start "G".
_ACCEPTOR_MOTIF = ((-1, "A", 1.0), (0, "G", 1.0), (1, "G", 0.5))
_TRACT_LENGTHS = (10, 20)  # inclusive range of polypyrimidine tract lengths, bp
_TRACT_PYRIMIDINE_PROB = 0.85

# Base-model scores: logit = shift * is_class + cryptic_shift * is_cryptic + N(0, noise) - offset.
# With noise 1 the single-score ROC-AUC is about Phi(1.9 / sqrt(2)) = 0.91 before the cryptic
# decoys pull it down a little: informative, never a label leak.
_SCORE_SHIFT = 1.9
_SCORE_CRYPTIC_SHIFT = 0.9
_SCORE_OFFSET = 2.5
_LOGIT_CLIP = 15.0  # keeps float32 scores strictly inside (0, 1)


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
            window = f"w{_offset_name(start)}_{_offset_name(end)}"
            for k in self.kmer_sizes:
                names.extend(f"{window}_k{k}_{''.join(kmer)}" for kmer in product(_BASES, repeat=k))
        return names + list(SCORE_COLUMNS)

    def to_dict(self) -> dict:
        """JSON-able cache key: every field (tuples as lists) plus the generator version."""
        payload = json.loads(json.dumps(asdict(self)))  # tuples -> lists, as JSON reads them back
        payload["generator_version"] = GENERATOR_VERSION
        return payload


def _offset_name(offset: int) -> str:
    # "-" is not valid in an identifier, so negative offsets read "m10" (minus ten).
    return f"m{-offset}" if offset < 0 else str(offset)


@dataclass(frozen=True)
class SimulatedGene:
    """One gene's sequence and sites; indices are into ``sequence`` (flanks included)."""

    index: int
    gene_id: str
    chrom: str
    strand: str
    genomic_start: int  # genomic coordinate of sequence[0]; row position = this + index
    sequence: np.ndarray  # uint8 codes 0..3 = A, C, G, T
    body: tuple[int, int]  # [start, end) of the gene body; rows are drawn from here only
    donors: np.ndarray  # index of the G of each intron's leading GT
    acceptors: np.ndarray  # index of the G of each intron's trailing AG
    cryptic_donors: np.ndarray  # planted GT with a partial consensus that is not a site
    cryptic_acceptors: np.ndarray  # planted AG with a partial tract that is not a site


def gene_id_for(spec: SyntheticSpec, gene_index: int) -> str:
    """Zero-padded so that lexicographic order of ids equals numeric order."""
    width = max(6, len(str(spec.n_genes - 1)))
    return f"G{gene_index:0{width}d}"


def _flanks(spec: SyntheticSpec) -> tuple[int, int]:
    """Bases needed before and after any row so all its windows' k-mers fit in the sequence."""
    left = max(0, -min(start for start, _ in spec.windows))
    right = max(0, max(end for _, end in spec.windows)) + max(spec.kmer_sizes)
    return left, right


def _within_ranges(starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """Mask of indices in [0, length) covered by any [start, end) range (ranges clipped)."""
    edges = np.zeros(length + 1, dtype=np.int32)
    np.add.at(edges, np.clip(starts, 0, length), 1)
    np.add.at(edges, np.clip(ends, 0, length), -1)
    return np.cumsum(edges[:-1]) > 0


def _within(points: np.ndarray, radius: int, length: int) -> np.ndarray:
    """Mask of indices in [0, length) within ``radius`` of any of ``points``."""
    return _within_ranges(points - radius, points + radius + 1, length)


def _plant_motif(sequence: np.ndarray, sites: np.ndarray, motif, strength: float, rng: np.random.Generator) -> None:
    """Bias bases around ``sites``; canonical positions (probability 1) are always set."""
    for offset, bases, prob in motif:
        if prob < 1.0:
            prob *= strength
        targets = sites[rng.random(sites.size) < prob] + offset
        codes = np.array([_CODE[b] for b in bases], dtype=np.uint8)
        sequence[targets] = codes[rng.integers(0, codes.size, targets.size)]


def _plant_tract(sequence: np.ndarray, acceptors: np.ndarray, strength: float, rng: np.random.Generator) -> None:
    """Mostly-pyrimidine tract of 10-20 bp right before the acceptor's AG."""
    lo, hi = _TRACT_LENGTHS
    lengths = rng.integers(lo, hi + 1, acceptors.size)
    distance = np.arange(1, hi + 1)  # 1 = the base just before the A of AG
    chosen = (distance[None, :] <= lengths[:, None]) & (rng.random((acceptors.size, hi)) < _TRACT_PYRIMIDINE_PROB * strength)
    targets = (acceptors[:, None] - 1 - distance[None, :])[chosen]
    sequence[targets] = np.where(rng.random(targets.size) < 0.5, _CODE["C"], _CODE["T"]).astype(np.uint8)


def _gt_starts(sequence: np.ndarray) -> np.ndarray:
    """Mask of indices p with sequence[p:p + 2] == "GT" (where a donor would be labelled)."""
    hits = np.zeros(sequence.size, dtype=bool)
    hits[:-1] = (sequence[:-1] == _CODE["G"]) & (sequence[1:] == _CODE["T"])
    return hits


def _ag_ends(sequence: np.ndarray) -> np.ndarray:
    """Mask of indices p with sequence[p - 1:p + 1] == "AG" (where an acceptor would be labelled)."""
    hits = np.zeros(sequence.size, dtype=bool)
    hits[1:] = (sequence[:-1] == _CODE["A"]) & (sequence[1:] == _CODE["G"])
    return hits


def simulate_gene(spec: SyntheticSpec, gene_index: int) -> SimulatedGene:
    """Sequence, exon/intron structure and sites of one gene; depends only on (spec, gene_index)."""
    rng = np.random.default_rng([spec.seed, gene_index, 0])
    n_exons = 2 + int(rng.poisson(spec.mean_exons - 2))
    n_introns = n_exons - 1
    exon_lengths = _MIN_EXON + rng.gamma(2.0, 55.0, n_exons).astype(np.int64)
    # Gene length spreads around the mean (gamma, CV 0.5); introns take what the exons leave,
    # split unevenly as in real genes, but never below the minimum intron length.
    target_length = int(spec.mean_gene_length * rng.gamma(4.0, 0.25))
    spare = max(target_length - int(exon_lengths.sum()) - n_introns * _MIN_INTRON, 0)
    intron_lengths = _MIN_INTRON + rng.multinomial(spare, rng.dirichlet(np.full(n_introns, 1.5)))

    left, right = _flanks(spec)
    segments = np.empty(2 * n_exons - 1, dtype=np.int64)
    segments[0::2], segments[1::2] = exon_lengths, intron_lengths
    boundaries = left + np.cumsum(segments)
    body = (left, int(boundaries[-1]))
    donors = boundaries[0:-1:2]  # first base of each intron
    acceptors = boundaries[1::2] - 1  # last base of each intron
    length = body[1] + right

    # Background: per-gene GC content, exons a little GC-richer than introns and flanks.
    gc = rng.uniform(0.36, 0.54)
    exon_starts = np.concatenate(([left], acceptors + 1))
    exon_ends = np.concatenate((donors, [body[1]]))
    in_exon = _within_ranges(exon_starts, exon_ends, length)
    gc_at = np.where(in_exon, gc + 0.06, gc)
    u = rng.random(length)
    # A: [0, (1-gc)/2), C: [.., 0.5), G: [0.5, 0.5+gc/2), T: rest. Cast before adding:
    # bool + bool is a logical OR in numpy.
    sequence = (u >= (1.0 - gc_at) / 2).astype(np.uint8)
    sequence += u >= 0.5
    sequence += u >= 0.5 + gc_at / 2

    # Cryptic sites first, so true motifs planted next always win. Motifs reach 21 bp
    # upstream and 5 bp downstream, so the clearance keeps them off true sites and flanks.
    sites = np.concatenate((donors, acceptors))
    allowed = np.zeros(length, dtype=bool)
    allowed[body[0] + _CRYPTIC_CLEARANCE : body[1] - _CRYPTIC_CLEARANCE] = True
    allowed &= ~_within(sites, _CRYPTIC_CLEARANCE, length)
    candidates = np.flatnonzero(allowed)
    n_cryptic = min(2 * int(rng.poisson(n_introns)), candidates.size)
    cryptic = rng.choice(candidates, n_cryptic, replace=False) if n_cryptic else candidates[:0]
    cryptic_donors, cryptic_acceptors = np.sort(cryptic[0::2]), np.sort(cryptic[1::2])
    _plant_motif(sequence, cryptic_donors, _DONOR_MOTIF, _CRYPTIC_STRENGTH, rng)
    _plant_tract(sequence, cryptic_acceptors, _CRYPTIC_STRENGTH, rng)
    _plant_motif(sequence, cryptic_acceptors, _ACCEPTOR_MOTIF, _CRYPTIC_STRENGTH, rng)
    _plant_motif(sequence, donors, _DONOR_MOTIF, 1.0, rng)
    _plant_tract(sequence, acceptors, 1.0, rng)
    _plant_motif(sequence, acceptors, _ACCEPTOR_MOTIF, 1.0, rng)
    # Two cryptic sites planted close together can overwrite each other's dinucleotide;
    # keep only those that still carry it.
    cryptic_donors = cryptic_donors[_gt_starts(sequence)[cryptic_donors]]
    cryptic_acceptors = cryptic_acceptors[_ag_ends(sequence)[cryptic_acceptors]]

    return SimulatedGene(
        index=gene_index,
        gene_id=gene_id_for(spec, gene_index),
        chrom=f"chr{int(rng.integers(1, 23))}",
        strand="+" if rng.random() < 0.5 else "-",
        genomic_start=int(rng.integers(1_000_000, 200_000_000)),
        sequence=sequence,
        body=body,
        donors=donors,
        acceptors=acceptors,
        cryptic_donors=cryptic_donors,
        cryptic_acceptors=cryptic_acceptors,
    )


def _pick(rng: np.random.Generator, mask: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` distinct indices where ``mask`` is true (all of them if fewer)."""
    candidates = np.flatnonzero(mask)
    if count >= candidates.size:
        return candidates
    return rng.choice(candidates, count, replace=False)


def _sample_rows(spec: SyntheticSpec, gene: SimulatedGene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (sequence indices, sorted) and class codes: all true sites plus negatives."""
    length = gene.sequence.size
    sites = np.concatenate((gene.donors, gene.acceptors))
    n_neither = int(round(spec.neither_per_site * sites.size))
    n_near = int(round(spec.near_fraction * n_neither))
    n_decoy = int(round(_DECOY_SHARE * (n_neither - n_near)))
    n_far = n_neither - n_near - n_decoy

    in_body = np.zeros(length, dtype=bool)
    in_body[gene.body[0] : gene.body[1]] = True
    taken = np.zeros(length, dtype=bool)
    taken[sites] = True
    near_zone = _within(sites, _NEAR_BP, length)

    near = _pick(rng, near_zone & in_body & ~taken, n_near)
    taken[near] = True
    # Decoys: planted cryptic sites first (the hardest negatives), then natural GT/AG.
    is_cryptic = np.zeros(length, dtype=bool)
    is_cryptic[gene.cryptic_donors] = is_cryptic[gene.cryptic_acceptors] = True
    cryptic = _pick(rng, is_cryptic & ~taken, n_decoy)
    taken[cryptic] = True
    dinucleotide = _gt_starts(gene.sequence) | _ag_ends(gene.sequence)
    decoys = _pick(rng, dinucleotide & in_body & ~taken, n_decoy - cryptic.size)
    taken[decoys] = True
    far = _pick(rng, in_body & ~near_zone & ~taken, n_far)

    positions = np.concatenate((gene.donors, gene.acceptors, near, cryptic, decoys, far))
    labels = np.concatenate((
        np.full(gene.donors.size, _DONOR, np.int8),
        np.full(gene.acceptors.size, _ACCEPTOR, np.int8),
        np.full(positions.size - sites.size, _NEITHER, np.int8),
    ))
    order = np.argsort(positions)
    return positions[order], labels[order]


def _kmer_counts(spec: SyntheticSpec, sequence: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(rows, windows * sum(4^k)) k-mer counts from prefix sums of one-hot k-mer codes."""
    length = sequence.size
    widths = [4**k for k in spec.kmer_sizes]
    column_offsets = np.cumsum([0] + widths[:-1])
    onehot = np.zeros((length, sum(widths)), dtype=np.int32)
    for k, column_offset in zip(spec.kmer_sizes, column_offsets):
        n_starts = length - k + 1
        codes = np.zeros(n_starts, dtype=np.int64)
        for i in range(k):  # base-4 number of the k-mer starting at each index
            codes = codes * 4 + sequence[i : i + n_starts]
        onehot[np.arange(n_starts), column_offset + codes] = 1
    # prefix[i] = counts of k-mers starting before i, so a window is a difference of two rows.
    prefix = np.zeros((length + 1, onehot.shape[1]), dtype=np.int32)
    np.cumsum(onehot, axis=0, out=prefix[1:])
    return np.hstack([prefix[positions + end] - prefix[positions + start] for start, end in spec.windows])


def _scores(labels: np.ndarray, positions: np.ndarray, gene: SimulatedGene, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Noisy base-model donor/acceptor scores in (0, 1); cryptic sites fool the base model a little."""
    columns = []
    for class_index, cryptic in ((_DONOR, gene.cryptic_donors), (_ACCEPTOR, gene.cryptic_acceptors)):
        logit = (
            _SCORE_SHIFT * (labels == class_index)
            + _SCORE_CRYPTIC_SHIFT * np.isin(positions, cryptic)
            + rng.normal(0.0, noise, labels.size)
            - _SCORE_OFFSET
        )
        columns.append(1.0 / (1.0 + np.exp(-np.clip(logit, -_LOGIT_CLIP, _LOGIT_CLIP))))
    return np.column_stack(columns)


def _gene_rows(spec: SyntheticSpec, gene_index: int) -> tuple[SimulatedGene, np.ndarray, np.ndarray, np.ndarray]:
    """(gene, sequence positions, class codes, float32 features) of one gene's rows."""
    gene = simulate_gene(spec, gene_index)
    # A separate stream from the sequence's, so sampling changes never alter the sequence.
    rng = np.random.default_rng([spec.seed, gene_index, 1])
    positions, labels = _sample_rows(spec, gene, rng)
    n_kmer = len(spec.windows) * sum(4**k for k in spec.kmer_sizes)
    features = np.empty((positions.size, n_kmer + len(SCORE_COLUMNS)), dtype=np.float32)
    features[:, :n_kmer] = _kmer_counts(spec, gene.sequence, positions)
    features[:, n_kmer:] = _scores(labels, positions, gene, spec.score_noise, rng)
    return gene, positions, labels, features


def _schema(spec: SyntheticSpec) -> pa.Schema:
    id_types = (pa.string(), pa.string(), pa.string(), pa.string(), pa.int64(), pa.string())
    id_fields = [pa.field(name, arrow_type) for name, arrow_type in zip(ID_COLUMNS, id_types)]
    return pa.schema(id_fields + [pa.field(name, pa.float32()) for name in spec.feature_columns()])


def _shard_table(spec: SyntheticSpec, gene_indices: range) -> pa.Table:
    """All rows of the given genes, sorted by gene then position, as one Arrow table."""
    genes, positions, labels, features = [], [], [], []
    for gene_index in gene_indices:
        gene, gene_positions, gene_labels, gene_features = _gene_rows(spec, gene_index)
        genes.append(gene)
        positions.append(gene.genomic_start + gene_positions)
        labels.append(gene_labels)
        features.append(gene_features)
    row_gene = pa.array(np.repeat(np.arange(len(genes)), [p.size for p in positions]))
    per_gene = {
        "gene_id": [g.gene_id for g in genes],
        "transcript_id": [f"{g.gene_id}.1" for g in genes],
        "chrom": [g.chrom for g in genes],
        "strand": [g.strand for g in genes],
    }
    columns = [pa.array(values, pa.string()).take(row_gene) for values in per_gene.values()]
    columns.append(pa.array(np.concatenate(positions), pa.int64()))
    columns.append(pa.array(LABELS, pa.string()).take(pa.array(np.concatenate(labels))))
    # Feature-major copy so each column is one contiguous float32 buffer (zero-copy to Arrow).
    by_feature = np.ascontiguousarray(np.concatenate(features).T)
    columns.extend(pa.array(column) for column in by_feature)
    return pa.Table.from_arrays(columns, schema=_schema(spec))


def _reusable(out_dir: Path, spec: SyntheticSpec) -> list[Path] | None:
    """Shard paths of a complete earlier run of the same spec and generator, else None."""
    spec_path = out_dir / SPEC_FILE
    if not spec_path.exists():
        return None
    try:
        stored = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if {k: v for k, v in stored.items() if k not in ("rows", "shards")} != spec.to_dict():
        return None
    shards = [out_dir / name for name in stored.get("shards", [])]
    return shards if shards and all(p.is_file() for p in shards) else None


def generate_dataset(
    out_dir: str | Path,
    spec: SyntheticSpec = SyntheticSpec(),
    *,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``out_dir/part-00000.parquet ...`` plus ``out_dir/_spec.json``; return the shard paths.

    Shards hold ``spec.genes_per_shard`` whole genes each, in gene order, rows sorted by
    gene then position. Each shard is written to a hidden temporary file and renamed into
    place; ``_spec.json`` (``spec.to_dict()`` plus ``rows`` and ``shards``) is written last,
    so an interrupted run is never mistaken for a complete one. If ``_spec.json`` matches
    this spec and every shard exists, the shards are reused as they are. Shard files of an
    earlier, different spec are removed so the folder only holds this dataset.
    ``progress(msg)`` is called once per shard written (or once when reusing).
    """
    out_dir = Path(out_dir)
    reused = _reusable(out_dir, spec)
    if reused is not None:
        if progress:
            progress(f"reusing {len(reused)} synthetic shards in {out_dir}")
        return reused

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC_FILE).unlink(missing_ok=True)
    n_shards = math.ceil(spec.n_genes / spec.genes_per_shard)
    shards, rows = [], 0
    for shard_index in range(n_shards):
        first = shard_index * spec.genes_per_shard
        genes = range(first, min(first + spec.genes_per_shard, spec.n_genes))
        table = _shard_table(spec, genes)
        path = out_dir / _SHARD_NAME.format(shard_index)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, row_group_size=spec.row_group_rows, compression="zstd")
        rows += table.num_rows
        shards.append(path)
        del table  # only one shard's rows in memory at a time
        if progress:
            progress(
                f"synthetic shard {shard_index + 1}/{n_shards} written ({gene_id_for(spec, genes[0])}.."
                f"{gene_id_for(spec, genes[-1])}), {rows:,} rows so far"
            )
    current = {p.name for p in shards}
    for stale in out_dir.glob("part-*.parquet"):
        if stale.name not in current:
            stale.unlink()
    write_json(out_dir / SPEC_FILE, {**spec.to_dict(), "rows": rows, "shards": sorted(current)})
    return shards


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m memopt_pipeline.core.data.synthetic OUT_DIR [--genes N] [--seed S] ...``."""
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(
        prog="python -m memopt_pipeline.core.data.synthetic",
        description="Generate the synthetic splice-site dataset as gene-sorted Parquet shards.",
    )
    parser.add_argument("out_dir", help="folder for part-*.parquet and _spec.json")
    parser.add_argument("--genes", type=int, default=defaults.n_genes, help="number of genes (~70 rows each)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--kmer-sizes", default=",".join(map(str, defaults.kmer_sizes)), help="comma-separated k values, e.g. 1,2,3"
    )
    parser.add_argument("--genes-per-shard", type=int, default=defaults.genes_per_shard)
    parser.add_argument(
        "--mean-exons", type=int, default=defaults.mean_exons, help="exons per gene; rows per gene grow ~14x this"
    )
    args = parser.parse_args(argv)
    try:
        kmer_sizes = tuple(int(k) for k in args.kmer_sizes.split(","))
        spec = SyntheticSpec(
            n_genes=args.genes,
            seed=args.seed,
            kmer_sizes=kmer_sizes,
            genes_per_shard=args.genes_per_shard,
            mean_exons=args.mean_exons,
        )
    except ValueError as error:
        parser.error(str(error))
    shards = generate_dataset(args.out_dir, spec, progress=print)
    total = 0
    for shard in shards:
        rows = pq.ParquetFile(shard).metadata.num_rows
        total += rows
        print(f"{shard}  {rows:,} rows")
    print(f"{len(shards)} shards, {total:,} rows x {len(spec.feature_columns())} features in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
