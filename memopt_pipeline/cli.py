"""`memopt` command line: run the whole graph into an experiment, open the UI on it.

    memopt run [--data PATH] [--budget-gb X] [--output DIR] [--force] ...
    memopt ui [--output DIR]   # dagster dev on that experiment
    memopt demo-data DIR       # write the demo dataset only

An experiment is an output folder (default data/output): its artifacts and, unless
DAGSTER_HOME is set, its own Dagster instance in DIR/.dagster. `memopt run` materializes what
is missing or stale there (running it again after a kill resumes), as ordinary Dagster runs
that `memopt ui` shows; it ends with what was reused and what ran, each stage's peak RSS
and the holdout metrics.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


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
    return {"ops": ops}


def _say(message: str) -> None:
    print(message, flush=True)


def run_pipeline(args: argparse.Namespace):
    """Materialize what is missing or stale in the experiment's instance; returns the Outcome."""
    from memopt_pipeline.automation.experiment import Experiment

    experiment = Experiment(args.output)
    # Step processes and `memopt ui` find the experiment through these.
    os.environ.update({k: v for k, v in experiment.environment().items() if k != "DAGSTER_HOME"})
    if args.parallel:
        return _run_parallel(args, experiment)
    from memopt_pipeline.automation.resumable_run import RunSettings, run_experiment

    # Step-level DEBUG events drown the progress lines; the UI keeps the full event log.
    settings = RunSettings(ops_config=_run_config(args)["ops"], budget_gb=args.budget_gb, force=args.force)
    return run_experiment(experiment, settings, log=_say)


def _run_parallel(args: argparse.Namespace, experiment):
    """--parallel: every stage again, instance partitions side by side in worker processes."""
    from memopt_pipeline.automation.local_run import materialize_pipeline
    from memopt_pipeline.automation.resumable_run import Outcome
    from memopt_pipeline.definitions import build_resources

    with experiment.exclusive(_say), experiment.instance() as instance:
        collected = materialize_pipeline(
            instance,
            resources=build_resources(budget_gb=args.budget_gb, output_dir=str(experiment.output_dir)),
            run_config={**_run_config(args), "loggers": {"console": {"config": {"log_level": "INFO"}}}},
            log=_say,
            parallel_instances=True,
        )
    return Outcome(collected=collected)


def format_summary(collected: dict[str, dict], wall_seconds: float, resumed: str = "") -> str:
    lines = ["", resumed] if resumed else []
    lines += ["", "stage                              peak RSS GiB   budget GiB   seconds"]
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
    parser.add_argument(
        "--output", default=None,
        help="the experiment's folder: artifacts and (without DAGSTER_HOME) its own Dagster instance in "
        "DIR/.dagster (default: data/output)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="recompute every stage (default: reuse every stage whose latest materialization is still current)",
    )
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
        "(each in its own process); this mode runs every stage again (no resume)",
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


def _run_command(args: argparse.Namespace) -> int:
    from memopt_pipeline.automation.resumable_run import RunFailed, Stopped, experiment_summary, install_stop_handlers

    install_stop_handlers()
    started = time.monotonic()
    try:
        outcome = run_pipeline(args)
    except (Stopped, KeyboardInterrupt) as stop:
        print(f"memopt: {stop or 'stopped'}; finished stages are kept: run the same command again to resume",
              file=sys.stderr)
        # The shell convention for death by a signal: 128 + its number.
        return 143 if "(SIGTERM)" in str(stop) else 130
    except RunFailed as failure:
        print(f"memopt: run failed: {failure}", file=sys.stderr)
        print("memopt: finished stages are kept; fix the cause and run again (`memopt ui` shows the full log)", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - reported, not swallowed: exit code 1
        cause = getattr(error, "user_exception", None) or error
        print(f"memopt: run failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        print("memopt: finished stages are kept; fix the cause and run again (`memopt ui` shows the full log)", file=sys.stderr)
        return 1
    resumed = experiment_summary(outcome) if outcome.decisions else ""
    print(format_summary(outcome.collected, time.monotonic() - started, resumed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memopt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_arguments(commands.add_parser("run", help="materialize the whole pipeline"))
    ui = commands.add_parser("ui", help="open the Dagster UI (dagster dev) on an experiment")
    ui.add_argument("--output", default=None, help="the experiment's folder (default: data/output)")
    ui.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to dagster dev")
    demo = commands.add_parser("demo-data", help="generate the demo dataset")
    demo.add_argument("out_dir", nargs="?", default="data/demo")
    # `memopt ui -p 3457`: options that `memopt ui` does not know are dagster dev's.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "ui":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "ui":
        args.extra = [*unknown, *args.extra]

    if args.command == "run":
        return _run_command(args)
    if args.command == "ui":
        from memopt_pipeline.automation.experiment import Experiment

        experiment = Experiment(args.output)
        experiment.prepare()
        environment = {**os.environ, **experiment.environment()}
        target = ["-w", "workspace.yaml"] if Path("workspace.yaml").is_file() else ["-m", "memopt_pipeline.definitions"]
        return subprocess.call([sys.executable, "-m", "dagster", "dev", *target, *args.extra], env=environment)
    from memopt_pipeline.core.data.synthetic import main as synthetic_main

    return synthetic_main([args.out_dir])


if __name__ == "__main__":
    raise SystemExit(main())
