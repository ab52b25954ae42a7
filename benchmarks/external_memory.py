"""XGBoost external memory against the in-memory QuantileDMatrix: seconds per round, peak RSS, quality.

    python -m memopt_pipeline.core.data.synthetic /tmp/bench2m --genes 8000 --mean-exons 20
    python benchmarks/external_memory.py --data /tmp/bench2m --genes 1600 --rounds 20

The same rows for every variant: ``--genes`` training genes of the pipeline's gene split
(holdout 0.2, seed 0), bin edges from one seeded sample (``bin_reference``, as the pipeline's
instances), ``--rounds`` rounds without early stopping, the pipeline's XGBoost parameters; each
variant in its own child process, one after the other:

- ``in_memory``: ``QuantileDMatrix`` (leaf-wise growth, ``grow_policy=lossguide``, 31 leaves);
- ``extmem_before``: ``ExtMemQuantileDMatrix`` as the pipeline ran it before: one cached page
  per reader batch (a batch never spans row groups: about 13k rows here);
- ``extmem_depthwise``: as before, but depth-wise growth (depth 5, at most 31 leaves), which
  XGBoost's external-memory guide recommends;
- ``extmem_after``: leaf-wise as in memory, pages of ``--page-rows`` rows (what the plan gives
  a budget with room for them), as the pipeline runs it now.

Printed per variant: matrix construction seconds, training seconds per round, the child's
peak RSS (``ru_maxrss`` from ``os.wait4``), pages handed to XGBoost and the holdout logloss
(1,600 holdout genes). Run it alone: with 2 cores, any other busy process skews the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("in_memory", "extmem_before", "extmem_depthwise", "extmem_after")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder (e.g. made by memopt_pipeline.core.data.synthetic)")
    parser.add_argument("--genes", type=int, default=1600, help="training genes (default 1600: about 430k rows here)")
    parser.add_argument("--rounds", type=int, default=20, help="boosting rounds (default 20)")
    parser.add_argument("--page-rows", type=int, default=262_144, help="rows per page of extmem_after (default 262,144)")
    parser.add_argument("--batch-rows", type=int, default=65_536, help="reader batch rows (default 65,536)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _setup(args):
    from memopt_pipeline.core.data.batch_reader import BatchReader
    from memopt_pipeline.core.data.dataset import list_shards, scan_dataset
    from memopt_pipeline.core.data.sampling import split_genes
    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN

    scratch = tempfile.mkdtemp(prefix="extmem-bench-")
    metadata = scan_dataset(list_shards(args.data), gene_column=GENE_COLUMN, label_column=LABEL_COLUMN,
                            gene_stats_path=Path(scratch) / "gene_stats.parquet")
    split = split_genes(metadata.read_gene_stats(), holdout_fraction=0.2, seed=0)
    return BatchReader(metadata), split.train_genes[: args.genes], split.holdout_genes, scratch


def child(args) -> dict:
    import numpy as np
    import xgboost
    from sklearn.metrics import log_loss

    from memopt_pipeline.core.train import xgboost_backend as xb
    from memopt_pipeline.core.train.instance import BoostingParams
    from memopt_pipeline.core.train.xgboost_model import predict_proba_xgboost, xgboost_params

    reader, genes, holdout_genes, scratch = _setup(args)
    params = BoostingParams()
    external = args.child != "in_memory"
    xgb_params = xgboost_params(params, n_classes=reader.metadata.n_classes, device="cpu")
    if args.child == "extmem_depthwise":
        # XGBoost's external-memory guide recommends depth-wise growth: 31 leaves -> depth 5.
        xgb_params.update(grow_policy="depthwise", max_depth=5)
    built = []

    class CountingIter(xb.ReaderIter):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    xb.ReaderIter = CountingIter
    reference = xb.bin_reference(reader, genes, bin_sample_rows=50_000, seed=0, max_bin=params.max_bin)
    started = time.monotonic()
    matrix = xb.build_dmatrix(
        reader, genes, batch_rows=args.batch_rows, max_bin=params.max_bin, ref=reference,
        external_memory_dir=Path(scratch) / "cache" if external else None,
        page_rows=args.page_rows if args.child == "extmem_after" else None,
    )  # fmt: skip
    build_s = time.monotonic() - started
    started = time.monotonic()
    booster = xgboost.train(xgb_params, matrix, num_boost_round=args.rounds)
    train_s = time.monotonic() - started
    rows = matrix.num_row()
    del matrix
    labels, proba = [], []
    for batch in reader.iter_batches(holdout_genes, args.batch_rows):
        labels.append(batch.labels)
        proba.append(predict_proba_xgboost(booster, batch.features))
    labels, proba = np.concatenate(labels), np.concatenate(proba)
    return {
        "rows": rows, "build_s": build_s, "s_per_round": train_s / args.rounds,
        "pages": max(it.pages_last_read for it in built), "holdout_logloss": float(log_loss(labels, proba, labels=[0, 1, 2])),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        Path(args.out).write_text(json.dumps(child(args)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        command = [sys.executable, __file__, "--child", variant, "--out", str(out), "--data", args.data,
                   "--genes", str(args.genes), "--rounds", str(args.rounds), "--page-rows", str(args.page_rows),
                   "--batch-rows", str(args.batch_rows)]
        started = time.monotonic()
        process = subprocess.Popen(command)
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            print(f"{variant}: failed with status {status}", file=sys.stderr)
            return 1
        result = json.loads(out.read_text())
        result.update(variant=variant, wall_s=time.monotonic() - started, peak_gb=usage.ru_maxrss * 1024 / 1024**3)
        rows.append(result)
        print(f"{variant}: {json.dumps(result)}", flush=True)
    base = next((r for r in rows if r["variant"] == "in_memory"), None)
    print(f"\n{rows[0]['rows']:,} training rows x 338 features, {args.rounds} rounds\n")
    print("| variant | pages | build s | s/round | vs in memory | peak RSS GB | holdout logloss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['s_per_round'] / base['s_per_round']:.2f}x" if base else ""
        print(f"| {r['variant']} | {r['pages']} | {r['build_s']:.1f} | {r['s_per_round']:.2f} | {ratio} | "
              f"{r['peak_gb']:.2f} | {r['holdout_logloss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
