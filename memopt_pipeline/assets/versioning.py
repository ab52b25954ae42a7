"""Versions that make a materialization a reusable checkpoint.

Dagster decides what is stale ("unsynced" in the UI) from code versions and data versions: a
materialization records its asset's ``code_version`` and the data versions of the inputs it
read. Config is not part of either, so each asset folds the config that changes its result
into the data version it reports: ``data version = hash(code version, config version, input
data versions)``, and records the config version as the tag ``memopt/config_version``.
Changing ``max_rounds`` therefore changes ``instance_model``'s data version when it runs again,
and everything downstream becomes unsynced, while the dataset stages keep theirs.

``memopt run`` (automation/resume.py) reads the same tags to decide what to reuse.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

import dagster as dg

from memopt_pipeline.assets.display import display_metadata

CONFIG_VERSION_TAG = "memopt/config_version"


def _digest(payload: Any, length: int) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def config_version(config: dg.Config | dict | None, **settings: Any) -> str:
    """A short hash of the asset's config (all fields, defaults included) and of ``settings``:
    values from outside the config that change the result (e.g. the budget the plan is made for)."""
    if isinstance(config, dg.Config):
        config = config.model_dump(mode="json")
    return _digest({"config": config or {}, "settings": settings}, 16)


def data_version(code_version: str, config_version_: str, input_data_versions: dict[str, str]) -> str:
    """The data version of a materialization: its recipe, not its bytes (re-running an unchanged
    recipe gives the same version, so downstream stays synced)."""
    return _digest({"code": code_version, "config": config_version_, "inputs": input_data_versions}, 24)


def input_data_versions(context: dg.AssetExecutionContext) -> dict[str, str]:
    """The data versions of the upstream materializations this step reads, as Dagster records them
    in ``dagster/input_data_version/<key>`` (the same lookup Dagster itself uses)."""
    step = context.get_step_execution_context()
    versions = {}
    for key in sorted(context.assets_def.asset_deps[context.asset_key], key=lambda k: k.to_user_string()):
        info = step.maybe_fetch_and_get_input_asset_version_info(key)
        versions[key.to_user_string()] = info.data_version.value if info and info.data_version else "unknown"
    return versions


def versioned_output(
    context: dg.AssetExecutionContext,
    value: Any,
    *,
    config: dg.Config | None,
    metadata: dict | None = None,
    **settings: Any,
) -> dg.Output:
    """``dg.Output`` carrying the data version of (code version, config + settings, inputs), with
    ``metadata`` rounded and ordered for reading (assets/display.py)."""
    config_tag = config_version(config, **settings)
    code = context.assets_def.code_versions_by_key[context.asset_key] or ""
    version = data_version(code, config_tag, input_data_versions(context))
    with warnings.catch_warnings():
        # data_version= is marked beta in Dagster 1.13; it is the documented way to report a version.
        warnings.simplefilter("ignore")
        return dg.Output(
            value,
            metadata=display_metadata(metadata or {}),
            data_version=dg.DataVersion(version),
            tags={CONFIG_VERSION_TAG: config_tag},
        )
