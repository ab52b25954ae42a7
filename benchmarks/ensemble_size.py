"""At which number of instances k does the ensemble lose quality against one model on all genes?

    python benchmarks/ensemble_size.py --data DIR --train-rows 2000000 --ks 1,2,4,8

The pipeline splits the training genes into k instances when one model's rows do not fit the
budget, trains one model per instance and averages their probabilities. Fewer rows per model
can cost quality; this measures how much, on the pipeline's own gene split and instance
assignment:

- the pipeline's gene split (holdout 0.2, seed 0) of ``--data``; of its training genes, a seeded
  random subset of about ``--train-rows`` rows (0 = all; the subset keeps k = 1 in memory), and
  of its holdout genes about ``--holdout-rows`` rows;
- for each k: ``assign_instances`` (the pipeline's, overlap 0.1, seed 0) splits those genes into
  k instances; each instance finds its number of rounds by early stopping (20 rounds) on one
  gene fold of its own genes (the pipeline's ``gene_folds``, fold 0 of 3), then is refit on all
  its genes for that many rounds, with the pipeline's LightGBM parameters;
- the ensemble is the plain mean of the members' probabilities (the pipeline's ensemble without
  its per-member calibration, which is the same map for every k and is measured by
  benchmarks/calibration_quality.py); holdout logloss and the splice sites' mean PR-AUC.

Every k uses the same rows, held once in memory (float32), so the table isolates the effect of
splitting. Wall time per k: training and prediction only. Run alone: timings are meaningless
beside another busy process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from in_memory_data import frame_to_arrays, predict, scan_and_split  # noqa: E402
from train_memory import site_pr_auc  # noqa: E402

SUBSET_SEED, FOLD_SEED, INSTANCE_SEED, OVERLAP = 1, 0, 0, 0.1
N_FOLDS, EARLY_STOPPING_ROUNDS = 3, 20
LOSS_LIMIT = 0.005  # the quality rule: an ensemble may cost at most 0.5% holdout logloss


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder (e.g. made by memopt_pipeline.core.data.synthetic)")
    parser.add_argument("--ks", default="1,2,4,8", help="instance counts to compare (default 1,2,4,8)")
    parser.add_argument("--train-rows", type=int, default=2_000_000, help="training rows to use, about (0 = all)")
    parser.add_argument("--holdout-rows", type=int, default=500_000, help="holdout rows to score on, about (0 = all)")
    parser.add_argument("--max-rounds", type=int, default=100, help="most rounds per model (default 100)")
    parser.add_argument("--threads", type=int, default=0, help="threads (default 0: the CPUs this process may use)")
    return parser.parse_args(argv)


def _subset(stats, genes: list[str], target_rows: int, seed: int) -> list[str]:
    """A seeded random subset of ``genes`` holding about ``target_rows`` rows (all when 0 or more than there are)."""
    rows = dict(zip(stats["gene"].to_list(), stats["rows"].to_list()))
    order = np.random.default_rng(seed).permutation(len(genes))
    chosen, total = [], 0
    for index in order:
        if target_rows and total >= target_rows:
            break
        chosen.append(genes[index])
        total += rows[genes[index]]
    return sorted(chosen)


def load(data: Path, train_rows: int, holdout_rows: int):
    """The chosen genes' rows in memory: float32 features, class indices, gene ids; and the gene stats."""
    import polars as pl

    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN

    metadata, stats, split = scan_and_split(data)
    train_genes = _subset(stats, split.train_genes, train_rows, SUBSET_SEED)
    holdout_genes = _subset(stats, split.holdout_genes, holdout_rows, SUBSET_SEED)
    wanted = train_genes + holdout_genes
    frame = (
        pl.scan_parquet([s.path for s in metadata.shards])
        .select([GENE_COLUMN, LABEL_COLUMN, *metadata.features])
        .filter(pl.col(GENE_COLUMN).cast(pl.Utf8).is_in(wanted))
        .collect()
    )
    features, labels, genes, gene_index = frame_to_arrays(frame, metadata, stats)
    del frame
    ids = {name: np.array(sorted(gene_index[g] for g in names), dtype=np.int32)
           for name, names in (("train", train_genes), ("holdout", holdout_genes))}
    return features, labels, genes, metadata, stats.filter(pl.col("gene").is_in(train_genes)), ids, gene_index


def ensemble(k: int, features, labels, genes, train_stats, gene_index, holdout_rows, n_classes: int, args) -> dict:
    """k instances of the training genes, each: early stopping on its fold 0, refit; the mean of their probabilities."""
    import lightgbm as lgb
    import polars as pl

    from memopt_pipeline.core.data.folds import assign_instances, gene_folds
    from memopt_pipeline.core.train.instance import BoostingParams
    from memopt_pipeline.core.train.lightgbm_backend import lightgbm_params

    params = lightgbm_params(BoostingParams(max_rounds=args.max_rounds, num_threads=args.threads),
                             n_classes=n_classes, bin_sample_rows=200_000, row_wise=True)
    instances = assign_instances(train_stats, n_instances=k, overlap=OVERLAP, seed=INSTANCE_SEED)
    started = time.monotonic()
    total = np.zeros((len(holdout_rows), n_classes))
    members = []
    for index, instance_genes in enumerate(instances):
        fold_of_gene = gene_folds(train_stats.filter(pl.col("gene").is_in(instance_genes)), n_folds=N_FOLDS,
                                  seed=FOLD_SEED)
        valid_ids = np.array([gene_index[g] for g, fold in fold_of_gene.items() if fold == 0], dtype=np.int32)
        own = np.flatnonzero(np.isin(genes, np.array([gene_index[g] for g in instance_genes], dtype=np.int32)))
        in_valid = np.isin(genes[own], valid_ids)
        fit = lgb.Dataset(features[own[~in_valid]], label=labels[own[~in_valid]], params=params)
        valid = lgb.Dataset(features[own[in_valid]], label=labels[own[in_valid]], reference=fit)
        booster = lgb.train(params, fit, num_boost_round=args.max_rounds, valid_sets=[valid],
                            callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)])
        rounds = booster.best_iteration or booster.current_iteration()
        del fit, valid, booster
        refit = lgb.train(params, lgb.Dataset(features[own], label=labels[own], params=params), num_boost_round=rounds)
        total += predict(refit, features, holdout_rows)
        members.append({"rows": len(own), "rounds": rounds})
        _say(f"k={k}: instance {index + 1}/{k}: {len(own):,} rows, {rounds} rounds")
        del refit
    return {"k": k, "proba": total / k, "members": members, "wall_s": time.monotonic() - started}


def score(labels: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    from memopt_pipeline.core.evaluate.metrics import multiclass_metrics

    metrics = multiclass_metrics(labels, proba, classes)
    return {"logloss": metrics["logloss"], "pr_auc": site_pr_auc(metrics["per_class"])}


def main(argv=None) -> int:
    args = parse_args(argv)
    from memopt_pipeline.core.train.threads import resolve_threads

    args.threads = resolve_threads(args.threads)
    ks = sorted({int(k) for k in args.ks.split(",")})
    started = time.monotonic()
    features, labels, genes, metadata, train_stats, ids, gene_index = load(Path(args.data), args.train_rows,
                                                                           args.holdout_rows)
    classes = [str(c) for c in metadata.classes]
    holdout_rows = np.flatnonzero(np.isin(genes, ids["holdout"]))
    train_rows = int(np.isin(genes, ids["train"]).sum())
    _say(f"loaded {len(labels):,} rows x {features.shape[1]} features in {time.monotonic() - started:.0f} s: "
         f"{len(ids['train']):,} training genes ({train_rows:,} rows), {len(ids['holdout']):,} holdout genes "
         f"({len(holdout_rows):,} rows)")
    results = []
    for k in ks:
        result = ensemble(k, features, labels, genes, train_stats, gene_index, holdout_rows, len(classes), args)
        result.update(score(labels[holdout_rows], result.pop("proba"), classes))
        results.append(result)
        _say(f"k={k}: holdout logloss {result['logloss']:.4f}, site PR-AUC {result['pr_auc']:.4f}, {result['wall_s']:.0f} s")

    reference = next((r for r in results if r["k"] == 1), None)
    print()
    print(f"{metadata.n_rows:,} rows x {len(metadata.features)} features in {args.data}; {train_rows:,} training rows "
          f"({len(ids['train']):,} genes), holdout {len(holdout_rows):,} rows ({len(ids['holdout']):,} genes); "
          f"early stopping {EARLY_STOPPING_ROUNDS} on fold 0 of {N_FOLDS}, at most {args.max_rounds} rounds; "
          f"{args.threads} threads")
    print()
    print("| k | rows per instance (mean) | rounds (mean) | holdout logloss | vs k=1 | site PR-AUC | vs k=1 | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        rows = np.mean([m["rows"] for m in row["members"]])
        rounds = np.mean([m["rounds"] for m in row["members"]])
        versus = (f"{(row['logloss'] / reference['logloss'] - 1) * 100:+.2f}%", f"{(row['pr_auc'] / reference['pr_auc'] - 1) * 100:+.2f}%") if reference else ("", "")
        print(f"| {row['k']} | {rows:,.0f} | {rounds:.0f} | {row['logloss']:.4f} | {versus[0]} | {row['pr_auc']:.4f} | "
              f"{versus[1]} | {row['wall_s']:.0f} |")
    if reference:
        over = [row["k"] for row in results if row["logloss"] > reference["logloss"] * (1 + LOSS_LIMIT)]
        print()
        print(f"first k losing more than {LOSS_LIMIT:.1%} holdout logloss against k=1: {over[0] if over else 'none measured'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
