"""Dataset discovery and metadata from Parquet footers plus the gene and label columns only.

Feature columns are never materialised here: the footer gives the schema, row counts and
sizes; the only column data read are the gene and label columns, streamed batch by batch
into per-gene class counts. Everything later (planner, splits, folds) works from these
per-gene aggregates rather than from rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

# Canonical order of splice-site labels: when a dataset's labels are exactly these, class
# indices follow this order (0 = neither) rather than alphabetical order.
SPLICE_LABEL_ORDER = ("neither", "donor", "acceptor")

# Numeric columns that identify a row rather than describe it; never used as features.
ID_LIKE_COLUMNS = frozenset({"position", "pos", "start", "end", "row_id", "index", "__index_level_0__"})

_METADATA_SCAN_BATCH_ROWS = 262_144


class DatasetError(ValueError):
    """The input data cannot be used as given; the message names the file, column and fix."""


@dataclass
class ShardInfo:
    path: str
    rows: int
    disk_bytes: int
    row_groups: int
    missing_features: list[str] = field(default_factory=list)


@dataclass
class DatasetMetadata:
    """What every later stage needs to know about the dataset, without its rows."""

    shards: list[ShardInfo]
    gene_column: str
    label_column: str
    classes: list  # label values in class-index order (str or int, as stored)
    features: list[str]
    excluded_columns: dict[str, str]  # column -> why it is not a feature
    n_rows: int
    n_genes: int
    class_counts: list[int]
    disk_bytes: int
    gene_stats_path: str  # Parquet: gene, rows, n_class_0..n_class_{C-1}

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def raw_float32_bytes(self) -> int:
        """Size of the whole feature matrix as float32: what a naive loader would allocate."""
        return self.n_rows * self.n_features * 4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> "DatasetMetadata":
        payload = dict(payload)
        payload["shards"] = [ShardInfo(**s) for s in payload["shards"]]
        return cls(**payload)

    def read_gene_stats(self) -> pl.DataFrame:
        return pl.read_parquet(self.gene_stats_path)


def class_count_columns(n_classes: int) -> list[str]:
    return [f"n_class_{i}" for i in range(n_classes)]


def list_shards(path: str | Path) -> list[Path]:
    """Parquet files of a dataset: one file, or every ``*.parquet`` under a folder, sorted.

    Files whose name starts with ``_`` or ``.`` (sidecars, temporary files) are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset path {path} does not exist; set dataset path to a Parquet file or folder")
    if path.is_file():
        if path.suffix != ".parquet":
            raise DatasetError(f"{path} is not a .parquet file; convert it to Parquet or point at a folder of shards")
        return [path]
    shards = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(("_", ".")))
    if not shards:
        raise DatasetError(f"no *.parquet files under {path}; point the dataset path at a folder of Parquet shards")
    return shards


def _is_numeric(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type)


def _open_shard(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged footer
        raise DatasetError(f"{path} is not a readable Parquet file ({exc}); re-export or remove this shard") from exc


def order_classes(values: Sequence) -> list:
    """Class-index order for the observed label values (splice order when it applies)."""
    values = list(values)
    if set(values) == set(SPLICE_LABEL_ORDER):
        return list(SPLICE_LABEL_ORDER)
    return sorted(values)


def scan_dataset(
    shards: Sequence[str | Path],
    *,
    gene_column: str,
    label_column: str,
    gene_stats_path: str | Path,
    exclude_columns: Sequence[str] = (),
    write_table: Callable[[Path, pa.Table], object] | None = None,
    progress: Callable[[str], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> DatasetMetadata:
    """Build :class:`DatasetMetadata` for ``shards``, writing per-gene stats to ``gene_stats_path``.

    Raises :class:`DatasetError` for a missing gene/label column, an unreadable or empty
    shard, null labels, a feature whose type conflicts between shards, fewer than two
    classes, or no usable feature column. ``checkpoint`` (the memory guard's cooperative check)
    runs after every batch of gene and label values read and once the per-gene counts are
    merged: the partial counts grow with the number of distinct genes per batch.
    """
    from memopt_pipeline.core.storage import write_parquet

    write_table = write_table or write_parquet
    shard_paths = [Path(s) for s in shards]
    excluded: dict[str, str] = {gene_column: "gene column", label_column: "label column"}
    for name in exclude_columns:
        excluded[name] = "excluded by configuration"

    feature_types: dict[str, tuple[pa.DataType, Path]] = {}
    shard_columns: list[set[str]] = []
    shard_infos: list[ShardInfo] = []
    partial_counts: list[pl.DataFrame] = []

    for index, path in enumerate(shard_paths):
        parquet = _open_shard(path)
        schema = parquet.schema_arrow
        names = set(schema.names)
        for required, role in ((gene_column, "gene"), (label_column, "label")):
            if required not in names:
                raise DatasetError(
                    f"{path}: {role} column {required!r} not found (columns: {sorted(names)[:12]}...); "
                    f"set the {role} column name in the dataset config"
                )
        rows = parquet.metadata.num_rows
        if rows == 0:
            raise DatasetError(f"{path} has no rows; remove the empty shard or re-export it")

        for column in schema:
            if column.name in excluded:
                continue
            if not _is_numeric(column.type):
                excluded[column.name] = f"non-numeric ({column.type})"
                continue
            if column.name.lower() in ID_LIKE_COLUMNS:
                excluded[column.name] = "identifier column"
                continue
            if column.name in feature_types:
                seen_type, seen_path = feature_types[column.name]
                if not _compatible(seen_type, column.type):
                    raise DatasetError(
                        f"column {column.name!r} is {column.type} in {path} but {seen_type} in {seen_path}; "
                        "make the type consistent across shards or exclude the column"
                    )
            else:
                feature_types[column.name] = (column.type, path)
        # A column that is a string in one shard and numeric in another is a conflict too.
        for column in schema:
            if column.name in feature_types and not _is_numeric(column.type):
                raise DatasetError(
                    f"column {column.name!r} is {column.type} in {path} but numeric in "
                    f"{feature_types[column.name][1]}; fix the shard or exclude the column"
                )
        shard_columns.append(names)

        for batch in parquet.iter_batches(batch_size=_METADATA_SCAN_BATCH_ROWS, columns=[gene_column, label_column]):
            frame = pl.from_arrow(batch)
            if frame[label_column].null_count():
                raise DatasetError(
                    f"{path}: {frame[label_column].null_count()} rows have a null {label_column!r}; "
                    "drop or label those rows"
                )
            if frame[gene_column].null_count():
                raise DatasetError(f"{path}: rows with a null {gene_column!r}; every row needs a gene")
            partial_counts.append(
                frame.select(pl.col(gene_column).cast(pl.Utf8).alias("gene"), pl.col(label_column).alias("label"))
                .group_by("gene", "label")
                .len()
            )
            if checkpoint is not None:
                checkpoint()
        shard_infos.append(
            ShardInfo(path=str(path), rows=rows, disk_bytes=path.stat().st_size, row_groups=parquet.num_row_groups)
        )
        if progress:
            progress(f"metadata: shard {index + 1}/{len(shard_paths)} {path.name}: {rows:,} rows")

    features = [name for name in feature_types if name not in excluded]
    if not features:
        raise DatasetError(f"no numeric feature columns found in {shard_paths[0]}; excluded: {excluded}")
    for info, names in zip(shard_infos, shard_columns):
        info.missing_features = [f for f in features if f not in names]

    counts = pl.concat(partial_counts).group_by("gene", "label").agg(pl.col("len").sum())
    if checkpoint is not None:
        checkpoint()
    classes = order_classes(counts["label"].unique().to_list())
    if len(classes) < 2:
        raise DatasetError(
            f"label column {label_column!r} has a single class {classes}; a classifier needs at least two"
        )
    class_index = {value: i for i, value in enumerate(classes)}
    wide = (
        counts.with_columns(pl.col("label").replace_strict(class_index, return_dtype=pl.Int32).alias("class"))
        .pivot(on="class", index="gene", values="len", aggregate_function="sum")
        .fill_null(0)
    )
    count_columns = class_count_columns(len(classes))
    wide = wide.rename({str(i): f"n_class_{i}" for i in range(len(classes)) if str(i) in wide.columns})
    for name in count_columns:
        if name not in wide.columns:
            wide = wide.with_columns(pl.lit(0).alias(name))
    gene_stats = (
        wide.select("gene", *[pl.col(c).cast(pl.Int64) for c in count_columns])
        .with_columns(pl.sum_horizontal(count_columns).alias("rows"))
        .select("gene", "rows", *count_columns)
        .sort("gene")
    )
    write_table(Path(gene_stats_path), gene_stats.to_arrow())

    return DatasetMetadata(
        shards=shard_infos,
        gene_column=gene_column,
        label_column=label_column,
        classes=classes,
        features=features,
        excluded_columns={k: v for k, v in excluded.items()},
        n_rows=int(gene_stats["rows"].sum()),
        n_genes=gene_stats.height,
        class_counts=[int(gene_stats[c].sum()) for c in count_columns],
        disk_bytes=sum(s.disk_bytes for s in shard_infos),
        gene_stats_path=str(gene_stats_path),
    )


def _compatible(a: pa.DataType, b: pa.DataType) -> bool:
    # Integers, floats and booleans all become float32 features; only non-numeric clashes.
    return _is_numeric(a) == _is_numeric(b)
