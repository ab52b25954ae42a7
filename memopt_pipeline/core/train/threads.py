"""How many training threads: the CPUs this process may really use, not the machine's cores.

LightGBM and XGBoost default to one OpenMP thread per core of the machine. In a container
with a CPU quota, under ``taskset`` or a SLURM allocation, that is more threads than CPUs:
each parallel region then waits for threads the scheduler has parked, and rounds get many
times slower. The usable count is the affinity mask, capped by the cgroup CPU quota
(rounded down: a 1.5-CPU quota gets 1 thread rather than being throttled every period).

Not covered: other processes competing for the same CPUs (nothing here can see them; the
pool limit and ``OMP_WAIT_POLICY=PASSIVE``, set in the package ``__init__``, keep the
slowdown near the share of CPU actually left).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from memopt_pipeline.core.memory.limits import along_cgroup_path


def _v2_quota(directory: Path) -> float | None:
    try:
        limit, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(limit) / int(period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(
    proc_self_cgroup: str | os.PathLike = "/proc/self/cgroup",
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
) -> float | None:
    """The smallest CPU quota (in CPUs, e.g. 1.5) that applies to this process, or None."""
    try:
        lines = Path(proc_self_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    v2_path, v1_path = None, "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "cpu" in parts[1].split(","):
            v1_path = parts[2]
    root = Path(cgroup_root)
    quotas = []
    for v1_folder in ("cpu", "cpu,cpuacct"):
        quotas += along_cgroup_path(root / v1_folder, v1_path, _v1_quota)
    if v2_path is not None:
        quotas += along_cgroup_path(root, v2_path, _v2_quota)
    return min(quotas) if quotas else None


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by the cgroup CPU quota."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        affinity = min(affinity, max(1, math.floor(quota)))
    return max(1, affinity)


def resolve_threads(requested: int) -> int:
    """``requested`` threads; 0 means the CPUs this process may use (:func:`usable_cpus`)."""
    if requested < 0:
        raise ValueError(f"num_threads must be 0 (the CPUs this process may use) or positive, got {requested}")
    return requested or usable_cpus()
