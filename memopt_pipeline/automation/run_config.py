"""Run config of automated and chained runs.

A run's config may only name the ops of its own job, so the settings of a whole chain are the
starting run's config: its own ops (the prepare stages, for full_training), the
``chain_settings`` resource (the config of the train and evaluate stages' ops, typed and
checked at launch: resources/chain_settings.py), and the run-level sections resources /
execution / loggers, which every later run of the chain reuses (:func:`chained_run_config`).

Schedules and the dataset sensor have no Launchpad: they read one YAML file for the whole
pipeline, named by ``$MEMOPT_AUTOMATION_CONFIG`` (same shape as a run config, every stage's ops
allowed), and turn it into the starting run's config: the later stages' ops move into
``resources.chain_settings``, which the file may also set directly (:func:`chain_start_run_config`).

A code location may size each instance partition's run from the materialized plan (on Kubernetes,
the ``instance_model`` pod's memory and the matching MemoryGuard budget: deploy/k8s.py). A run
launched with a run config of its own replaces the job's partitioned config, so every sensor that
launches ``train_instances`` runs lays that sizing over its own config (:func:`with_instance_run_config`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import dagster as dg
import yaml

from memopt_pipeline.assets import FINALIZE_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
from memopt_pipeline.resources.chain_settings import CHAIN_SETTINGS_KEY, ChainSettings

AUTOMATION_CONFIG_ENV = "MEMOPT_AUTOMATION_CONFIG"
# Sections of a run config that are not per-op and mean the same in every job of the project.
RUN_LEVEL_SECTIONS = ("resources", "execution", "loggers")
_ALL_SECTIONS = ("ops", *RUN_LEVEL_SECTIONS)
_CHAINED_OPS = frozenset(a.key.to_user_string() for a in [*INSTANCE_ASSETS, *FINALIZE_ASSETS])
_PIPELINE_OPS = frozenset(a.key.to_user_string() for a in PREPARE_ASSETS) | _CHAINED_OPS
# The chained ops that have settings: ChainSettings' fields are named after them.
_SETTINGS_OPS = frozenset(ChainSettings.model_fields)


class ChainConfigError(ValueError):
    """The chain's configuration (a starting run or the automation file) cannot be used; the message says the fix."""


InstanceRunConfigFn = Callable[[str, dg.DagsterInstance], Mapping]
"""The run config one instance partition's ``train_instances`` run needs in this code location, from
the plan materialized in the given instance: (partition key, instance) -> run config. On Kubernetes it
is deploy/k8s.py's plan-sized ``instance_model`` pod (the same function as the job's partitioned
config); the local code location has none. Raises ValueError or RuntimeError saying the fix."""


def _names(assets: Sequence[dg.AssetsDefinition]) -> set[str]:
    return {a.key.to_user_string() for a in assets}


def run_config_for(assets: Sequence[dg.AssetsDefinition], ops: Mapping, run_level: Mapping) -> dict:
    """Run config of a job over ``assets``: the ops config of those assets only, plus the run-level sections."""
    names = _names(assets)
    config = {section: value for section, value in run_level.items() if section in RUN_LEVEL_SECTIONS and value}
    selected = {name: value for name, value in ops.items() if name in names}
    if selected:
        config["ops"] = selected
    return config


def _overlaid(base: Mapping, over: Mapping) -> dict:
    """``base`` with ``over`` laid on top: nested mappings merged key by key, any other value of ``over`` wins."""
    merged = dict(base)
    for key, value in over.items():
        current = merged.get(key)
        merged[key] = _overlaid(current, value) if isinstance(value, Mapping) and isinstance(current, Mapping) else value
    return merged


def with_instance_run_config(
    run_config: Mapping, instance_run_config_fn: InstanceRunConfigFn | None, partition_key: str, instance: dg.DagsterInstance
) -> dict:
    """``run_config`` of a ``train_instances`` run for ``partition_key``, with the code location's
    per-instance sizing laid over it (unchanged when the code location has none).

    The sizing wins where both set a value: on Kubernetes the ``instance_model`` pod's memory and
    the MemoryGuard budget are computed together (the guard's budget is the pod's request), so a
    budget carried over from the chain's starting run (the budget the plan was made for) must not
    replace the one that fits the pod. Everything else in ``run_config`` (ops settings, other
    resources' config, the rest of the executor's config) is kept. Raises ChainConfigError, with
    the fix, when the plan cannot size the partition."""
    if instance_run_config_fn is None:
        return dict(run_config)
    try:
        sizing = instance_run_config_fn(partition_key, instance)
    except (RuntimeError, ValueError) as error:
        raise ChainConfigError(str(error)) from error
    return _overlaid(run_config, sizing)


def chain_settings_of(run_config: Mapping | None) -> dict:
    """The ``chain_settings`` resource's config in a run config ({} when absent: every default)."""
    resources = (run_config or {}).get("resources") or {}
    return dict((resources.get(CHAIN_SETTINGS_KEY) or {}).get("config") or {})


def chained_run_config(assets: Sequence[dg.AssetsDefinition], start_run_config: Mapping | None) -> dict:
    """Run config of a chained run over ``assets``, from the run config of the chain's starting run:
    those assets' ops config from its chain settings, and its run-level sections without
    chain_settings (no chained job takes that resource)."""
    start_run_config = start_run_config or {}
    ops = {name: {"config": value} for name, value in chain_settings_of(start_run_config).items() if value is not None}
    resources = {k: v for k, v in (start_run_config.get("resources") or {}).items() if k != CHAIN_SETTINGS_KEY}
    return run_config_for(assets, ops, {**start_run_config, "resources": resources})


def load_automation_config() -> dict:
    """The whole-pipeline run config named by ``$MEMOPT_AUTOMATION_CONFIG``; {} when the variable is unset."""
    location = os.environ.get(AUTOMATION_CONFIG_ENV, "").strip()
    if not location:
        return {}
    path = Path(location)
    if not path.is_file():
        raise ChainConfigError(f"{AUTOMATION_CONFIG_ENV}={location}: no such file; point it at a YAML run config or unset it")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ChainConfigError(f"{AUTOMATION_CONFIG_ENV}={location} is not valid YAML: {error}") from error
    if not isinstance(config, dict) or set(config) - set(_ALL_SECTIONS):
        raise ChainConfigError(
            f"{AUTOMATION_CONFIG_ENV}={location}: expected a run config with only the sections {list(_ALL_SECTIONS)}"
        )
    unknown = sorted(set(config.get("ops") or {}) - _PIPELINE_OPS)
    if unknown:
        raise ChainConfigError(f"{AUTOMATION_CONFIG_ENV}={location}: unknown ops {unknown}; known: {sorted(_PIPELINE_OPS)}")
    return config


def chain_start_run_config(config: Mapping, start_assets: Sequence[dg.AssetsDefinition]) -> dict:
    """Run config of a run that starts a chain, from a whole-pipeline ``config``: the ops config
    of ``start_assets``, the later stages' ops config as the chain settings, the run-level sections."""
    ops = config.get("ops") or {}
    settings = chain_settings_of(config)
    for name in sorted(set(ops) & _CHAINED_OPS):
        entry = ops[name] or {}
        if name not in _SETTINGS_OPS or not isinstance(entry, Mapping) or set(entry) - {"config"}:
            raise ChainConfigError(
                f"{AUTOMATION_CONFIG_ENV}: ops.{name} cannot be set for a chained run; only the config of "
                f"{sorted(_SETTINGS_OPS)} can, as {name}: {{config: {{...}}}}"
            )
        if name in settings:
            raise ChainConfigError(
                f"{AUTOMATION_CONFIG_ENV}: {name} is set twice, under ops and under resources.{CHAIN_SETTINGS_KEY}; "
                "keep one of them"
            )
        if entry.get("config"):
            settings[name] = entry["config"]
    resources = dict(config.get("resources") or {})
    if settings:
        resources[CHAIN_SETTINGS_KEY] = {"config": settings}
    return run_config_for(start_assets, ops, {**config, "resources": resources})
