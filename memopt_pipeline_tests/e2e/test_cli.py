"""`memopt run` end to end: persistent instance, every partition, summary printed."""

from pathlib import Path

import dagster as dg

from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.cli import main
from memopt_pipeline_tests.checkpoint_layout import latest_run_dir, latest_value


def test_memopt_run_materializes_everything_into_the_instance(tiny_dataset, tmp_path, monkeypatch, capsys):
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
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


def test_memopt_run_reports_a_bad_dataset_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    exit_code = main(["run", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert exit_code == 1
    error = capsys.readouterr().err
    assert "DatasetError" in error and "missing does not exist" in error


def test_budget_below_the_process_baseline_is_a_clear_error(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    exit_code = main(["run", "--data", str(tiny_dataset), "--output", str(tmp_path / "out"), "--budget-gb", "0.1"])
    assert exit_code == 1
    error = capsys.readouterr().err
    assert "already uses" in error and "Set the memory budget to at least" in error
