"""`memopt run` end to end (persistent instance, every partition, summary printed, failures told
concisely); its arguments checked at parse time; `memopt ui` passing options on to dagster dev."""

import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memopt_pipeline import cli
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.automation.experiment import Experiment
from memopt_pipeline.cli import build_parser, dagster_dev_command, describe_exception, main
from memopt_pipeline.resources.storage import OUTPUT_DIR_ENV
from memopt_pipeline_tests.checkpoint_layout import latest_run_dir, latest_value


def test_memopt_run_materializes_everything_into_the_instance(tiny_dataset, tmp_path, monkeypatch, capsys):
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(OUTPUT_DIR_ENV, str(tmp_path / "out"))  # memopt run sets it: restored after the test
    monkeypatch.chdir(tmp_path)
    exit_code = main(
        [
            "run", "--data", str(tiny_dataset), "--output", str(tmp_path / "out"), "--budget-gb", "4",
            "--instances", "2", "--folds", "2", "--max-rounds", "30",
        ]
    )
    assert exit_code == 0
    printed = capsys.readouterr().out
    assert "instance_model [instance_1]" in printed
    assert "donor      PR-AUC" in printed and "logloss" in printed
    assert "budget GiB" in printed and " 4.00 " in printed
    report = next(line for line in printed.splitlines() if line.startswith("report: "))
    assert Path(report.removeprefix("report: ")).is_file()

    # A later `dagster dev` on the same DAGSTER_HOME sees these materializations.
    with dg.DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME)) == ["instance_0", "instance_1"]
        for key in ("source_dataset", "dataset_metadata", "memory_plan", "ensemble_model", "holdout_evaluation", "shap_summary"):
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
        partitions = instance.get_materialized_partitions(dg.AssetKey("instance_model"))
        assert partitions == {"instance_0", "instance_1"}
        # The model lives in the folder of the materialization that wrote it (named by its run id).
        run_dir = latest_run_dir(instance, tmp_path / "out", "instance_model", "instance_1")
        assert latest_value(instance, "instance_model", "instance_1")["model_path"] == str(run_dir / "model.txt")
    assert run_dir.parent == (tmp_path / "out" / "artifacts" / "instance_model" / "instance_1").resolve()
    assert (run_dir / "model.txt").exists()


def test_a_failed_run_prints_its_reason_and_fix_in_a_few_lines(tmp_path, monkeypatch, capfd):
    """Not 70-100 lines of Dagster stack trace with the reason last, behind "Failure: DatasetError:"."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # the experiment's own instance, as users run it
    monkeypatch.setenv(OUTPUT_DIR_ENV, str(tmp_path / "out"))  # memopt run sets it: restored after the test
    monkeypatch.chdir(tmp_path)
    no_gene = tmp_path / "no_gene.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0], "splice_type": [0, 1]}), no_gene)
    exit_code = main(["run", "--data", str(no_gene), "--output", str(tmp_path / "out")])
    assert exit_code == 1
    captured = capfd.readouterr()
    printed = (captured.out + captured.err).splitlines()
    assert len(printed) < 10, "\n".join(printed)
    assert "Stack Trace" not in captured.err and "Traceback" not in captured.err
    failed = next(line for line in captured.err.splitlines() if line.startswith("memopt: run failed: "))
    assert failed == (
        f"memopt: run failed: dataset_metadata: {no_gene}: gene column 'gene_id' not found "
        "(columns: ['splice_type', 'x']...); set the gene column name in the dataset config"
    )
    assert "memopt run ... --verbose, or the run's logs in `memopt ui`" in captured.err
    # ... where the trace is indeed kept.
    with Experiment(tmp_path / "out").instance() as instance:
        (failure,) = instance.get_records_for_run(
            instance.get_runs(limit=1)[0].run_id, of_type=dg.DagsterEventType.STEP_FAILURE
        ).records
        error, frames = failure.event_log_entry.dagster_event.step_failure_data.error, []
        while error is not None:
            frames, error = frames + error.stack, error.cause
        assert any("memopt_pipeline/core/data" in frame for frame in frames)


def _run_without_dagster(monkeypatch, error: Exception):
    """`memopt run` up to the point where it would start Dagster runs, which raise ``error``."""
    from memopt_pipeline.automation import resumable_run

    seen = {}

    def run_experiment(experiment, settings, log):
        seen["settings"] = settings
        raise error

    monkeypatch.setattr(resumable_run, "run_experiment", run_experiment)
    monkeypatch.setattr(resumable_run, "install_stop_handlers", lambda: None)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv(OUTPUT_DIR_ENV, "data/output")  # memopt run sets it: restored after the test
    return seen


@pytest.mark.parametrize("verbose", [False, True], ids=["concise", "verbose"])
def test_only_verbose_prints_the_trace_of_an_error(tmp_path, monkeypatch, capsys, verbose):
    seen = _run_without_dagster(monkeypatch, ValueError("budget file unreadable"))
    exit_code = main(["run", "--output", str(tmp_path / "out"), *(["--verbose"] if verbose else [])])
    assert exit_code == 1
    assert seen["settings"].verbose is verbose  # Dagster's own console (with traces) only then
    error = capsys.readouterr().err
    assert "memopt: run failed: ValueError: budget file unreadable" in error
    assert ("Traceback (most recent call last)" in error) is verbose


def test_an_error_in_this_process_is_described_by_its_message():
    from memopt_pipeline.core.data.dataset import DatasetError

    # Ours say the problem and the fix: no class name in front.
    assert describe_exception(DatasetError("data.parquet: no gene column; set --gene-column")) == (
        "data.parquet: no gene column; set --gene-column"
    )
    assert describe_exception(KeyError("gene_id")) == "KeyError: 'gene_id'"
    # Dagster's wrappers (DagsterUserCodeExecutionError and the like) carry what user code raised.
    wrapper = RuntimeError("Error occurred while executing op")
    wrapper.user_exception = DatasetError("no shards under /x; point --data at a folder of Parquet shards")
    assert describe_exception(wrapper) == "no shards under /x; point --data at a folder of Parquet shards"


def test_a_failure_reason_is_printed_once_without_prefixes(tmp_path, monkeypatch, capsys):
    from memopt_pipeline.automation.resumable_run import RunFailed

    _run_without_dagster(monkeypatch, RunFailed("source_dataset: dataset path /x does not exist; set dataset path"))
    assert main(["run", "--output", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "memopt: run failed: source_dataset: dataset path /x does not exist; set dataset path",
        (
            "memopt: finished stages are kept; fix the cause and run the same command again "
            "(full trace: memopt run ... --verbose, or the run's logs in `memopt ui`)"
        ),
    ]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--folds", "1"], "--folds: 1 fold leaves nothing to validate on: use 2 or more folds, or --fast"),
        (["--folds", "0"], "--folds: 0 is not allowed: use 2 or more folds"),
        (["--instances", "-1"], "--instances: -1 is not allowed: use 0 (as the memory plan needs) or more"),
        (["--max-rounds", "0"], "--max-rounds: 0 is not allowed: use 1 or more"),
        (["--demo-genes", "0"], "--demo-genes: 0 is not allowed: use 1 or more"),
        (["--sample-genes", "-5"], "--sample-genes: -5 is not allowed: use 0 (all genes) or more"),
        (["--holdout-fraction", "1"], "--holdout-fraction: 1 is not allowed: use a share in (0, 1)"),
        (["--holdout-fraction", "0"], "--holdout-fraction: 0 is not allowed: use a share in (0, 1)"),
        (["--overlap", "1"], "--overlap: 1 is not allowed: use a share in [0, 1)"),
        (["--overlap", "-0.1"], "--overlap: -0.1 is not allowed: use a share in [0, 1)"),
        (["--plan-safety", "0"], "--plan-safety: 0 is not allowed"),
        (["--budget-gb", "0"], "--budget-gb: 0 is not allowed: the budget must be above 0"),
        (["--budget-gb", "nan"], "--budget-gb: 'nan' is not a finite number"),
        (["--instances", "two"], "--instances: 'two' is not a whole number"),
    ],
)
def test_run_arguments_are_checked_before_anything_runs(option, message, monkeypatch, capsys):
    seen = _run_without_dagster(monkeypatch, AssertionError("must not run"))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *option])
    assert exit_info.value.code == 2 and not seen
    assert f"memopt run: error: argument {message}" in capsys.readouterr().err


def test_values_with_a_meaning_at_the_edges_are_accepted():
    args = build_parser().parse_args(
        ["run", "--instances", "0", "--sample-genes", "0", "--overlap", "0", "--folds", "2", "--plan-safety", "1.3"]
    )
    assert (args.instances, args.sample_genes, args.overlap, args.folds, args.plan_safety) == (0, 0, 0.0, 2, 1.3)


def test_help_shows_defaults_and_the_accepted_inputs(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for expected in (
        "(default: gene_id)", "(default: splice_type)", "(default: 3)", "(default: 0.2)", "(default: 0.85)",
        "a Parquet file or a folder of *.parquet shards", ".csv / .csv.gz file or a folder of them",
        "(default: the generated demo dataset in --demo-dir)", "--verbose",
    ):
        assert expected in text, expected


@pytest.mark.parametrize(
    ("argv", "output", "passed"),
    [
        (["ui", "-p", "3457"], None, ["-p", "3457"]),
        (["ui", "--", "-p", "3457"], None, ["-p", "3457"]),
        (["ui", "-p", "3457", "--output", "exp", "--host", "0.0.0.0"], "exp", ["-p", "3457", "--host", "0.0.0.0"]),
        (["ui", "--output", "exp", "--", "--log-level", "debug"], "exp", ["--log-level", "debug"]),
    ],
    ids=["option", "after-double-dash", "mixed-with-output", "output-then-double-dash"],
)
def test_ui_passes_options_it_does_not_know_to_dagster_dev(argv, output, passed, tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv(OUTPUT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no workspace.yaml here: the module is the code location
    started = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, env: started.append((command, env)) or 0)
    assert main(argv) == 0
    ((command, env),) = started
    assert command == [sys.executable, "-m", "dagster", "dev", "-m", "memopt_pipeline.definitions", *passed]
    assert env["DAGSTER_HOME"] == str((tmp_path / (output or "data/output") / ".dagster").resolve())


def test_ui_uses_the_workspace_file_unless_given_a_code_location(tmp_path):
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text("load_from: []\n")
    dev = [sys.executable, "-m", "dagster", "dev"]
    assert dagster_dev_command(["-p", "1"], workspace) == [*dev, "-w", str(workspace), "-p", "1"]
    assert dagster_dev_command(["-m", "other.defs"], workspace) == [*dev, "-m", "other.defs"]
    assert dagster_dev_command(["--workspace=w.yaml"], workspace) == [*dev, "--workspace=w.yaml"]


def test_budget_below_the_process_baseline_is_a_clear_error(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv(OUTPUT_DIR_ENV, str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    exit_code = main(["run", "--data", str(tiny_dataset), "--output", str(tmp_path / "out"), "--budget-gb", "0.1"])
    assert exit_code == 1
    error = capsys.readouterr().err
    assert "already uses" in error and "Set the memory budget to at least" in error
