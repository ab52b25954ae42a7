"""`memopt` command line: run the whole graph into an experiment, open the UI on it.

    memopt run [--data PATH] [--budget-gb X] [--output DIR] [--force] [--verbose] ...
    memopt ui [--output DIR] [dagster dev options, e.g. -p 3457]   # dagster dev on that experiment
    memopt demo-data DIR       # write the demo dataset only

An experiment is an output folder (default data/output): its artifacts and, unless
DAGSTER_HOME is set, its own Dagster instance in DIR/.dagster. `memopt run` materializes what
is missing or stale there (running it again after a kill resumes), as ordinary Dagster runs
that `memopt ui` shows; it ends with what was reused and what ran, each stage's peak RSS
and the holdout metrics. A failure prints its reason and fix, without a stack trace (--verbose
prints it; the run's logs in `memopt ui` always have it).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
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
    settings = RunSettings(
        ops_config=_run_config(args)["ops"], budget_gb=args.budget_gb, force=args.force, verbose=args.verbose
    )
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


# --- values checked at parse time: a typo fails in a second, not after minutes of earlier stages ---
def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def count(minimum: int, meaning_of_zero: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number >= minimum (0 allowed, with its meaning, when minimum is 0)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            allowed = f"0 ({meaning_of_zero}) or more" if minimum == 0 else f"{minimum} or more"
            raise argparse.ArgumentTypeError(f"{value} is not allowed: use {allowed}")
        return value

    return parse


def folds(text: str) -> int:
    value = _integer(text)
    if value < 2:
        problem = "1 fold leaves nothing to validate on" if value == 1 else f"{value} is not allowed"
        raise argparse.ArgumentTypeError(
            f"{problem}: use 2 or more folds, or --fast for one gene-aware 95%/5% validation split instead of k folds"
        )
    return value


def fraction(low: float, high: float, example: float, *, low_inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in (low, high), or [low, high) with low_inclusive."""
    shown = f"{'[' if low_inclusive else '('}{low:g}, {high:g})"

    def parse(text: str) -> float:
        value = _number(text)
        if not (low <= value < high if low_inclusive else low < value < high):
            raise argparse.ArgumentTypeError(f"{value:g} is not allowed: use a share in {shown}, e.g. {example:g}")
        return value

    return parse


def positive(what: str) -> Callable[[str], float]:
    """An argparse type: a number above 0."""

    def parse(text: str) -> float:
        value = _number(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{value:g} is not allowed: {what} must be above 0")
        return value

    return parse


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written; "(default: X)" after options whose default is a value (the
    others say in words what happens without them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default == "" or action.default is False or "default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN, SyntheticSpec

    parser.add_argument(
        "--data", default="",
        help="the input: a Parquet file or a folder of *.parquet shards (searched recursively), or a "
        "comma-separated .csv / .csv.gz file or a folder of them, streamed into Parquet shards first "
        "(default: the generated demo dataset in --demo-dir)",
    )
    parser.add_argument(
        "--gene-column", default=GENE_COLUMN,
        help="column with each row's group (gene) id: a gene's rows are never split between training, "
        "validation and holdout",
    )
    parser.add_argument("--label-column", default=LABEL_COLUMN, help="column with each row's class label")
    parser.add_argument(
        "--budget-gb", type=positive("the budget"), default=None, help="memory budget in GiB (default: 60%% of RAM)"
    )
    parser.add_argument(
        "--output", default=None,
        help="the experiment's folder: artifacts and (without DAGSTER_HOME) its own Dagster instance in "
        "DIR/.dagster (default: data/output)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="recompute every stage (default: reuse every stage whose latest materialization is still current)",
    )
    parser.add_argument(
        "--sample-genes", type=count(0, "all genes"), default=0,
        help="train and evaluate on this many randomly chosen genes only (0 = all)",
    )
    parser.add_argument(
        "--holdout-fraction", type=fraction(0, 1, 0.2), default=0.2,
        help="share of the genes held out for evaluation, between 0 and 1",
    )
    parser.add_argument(
        "--instances", type=count(0, "as the memory plan needs"), default=0,
        help="instance models (0 = as few as the memory plan allows; more than that if asked)",
    )
    parser.add_argument(
        "--overlap", type=fraction(0, 1, 0.1, low_inclusive=True), default=0.1,
        help="share of extra genes each instance borrows from the others, 0 to below 1",
    )
    parser.add_argument(
        "--folds", type=folds, default=3, help="gene-aware cross-validation folds per instance, 2 or more"
    )
    parser.add_argument(
        "--fast", action="store_true",
        help="fast mode: one gene-aware 95%%/5%% validation split instead of k folds (--folds is ignored)",
    )
    parser.add_argument("--max-rounds", type=count(1), default=300, help="max boosting rounds in phase 1")
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
        "--plan-safety", type=positive("the plan's share of the budget"), default=0.85,
        help="share of the budget the plan may fill, above 0 (values above 1 over-commit on purpose, e.g. to "
        "exercise the out-of-memory recovery ladder)",
    )
    parser.add_argument(
        "--demo-genes", type=count(1), default=SyntheticSpec().n_genes, help="genes in the demo dataset (no --data)"
    )
    parser.add_argument("--demo-dir", default="data/demo", help="where the demo dataset is generated")
    parser.add_argument(
        "--verbose", action="store_true",
        help="print Dagster's full log, stack traces included, instead of only a failure's reason "
        "(the run's logs in `memopt ui` always have them)",
    )


def describe_exception(error: BaseException) -> str:
    """What a user needs of an exception raised in this process: its reason, not Dagster's wrapper."""
    from memopt_pipeline.automation.resumable_run import reason_text

    cause = getattr(error, "user_exception", None) or error
    return reason_text(f"{type(cause).__module__}.{type(cause).__qualname__}", str(cause))


def _report_failure(reason: str, verbose: bool) -> None:
    # The reason (our errors say the fix too) and what to do next; the trace only on request.
    trace = "above, and in" if verbose else "memopt run ... --verbose, or"
    print(f"memopt: run failed: {reason}", file=sys.stderr)
    print(
        f"memopt: finished stages are kept; fix the cause and run the same command again "
        f"(full trace: {trace} the run's logs in `memopt ui`)",
        file=sys.stderr,
    )


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
        _report_failure(str(failure), args.verbose)
        return 1
    except Exception as error:  # noqa: BLE001 - reported, not swallowed: exit code 1
        if args.verbose:
            traceback.print_exc()
        _report_failure(describe_exception(error), args.verbose)
        return 1
    resumed = experiment_summary(outcome) if outcome.decisions else ""
    print(format_summary(outcome.collected, time.monotonic() - started, resumed))
    return 0


# dagster dev options that choose the code location; given one, `memopt ui` adds none of its own.
_DAGSTER_TARGET_OPTIONS = (
    "-w", "--workspace", "-m", "--module-name", "-f", "--python-file", "--package-name",
    "--autoload-defs-module-name", "--grpc-port", "--grpc-socket", "--empty-workspace",
)


def dagster_dev_command(passed: list[str], workspace: Path = Path("workspace.yaml")) -> list[str]:
    """The `dagster dev` command line of `memopt ui`: this code location plus the options passed on.

    ``passed`` is what `memopt ui` did not recognise itself (``-p 3457``, ``--host 0.0.0.0``); a ``--``
    before them (``memopt ui -- -p 3457``) is dropped, as dagster dev would take what follows it
    for arguments, not options.
    """
    passed = list(passed)
    if "--" in passed:
        passed.remove("--")
    if any(arg.split("=", 1)[0] in _DAGSTER_TARGET_OPTIONS for arg in passed):
        target = []
    elif workspace.is_file():
        target = ["-w", str(workspace)]
    else:
        target = ["-m", "memopt_pipeline.definitions"]
    return [sys.executable, "-m", "dagster", "dev", *target, *passed]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description=__doc__, formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    # A short usage line: an argument error is then two lines, not twelve (--help lists the options).
    run = commands.add_parser(
        "run", help="materialize the whole pipeline", usage="%(prog)s [options]", formatter_class=_HelpFormatter
    )
    _add_run_arguments(run)
    ui = commands.add_parser(
        "ui",
        help="open the Dagster UI (dagster dev) on an experiment",
        description="dagster dev on an experiment's instance. Options that memopt ui does not know itself\n"
        "go to dagster dev, e.g. memopt ui -p 3457 --host 0.0.0.0 (write --host: -h is this help);\n"
        "after --, everything does: memopt ui -- -p 3457.",
        formatter_class=_HelpFormatter,
        # Only --output exactly is memopt's: an abbreviation could swallow a dagster dev option.
        allow_abbrev=False,
    )
    ui.add_argument("--output", default=None, help="the experiment's folder (default: data/output)")
    demo = commands.add_parser("demo-data", help="generate the demo dataset", formatter_class=_HelpFormatter)
    demo.add_argument("out_dir", nargs="?", default="data/demo", help="where the demo dataset is written")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `memopt ui -p 3457`: options that `memopt ui` does not know are dagster dev's.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "ui":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    if args.command == "run":
        return _run_command(args)
    if args.command == "ui":
        from memopt_pipeline.automation.experiment import Experiment

        experiment = Experiment(args.output)
        experiment.prepare()
        environment = {**os.environ, **experiment.environment()}
        return subprocess.call(dagster_dev_command(unknown), env=environment)
    from memopt_pipeline.core.data.synthetic import main as synthetic_main

    return synthetic_main([args.out_dir])


if __name__ == "__main__":
    raise SystemExit(main())
