"""Training rounds beside one CPU-bound process: how much slower than alone.

    python -m memopt_pipeline.core.data.synthetic /tmp/bench2m --genes 8000 --mean-exons 20
    python benchmarks/contention.py --data /tmp/bench2m

One LightGBM model (the pipeline's parameters and default threads: the CPUs this process may
use) and one XGBoost model on ``--genes`` genes held in memory, ``--rounds`` rounds each,
timed per round in a child process: alone, then beside one busy process (a Python loop that
never sleeps, as another user's job would be). Each with ``OMP_WAIT_POLICY=ACTIVE`` (threads
spin between parallel regions; libgomp's default spins for a while, then sleeps) and
``PASSIVE``, which the pipeline sets (``memopt_pipeline/__init__.py``) unless the environment
already chose one. Run it on an otherwise idle machine.
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--genes", type=int, default=800, help="genes held in memory (default 800: about 210k rows)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args) -> dict:
    import lightgbm as lgb
    import numpy as np
    import xgboost

    from memopt_pipeline.core.data.batch_reader import BatchReader
    from memopt_pipeline.core.data.dataset import list_shards, scan_dataset
    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN
    from memopt_pipeline.core.train.instance import BoostingParams
    from memopt_pipeline.core.train.lightgbm_backend import lightgbm_params
    from memopt_pipeline.core.train.xgboost_model import xgboost_params

    metadata = scan_dataset(list_shards(args.data), gene_column=GENE_COLUMN, label_column=LABEL_COLUMN,
                            gene_stats_path=Path(tempfile.mkdtemp()) / "gene_stats.parquet")
    genes = sorted(metadata.read_gene_stats()["gene"].to_list())[: args.genes]
    batches = list(BatchReader(metadata).iter_batches(genes, 65_536))
    features = np.concatenate([b.features for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    params = BoostingParams()
    result = {"rows": len(labels), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}

    lgb_params = lightgbm_params(params, n_classes=3, bin_sample_rows=200_000)
    dataset = lgb.Dataset(features, label=labels, params=lgb_params).construct()
    started = time.monotonic()
    lgb.train(lgb_params, dataset, num_boost_round=args.rounds)
    result["lightgbm_s_per_round"] = (time.monotonic() - started) / args.rounds

    matrix = xgboost.QuantileDMatrix(features, label=labels, max_bin=params.max_bin)
    started = time.monotonic()
    xgboost.train(xgboost_params(params, n_classes=3, device="cpu"), matrix, num_boost_round=args.rounds)
    result["xgboost_s_per_round"] = (time.monotonic() - started) / args.rounds
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        Path(args.out).write_text(json.dumps(child(args)))
        return 0
    rows = []
    for policy in ("ACTIVE", "PASSIVE"):
        for busy in (False, True):
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                out = Path(tempfile.mkstemp(suffix=".json")[1])
                subprocess.run([sys.executable, __file__, "--child", "--out", str(out), "--data", args.data,
                                "--genes", str(args.genes), "--rounds", str(args.rounds)], env=env, check=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            row = {**json.loads(out.read_text()), "busy": busy}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{rows[0]['rows']:,} rows x 338 features in memory, {args.rounds} rounds, {os.cpu_count()} CPUs\n")
    print("| OMP_WAIT_POLICY | beside a busy process | LightGBM s/round | vs alone | XGBoost s/round | vs alone |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        alone = next(r for r in rows if r["omp_wait_policy"] == row["omp_wait_policy"] and not r["busy"])
        print(f"| {row['omp_wait_policy']} | {'yes' if row['busy'] else 'no'} | {row['lightgbm_s_per_round']:.3f} | "
              f"{row['lightgbm_s_per_round'] / alone['lightgbm_s_per_round']:.1f}x | {row['xgboost_s_per_round']:.3f} | "
              f"{row['xgboost_s_per_round'] / alone['xgboost_s_per_round']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
