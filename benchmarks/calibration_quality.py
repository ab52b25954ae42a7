"""Holdout logloss and per-class ECE of what the ensemble outputs, for softmax and one-vs-rest,
with the calibration code before and after it was fixed, and with a second calibration of the
ensemble's average.

    python -m memopt_pipeline.core.data.synthetic /tmp/bench2m --genes 8000 --mean-exons 20
    python benchmarks/calibration_quality.py --data /tmp/bench2m     # 2,135,378 rows x 338 features

The work is the pipeline's, done in memory so that one set of models serves every variant:
the pipeline's gene split (holdout 0.2, seed 0), ``--instances`` instances of the training genes
(``assign_instances``, overlap 0.1), per instance ``--folds`` gene folds; per fold a LightGBM
model with the pipeline's parameters trained ``--rounds`` rounds, predicting its fold's rows
(out-of-fold), then a refit on all the instance's genes. Every member's calibration is fitted
on its out-of-fold rows, row-normalised as the pipeline records them.

Variants, all scored on the holdout genes (never seen by any model or calibration map):

- ``uncalibrated``: the mean of the members' row-normalised probabilities;
- ``before``: the code before the fix (``previous_*`` below, copied from the commit before
  "Sound outputs"): per-class maps applied to the raw one-vs-rest sigmoids, then renormalised;
- ``after``: ``core.train.calibration`` as the pipeline runs it now (maps fitted and applied
  on renormalised rows);
- ``after + ensemble``: ``after``, then one more map of the same method fitted on the
  ensemble's own out-of-fold average. For a training row, a member that trained on its gene
  contributes its out-of-fold prediction, a member that did not contributes its refit model's
  prediction (honest either way), each through its own calibration, weighted as in the ensemble.

For softmax, ``before`` and ``after`` differ only by the input floor (``_INPUT_FLOOR``); the
fix is about one-vs-rest. Quality only: timings here are not a criterion.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from in_memory_data import frame_to_arrays, predict, scan_and_split  # noqa: E402

METHODS = ("platt", "isotonic")
OBJECTIVES = ("softmax", "ovr")
FOLD_SEED, INSTANCE_SEED, OVERLAP = 0, 0, 0.1


# --- the calibration code before the fix (commit e7ceb03^, core/train/calibration.py) -------
_CLIP = 1e-6


def _previous_logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _CLIP, 1.0 - _CLIP)
    return np.log(p) - np.log1p(-p)


def previous_fit_calibration(labels: np.ndarray, proba: np.ndarray, *, method: str) -> dict:
    proba = np.asarray(proba, dtype=np.float64)
    result: dict = {"method": method, "n_classes": proba.shape[1], "per_class": []}
    for k in range(proba.shape[1]):
        positives = (labels == k).astype(np.float64)
        if method == "platt":
            from sklearn.linear_model import LogisticRegression

            model = LogisticRegression(C=1e4, solver="lbfgs", max_iter=200)
            model.fit(_previous_logit(proba[:, k]).reshape(-1, 1), positives)
            result["per_class"].append({"slope": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0])})
        else:
            from sklearn.isotonic import IsotonicRegression

            model = IsotonicRegression(y_min=_CLIP, y_max=1.0 - _CLIP, out_of_bounds="clip")
            model.fit(proba[:, k], positives)
            result["per_class"].append({"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()})
    return result


def previous_apply_calibration(calibration: dict, proba: np.ndarray) -> np.ndarray:
    from memopt_pipeline.core.train.calibration import normalise_rows

    proba = np.asarray(proba, dtype=np.float64)
    out = np.empty_like(proba)
    for k, params in enumerate(calibration["per_class"]):
        if calibration["method"] == "platt":
            out[:, k] = 1.0 / (1.0 + np.exp(-(params["slope"] * _previous_logit(proba[:, k]) + params["intercept"])))
        else:
            out[:, k] = np.interp(proba[:, k], params["x"], params["y"])
    return normalise_rows(out)
# ---------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder (e.g. made by memopt_pipeline.core.data.synthetic)")
    parser.add_argument("--instances", type=int, default=4, help="instances in the ensemble (default 4)")
    parser.add_argument("--folds", type=int, default=3, help="gene folds per instance (default 3)")
    parser.add_argument("--rounds", type=int, default=40, help="rounds per fold model and refit (default 40)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma list of softmax, ovr")
    parser.add_argument("--threads", type=int, default=0, help="threads (default 0: the CPUs this process may use)")
    return parser.parse_args(argv)


def load(data: Path, n_instances: int, n_folds: int):
    """Every row in memory: float32 features, class indices, gene ids; plus the split, instances and folds."""
    import polars as pl

    from memopt_pipeline.core.data.folds import assign_instances, gene_folds
    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN

    metadata, stats, split = scan_and_split(data)
    train_stats = stats.filter(pl.col("gene").is_in(split.train_genes))
    instances = assign_instances(train_stats, n_instances=n_instances, overlap=OVERLAP, seed=INSTANCE_SEED)
    folds = [gene_folds(train_stats.filter(pl.col("gene").is_in(genes)), n_folds=n_folds, seed=FOLD_SEED)
             for genes in instances]

    frame = pl.read_parquet([s.path for s in metadata.shards],
                            columns=[GENE_COLUMN, LABEL_COLUMN, *metadata.features])
    features, labels, genes, gene_index = frame_to_arrays(frame, metadata, stats)
    del frame

    def ids(names) -> np.ndarray:
        return np.array(sorted(gene_index[g] for g in names), dtype=np.int32)

    plan = {
        "holdout": ids(split.holdout_genes),
        "train": ids(split.train_genes),
        "instances": [ids(genes) for genes in instances],
        "folds": [{k: ids(g for g, f in fold_of_gene.items() if f == k) for k in range(n_folds)}
                  for fold_of_gene in folds],
    }
    return features, labels, genes, metadata, plan


def train_members(objective: str, features, labels, genes, plan, n_classes: int, args):
    """Per instance: raw out-of-fold probabilities on its rows, and its refit model's raw
    probabilities on the holdout and on the training rows of the genes it did not train on."""
    import lightgbm as lgb

    from memopt_pipeline.core.train.instance import BoostingParams
    from memopt_pipeline.core.train.lightgbm_backend import lightgbm_params

    params = lightgbm_params(BoostingParams(objective=objective, max_rounds=args.rounds, num_threads=args.threads),
                             n_classes=n_classes, bin_sample_rows=200_000, row_wise=True)
    holdout_rows = np.flatnonzero(np.isin(genes, plan["holdout"]))
    train_rows = np.flatnonzero(np.isin(genes, plan["train"]))
    members = []
    for index, (instance_genes, folds) in enumerate(zip(plan["instances"], plan["folds"])):
        own = np.flatnonzero(np.isin(genes, instance_genes))
        oof = np.empty((len(own), n_classes))
        for k, fold_genes in folds.items():
            in_fold = np.isin(genes[own], fold_genes)
            fit = lgb.Dataset(features[own[~in_fold]], label=labels[own[~in_fold]], params=params)
            booster = lgb.train(params, fit, num_boost_round=args.rounds)
            oof[in_fold] = predict(booster, features, own[in_fold])
            del fit, booster
            _say(f"{objective} instance {index + 1}: fold {k + 1}/{len(folds)} done")
        refit = lgb.train(params, lgb.Dataset(features[own], label=labels[own], params=params),
                          num_boost_round=args.rounds)
        others = np.setdiff1d(train_rows, own, assume_unique=True)
        members.append({"own": own, "oof": oof, "holdout": predict(refit, features, holdout_rows),
                        "others": others, "on_others": predict(refit, features, others)})
        _say(f"{objective} instance {index + 1}/{len(plan['instances'])}: refit done, {len(own):,} rows")
    return members, holdout_rows, train_rows


def score(labels: np.ndarray, proba: np.ndarray) -> dict:
    from sklearn.metrics import log_loss

    from memopt_pipeline.core.train.calibration import expected_calibration_error

    ece = expected_calibration_error(labels, proba)
    return {"logloss": float(log_loss(labels, proba, labels=list(range(proba.shape[1])))),
            "ece": ece["per_class"], "ece_mean": ece["mean"]}


def evaluate(members, labels, holdout_rows, train_rows, method: str) -> dict:
    from memopt_pipeline.core.train.calibration import apply_calibration, fit_calibration, normalise_rows

    weight = 1.0 / len(members)
    y_holdout = labels[holdout_rows]
    averages = {"uncalibrated": 0.0, "before": 0.0, "after": 0.0}
    ensemble_oof = np.zeros((len(train_rows), members[0]["oof"].shape[1]))
    for member in members:
        oof_recorded = normalise_rows(member["oof"]).astype(np.float32)  # as PhaseOne records it
        y_own = labels[member["own"]]
        before = previous_fit_calibration(y_own, oof_recorded, method=method)
        after = fit_calibration(y_own, oof_recorded, method=method)
        member["after"] = after
        averages["uncalibrated"] = averages["uncalibrated"] + weight * normalise_rows(member["holdout"])
        averages["before"] = averages["before"] + weight * previous_apply_calibration(before, member["holdout"])
        averages["after"] = averages["after"] + weight * apply_calibration(after, member["holdout"])
        # The ensemble's honest out-of-fold average over the training rows.
        ensemble_oof[np.searchsorted(train_rows, member["own"])] += weight * apply_calibration(after, member["oof"])
        ensemble_oof[np.searchsorted(train_rows, member["others"])] += weight * apply_calibration(after, member["on_others"])
    second = fit_calibration(labels[train_rows], ensemble_oof, method=method)
    averages["after + ensemble"] = apply_calibration(second, averages["after"])
    return {name: score(y_holdout, proba) for name, proba in averages.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    from memopt_pipeline.core.train.threads import resolve_threads

    args.threads = resolve_threads(args.threads)
    started = time.monotonic()
    features, labels, genes, metadata, plan = load(Path(args.data), args.instances, args.folds)
    classes = [str(c) for c in metadata.classes]
    _say(f"loaded {len(labels):,} rows x {features.shape[1]} features; {len(plan['train'])} training genes in "
         f"{args.instances} instances, {len(plan['holdout'])} holdout genes")
    results = []
    for objective in args.objectives.split(","):
        members, holdout_rows, train_rows = train_members(objective, features, labels, genes, plan, len(classes), args)
        for method in METHODS:
            for variant, figures in evaluate(members, labels, holdout_rows, train_rows, method).items():
                results.append({"objective": objective, "method": method, "variant": variant, **figures})
        del members
    print()
    print(f"{metadata.n_rows:,} rows x {len(metadata.features)} features; holdout {len(holdout_rows):,} rows; "
          f"{args.instances} instances x {args.folds} folds, {args.rounds} rounds; {time.monotonic() - started:.0f} s")
    print()
    print(f"| objective | calibration | variant | holdout logloss | mean ECE | {' | '.join(f'ECE {c}' for c in classes)} |")
    print("|---|---|---|---:|---:|" + "---:|" * len(classes))
    for row in results:
        per_class = " | ".join(f"{value:.4f}" for value in row["ece"])
        print(f"| {row['objective']} | {row['method']} | {row['variant']} | {row['logloss']:.4f} | "
              f"{row['ece_mean']:.4f} | {per_class} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
