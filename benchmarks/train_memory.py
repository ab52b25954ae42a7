"""Peak memory, wall time and holdout quality of four ways to train on the same gene-grouped data.

    python benchmarks/train_memory.py                      # 8000 genes x 20 exons (~2.1M rows x 338 features)
    python benchmarks/train_memory.py --quick              # 300 genes x 6 exons, 60 rounds: smoke test (~1 min)
    python benchmarks/train_memory.py --data DIR --approaches naive_lightgbm,pipeline --budget-gb 1
    # Bigger than the machine: ~10M rows x 338 features (13.7 GB of float32), generated shard by shard
    python benchmarks/train_memory.py --genes 38000 --approaches naive_lightgbm,xgboost_extmem,pipeline \
        --budget-gb 4 --max-rounds 30 --naive-data-limit-gb 20

Approaches (each runs in its own child process, one after the other, so they never share
memory or compete for cores):

- ``naive_lightgbm``     polars reads every shard -> float32 numpy -> ``lgb.Dataset`` -> ``lgb.train``;
- ``naive_xgboost_hist`` the same load -> ``xgboost.QuantileDMatrix`` -> ``xgb.train`` (hist);
- ``xgboost_extmem``     ``xgboost.ExtMemQuantileDMatrix`` over a ``DataIter`` of Parquet row groups;
- ``pipeline``           ``memopt run`` (the whole Dagster graph) under ``--budget-gb``.

Same data for everyone: the holdout/training genes come from ``split_genes`` with the
pipeline's defaults (holdout 0.2, seed 0, all genes), and the parent checks that the
pipeline's ``gene_split`` asset holds the same holdout genes. ``naive_lightgbm`` finds its
number of rounds with the pipeline's own rule: early stopping on each of the ``--folds``
gene-aware folds (the pipeline's ``gene_folds`` on all training genes, seed 0: exactly the
folds of a one-instance pipeline), the mean best iteration, then a refit on all training
genes for that many rounds. The XGBoost baselines stop early on fold 0 only (one fit + refit).

``--pipeline-instances 1,4`` runs the pipeline once per instance count (rows
``pipeline[1]``, ``pipeline[4]``); ``--pipeline-args`` passes more ``memopt run`` options
(e.g. ``--calibration none``). The pipeline's holdout logloss is of calibrated probabilities;
its uncalibrated logloss (same run, same models) is reported beside it.

Peak RSS is what the kernel recorded for each child: the parent starts it with
``subprocess.Popen`` and reaps it with ``os.wait4``, whose rusage holds the child's own
``ru_maxrss`` (KiB on Linux; the largest of the child and any descendant it waited for).
``getrusage(RUSAGE_CHILDREN)`` would not do: it is a running maximum over all children, so
after the first big one every later child would read the same. A child that dies (an OOM
kill is SIGKILL, shell status 137) becomes a "failed" row; the script carries on.

The children write their holdout probabilities to a file and the parent computes the
metrics, so scikit-learn's import never inflates a measured peak (the pipeline computes
its own, in-process: that is part of what it costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from memopt_pipeline.core.units import GiB

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DATA_DIR = BENCH_DIR / "data"
APPROACHES = ("naive_lightgbm", "naive_xgboost_hist", "xgboost_extmem", "pipeline")

# The pipeline's gene_split defaults: the baselines must hold out exactly the same genes.
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0
SAMPLE_GENES = 0
FOLD_SEED = 0  # the pipeline's cv_folds default seed

# Shared model settings (the pipeline's BoostingParams defaults; --max-rounds overrides R).
LEARNING_RATE = 0.1
NUM_LEAVES = 31
MAX_BIN = 255
MIN_DATA_IN_LEAF = 20
FEATURE_FRACTION = 0.9
LAMBDA_L2 = 1.0
EARLY_STOPPING_ROUNDS = 20

# Rows per XGBoost external-memory batch (the generator's Parquet row group size).
# XGBoost's external-memory guide asks for pages as large as memory allows: every tree level
# reads every page (benchmarks/external_memory.py measured 65,536-row pages 3x slower per round
# than 262,144-row ones on 338 features).
EXTMEM_BATCH_ROWS = 262_144

# --quick: ~20k rows; 60 rounds keep the pipeline's 3 folds + refit short (early stopping
# may not trigger, which is fine for a smoke test).
QUICK_GENES = 300
QUICK_MEAN_EXONS = 6
QUICK_MAX_ROUNDS = 60


# ======================================================================================
# Parent: dataset, split, children, table
# ======================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, default=None, help="genes in the generated dataset (default 8000; --quick: 300)")
    parser.add_argument("--mean-exons", type=int, default=None, help="mean exons per gene of the generated dataset (default 20; --quick: 6)")
    parser.add_argument("--data", default=None, help="reuse this dataset (Parquet file or folder) instead of generating one")
    parser.add_argument("--budget-gb", type=float, default=1.5, help="memory budget of the pipeline, GiB (default 1.5)")
    parser.add_argument("--approaches", default=",".join(APPROACHES), help=f"comma list of {', '.join(APPROACHES)}")
    parser.add_argument("--max-rounds", type=int, default=None, help="max boosting rounds R for every approach (default 300; --quick: 60)")
    parser.add_argument("--folds", type=int, default=3, help="CV folds per instance, pipeline and naive_lightgbm (default 3)")
    parser.add_argument("--pipeline-instances", default="0",
                        help="comma list of instance counts, one pipeline run each (0 = as the plan needs; default 0)")
    parser.add_argument("--pipeline-args", default="", help="extra `memopt run` options for the pipeline runs")
    parser.add_argument("--threads", type=int, default=0, help="threads per approach (default 0 = all cores)")
    parser.add_argument("--naive-data-limit-gb", type=float, default=0,
                        help="run the naive baselines under this data-segment limit (setrlimit RLIMIT_DATA, as "
                        "`prlimit --data`), GiB: a load that does not fit fails with MemoryError instead of calling the "
                        "kernel's OOM killer onto the machine (default 0: no limit)")
    parser.add_argument("--extmem-batch-rows", type=int, default=EXTMEM_BATCH_ROWS,
                        help=f"rows per XGBoost external-memory batch, i.e. per cache page (default {EXTMEM_BATCH_ROWS:,})")
    parser.add_argument("--quick", action="store_true", help=f"smoke test on a {QUICK_GENES}-gene dataset")
    parser.add_argument("--quiet", action="store_true", help="do not echo the children's output (it is always logged)")
    # Internal: how the parent starts a baseline child.
    parser.add_argument("--child", choices=APPROACHES[:3], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    # --quick changes only what was not given explicitly.
    if args.genes is None:
        args.genes = QUICK_GENES if args.quick else 8000
    if args.mean_exons is None:
        args.mean_exons = QUICK_MEAN_EXONS if args.quick else 20
    if args.max_rounds is None:
        args.max_rounds = QUICK_MAX_ROUNDS if args.quick else 300
    unknown = sorted(set(args.approaches.split(",")) - set(APPROACHES))
    if unknown:
        parser.error(f"unknown approaches {unknown}; choose from {', '.join(APPROACHES)}")
    return args


def ensure_dataset(args: argparse.Namespace) -> Path:
    """--data as given, or the generated dataset (the generator reuses shards of an identical spec)."""
    if args.data:
        return Path(args.data).resolve()
    out = DATA_DIR / f"genes{args.genes}_exons{args.mean_exons}"
    print(f"dataset: {out} (generated on first use)", flush=True)
    # A subprocess, so the generator's memory is never part of this process. It prints a
    # line per shard (160 for 8000 genes); every 20th is enough to show progress.
    command = [sys.executable, "-m", "memopt_pipeline.core.data.synthetic", str(out),
               "--genes", str(args.genes), "--mean-exons", str(args.mean_exons)]
    process = subprocess.Popen(command, cwd=REPO_DIR, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("synthetic shard"):
            done, total = line.split()[2].split("/")
            if int(done) % 20 and done != total:
                continue
        elif not line.startswith(("reusing", "synthetic")) and " shards, " not in line:
            continue  # the per-shard row listing at the end
        print("  [data] " + line.rstrip(), flush=True)
    if process.wait() != 0:
        raise SystemExit(f"dataset generation failed (exit {process.returncode}): {' '.join(command)}")
    return out


def prepare_spec(data: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    """Scan the dataset and fix the genes every approach uses; written to run_dir/spec.json for the children."""
    import polars as pl

    from memopt_pipeline.core.data.dataset import list_shards, scan_dataset
    from memopt_pipeline.core.data.folds import gene_folds
    from memopt_pipeline.core.data.sampling import split_genes
    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN

    metadata = scan_dataset(
        list_shards(data), gene_column=GENE_COLUMN, label_column=LABEL_COLUMN,
        gene_stats_path=run_dir / "gene_stats.parquet",
    )
    stats = metadata.read_gene_stats()
    split = split_genes(stats, holdout_fraction=HOLDOUT_FRACTION, sample_genes=SAMPLE_GENES, seed=SPLIT_SEED)
    fold_of_gene = gene_folds(stats.filter(pl.col("gene").is_in(split.train_genes)), n_folds=args.folds, seed=FOLD_SEED)
    folds = [sorted(g for g, fold in fold_of_gene.items() if fold == k) for k in range(args.folds)]
    valid_genes = folds[0]
    fit_genes = sorted(g for g, fold in fold_of_gene.items() if fold != 0)
    spec = {
        "data": str(data),
        "shards": [s.path for s in metadata.shards],
        "gene_column": metadata.gene_column,
        "label_column": metadata.label_column,
        "classes": metadata.classes,
        "features": metadata.features,
        "n_rows": metadata.n_rows,
        "n_genes": metadata.n_genes,
        "train_rows": split.train_rows,
        "holdout_rows": split.holdout_rows,
        "train_genes": split.train_genes,
        "holdout_genes": split.holdout_genes,
        "fit_genes": fit_genes,  # phase 1 training genes of the XGBoost baselines
        "valid_genes": valid_genes,  # phase 1 early-stopping genes of the XGBoost baselines (fold 0)
        "folds": folds,  # naive_lightgbm: every fold stops early once (the pipeline's rule)
        "max_rounds": args.max_rounds,
        "threads": args.threads,
        # Only train_memory.py has external-memory baselines; the other benchmarks share this spec.
        "extmem_batch_rows": getattr(args, "extmem_batch_rows", None),
        "missing_features": sorted({f for s in metadata.shards for f in s.missing_features}),
    }
    (run_dir / "spec.json").write_text(json.dumps(spec))
    return spec


def child_env(threads: int, **extra: str) -> dict:
    # The pipeline's LightGBM runs with num_threads=0, i.e. OpenMP's default, which is this.
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **extra}


def data_limit(limit_bytes: int):
    """A ``preexec_fn`` that caps the child's data segment at ``limit_bytes`` (what ``prlimit --data`` does).

    Since Linux 4.7 RLIMIT_DATA counts private anonymous mappings too, i.e. every large
    malloc, numpy array and Arrow buffer: an allocation beyond the limit fails (MemoryError in
    Python, an abort in Rust or C++) in the child alone, instead of the kernel's OOM killer
    choosing a victim on the machine."""
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    return apply


def run_child(command: list[str], log_path: Path, *, env: dict, prefix: str = "", echo: bool = True,
              data_limit_bytes: int = 0) -> dict:
    """Run one child to completion; return its exit status, peak RSS (from os.wait4) and wall time.

    Output goes to ``log_path`` (and, prefixed, to our stdout). Popen + os.wait4 rather than
    Popen.wait: wait4 is the only call that hands back the rusage of that one child.
    ``data_limit_bytes``: run it under that data-segment limit (:func:`data_limit`).
    """
    import psutil

    started, busy_before = time.monotonic(), _busy_cpu_seconds(psutil.cpu_times())
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO_DIR, env=env,
                                   preexec_fn=data_limit(data_limit_bytes) if data_limit_bytes else None)

        def pump() -> None:  # drain the pipe so the child never blocks on a full one
            for line in process.stdout:
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.write(prefix + line.decode(errors="replace"))
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # Ctrl-C: do not leave a 5 GB child behind
            process.kill()
            process.wait()
            raise
        wall = time.monotonic() - started
        busy = _busy_cpu_seconds(psutil.cpu_times()) - busy_before
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped already; keep Popen from waiting again
        reader.join()
    failure = None
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        failure = f"killed by {signal.Signals(sig).name} (status {128 + sig})"
        if sig == signal.SIGKILL:
            failure += ", likely the OOM killer"
        elif sig == signal.SIGABRT and data_limit_bytes:
            failure += f", an allocation beyond the {data_limit_bytes / GiB:g} GiB data limit: {_last_line(log_path)}"
    elif os.WEXITSTATUS(status) != 0:
        failure = f"exit {os.WEXITSTATUS(status)}: {_last_line(log_path)}"
    # CPU time the machine spent on anything but this child while it ran: a busy neighbour
    # makes OpenMP training many times slower (measured here: 20-40x with 2 threads on 2
    # cores and one other busy process), so timings taken that way are flagged.
    child_cpu = usage.ru_utime + usage.ru_stime
    foreign_share = max(0.0, busy - child_cpu) / (wall * (os.cpu_count() or 1))
    return {"peak_rss_gb": usage.ru_maxrss * 1024 / GiB, "wall_s": wall, "failure": failure,
            "cpu_s": child_cpu, "foreign_cpu_share": foreign_share}


def _busy_cpu_seconds(times) -> float:
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def _last_line(path: Path, limit: int = 160) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    # Prefer the line naming the error over a trailing hint.
    for line in reversed(lines):
        if "Error" in line or "failed" in line or "Exceeded" in line or "memory allocation" in line:
            return line[:limit]
    return lines[-1][:limit] if lines else "(no output)"


def holdout_metrics(predictions_path: Path, classes: list) -> dict:
    from memopt_pipeline.core.evaluate.metrics import multiclass_metrics

    with np.load(predictions_path) as saved:
        return multiclass_metrics(saved["labels"], saved["proba"], classes)


def site_pr_auc(per_class: dict) -> float | None:
    """Mean PR-AUC of every class but the most prevalent one: the splice sites, not "neither"
    (whose PR-AUC is near 1 for any model and would hide the difference)."""
    if not per_class:
        return None
    majority = max(per_class, key=lambda name: per_class[name]["prevalence"])
    values = [entry["pr_auc"] for name, entry in per_class.items() if name != majority]
    return float(np.mean(values)) if values else None


def read_pipeline_values(output: Path, stages: list[tuple[str, str | None]]) -> list:
    """The latest value of each (asset, partition) of a `memopt run --output OUTPUT`, read from the
    experiment's own Dagster instance as the pipeline itself reads its inputs."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    from memopt_pipeline.automation.experiment import INSTANCE_FOLDER
    from memopt_pipeline.resources.io_manager import load_latest_value

    # The child ran without DAGSTER_HOME, so its instance is the output folder's, whatever ours says.
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(output / INSTANCE_FOLDER))) as instance:
        return [load_latest_value(instance, dg.AssetKey(asset), partition) for asset, partition in stages]


def run_baseline(approach: str, spec: dict, run_dir: Path, args: argparse.Namespace) -> dict:
    """One baseline in a child process (this script with --child); metrics from its saved predictions."""
    out = run_dir / f"{approach}.json"
    command = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", approach,
               "--spec", str(run_dir / "spec.json"), "--out", str(out)]
    naive = approach.startswith("naive")
    row = {"approach": approach, **run_child(command, run_dir / f"{approach}.log", env=child_env(args.threads),
                                             prefix=f"  [{approach}] ", echo=not args.quiet,
                                             data_limit_bytes=int(args.naive_data_limit_gb * GiB) if naive else 0)}
    if row["failure"]:
        return row
    try:
        child = json.loads(out.read_text())
    except (OSError, ValueError) as error:
        row["failure"] = f"exited 0 but wrote no result: {error}"
        return row
    metrics = holdout_metrics(Path(child.pop("predictions")), spec["classes"])
    row.update(child)
    row.update(logloss=metrics["logloss"], baseline_logloss=metrics["baseline_logloss"],
               accuracy=metrics["accuracy"], holdout_rows=metrics["rows"], pr_auc=site_pr_auc(metrics["per_class"]))
    rule = f"mean of {len(spec['folds'])} gene-fold ES" if approach == "naive_lightgbm" else "ES on gene fold 0"
    stopped = "never stopped early" if child["rounds"] >= spec["max_rounds"] else rule
    row["note"] = f"{child['rounds']} rounds ({stopped}); " + (
        f"load {child['load_s']:.1f} s" if child["load_s"] else "reads Parquet on every pass")
    return row


def run_pipeline(spec: dict, run_dir: Path, args: argparse.Namespace, instances: int = 0) -> dict:
    """`memopt run` as one child, in its own experiment instance; results read through that instance."""
    name = f"pipeline[{instances}]" if instances else "pipeline"
    output = run_dir / f"{name.replace('[', '_').replace(']', '')}_output"
    command = [
        sys.executable, "-u", "-m", "memopt_pipeline.cli", "run",
        "--data", spec["data"], "--budget-gb", str(args.budget_gb), "--output", str(output),
        "--folds", str(args.folds), "--max-rounds", str(args.max_rounds),
        # Pinned to the values the baselines' split was computed with.
        "--holdout-fraction", str(HOLDOUT_FRACTION), "--sample-genes", str(SAMPLE_GENES),
        "--instances", str(instances), *args.pipeline_args.split(),
    ]
    # Without DAGSTER_HOME `memopt run` keeps a fresh Dagster instance in the (new) output folder:
    # no runs or partitions of earlier runs.
    env = {k: v for k, v in child_env(args.threads).items() if k != "DAGSTER_HOME"}
    row = {"approach": name, **run_child(command, run_dir / f"{name}.log", env=env, prefix=f"  [{name}] ",
                                         echo=not args.quiet)}
    if row["failure"]:
        return row
    import dagster as dg

    try:
        evaluation, split, assignment, plan = read_pipeline_values(
            output, [("holdout_evaluation", None), ("gene_split", None), ("instance_assignment", None),
                     ("memory_plan", None)])
        instances = assignment["instances"]
    except (OSError, KeyError, ValueError, dg.Failure) as error:
        row["failure"] = f"finished but its results are unreadable: {error}"
        return row
    if sorted(split["holdout_genes"]) != sorted(spec["holdout_genes"]):
        print("WARNING: the pipeline's holdout genes differ from the baselines' - its logloss is not comparable", flush=True)
        row["warning"] = "holdout genes differ from the baselines'"
    if len(instances) == 1:
        folds = read_pipeline_values(output, [("cv_folds", "instance_0")])[0]["fold_of_gene"]
        if any(sorted(g for g, f in folds.items() if f == k) != genes for k, genes in enumerate(spec["folds"])):
            print("WARNING: the pipeline's folds differ from naive_lightgbm's - the early-stopping rule is not the same",
                  flush=True)
            row["warning"] = "folds differ from naive_lightgbm's"
    overlap_rows = sum(v["rows"] for v in instances.values())
    row.update(
        uncalibrated_logloss=evaluation.get("uncalibrated_logloss"),
        logloss=evaluation["logloss"], baseline_logloss=evaluation.get("baseline_logloss"),
        accuracy=evaluation.get("accuracy"), holdout_rows=evaluation.get("rows"),
        pr_auc=site_pr_auc(evaluation.get("per_class") or {}), plan=plan,
        rows=split["train_rows"], features=len(spec["features"]), instances=len(instances),
        instance_rows=overlap_rows,
    )
    row["note"] = (f"plan: {plan['strategy']}, up to {plan['max_rows_per_instance']:,} rows per instance"
                   + (f" ({plan['choice']})" if plan.get("choice") else "")
                   + f"; {len(instances)} instance(s) ({overlap_rows:,} rows incl. overlap); "
                   f"{args.folds} folds; budget {args.budget_gb:g} GiB")
    if row.get("warning"):
        row["note"] += f"; {row['warning'].upper()}"
    return row


def format_table(rows: list[dict], budget_gb: float) -> str:
    lines = ["| approach | peak RSS GB | wall s | holdout logloss | vs naive_lightgbm | uncalibrated logloss "
             "| vs naive_lightgbm | site PR-AUC | rows | features | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    reference = next((r["logloss"] for r in rows if r["approach"] == "naive_lightgbm" and not r.get("failure")), None)

    def versus(value):
        return f"{(value / reference - 1) * 100:+.2f}%" if reference and value is not None else ""

    for row in rows:
        if row.get("failure"):
            lines.append(f"| {row['approach']} | {row['peak_rss_gb']:.2f} | {row['wall_s']:.1f} | failed | | | | | | | "
                         f"FAILED: {row['failure'].replace('|', '/')} |")
            continue
        note = row.get("note", "")
        if row.get("foreign_cpu_share", 0) > 0.1:
            note += f"; DISTURBED: other processes used {row['foreign_cpu_share']:.0%} of the CPU"
        if row["peak_rss_gb"] > budget_gb:
            note += f"; over the {budget_gb:g} GiB budget"
        uncalibrated = row.get("uncalibrated_logloss")
        lines.append(f"| {row['approach']} | {row['peak_rss_gb']:.2f} | {row['wall_s']:.1f} | {row['logloss']:.4f} | "
                     f"{versus(row['logloss'])} | {'' if uncalibrated is None else f'{uncalibrated:.4f}'} | "
                     f"{versus(uncalibrated)} | {_number(row.get('pr_auc'))} | "
                     f"{row['rows']:,} | {row['features']} | {note} |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def main_parent(args: argparse.Namespace) -> int:
    import psutil

    data = ensure_dataset(args)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = RESULTS_DIR / f"train_memory_{stamp}"  # logs, spec, predictions, pipeline output
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = prepare_spec(data, run_dir, args)
    n_features = len(spec["features"])
    train_raw_gb = spec["train_rows"] * n_features * 4 / GiB
    all_raw_gb = spec["n_rows"] * n_features * 4 / GiB
    header = [
        f"dataset {spec['data']}: {spec['n_rows']:,} rows x {n_features} features, {spec['n_genes']:,} genes",
        f"split: {len(spec['train_genes']):,} training genes ({spec['train_rows']:,} rows), "
        f"{len(spec['holdout_genes']):,} holdout genes ({spec['holdout_rows']:,} rows); "
        f"baselines stop early on {len(spec['valid_genes']):,} of the training genes",
        f"raw float32 training matrix: {train_raw_gb:.2f} GB (all rows: {all_raw_gb:.2f} GB)",
        f"max rounds {args.max_rounds}, early stopping {EARLY_STOPPING_ROUNDS}, pipeline folds {args.folds}, "
        f"pipeline budget {args.budget_gb:g} GiB; {args.threads} threads per approach, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / GiB:.1f} GiB RAM",
        f"XGBoost external memory: {args.extmem_batch_rows:,} rows per batch (cache page)"
        + (f"; naive baselines under a {args.naive_data_limit_gb:g} GiB data-segment limit (RLIMIT_DATA)"
           if args.naive_data_limit_gb else ""),
    ]
    if spec["missing_features"]:
        header.append(f"note: {len(spec['missing_features'])} features are missing from some shards; "
                      "the naive polars read may fail on such data")
    print("\n".join(header), flush=True)
    busy = psutil.cpu_percent(interval=1.0)
    if busy > 20:
        print(f"WARNING: the CPU is {busy:.0f}% busy before we start - other processes are running; "
              "wall times will be inflated", flush=True)

    rows = []
    for approach in [a for a in APPROACHES if a in args.approaches.split(",")]:
        runs = (
            [lambda n=int(n): run_pipeline(spec, run_dir, args, n) for n in args.pipeline_instances.split(",")]
            if approach == "pipeline"
            else [lambda: run_baseline(approach, spec, run_dir, args)]
        )
        for run in runs:
            print(f"\n== {approach} (logs in {run_dir})", flush=True)
            row = run()
            rows.append(row)
            status = f"FAILED ({row['failure']})" if row.get("failure") else f"logloss {row['logloss']:.4f}"
            print(f"== {row['approach']}: peak RSS {row['peak_rss_gb']:.2f} GB, {row['wall_s']:.1f} s, {status}", flush=True)

    table = format_table(rows, args.budget_gb)
    markdown = "\n".join([
        f"# train_memory {stamp}", "", *[f"- {line}" for line in header], "",
        table, "",
        "GB = GiB (2^30 bytes). Peak RSS: the child's ru_maxrss from os.wait4. Wall time: the whole child, "
        "interpreter start and data loading included. naive_lightgbm: early stopping on each gene-aware fold "
        "(the pipeline's rule), XGBoost baselines: on fold 0; then a refit on all training genes for the best "
        "number of rounds; rows = rows of the refit. Pipeline: rows = training rows (each once), see the note for rows with instance overlap.",
        "",
    ])
    print("\n" + table)
    md_path = RESULTS_DIR / f"train_memory_{stamp}.md"
    json_path = RESULTS_DIR / f"train_memory_{stamp}.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps({
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "spec", "out")},
        "dataset": {k: spec[k] for k in ("data", "n_rows", "n_genes", "train_rows", "holdout_rows")}
        | {"features": n_features, "train_raw_float32_gb": train_raw_gb, "all_raw_float32_gb": all_raw_gb},
        "machine": {"cores": os.cpu_count(), "ram_gb": psutil.virtual_memory().total / GiB,
                    "cpu_busy_percent_before": busy},
        "results": rows,
    }, indent=2))
    print(f"\nwritten {md_path}\n        {json_path}\n        {run_dir}/ (logs, predictions, pipeline output)")
    return 0


# ======================================================================================
# Children: one function per baseline. Each loads its data, finds the number of rounds
# with early stopping on the validation genes, refits on all training genes, predicts the
# holdout genes, and saves labels + probabilities for the parent.
# ======================================================================================


def _say(message: str) -> None:
    print(message, flush=True)


def lightgbm_params(spec: dict) -> dict:
    # Plain LightGBM defaults otherwise: no force_col_wise, default bin sample - a naive script.
    return {
        "objective": "multiclass", "num_class": len(spec["classes"]), "metric": "multi_logloss",
        "learning_rate": LEARNING_RATE, "num_leaves": NUM_LEAVES, "max_bin": MAX_BIN,
        "min_data_in_leaf": MIN_DATA_IN_LEAF, "feature_fraction": FEATURE_FRACTION, "lambda_l2": LAMBDA_L2,
        "num_threads": spec["threads"], "seed": 0, "verbosity": -1,
    }


def xgboost_params(spec: dict) -> dict:
    # The closest XGBoost hist equivalent: leaf-wise growth capped at 31 leaves (LightGBM's way),
    # colsample_bytree = feature_fraction (both per tree), reg_lambda = lambda_l2. LightGBM's
    # min_data_in_leaf (a row count) has no XGBoost counterpart - min_child_weight is a hessian
    # sum - so it stays at XGBoost's default.
    return {
        "objective": "multi:softprob", "num_class": len(spec["classes"]), "eval_metric": "mlogloss",
        "tree_method": "hist", "grow_policy": "lossguide", "max_leaves": NUM_LEAVES, "max_depth": 0,
        "eta": LEARNING_RATE, "max_bin": MAX_BIN, "colsample_bytree": FEATURE_FRACTION,
        "reg_lambda": LAMBDA_L2, "nthread": spec["threads"], "seed": 0,
    }


def load_in_memory(spec: dict) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """The naive load: every shard into one polars frame, then float32 numpy matrices.

    Returns (X_train, y_train, bounds, X_holdout, y_holdout). Training rows are ordered by
    gene fold (fold 0 first); rows bounds[k]:bounds[k+1] are fold k. Fold 0 is a zero-copy
    view X_train[:bounds[1]] and the rest X_train[bounds[1]:]; phase 2 uses the whole matrix.
    """
    import polars as pl

    gene, label, features = spec["gene_column"], spec["label_column"], spec["features"]
    class_index = {value: i for i, value in enumerate(spec["classes"])}
    _say(f"reading {len(spec['shards'])} shards into one polars frame")
    frame = pl.read_parquet(spec["shards"], columns=[gene, label, *features])
    _say(f"read {frame.height:,} rows ({frame.estimated_size() / GiB:.2f} GiB); cutting the folds and the holdout out of it")

    def rows_of(genes: list[str]) -> pl.DataFrame:
        return frame.filter(pl.col(gene).cast(pl.Utf8).is_in(genes))

    parts = [rows_of(genes) for genes in spec["folds"]]
    holdout = rows_of(spec["holdout_genes"])
    frame = None  # the whole dataset: released once the folds are cut out of it
    bounds = np.cumsum([0] + [part.height for part in parts]).tolist()
    train = pl.concat(parts)
    del parts

    def to_numpy(part: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        # C order: LightGBM copies any other layout before binning.
        X = part.select(pl.col(features).cast(pl.Float32)).to_numpy(order="c")
        y = part[label].replace_strict(class_index, return_dtype=pl.Int32).to_numpy()
        return X, y

    _say(f"converting {train.height:,} training rows to a float32 numpy matrix")
    X_train, y_train = to_numpy(train)
    del train
    X_holdout, y_holdout = to_numpy(holdout)
    return X_train, y_train, bounds, X_holdout, y_holdout


def timed_load_in_memory(spec: dict):
    """load_in_memory plus its wall time, logged: both naive approaches report the load apart."""
    timer = time.monotonic()
    X, y, bounds, X_holdout, y_holdout = load_in_memory(spec)
    load_s = time.monotonic() - timer
    _say(f"loaded {len(y):,} training + {len(y_holdout):,} holdout rows in {load_s:.1f} s")
    return X, y, bounds, X_holdout, y_holdout, load_s


def naive_lightgbm(spec: dict) -> dict:
    import lightgbm as lgb

    X, y, bounds, X_holdout, y_holdout, load_s = timed_load_in_memory(spec)
    params = lightgbm_params(spec)

    # The pipeline's rule: every fold stops early once; the mean best iteration is refit.
    best = []
    for k in range(len(bounds) - 1):
        low, high = bounds[k], bounds[k + 1]
        rest = np.concatenate([X[:low], X[high:]])  # a copy, as a naive script would make
        fit = lgb.Dataset(rest, label=np.concatenate([y[:low], y[high:]]), params=params)
        valid = lgb.Dataset(X[low:high], label=y[low:high], reference=fit)
        booster = lgb.train(params, fit, num_boost_round=spec["max_rounds"], valid_sets=[valid],
                            callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)])
        # best_iteration counts trees (1-based); 0 means stopping never triggered: all rounds.
        best.append(booster.best_iteration or booster.current_iteration())
        _say(f"phase 1, fold {k + 1}: best iteration {best[-1]}")
        del booster, fit, valid, rest
    rounds = max(1, int(round(np.mean(best))))
    _say(f"phase 1: {rounds} rounds (mean of {best})")

    full = lgb.Dataset(X, label=y, params=params)
    booster = lgb.train(params, full, num_boost_round=rounds)
    del full
    proba = booster.predict(X_holdout)
    return {"rows": len(y), "features": X.shape[1], "rounds": int(rounds), "load_s": load_s,
            "labels": y_holdout, "proba": proba}


def naive_xgboost_hist(spec: dict) -> dict:
    import xgboost as xgb

    X, y, bounds, X_holdout, y_holdout, load_s = timed_load_in_memory(spec)
    params = xgboost_params(spec)

    # Early stopping on fold 0 (the first rows), training on the others.
    n_valid = bounds[1]
    fit = xgb.QuantileDMatrix(X[n_valid:], label=y[n_valid:], max_bin=MAX_BIN, nthread=spec["threads"])
    valid = xgb.QuantileDMatrix(X[:n_valid], label=y[:n_valid], ref=fit, max_bin=MAX_BIN, nthread=spec["threads"])
    booster = xgb.train(params, fit, num_boost_round=spec["max_rounds"], evals=[(valid, "valid")],
                        early_stopping_rounds=EARLY_STOPPING_ROUNDS, verbose_eval=False)
    rounds = booster.best_iteration + 1  # XGBoost's best_iteration is a 0-based index
    _say(f"phase 1: {rounds} rounds")
    del booster, fit, valid

    full = xgb.QuantileDMatrix(X, label=y, max_bin=MAX_BIN, nthread=spec["threads"])
    booster = xgb.train(params, full, num_boost_round=rounds)
    del full
    proba = booster.inplace_predict(X_holdout)
    return {"rows": len(y), "features": X.shape[1], "rounds": int(rounds), "load_s": load_s,
            "labels": y_holdout, "proba": proba}


def iter_row_groups(spec: dict, genes: list[str], batch_rows: int = EXTMEM_BATCH_ROWS):
    """(X float32, y int32) batches of the rows of ``genes``, read Parquet row group by row group.

    A deliberately independent reader (pyarrow only, not the pipeline's BatchReader), so this
    baseline measures XGBoost's external memory and nothing of ours. Consecutive row groups
    are gathered until ``batch_rows`` rows: the generated shards hold ~13k rows each and
    XGBoost's CPU external memory keeps one cache page per batch, walking all pages for
    every histogram, so tiny batches would slow it down for no memory gain.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    gene, label, features = spec["gene_column"], spec["label_column"], spec["features"]
    wanted = pa.array(sorted(genes), pa.string())
    classes = pa.array(spec["classes"])

    def to_xy(tables: list) -> tuple[np.ndarray, np.ndarray]:
        table = pa.concat_tables(tables)  # zero-copy: chunks side by side
        X = np.empty((table.num_rows, len(features)), dtype=np.float32)
        for j, name in enumerate(features):  # column by column: no float64 or second full copy
            X[:, j] = pc.cast(table[name], pa.float32()).to_numpy()
        y = pc.index_in(table[label], value_set=classes).to_numpy().astype(np.int32)
        return X, y

    pending, pending_rows = [], 0
    for path in spec["shards"]:
        parquet = pq.ParquetFile(path)
        for row_group in range(parquet.num_row_groups):
            table = parquet.read_row_group(row_group, columns=[gene, label, *features])
            table = table.filter(pc.is_in(pc.cast(table[gene], pa.string()), value_set=wanted))
            if table.num_rows == 0:
                continue
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= batch_rows:
                yield to_xy(pending)
                pending, pending_rows = [], 0
    if pending:
        yield to_xy(pending)


def xgboost_extmem(spec: dict) -> dict:
    import xgboost as xgb

    class RowGroups(xgb.DataIter):
        def __init__(self, genes: list[str], cache_prefix: str):
            self._genes = genes
            self._batches = None
            super().__init__(cache_prefix=cache_prefix)

        def next(self, input_data) -> bool:
            if self._batches is None:  # first call after reset(): a new pass over the shards
                self._batches = iter_row_groups(spec, self._genes, spec["extmem_batch_rows"])
            batch = next(self._batches, None)
            if batch is None:
                return False
            input_data(data=batch[0], label=batch[1])
            return True

        def reset(self) -> None:
            self._batches = None

    params = xgboost_params(spec)
    cache = tempfile.mkdtemp(prefix="xgb_extmem_")  # XGBoost's pages on disk; removed below
    try:
        timer = time.monotonic()

        def matrix(genes: list[str], name: str, ref=None):
            return xgb.ExtMemQuantileDMatrix(RowGroups(genes, os.path.join(cache, name)), ref=ref,
                                             max_bin=MAX_BIN, nthread=spec["threads"])

        fit = matrix(spec["fit_genes"], "fit")
        valid = matrix(spec["valid_genes"], "valid", ref=fit)
        booster = xgb.train(params, fit, num_boost_round=spec["max_rounds"], evals=[(valid, "valid")],
                            early_stopping_rounds=EARLY_STOPPING_ROUNDS, verbose_eval=False)
        rounds = booster.best_iteration + 1
        _say(f"phase 1: {rounds} rounds in {time.monotonic() - timer:.1f} s")
        del booster, fit, valid

        full = matrix(spec["train_genes"], "train")
        rows = full.num_row()
        booster = xgb.train(params, full, num_boost_round=rounds)
        del full
        # Holdout streamed too: one batch of features in memory at a time.
        labels, proba = [], []
        for X, y in iter_row_groups(spec, spec["holdout_genes"], spec["extmem_batch_rows"]):
            proba.append(booster.inplace_predict(X))
            labels.append(y)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    # load_s 0: there is no separate load; the data are read (again) for each matrix.
    return {"rows": int(rows), "features": len(spec["features"]), "rounds": int(rounds), "load_s": 0.0,
            "labels": np.concatenate(labels), "proba": np.concatenate(proba)}


def main_child(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.spec).read_text())
    started = time.monotonic()
    result = {"naive_lightgbm": naive_lightgbm, "naive_xgboost_hist": naive_xgboost_hist,
              "xgboost_extmem": xgboost_extmem}[args.child](spec)
    out = Path(args.out)
    predictions = out.with_suffix(".npz")
    np.savez(predictions, labels=result.pop("labels"), proba=np.asarray(result.pop("proba"), dtype=np.float64))
    result.update(predictions=str(predictions), child_s=time.monotonic() - started)
    out.write_text(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return main_child(args) if args.child else main_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
