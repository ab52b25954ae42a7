"""Materialization metadata a person can scan: numbers rounded, entries in a fixed order.

Rounding keeps numbers numeric (a float stays a float, so the UI's metadata plots still draw
it over time); only the digits nobody reads go. The full values are in each asset's value file.

Order matters because Dagster 1.13 keeps it: metadata is stored as a list of entries in the
order given (dagster's serdes writes ``metadata_entries`` as a list, not a key-sorted object)
and the UI's table (ui-core AssetEventMetadataEntriesTable) lists them in that order without
sorting. So every asset's metadata goes through :func:`display_metadata` in one place,
``versioned_output``, and reads: the stage's own metrics, then its memory record, then other
short values (settings, modes), then long entries (tables, plots, JSON, paths).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import dagster as dg
import numpy as np

from memopt_pipeline.resources.memory_guard import MEMORY_METADATA_KEYS

SIGNIFICANT_DIGITS = 4
# A plain string longer than this is text to open (a description, a layout), not a value to scan.
LONG_TEXT_CHARS = 60

METRICS, MEMORY, SHORT, LONG = range(4)
_SHORT_VALUE_TYPES = (dg.BoolMetadataValue, dg.TextMetadataValue, dg.NullMetadataValue)


def round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` to ``digits`` significant digits, still a float (NaN and infinities unchanged)."""
    if not math.isfinite(value):
        return value
    # Through the shortest decimal text, so 0.8800000000000001 becomes exactly the float 0.88.
    return float(f"{value:.{digits}g}")


def _round(value: Any) -> Any:
    """Floats rounded, numpy scalars made Python numbers (which Dagster accepts), the rest unchanged."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return round_significant(float(value))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dg.FloatMetadataValue) and value.value is not None:
        return dg.MetadataValue.float(round_significant(value.value))
    if isinstance(value, dg.JsonMetadataValue):
        return dg.MetadataValue.json(_round_nested(value.data))
    return value


def _round_nested(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {key: _round_nested(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_round_nested(value) for value in data]
    return _round(data)


def _group(key: str, value: Any) -> int:
    if key in MEMORY_METADATA_KEYS:
        return MEMORY
    if isinstance(value, (int, float, dg.IntMetadataValue, dg.FloatMetadataValue)) and not isinstance(value, bool):
        return METRICS
    text = value.text if isinstance(value, dg.TextMetadataValue) else value
    if isinstance(text, str):
        return LONG if len(text) > LONG_TEXT_CHARS else SHORT
    if value is None or isinstance(value, (bool, *_SHORT_VALUE_TYPES)):
        return SHORT
    return LONG  # markdown, JSON, paths, tables, anything else Dagster renders as a block


def display_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` with floats rounded to 4 significant digits and entries ordered: metrics
    (numbers), memory (in :data:`MEMORY_METADATA_KEYS` order), other short values, long entries.
    Within a group the asset's own order is kept."""
    memory_rank = {key: rank for rank, key in enumerate(MEMORY_METADATA_KEYS)}
    rounded = [(key, _round(value)) for key, value in metadata.items()]
    ordered = sorted(rounded, key=lambda item: (_group(*item), memory_rank.get(item[0], 0)))
    return dict(ordered)
