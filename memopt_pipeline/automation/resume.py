"""Which stages `memopt run` can reuse: the checkpoint rule, read from Dagster's own versions.

A stage (an asset, or one partition of it) is reused when its latest materialization in the
experiment's instance
- was made by the asset's current ``code_version``;
- carries the config version (``memopt/config_version``) the planned run would give it: the
  asset's config with defaults filled in, plus the settings from outside the config that change
  its result (the input files' fingerprint for ``source_dataset``, the budget for ``memory_plan``);
- read the current data version of each upstream asset (``dagster/input_data_version/<key>``)
  and no upstream stage ran again in this invocation;
- still has its files: the value it wrote and every file under the output folder it names.
Anything else runs, and so does everything downstream of it. ``force`` runs everything.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from memopt_pipeline.assets.dataset import DatasetConfig, source_version_settings
from memopt_pipeline.assets.versioning import CONFIG_VERSION_TAG, config_version
from memopt_pipeline.resources import MemoryGuard
from memopt_pipeline.resources.checkpoints import latest_materialization, recorded_value_path, strings_in

CODE_VERSION_TAG = "dagster/code_version"
DATA_VERSION_TAG = "dagster/data_version"
INPUT_DATA_VERSION_PREFIX = "dagster/input_data_version/"


@dataclass(frozen=True)
class Decision:
    asset: str
    partition: str | None
    reuse: bool
    reason: str

    @property
    def label(self) -> str:
        return f"{self.asset} [{self.partition}]" if self.partition else self.asset


def config_class(assets_def: dg.AssetsDefinition) -> type[dg.Config] | None:
    """The dg.Config class of the asset's ``config`` parameter, if it has one."""
    function = assets_def.op.compute_fn.decorated_fn
    hints = typing.get_type_hints(function)
    cls = hints.get("config")
    return cls if isinstance(cls, type) and issubclass(cls, dg.Config) else None


def latest_record(instance: dg.DagsterInstance, asset: str, partition: str | None = None):
    return latest_materialization(instance, dg.AssetKey(asset), partition)


def _tags(record) -> dict[str, str]:
    return dict(record.asset_materialization.tags or {}) if record else {}


def missing_files(record, output_dir: Path) -> list[str]:
    """Files a materialization wrote or points to, under the output folder, that are gone."""
    value_file = recorded_value_path(record)
    if value_file is None:
        return []
    if not value_file.is_file():
        return [str(value_file)]
    try:
        value = json.loads(value_file.read_text())
    except (OSError, json.JSONDecodeError):
        return [str(value_file)]
    root = str(output_dir)
    return [p for p in set(strings_in(value)) if p.startswith(root + "/") and not Path(p).exists()]


class ResumePlanner:
    """Decides stage by stage, in graph order, whether the latest materialization can be reused."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        assets: list[dg.AssetsDefinition],
        *,
        ops_config: dict,
        memory_guard: MemoryGuard,
        output_dir: Path,
        force: bool = False,
    ):
        self.instance = instance
        self.assets = {a.key.to_user_string(): a for a in assets}
        self.ops_config = ops_config
        self.memory_guard = memory_guard
        self.output_dir = output_dir
        self.force = force
        self.ran: set[tuple[str, str | None]] = set()  # (asset, partition) run in this invocation
        self.decisions: list[Decision] = []

    def expected_config_version(self, asset: str) -> str:
        assets_def = self.assets[asset]
        cls = config_class(assets_def)
        given = self.ops_config.get(asset, {}).get("config", {})
        config = cls(**given) if cls else None
        return config_version(config, **self._settings(asset, config))

    def _settings(self, asset: str, config: dg.Config | None) -> dict:
        # The same settings the assets pass to versioned_output (assets/dataset.py, assets/planning.py).
        if asset == "source_dataset":
            assert isinstance(config, DatasetConfig)
            return {"input": source_version_settings(config)}
        if asset == "memory_plan":
            return {"budget_bytes": self.memory_guard.budget_bytes()}
        return {}

    def decide(self, asset: str, partition: str | None = None) -> Decision:
        decision = self._decide(asset, partition)
        self.decisions.append(decision)
        if not decision.reuse:
            self.ran.add((asset, partition))
        return decision

    def _decide(self, asset: str, partition: str | None) -> Decision:
        def run(reason: str) -> Decision:
            return Decision(asset, partition, False, reason)

        if self.force:
            return run("--force")
        record = latest_record(self.instance, asset, partition)
        if record is None:
            return run("never materialized")
        tags = _tags(record)
        assets_def = self.assets[asset]
        code_version = assets_def.code_versions_by_key[assets_def.key]
        if tags.get(CODE_VERSION_TAG) != code_version:
            return run(f"code version {tags.get(CODE_VERSION_TAG)} -> {code_version}")
        try:
            expected = self.expected_config_version(asset)
        except Exception as error:  # noqa: BLE001 - e.g. the input path is gone: the stage itself says why
            return run(f"cannot version its inputs ({type(error).__name__})")
        if tags.get(CONFIG_VERSION_TAG) != expected:
            return run("config changed")
        for parent in sorted(assets_def.asset_deps[assets_def.key], key=lambda k: k.to_user_string()):
            name = parent.to_user_string()
            parent_partitioned = self.assets[name].partitions_def is not None
            same_partition = partition if parent_partitioned and partition else None
            if any(
                ran_asset == name and (not parent_partitioned or not partition or ran_partition == partition)
                for ran_asset, ran_partition in self.ran
            ):
                return run(f"{name} ran again")
            parent_record = latest_record(self.instance, name, same_partition)
            if parent_record is None:
                return run(f"{name} has no materialization")
            if parent_partitioned:
                # Dagster records a combined version for partitioned inputs; what matters is that
                # every partition read (the same one, or all of them for a fan-in like the
                # ensemble) is older than this materialization.
                keys = [partition] if partition else self.instance.get_materialized_partitions(parent)
                if any(
                    (r := latest_record(self.instance, name, key)) is None or r.storage_id > record.storage_id
                    for key in keys
                ):
                    return run(f"{name} changed since")
            elif tags.get(INPUT_DATA_VERSION_PREFIX + name) != _tags(parent_record).get(DATA_VERSION_TAG):
                return run(f"{name} has a new data version")
        missing = missing_files(record, self.output_dir)
        if missing:
            return run(f"{len(missing)} of its files are gone (e.g. {missing[0]})")
        return Decision(asset, partition, True, f"reused (run {record.run_id[:8]})")
