"""The dataset sensor: a baseline first, a settled change launches full_training on the watched folder."""

import json
import shutil

import dagster as dg
import pytest

from memopt_pipeline.automation.dataset_sensor import (
    DATA_DIR_ENV,
    FINGERPRINT_TAG,
    INTERVAL_ENV,
    dataset_change_sensor,
    sensor_interval_seconds,
)
from memopt_pipeline.automation.run_config import AUTOMATION_CONFIG_ENV, ChainConfigError
from memopt_pipeline.core.data.dataset import DatasetError
from memopt_pipeline.definitions import defs


@pytest.fixture
def watched(tiny_dataset, tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_dataset, folder)
    monkeypatch.setenv(DATA_DIR_ENV, str(folder))
    monkeypatch.delenv(AUTOMATION_CONFIG_ENV, raising=False)
    return folder


class Ticks:
    """Evaluates the sensor the way the daemon does: each tick starts from the previous cursor."""

    def __init__(self):
        self.cursor = None

    def __call__(self):
        result = dataset_change_sensor.evaluate_tick(dg.build_sensor_context(cursor=self.cursor))
        self.cursor = result.cursor
        return result


def _add_shard(folder):
    shutil.copy(sorted(folder.glob("*.parquet"))[0], folder / "new_shard.parquet")


def test_first_tick_is_a_baseline_and_a_settled_change_launches_full_training(watched):
    tick = Ticks()
    first = tick()
    assert not first.run_requests and "watching" in first.skip_message
    assert not tick().run_requests  # nothing changed

    _add_shard(watched)
    changed = tick()
    assert not changed.run_requests and "waiting one more tick" in changed.skip_message
    [request] = tick().run_requests
    assert dataset_change_sensor.job_name == "full_training"
    assert request.run_config == {"ops": {"source_dataset": {"config": {"path": str(watched.resolve())}}}}
    assert request.tags[FINGERPRINT_TAG] in request.run_key
    assert "no change" in tick().skip_message  # the trained state is the new baseline


def test_a_change_undone_before_it_settled_launches_nothing(watched):
    tick = Ticks()
    tick()
    _add_shard(watched)
    assert "waiting" in tick().skip_message
    (watched / "new_shard.parquet").unlink()
    assert not tick().run_requests
    assert json.loads(tick.cursor)["pending"] is None


def test_the_automation_config_shapes_the_launched_run(watched, tmp_path, monkeypatch):
    config = tmp_path / "automation.yaml"
    config.write_text(
        "ops:\n"
        "  source_dataset: {config: {gene_column: gene_id}}\n"
        "  instance_model: {config: {max_rounds: 20}}\n"
        "execution: {config: {in_process: {}}}\n"
    )
    monkeypatch.setenv(AUTOMATION_CONFIG_ENV, str(config))
    tick = Ticks()
    tick()
    _add_shard(watched)
    tick()
    [request] = tick().run_requests
    # The train stage's ops become the chain settings of the full_training run.
    assert request.run_config == {
        "ops": {"source_dataset": {"config": {"gene_column": "gene_id", "path": str(watched.resolve())}}},
        "resources": {"chain_settings": {"config": {"instance_model": {"max_rounds": 20}}}},
        "execution": {"config": {"in_process": {}}},
    }
    dg.validate_run_config(defs.resolve_job_def("full_training"), request.run_config)  # as the daemon will

    # A config that points the run elsewhere than the watched folder is refused, not half-applied.
    config.write_text("ops:\n  source_dataset: {config: {path: /elsewhere}}\n")
    (watched / "new_shard.parquet").unlink()
    tick()
    with pytest.raises(ChainConfigError, match="remove the path from the automation config"):
        tick()


def test_unset_variable_and_missing_folder_are_reported(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert f"{DATA_DIR_ENV} is not set" in Ticks()().skip_message
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="does not exist"):
        Ticks()()


def test_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert sensor_interval_seconds() == 60
    monkeypatch.setenv(INTERVAL_ENV, "2")
    assert sensor_interval_seconds() == 2
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=f"{INTERVAL_ENV}='soon'"):
        sensor_interval_seconds()
