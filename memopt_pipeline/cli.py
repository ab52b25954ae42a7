"""`memopt` command line: run the whole graph into the project's Dagster instance, open the UI.

    memopt run [--data PATH] [--budget-gb X] [--output DIR] ...
    memopt ui            # dagster dev on this code location
    memopt demo-data DIR # write the demo dataset only

`memopt run` materializes every asset, every instance partition included, as ordinary
Dagster runs in the instance configured by ./dagster.yaml, so `dagster dev` afterwards shows
them; it ends with a summary of stages, peak RSS and holdout metrics.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def _instance():
    """The project's Dagster instance: $DAGSTER_HOME if set, else ./dagster.yaml (as `dagster dev` does)."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    config_dir = Path.cwd()
    if not (config_dir / "dagster.yaml").exists():
        raise SystemExit(
            "no DAGSTER_HOME set and no dagster.yaml in the current folder: run from the repository root "
            "or set DAGSTER_HOME"
        )
    home = config_dir / ".dagster"
    home.mkdir(exist_ok=True)
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home), config_dir=str(config_dir)))


def _run_config(args: argparse.Namespace) -> dict:
    ops: dict = {
        "source_dataset": {
            "config": {
                "path": args.data or "",
                "gene_column": args.gene_column,
                "label_column": args.label_column,
                "demo_genes": args.demo_genes,
                "demo_dir": args.demo_dir,
            }
        },
        "gene_split": {"config": {"sample_genes": args.sample_genes, "holdout_fraction": args.holdout_fraction}},
        "instance_assignment": {"config": {"n_instances": args.instances, "overlap": args.overlap}},
        "cv_folds": {"config": {"n_folds": args.folds, "fast": args.fast}},
        "instance_model": {
            "config": {
                "max_rounds": args.max_rounds,
                "backend": args.backend,
                "objective": args.objective,
                "calibration": args.calibration,
            }
        },
        "ensemble_model": {"config": {"weighting": args.weighting}},
        "memory_plan": {"config": {"safety": args.plan_safety}},
    }
    # Step-level DEBUG events drown the progress lines; the UI keeps the full event log.
    return {"ops": ops, "loggers": {"console": {"config": {"log_level": "INFO"}}}}


def run_pipeline(args: argparse.Namespace) -> dict:
    """Materialize the whole graph into the project's instance; returns per-stage metadata."""
    from memopt_pipeline.automation.local_run import materialize_pipeline
    from memopt_pipeline.definitions import build_resources

    with _instance() as instance:
        return materialize_pipeline(
            instance,
            resources=build_resources(budget_gb=args.budget_gb, output_dir=args.output),
            run_config=_run_config(args),
            log=lambda message: print(message, flush=True),
            parallel_instances=args.parallel,
        )


def format_summary(collected: dict[str, dict], wall_seconds: float) -> str:
    lines = ["", "stage                              peak RSS GiB   budget GiB   seconds"]
    for stage, meta in collected.items():
        if "peak_rss_gb" in meta:
            lines.append(
                f"{stage:<34} {meta['peak_rss_gb']:>12.2f} {meta['budget_gb']:>12.2f} {meta.get('stage_seconds', 0):>9.1f}"
            )
    holdout = collected.get("holdout_evaluation")
    if holdout:
        lines.append("")
        lines.append(
            f"holdout ({holdout['holdout_genes']} genes, {holdout['holdout_rows']:,} rows): "
            f"logloss {holdout['logloss']:.4f} vs class prior {holdout['baseline_logloss']:.4f}"
        )
        for key in sorted(k for k in holdout if k.endswith("_pr_auc")):
            name = key[: -len("_pr_auc")]
            lines.append(
                f"  {name:<10} PR-AUC {holdout[key]:.3f} (prior {holdout[name + '_prevalence']:.3f})  "
                f"ROC-AUC {holdout[name + '_roc_auc']:.3f}  top-k acc {holdout[name + '_top_k_accuracy']:.3f}"
            )
    report = collected.get("run_report")
    if report:
        lines.append("")
        lines.append(f"report: {report['report_path']}")
    lines.append(f"total wall time {wall_seconds:.1f} s")
    return "\n".join(lines)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN, SyntheticSpec

    parser.add_argument("--data", default="", help="Parquet file or folder of shards (default: generated demo data)")
    parser.add_argument("--gene-column", default=GENE_COLUMN, help="group (gene) id column")
    parser.add_argument("--label-column", default=LABEL_COLUMN, help="class label column")
    parser.add_argument("--budget-gb", type=float, default=None, help="memory budget in GiB (default: 60%% of RAM)")
    parser.add_argument("--output", default=None, help="output folder (default: data/output)")
    parser.add_argument("--sample-genes", type=int, default=0, help="train on this many genes only (0 = all)")
    parser.add_argument("--holdout-fraction", type=float, default=0.2, help="share of genes held out")
    parser.add_argument("--instances", type=int, default=0, help="instance models (0 = as the plan needs)")
    parser.add_argument("--overlap", type=float, default=0.1, help="gene overlap between instances")
    parser.add_argument("--folds", type=int, default=3, help="gene-aware CV folds per instance")
    parser.add_argument(
        "--fast", action="store_true", help="fast mode: one gene-aware 95/5 validation split instead of k folds"
    )
    parser.add_argument("--max-rounds", type=int, default=300, help="max boosting rounds in phase 1")
    parser.add_argument(
        "--parallel", action="store_true",
        help="train instance models side by side, as many at once as the plan's predicted peaks fit the budget "
        "(each in its own process)",
    )
    parser.add_argument(
        "--objective", choices=["softmax", "ovr"], default="softmax", help="multiclass softmax or one-vs-rest"
    )
    parser.add_argument(
        "--calibration", choices=["platt", "isotonic", "none"], default="platt",
        help="per-class calibration fitted on out-of-fold predictions",
    )
    parser.add_argument(
        "--weighting", choices=["equal", "validation"], default="equal",
        help="ensemble weights: equal, or proportional to 1 / cross-validated logloss",
    )
    parser.add_argument("--backend", choices=["lightgbm", "xgboost"], default="lightgbm", help="boosting library")
    parser.add_argument(
        "--plan-safety", type=float, default=0.85,
        help="share of the budget the plan may fill (values above 1 over-commit on purpose, e.g. to exercise "
        "the out-of-memory recovery ladder)",
    )
    parser.add_argument("--demo-genes", type=int, default=SyntheticSpec().n_genes, help="genes in the demo dataset")
    parser.add_argument("--demo-dir", default="data/demo", help="where the demo dataset is generated")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memopt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_arguments(commands.add_parser("run", help="materialize the whole pipeline"))
    ui = commands.add_parser("ui", help="open the Dagster UI (dagster dev) on this code location")
    ui.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to dagster dev")
    demo = commands.add_parser("demo-data", help="generate the demo dataset")
    demo.add_argument("out_dir", nargs="?", default="data/demo")
    args = parser.parse_args(argv)

    if args.command == "run":
        started = time.monotonic()
        try:
            collected = run_pipeline(args)
        except Exception as error:  # noqa: BLE001 - reported, not swallowed: exit code 1
            cause = getattr(error, "user_exception", None) or error
            print(f"memopt: run failed: {type(cause).__name__}: {cause}", file=sys.stderr)
            print("memopt: what succeeded is kept; fix the cause and run again (see `dagster dev` for the full log)", file=sys.stderr)
            return 1
        print(format_summary(collected, time.monotonic() - started))
        return 0
    if args.command == "ui":
        return subprocess.call([sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", *args.extra])
    from memopt_pipeline.core.data.synthetic import main as synthetic_main

    return synthetic_main([args.out_dir])


if __name__ == "__main__":
    raise SystemExit(main())
