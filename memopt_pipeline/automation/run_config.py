"""Run config of automated and chained runs.

A run's config may only name the ops of its own job, so the settings of a whole chain travel
in two parts: the starting run's own config (its ops, plus the run-level sections resources /
execution / loggers, which every later run of the chain reuses), and the tag
``memopt/chain_config``: JSON ``{"ops": {...}}`` for the ops of the train and evaluate stages.

Schedules and the dataset sensor have no Launchpad: they read one YAML file for the whole
pipeline, named by ``$MEMOPT_AUTOMATION_CONFIG`` (same shape as a run config, every stage's ops
allowed), and split it into those two parts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import dagster as dg
import yaml

from memopt_pipeline.assets import FINALIZE_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
from memopt_pipeline.automation.jobs import CHAIN_CONFIG_TAG

AUTOMATION_CONFIG_ENV = "MEMOPT_AUTOMATION_CONFIG"
# Sections of a run config that are not per-op and mean the same in every job of the project.
RUN_LEVEL_SECTIONS = ("resources", "execution", "loggers")
_ALL_SECTIONS = ("ops", *RUN_LEVEL_SECTIONS)
_CHAINED_OPS = frozenset(a.key.to_user_string() for a in [*INSTANCE_ASSETS, *FINALIZE_ASSETS])
_PIPELINE_OPS = frozenset(a.key.to_user_string() for a in PREPARE_ASSETS) | _CHAINED_OPS


class ChainConfigError(ValueError):
    """The chain's configuration (tag or automation file) cannot be used; the message says the fix."""


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


def parse_chain_config(tags: Mapping[str, str]) -> dict:
    """The ops config of the chained stages from a run's ``memopt/chain_config`` tag ({} when absent)."""
    text = tags.get(CHAIN_CONFIG_TAG)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ChainConfigError(f"tag {CHAIN_CONFIG_TAG} is not valid JSON ({error}); fix the tag and start the chain again") from error
    if not isinstance(value, dict) or set(value) - {"ops"}:
        raise ChainConfigError(
            f"tag {CHAIN_CONFIG_TAG} must be a JSON object with only an \"ops\" key, e.g. "
            '{"ops": {"instance_model": {"config": {"max_rounds": 100}}}}; resources, execution and loggers '
            "come from the starting run's own config"
        )
    ops = value.get("ops", {})
    if not isinstance(ops, dict):
        raise ChainConfigError(f"tag {CHAIN_CONFIG_TAG}: \"ops\" must be an object mapping op names to their config")
    unknown = sorted(set(ops) - _CHAINED_OPS)
    if unknown:
        raise ChainConfigError(
            f"tag {CHAIN_CONFIG_TAG} names ops that no chained run has: {unknown}; it may only configure "
            f"{sorted(_CHAINED_OPS)} (the starting run's own config holds the others)"
        )
    return ops


def chain_config_tag(ops: Mapping) -> dict[str, str]:
    """The tag that hands ``ops`` (config of the chained stages only) to the chain sensors."""
    chained = {name: value for name, value in ops.items() if name in _CHAINED_OPS}
    return {CHAIN_CONFIG_TAG: json.dumps({"ops": chained}, sort_keys=True)} if chained else {}


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


def chain_start_request(
    config: Mapping, start_assets: Sequence[dg.AssetsDefinition]
) -> tuple[dict, dict[str, str]]:
    """(run config, tags) of a run that starts a chain, from a whole-pipeline ``config``."""
    ops = config.get("ops") or {}
    return run_config_for(start_assets, ops, config), chain_config_tag(ops)
