"""The memory this process may use (physical RAM capped by its cgroup) and the budget derived from it."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, TypeVar

from memopt_pipeline.core.memory.measure import physical_memory_bytes
from memopt_pipeline.core.units import GiB

T = TypeVar("T")

# cgroup v1 reports "no limit" as a huge page-aligned number (e.g. 9223372036854771712).
_CGROUP_V1_UNLIMITED = 2**60
# Share of available memory used as the budget when none is given.
DEFAULT_BUDGET_FRACTION = 0.6


def _read_limit(path: Path) -> int | None:
    """A cgroup limit file's value in bytes; None for "max", unlimited, missing or unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # cgroup v2 writes "max" for no limit
        return None
    value = int(text)
    return value if value < _CGROUP_V1_UNLIMITED else None


def along_cgroup_path(hierarchy_root: Path, cgroup_path: str, read: Callable[[Path], T | None]) -> list[T]:
    """``read(directory)`` at every level from ``hierarchy_root/cgroup_path`` up to ``hierarchy_root``,
    the values that are not None.

    A parent's limit caps its children, so every level counts. Inside a container with a
    cgroup namespace the path is "/" and only the root level exists, which is fine.
    """
    directory = hierarchy_root / cgroup_path.strip("/")
    values = []
    while True:
        value = read(directory)
        if value is not None:
            values.append(value)
        if directory == hierarchy_root or hierarchy_root not in directory.parents:
            return values
        directory = directory.parent


def _limits_along(hierarchy_root: Path, cgroup_path: str, filename: str) -> list[int]:
    """Limits found in ``filename`` from ``hierarchy_root/cgroup_path`` up to ``hierarchy_root``."""
    return along_cgroup_path(hierarchy_root, cgroup_path, lambda directory: _read_limit(directory / filename))


def cgroup_memory_limit_bytes(
    proc_self_cgroup: str | os.PathLike = "/proc/self/cgroup",
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
) -> int | None:
    """Smallest cgroup memory limit that applies to this process, or None if there is none.

    cgroup v2: the ``0::<path>`` line, then ``memory.max`` at every level from
    ``<root>/<path>`` up to ``<root>``. cgroup v1 (also hybrid hosts, which list a ``0::``
    line but mount the memory controller under v1): the ``memory`` controller's path under
    ``<root>/memory``, ``memory.limit_in_bytes`` the same way. Both are read and the smallest
    limit wins; on a given host only one of them has limit files.
    """
    try:
        lines = Path(proc_self_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    v2_path: str | None = None
    v1_path = "/"  # without a memory line, a namespaced container's root is still worth reading
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path

    root = Path(cgroup_root)
    limits = _limits_along(root / "memory", v1_path, "memory.limit_in_bytes")
    if v2_path is not None:
        limits += _limits_along(root, v2_path, "memory.max")
    return min(limits) if limits else None


def available_memory_bytes() -> int:
    """Memory this process may use at most: physical RAM, capped by a cgroup limit (not free memory)."""
    physical = physical_memory_bytes()
    limit = cgroup_memory_limit_bytes()
    return physical if limit is None else min(physical, limit)


def resolve_budget_bytes(budget_gb: float | None, fraction: float = DEFAULT_BUDGET_FRACTION) -> int:
    """The memory budget in bytes: ``budget_gb`` GiB if given, else ``fraction`` of available memory."""
    # Comparisons are written as `not (valid)` so that NaN is rejected too.
    if not (0 < fraction <= 1):
        raise ValueError(f"budget fraction must be in (0, 1], got {fraction!r}")
    if budget_gb is None:
        return int(fraction * available_memory_bytes())
    if not (budget_gb > 0) or math.isinf(budget_gb):
        raise ValueError(
            f"memory budget must be a positive number of GiB, got {budget_gb!r}; "
            f"leave it empty to use {fraction:.0%} of available memory"
        )
    return int(budget_gb * GiB)


def cgroup_oom_kill_count(
    proc_self_cgroup: str | os.PathLike = "/proc/self/cgroup",
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
) -> int | None:
    """The kernel's count of OOM kills in this process's cgroup, or None where it cannot be read.

    cgroup v2: ``oom_kill`` in ``memory.events``; v1: ``oom_kill`` in ``memory.oom_control`` of the
    memory controller's cgroup."""
    try:
        lines = Path(proc_self_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            candidates.append(Path(cgroup_root) / parts[2].strip("/") / "memory.events")
        elif "memory" in parts[1].split(","):
            candidates.append(Path(cgroup_root) / "memory" / parts[2].strip("/") / "memory.oom_control")
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None
