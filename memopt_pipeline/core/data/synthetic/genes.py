"""One simulated gene (sequence, exons, splice sites) and its rows: positions, labels, features.

Sequences are random DNA with an exon/intron structure and weak consensus motifs around the
true sites; "neither" rows include hard negatives (near a site, on GT/AG decoys, on planted
cryptic sites). Each gene draws from generators seeded by ``(seed, gene_index)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memopt_pipeline.core.data.synthetic.spec import (
    ACCEPTOR,
    BASES,
    DONOR,
    NEITHER,
    SCORE_COLUMNS,
    SyntheticSpec,
)

_CODE = {base: code for code, base in enumerate(BASES)}

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
        np.full(gene.donors.size, DONOR, np.int8),
        np.full(gene.acceptors.size, ACCEPTOR, np.int8),
        np.full(positions.size - sites.size, NEITHER, np.int8),
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
    for class_index, cryptic in ((DONOR, gene.cryptic_donors), (ACCEPTOR, gene.cryptic_acceptors)):
        logit = (
            _SCORE_SHIFT * (labels == class_index)
            + _SCORE_CRYPTIC_SHIFT * np.isin(positions, cryptic)
            + rng.normal(0.0, noise, labels.size)
            - _SCORE_OFFSET
        )
        columns.append(1.0 / (1.0 + np.exp(-np.clip(logit, -_LOGIT_CLIP, _LOGIT_CLIP))))
    return np.column_stack(columns)


def gene_rows(spec: SyntheticSpec, gene_index: int) -> tuple[SimulatedGene, np.ndarray, np.ndarray, np.ndarray]:
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

