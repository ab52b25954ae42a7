"""Reading and shaping the dataset, in bounded memory.

Covers: the scan of Parquet footers into :class:`~.dataset.DatasetMetadata` (rows, genes, per-gene
class counts, schema drift), the batch reader every stage streams rows through, CSV ingest into
gene-sorted shards, the synthetic splice-site generator, gene sampling and the holdout split,
gene-aware folds, feature screening and the input fingerprint.

Does not cover: how much memory any of this may use (``core.memory`` plans it and the caller's
monitor enforces it through the check points these readers call) or training.
"""
