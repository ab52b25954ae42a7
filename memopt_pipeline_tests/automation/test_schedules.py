"""The nightly retrain schedule: cron from the environment, settings from the automation config."""

import dagster as dg
import pytest

from memopt_pipeline.automation.run_config import AUTOMATION_CONFIG_ENV, ChainConfigError
from memopt_pipeline.automation.schedules import (
    DEFAULT_RETRAIN_CRON,
    RETRAIN_CRON_ENV,
    build_nightly_retrain_schedule,
    nightly_retrain_schedule,
    retrain_cron,
)
from memopt_pipeline.definitions import defs


def test_defaults_to_two_am_and_stopped(monkeypatch):
    monkeypatch.delenv(RETRAIN_CRON_ENV, raising=False)
    assert retrain_cron() == DEFAULT_RETRAIN_CRON == "0 2 * * *"
    assert nightly_retrain_schedule.job_name == "retrain_from_current_plan"
    assert nightly_retrain_schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_cron_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(RETRAIN_CRON_ENV, "30 3 * * 1-5")
    assert build_nightly_retrain_schedule(retrain_cron()).cron_schedule == "30 3 * * 1-5"


def test_an_invalid_cron_names_the_variable():
    with pytest.raises(ValueError, match=f"{RETRAIN_CRON_ENV}='every night' is not a valid cron expression"):
        build_nightly_retrain_schedule("every night")


def test_a_tick_carries_the_automation_config_to_the_chain(tmp_path, monkeypatch):
    config = tmp_path / "automation.yaml"
    config.write_text(
        "ops:\n"
        "  instance_model: {config: {max_rounds: 50}}\n"
        "  gene_split: {config: {sample_genes: 100}}\n"
        "resources:\n"
        "  memory_guard: {config: {budget_gb: 2.0}}\n"
    )
    monkeypatch.setenv(AUTOMATION_CONFIG_ENV, str(config))
    with dg.instance_for_test() as instance:
        [request] = nightly_retrain_schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests
    # retrain_from_current_plan has no op config; its resources carry over to the chained runs,
    # the train settings become its chain settings (gene_split is not re-run by a retrain).
    assert request.run_config == {
        "resources": {
            "memory_guard": {"config": {"budget_gb": 2.0}},
            "chain_settings": {"config": {"instance_model": {"max_rounds": 50}}},
        }
    }
    _assert_launchable(request)


def _assert_launchable(request: dg.RunRequest) -> None:
    # What the daemon checks before it creates the run.
    dg.validate_run_config(defs.resolve_job_def("retrain_from_current_plan"), request.run_config)


def test_the_automation_config_may_set_the_chain_settings_directly_but_not_twice(tmp_path, monkeypatch):
    config = tmp_path / "automation.yaml"
    config.write_text(
        "ops:\n"
        "  shap_summary: {config: {sample_rows: 10}}\n"
        "resources:\n"
        "  chain_settings: {config: {cv_folds: {n_folds: 4}}}\n"
    )
    monkeypatch.setenv(AUTOMATION_CONFIG_ENV, str(config))
    with dg.instance_for_test() as instance:
        [request] = nightly_retrain_schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests
    assert request.run_config == {
        "resources": {"chain_settings": {"config": {"cv_folds": {"n_folds": 4}, "shap_summary": {"sample_rows": 10}}}}
    }
    _assert_launchable(request)

    config.write_text(
        "ops:\n"
        "  cv_folds: {config: {n_folds: 5}}\n"
        "resources:\n"
        "  chain_settings: {config: {cv_folds: {n_folds: 4}}}\n"
    )
    with pytest.raises(ChainConfigError, match="cv_folds is set twice, under ops and under resources.chain_settings"):
        nightly_retrain_schedule.evaluate_tick(dg.build_schedule_context())


def test_a_tick_without_automation_config_uses_the_defaults(monkeypatch):
    monkeypatch.delenv(AUTOMATION_CONFIG_ENV, raising=False)
    with dg.instance_for_test() as instance:
        [request] = nightly_retrain_schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests
    assert request.run_config == {}


def test_a_broken_automation_config_fails_the_tick_with_the_fix(tmp_path, monkeypatch):
    config = tmp_path / "automation.yaml"
    config.write_text("ops:\n  instance_modle: {config: {}}\n")
    monkeypatch.setenv(AUTOMATION_CONFIG_ENV, str(config))
    with pytest.raises(ChainConfigError, match=r"unknown ops \['instance_modle'\]"):
        nightly_retrain_schedule.evaluate_tick(dg.build_schedule_context())
    config.write_text("ops:\n  run_report: {config: {title: x}}\n")
    with pytest.raises(ChainConfigError, match="ops.run_report cannot be set for a chained run"):
        nightly_retrain_schedule.evaluate_tick(dg.build_schedule_context())
    monkeypatch.setenv(AUTOMATION_CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ChainConfigError, match="no such file"):
        nightly_retrain_schedule.evaluate_tick(dg.build_schedule_context())
