"""The team instance example (Postgres storage) is valid instance config and keeps the project's settings."""

import shutil
from pathlib import Path

import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "memopt_pipeline" / "deploy" / "dagster.postgres.yaml"
VARIABLES = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_SHARED_DIR")


def test_example_is_valid_instance_config_with_postgres_storage(tmp_path, monkeypatch):
    for name in VARIABLES:
        monkeypatch.setenv(name, "5432" if name.endswith("PORT") else f"value-of-{name.lower()}")
    shutil.copy(EXAMPLE, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))  # raises on any schema error
    ref = InstanceRef.from_dir(str(tmp_path))
    assert (ref.storage_data.module_name, ref.storage_data.class_name) == ("dagster_postgres", "DagsterPostgresStorage")
    assert ref.run_coordinator_data.class_name == "QueuedRunCoordinator"
    # No credential is written in the file: every connection field comes from the environment.
    fields = config["storage"]["postgres"]["postgres_db"]
    assert all(set(value) == {"env"} for value in fields.values()), fields


def test_example_keeps_the_project_instance_settings():
    example = yaml.safe_load(EXAMPLE.read_text())
    project = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    assert example["concurrency"]["pools"] == project["concurrency"]["pools"]
    assert example["run_retries"] == project["run_retries"]
    assert example["run_monitoring"] == project["run_monitoring"]
