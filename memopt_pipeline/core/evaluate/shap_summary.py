"""Chunked native SHAP: mean |contribution| per feature and class, bounded by the chunk size.

Which rows: a seeded sample of the holdout stratified by class and spread over genes
(:mod:`memopt_pipeline.core.data.stratified_sample`), drawn in one pass, so donors and acceptors
are explained as well as "neither", and genes from the whole sorted gene list.

What is explained: each member's raw margin (LightGBM/XGBoost native TreeSHAP, before the
softmax or the per-class sigmoid, before calibration), averaged over the members with the
ensemble's weights; the additivity check verifies exactly that (contributions + bias = the
weighted mean margin). It is not the ensemble's output, which averages calibrated
probabilities: no margin maps to it. :func:`explained_quantity` says so in words, and names
the members' objectives (softmax margins are logits up to a per-row constant, one-vs-rest
margins are per-class log-odds; a mean over both mixes the two units).

LightGBM's own ``pred_contrib`` (TreeSHAP in C++) is used rather than shap.TreeExplainer:
it is exact for the model, needs no model conversion, and its memory is proportional to
the chunk (rows x classes x (features + 1) doubles). Each chunk is reduced at once, so
memory does not grow with the sample:

- running sums of |contribution| per class and feature (global importance);
- a fixed-size, seeded uniform sample of rows (reservoir sampling, algorithm R) keeping
  their feature values and contributions, for a beeswarm plot;
- optionally, one Parquet row per explained row, appended chunk by chunk (see
  :func:`_row_table` for what it holds and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import pyarrow as pa

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.stratified_sample import SamplePlan, stratified_sample
from memopt_pipeline.core.evaluate.ensemble import Ensemble
from memopt_pipeline.core.storage import IncrementalParquetWriter

DEFAULT_RESERVOIR_ROWS = 1_000
DEFAULT_ROW_TOP_K = 3


def reservoir_bytes(rows: int, n_features: int, n_classes: int) -> int:
    """Memory of a :class:`ShapReservoir` of ``rows`` rows: float32 values and contributions."""
    return rows * n_features * (n_classes + 1) * 4 + rows * 12


class ShapReservoir:
    """A uniform random sample of at most ``capacity`` explained rows, whatever the number offered.

    Algorithm R (Vitter): the first ``capacity`` rows fill the reservoir; row ``i`` (0-based)
    after that replaces a uniformly chosen slot with probability ``capacity / (i + 1)``. Every
    row offered ends up in the sample with the same probability, so rows of the last chunks
    are as likely as rows of the first. Memory is ``capacity x features x (classes + 1)``
    float32, fixed when the reservoir is made.
    """

    def __init__(self, capacity: int, n_features: int, n_classes: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.values = np.empty((capacity, n_features), dtype=np.float32)
        self.contributions = np.empty((capacity, n_classes, n_features), dtype=np.float32)
        self.row_index = np.empty(capacity, dtype=np.int64)  # position in the explained sample
        self.labels = np.empty(capacity, dtype=np.int32)
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    @property
    def size(self) -> int:
        return min(self.seen, self.capacity)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """Feature values (size, features) and contributions (size, classes, features) kept."""
        return self.values[: self.size], self.contributions[: self.size]

    def offer(self, values: np.ndarray, contributions: np.ndarray, labels: np.ndarray) -> None:
        """Offer a chunk of rows: ``values`` (rows, features), ``contributions`` (rows, classes,
        features) without the bias, ``labels`` (rows,)."""
        n = len(values)
        index = np.arange(self.seen, self.seen + n, dtype=np.int64)
        fill = int(min(max(self.capacity - self.seen, 0), n))
        # Fill phase: row i goes to slot i.
        self._store(index[:fill], np.arange(fill), values, contributions, labels, index)
        if fill < n:
            # Replacement phase, vectorised: one draw j ~ U{0..i} per row, kept if j < capacity.
            draws = self._rng.integers(0, index[fill:] + 1)
            kept = np.nonzero(draws < self.capacity)[0]
            slots, rows = draws[kept], fill + kept
            # Sequentially, a later row that draws the same slot overwrites an earlier one:
            # keep only the last row per slot so the result equals the one-row-at-a-time algorithm.
            _, last_reversed = np.unique(slots[::-1], return_index=True)
            last = len(slots) - 1 - last_reversed
            self._store(slots[last], rows[last], values, contributions, labels, index)
        self.seen += n

    def _store(self, slots, rows, values, contributions, labels, index) -> None:
        self.values[slots] = values[rows]
        self.contributions[slots] = contributions[rows]
        self.row_index[slots] = index[rows]
        self.labels[slots] = labels[rows]

    def table(self, features: list[str], classes: list, feature_indices: list[int] | np.ndarray) -> pa.Table:
        """The sample as Arrow, for the chosen features: ``row_index``, ``label``, then per feature
        its value and one contribution per class (``shap_<class>__<feature>``), in sample order."""
        order = np.argsort(self.row_index[: self.size], kind="stable")
        columns: dict[str, np.ndarray] = {"row_index": self.row_index[order], "label": self.labels[order]}
        for j in feature_indices:
            columns[features[j]] = self.values[order, j]
            for c, name in enumerate(classes):
                columns[f"shap_{name}__{features[j]}"] = self.contributions[order, c, j]
        return pa.table(columns)


@dataclass
class ShapSummary:
    features: list[str]
    classes: list
    mean_abs: np.ndarray  # (classes, features)
    rows: int
    chunks: int
    additivity_max_error: float  # |sum of contributions - explained margin|, max over checked rows
    reservoir: ShapReservoir
    rows_path: Path | None = None  # per-row Parquet (see _row_table), when requested
    explained: dict | None = None  # what the contributions explain (explained_quantity)
    genes: int = 0  # distinct genes in the sample
    rows_per_class: dict | None = None  # class -> rows in the sample
    plan: SamplePlan | None = None  # the sample's rule: rows per class, per-gene caps
    additivity_rows: int = 0  # rows the additivity check covered

    def top_features(self, k: int = 10) -> list[tuple[str, float]]:
        overall = self.mean_abs.mean(axis=0)
        order = np.argsort(-overall)[:k]
        return [(self.features[i], float(overall[i])) for i in order]

    def top_feature_indices(self, k: int = 10) -> list[int]:
        return [int(i) for i in np.argsort(-self.mean_abs.mean(axis=0))[:k]]


def _row_table(
    ids: pa.Table | None,
    labels: np.ndarray,
    contributions: np.ndarray,
    features: pa.Array,
    classes: list,
    top_k: int,
) -> pa.Table:
    """One row per explained row: ids, label, then per class the raw score and the ``top_k``
    features with the largest |contribution| and their contributions.

    Why this and not all contributions: all of them are rows x classes x features, as big as
    the data itself, while these answer the per-row question ("why was this position called a
    donor?") and grow with rows x classes x top_k only. Per-feature aggregates are in the
    summary, per-feature distributions in the reservoir. Feature names are dictionary-encoded
    indices into ``features``, so the strings cost nothing per row.
    """
    table = ids if ids is not None else pa.table({})
    table = table.append_column("label", pa.array(labels, type=pa.int32()))
    rows = len(labels)
    for c, name in enumerate(classes):
        per_class = contributions[:, c, :]
        table = table.append_column(f"raw_{name}", pa.array(per_class.sum(axis=1).astype(np.float32)))
        magnitude = np.abs(per_class[:, :-1])
        top = np.argpartition(-magnitude, top_k - 1, axis=1)[:, :top_k]
        # argpartition leaves the top k unordered: order them by |contribution|, largest first.
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(magnitude, top, axis=1), axis=1), axis=1)
        for r in range(top_k):
            table = table.append_column(
                f"top{r + 1}_feature_{name}", pa.DictionaryArray.from_arrays(pa.array(top[:, r].astype(np.int32)), features)
            )
            table = table.append_column(
                f"top{r + 1}_shap_{name}", pa.array(per_class[np.arange(rows), top[:, r]].astype(np.float32))
            )
    return table


def explained_quantity(ensemble: Ensemble) -> dict:
    """What the ensemble's contributions explain, in words and per member (loads each member once
    when the ensemble keeps none loaded)."""
    members = [
        {"partition": member.partition, "format": model.kind, "objective": model.objective, "weight": weight}
        for weight, member, model in ensemble.iter_members()
    ]
    objectives = sorted({m["objective"] for m in members})
    units = {"softmax": "softmax logits (up to a per-row constant)", "ovr": "one-vs-rest per-class log-odds"}
    if len(members) == 1:
        only = members[0]
        subject = f"the raw margin of the one member {only['partition']} ({only['format']}, {only['objective']})"
        output = (
            "The output probabilities are this margin through the softmax or the per-class sigmoids, rows "
            "renormalised, then the member's calibration"
        )
    else:
        subject = f"the weighted mean of the raw margins of its {len(members)} members (the ensemble's weights)"
        output = (
            "The output probabilities are the weighted mean of each member's calibrated probabilities, which "
            "is not a function of the mean margin"
        )
    text = (
        f"SHAP explains {subject}, per class, before calibration: "
        + " and ".join(units.get(o, o) for o in objectives)
        + (" averaged together, two different units" if len(objectives) > 1 else "")
        + f". {output}: the contributions add up to the explained margin, not to the output probabilities."
    )
    return {"text": text, "members": members, "mixed_objectives": len(objectives) > 1}


def chunked_shap(
    ensemble: Ensemble,
    reader: BatchReader,
    genes: Collection[str],
    *,
    sample_rows: int,
    chunk_rows: int,
    additivity_rows: int = 5,
    reservoir_rows: int = DEFAULT_RESERVOIR_ROWS,
    seed: int = 0,
    rows_path: str | Path | None = None,
    row_top_k: int = DEFAULT_ROW_TOP_K,
    log: Callable[[str], None] = lambda message: None,
) -> ShapSummary:
    """Contributions for a stratified sample of ``sample_rows`` rows of ``genes`` (see the module
    docstring; seeded by ``seed``), in chunks of at most ``chunk_rows``.

    Memory is the sample's features (at most ``sample_rows`` rows, see
    :func:`stratified_sample.sample_bytes`), one chunk of contributions and the fixed-size
    reservoir; with ``rows_path`` the per-row table is appended to that Parquet file chunk by
    chunk (it appears whole, atomically, at the end; on failure the previous file stays).
    """
    metadata = reader.metadata
    classes = list(metadata.classes)
    n_features = len(reader.features)
    sums = np.zeros((len(classes), n_features), dtype=np.float64)
    reservoir = ShapReservoir(min(reservoir_rows, sample_rows), n_features, len(classes), seed=seed)
    feature_dictionary = pa.array(reader.features, type=pa.string())
    top_k = min(row_top_k, n_features)
    writer: IncrementalParquetWriter | None = None
    rows = chunks = 0
    additivity_error = 0.0
    sample = stratified_sample(reader, genes, sample_rows, seed=seed, batch_rows=chunk_rows, purpose="shap")
    rows_per_class = dict(zip(map(str, classes), sample.class_counts(len(classes))))
    log(
        f"shap: sample of {len(sample):,} rows from {len(set(sample.genes)):,} of {len(genes):,} genes, rows per class "
        + ", ".join(f"{c} {n:,}" for c, n in rows_per_class.items())
    )
    # Additivity rows spread over the sample (it is in gene order), so every class is likely checked.
    checked = np.unique(np.linspace(0, len(sample) - 1, min(additivity_rows, len(sample))).astype(np.int64))
    if ensemble.one_at_a_time:
        # Contributions must be averaged over members per row before |x| is taken, so members
        # cannot be looped outermost as holdout prediction does without keeping every row's
        # contributions; instead each chunk loads every member. Fine for the small SHAP sample.
        log(f"shap: models are loaded one at a time, once per chunk ({len(ensemble.members)} per chunk)")
    try:
        for start in range(0, len(sample), chunk_rows):
            features = sample.features[start : start + chunk_rows]
            labels = sample.labels[start : start + chunk_rows]
            contributions = ensemble.predict_contributions(features)
            local = checked[(checked >= start) & (checked < start + len(features))] - start
            if len(local):
                # Additivity: per class, contributions plus bias must equal the explained margin.
                raw = ensemble.predict_raw(features[local])
                additivity_error = max(additivity_error, float(np.abs(contributions[local].sum(axis=2) - raw).max()))
            # One class at a time keeps the |x| temporary at rows x features, not x classes.
            for c in range(len(classes)):
                sums[c] += np.abs(contributions[:, c, :-1]).sum(axis=0)
            reservoir.offer(features, contributions[:, :, :-1], labels)
            if rows_path is not None:
                ids = sample.ids.slice(start, len(features))
                table = _row_table(ids, labels, contributions, feature_dictionary, classes, top_k)
                if writer is None:
                    writer = IncrementalParquetWriter(rows_path, table.schema)
                writer.write(table)
            rows += len(features)
            chunks += 1
            del contributions
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if rows == 0:
        raise ValueError("no holdout rows to explain; check gene_split")
    written = writer.close() if writer is not None else None
    log(
        f"shap: {rows:,} rows in {chunks} chunks, additivity error {additivity_error:.2e}, "
        f"{reservoir.size:,} rows kept for the beeswarm"
    )
    return ShapSummary(
        features=list(reader.features),
        classes=classes,
        mean_abs=sums / rows,
        rows=rows,
        chunks=chunks,
        additivity_max_error=additivity_error,
        reservoir=reservoir,
        rows_path=written,
        explained=explained_quantity(ensemble),
        genes=len(set(sample.genes)),
        rows_per_class=rows_per_class,
        plan=sample.plan,
        additivity_rows=len(checked),
    )
