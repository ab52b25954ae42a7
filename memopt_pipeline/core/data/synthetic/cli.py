"""``python -m memopt_pipeline.core.data.synthetic OUT_DIR``: generate the dataset from the command line."""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq

from memopt_pipeline.core.data.synthetic.shards import generate_dataset
from memopt_pipeline.core.data.synthetic.spec import SyntheticSpec


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

