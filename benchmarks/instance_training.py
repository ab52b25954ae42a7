"""One instance's training, streamed from Parquet, against the same work done in memory.

    python -m memopt_pipeline.core.data.synthetic /tmp/bench1m --genes 3800 --mean-exons 20
    python benchmarks/instance_training.py --data /tmp/bench1m            # 1,014,230 rows x 338 features

The work, identical for every approach: the training genes of the pipeline's gene split
(holdout 0.2, seed 0), ``--folds`` gene folds (seed 0); per fold, train ``--rounds`` rounds
on the other folds with the fold as validation set (early stopping patience = ``--rounds``,
so every fold runs every round) and predict the fold's rows (out-of-fold); then a refit on
all training genes for ``--rounds`` rounds and a prediction of the holdout genes. Same
LightGBM parameters (the pipeline's defaults), same threads.

Approaches, each in its own child process, one after the other:

- ``naive``: polars reads every shard, float32 numpy in memory, ``lgb.Dataset`` per fold
  (LightGBM's own layout test, its own bin sample), predictions in memory;
- ``streamed``: ``core.train.lightgbm_backend.train_instance``, what ``instance_model`` runs,
  with the layout the plan picks at ``--budget-gb`` (``--layout`` overrides it: ``cut``,
  ``cut_row_wise``, ``stream``, ``stream_row_wise``);
- ``reader``: one full-feature pass of ``BatchReader`` over the training genes, rows/s.

Printed: wall time (the criterion: the whole child, load or streaming included), peak RSS (the kernel's ``ru_maxrss`` of the child, from ``os.wait4``),
the training seconds, holdout logloss, and for the streamed run how many times it decoded
the instance's rows. Run it alone: with 2 cores, any other busy process skews the timings.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_memory import child_env, holdout_metrics, load_in_memory, prepare_spec, run_child  # noqa: E402

APPROACHES = ("reader", "naive", "streamed")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset folder (e.g. made by memopt_pipeline.core.data.synthetic)")
    parser.add_argument("--rounds", type=int, default=60, help="rounds per fold and for the refit (default 60)")
    parser.add_argument("--folds", type=int, default=3, help="gene folds (default 3)")
    parser.add_argument("--budget-gb", type=float, default=8.0, help="budget the plan picks the layout for (default 8)")
    parser.add_argument("--layout", choices=("plan", "cut", "cut_row_wise", "stream", "stream_row_wise"), default="plan")
    parser.add_argument("--approaches", default=",".join(APPROACHES), help=f"comma list of {', '.join(APPROACHES)}")
    parser.add_argument("--threads", type=int, default=0, help="threads (default 0: the CPUs this process may use)")
    parser.add_argument("--out-dir", default=None, help="folder for logs and predictions (default: a temporary one)")
    parser.add_argument("--child", choices=APPROACHES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child and not args.data:
        parser.error("--data is required")
    from memopt_pipeline.core.train.threads import resolve_threads

    args.threads = resolve_threads(args.threads)
    args.max_rounds = args.rounds
    return args


def _params(spec: dict):
    from memopt_pipeline.core.train.instance import BoostingParams

    # Patience = rounds: every fold trains every round, in both approaches.
    return BoostingParams(max_rounds=spec["max_rounds"], early_stopping_rounds=spec["max_rounds"], num_threads=spec["threads"])


def _metadata(spec: dict):
    from memopt_pipeline.core.data.dataset import list_shards, scan_dataset

    return scan_dataset(
        list_shards(spec["data"]), gene_column=spec["gene_column"], label_column=spec["label_column"],
        gene_stats_path=Path(spec["run_dir"]) / "gene_stats.parquet",
    )


def child_reader(spec: dict) -> dict:
    from memopt_pipeline.core.data.batch_reader import BatchReader

    reader = BatchReader(_metadata(spec))
    started = time.monotonic()
    rows = sum(len(batch.labels) for batch in reader.iter_batches(spec["train_genes"], 65_536))
    seconds = time.monotonic() - started
    return {"train_s": seconds, "rows": rows, "note": f"{rows / seconds:,.0f} rows/s, {len(spec['features'])} features"}


def child_naive(spec: dict) -> dict:
    import lightgbm as lgb

    from memopt_pipeline.core.train.lightgbm_backend import lightgbm_params

    started = time.monotonic()
    X, y, bounds, X_holdout, y_holdout = load_in_memory(spec)
    load_s = time.monotonic() - started
    params = lightgbm_params(_params(spec), n_classes=len(spec["classes"]), bin_sample_rows=200_000)
    for key in ("force_col_wise", "force_row_wise", "bin_construct_sample_cnt"):
        params.pop(key, None)  # a naive script leaves LightGBM's defaults
    started = time.monotonic()
    for k in range(len(bounds) - 1):
        low, high = bounds[k], bounds[k + 1]
        fit = lgb.Dataset(np.concatenate([X[:low], X[high:]]), label=np.concatenate([y[:low], y[high:]]), params=params)
        valid = lgb.Dataset(X[low:high], label=y[low:high], reference=fit)
        booster = lgb.train(params, fit, num_boost_round=spec["max_rounds"], valid_sets=[valid],
                            callbacks=[lgb.early_stopping(spec["max_rounds"], verbose=False)])
        booster.predict(X[low:high])  # out-of-fold predictions, as the pipeline makes
        print(f"fold {k + 1}: {booster.current_iteration()} rounds, {time.monotonic() - started:.1f} s", flush=True)
        del booster, fit, valid
    full = lgb.Dataset(X, label=y, params=params)
    booster = lgb.train(params, full, num_boost_round=spec["max_rounds"])
    train_s = time.monotonic() - started
    return {"train_s": train_s, "load_s": load_s, "rows": len(y), "labels": y_holdout, "proba": booster.predict(X_holdout),
            "note": f"load {load_s:.1f} s"}


def _log_with_peak(message: str) -> None:
    """A progress line with the process's peak RSS so far: which step set the peak."""
    import resource

    from memopt_pipeline.core.memory.measure import process_rss_bytes

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    print(f"{message} [RSS {process_rss_bytes() / 2**30:.2f} GiB, peak so far {peak_gib:.2f} GiB]", flush=True)


def child_streamed(spec: dict) -> dict:
    from memopt_pipeline.core.data.batch_reader import BatchReader
    from memopt_pipeline.core.memory.measure import process_rss_bytes
    from memopt_pipeline.core.memory.planner import make_plan
    from memopt_pipeline.core.memory.release import release_memory
    from memopt_pipeline.core.train.instance import predict_genes
    from memopt_pipeline.core.train.lightgbm_backend import train_instance
    from memopt_pipeline.core.units import GiB

    metadata = _metadata(spec)
    reader = BatchReader(metadata)
    fold_of_gene = {gene: k for k, genes in enumerate(spec["folds"]) for gene in genes}
    rows = reader.count_rows(fold_of_gene)
    plan = make_plan(
        dataset_rows=metadata.n_rows, n_features=metadata.n_features, n_classes=metadata.n_classes,
        budget_bytes=int(spec["budget_gb"] * GiB), baseline_bytes=process_rss_bytes(),
    )
    options = {}
    if "cut_folds" in inspect.signature(train_instance).parameters:  # older code streams every fold
        layout = plan.lightgbm_layout(rows)
        chosen = {"plan": (layout.cut_folds, layout.row_wise), "cut": (True, False), "cut_row_wise": (True, True),
                  "stream": (False, False), "stream_row_wise": (False, True)}[spec["layout"]]
        options = {"cut_folds": chosen[0], "row_wise": chosen[1]}
    started = time.monotonic()
    training = train_instance(
        reader, fold_of_gene, params=_params(spec), batch_rows=plan.batch_rows, bin_sample_rows=plan.bin_sample_rows,
        log=_log_with_peak, release=release_memory, **options,
    )
    train_s = time.monotonic() - started
    decodes = reader.stats.rows_read / rows
    labels, proba = predict_genes(reader, spec["holdout_genes"], training.booster.predict, batch_rows=plan.batch_rows,
                                  purpose="holdout")
    layout_text = ", ".join(k for k, v in options.items() if v) or "streamed folds, column-wise"
    return {"train_s": train_s, "rows": rows, "labels": labels, "proba": proba, "decodes": decodes,
            "note": f"{layout_text}; instance rows decoded {decodes:.2f}x (incl. out-of-fold)"}


def main_child(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.spec).read_text())
    result = {"reader": child_reader, "naive": child_naive, "streamed": child_streamed}[args.child](spec)
    out = Path(args.out)
    if "proba" in result:
        predictions = out.with_suffix(".npz")
        np.savez(predictions, labels=result.pop("labels"), proba=np.asarray(result.pop("proba"), dtype=np.float64))
        result["predictions"] = str(predictions)
    out.write_text(json.dumps(result))
    return 0


def main_parent(args: argparse.Namespace) -> int:
    import tempfile

    run_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="instance_training_"))
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = prepare_spec(Path(args.data).resolve(), run_dir, args)
    spec.update(run_dir=str(run_dir), budget_gb=args.budget_gb, layout=args.layout)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    print(f"{spec['train_rows']:,} training rows ({len(spec['folds'])} folds), {spec['holdout_rows']:,} holdout rows, "
          f"{len(spec['features'])} features, {args.rounds} rounds, {args.threads} threads", flush=True)
    rows = []
    for approach in args.approaches.split(","):
        out = run_dir / f"{approach}.json"
        command = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", approach,
                   "--spec", str(run_dir / "spec.json"), "--out", str(out)]
        row = {"approach": approach, **run_child(command, run_dir / f"{approach}.log", env=child_env(args.threads),
                                                 prefix=f"  [{approach}] ", echo=False)}
        if not row["failure"]:
            row.update(json.loads(out.read_text()))
            if "predictions" in row:
                row["logloss"] = holdout_metrics(Path(row["predictions"]), spec["classes"])["logloss"]
        rows.append(row)
    naive = next((r for r in rows if r["approach"] == "naive" and not r["failure"]), None)
    print()
    print("| approach | wall s | vs naive wall | training s | peak RSS GB | holdout logloss | other CPU use | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        if row["failure"]:
            print(f"| {row['approach']} | {row['wall_s']:.1f} | - | - | {row['peak_rss_gb']:.2f} | - | - | {row['failure']} |")
            continue
        ratio = f"{row['wall_s'] / naive['wall_s']:.2f}x" if naive and row["approach"] == "streamed" else ""
        logloss = f"{row['logloss']:.5f}" if "logloss" in row else ""
        print(f"| {row['approach']} | {row['wall_s']:.1f} | {ratio} | {row['train_s']:.1f} | {row['peak_rss_gb']:.2f} | "
              f"{logloss} | {row['foreign_cpu_share']:.0%} | {row['note']} |")
    print(f"\nlogs and predictions: {run_dir}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return main_child(args) if args.child else main_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
