"""cgroup limits with fake files, available memory and the budget."""

import pytest

from memopt_pipeline.core.memory import limits as memory
from memopt_pipeline.core.memory.limits import cgroup_memory_limit_bytes, resolve_budget_bytes
from memopt_pipeline.core.units import GiB

# --- cgroup limits ----------------------------------------------------------------------------


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_nested_smallest_limit_wins(tmp_path):
    write(tmp_path / "proc_cgroup", "0::/kubepods/pod1/container\n")
    root = tmp_path / "cgroup"
    write(root / "memory.max", "max\n")
    write(root / "kubepods/memory.max", str(8 * GiB))
    write(root / "kubepods/pod1/memory.max", str(4 * GiB))
    write(root / "kubepods/pod1/container/memory.max", "max\n")
    assert cgroup_memory_limit_bytes(tmp_path / "proc_cgroup", root) == 4 * GiB


def test_cgroup_v2_max_everywhere_means_no_limit(tmp_path):
    write(tmp_path / "proc_cgroup", "0::/user.slice\n")
    root = tmp_path / "cgroup"
    write(root / "memory.max", "max\n")
    write(root / "user.slice/memory.max", "max\n")
    assert cgroup_memory_limit_bytes(tmp_path / "proc_cgroup", root) is None


def test_cgroup_v1_fallback(tmp_path):
    write(tmp_path / "proc_cgroup", "4:memory:/\n3:cpu,cpuacct:/\n0::/\n")  # hybrid host
    root = tmp_path / "cgroup"
    write(root / "memory/memory.limit_in_bytes", str(2 * GiB))
    assert cgroup_memory_limit_bytes(tmp_path / "proc_cgroup", root) == 2 * GiB


def test_cgroup_v1_nested_path_and_unlimited_value(tmp_path):
    write(tmp_path / "proc_cgroup", "4:memory:/docker/abc\n")
    root = tmp_path / "cgroup"
    write(root / "memory/memory.limit_in_bytes", "9223372036854771712")  # v1 "unlimited"
    write(root / "memory/docker/abc/memory.limit_in_bytes", str(3 * GiB))
    assert cgroup_memory_limit_bytes(tmp_path / "proc_cgroup", root) == 3 * GiB
    write(root / "memory/docker/abc/memory.limit_in_bytes", "9223372036854771712")
    assert cgroup_memory_limit_bytes(tmp_path / "proc_cgroup", root) is None


def test_cgroup_missing_files_mean_none(tmp_path):
    assert cgroup_memory_limit_bytes(tmp_path / "no_such_file", tmp_path / "no_such_dir") is None
    write(tmp_path / "proc_cgroup", "0::/\n")
    assert cgroup_memory_limit_bytes(tmp_path / "proc_cgroup", tmp_path / "empty") is None


def test_available_memory_is_capped_by_the_cgroup_limit(monkeypatch):
    monkeypatch.setattr(memory, "physical_memory_bytes", lambda: 64 * GiB)
    monkeypatch.setattr(memory, "cgroup_memory_limit_bytes", lambda: 16 * GiB)
    assert memory.available_memory_bytes() == 16 * GiB
    monkeypatch.setattr(memory, "cgroup_memory_limit_bytes", lambda: None)
    assert memory.available_memory_bytes() == 64 * GiB


# --- budget -----------------------------------------------------------------------------------


def test_explicit_budget():
    assert resolve_budget_bytes(2.5) == int(2.5 * GiB)


def test_budget_as_fraction_of_available_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 10 * GiB)
    assert resolve_budget_bytes(None) == 6 * GiB
    assert resolve_budget_bytes(None, fraction=0.25) == int(2.5 * GiB)


@pytest.mark.parametrize("budget_gb", [0, -1.0, float("nan"), float("inf")])
def test_nonsense_budget_is_rejected(budget_gb):
    with pytest.raises(ValueError, match="positive number of GiB"):
        resolve_budget_bytes(budget_gb)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan")])
def test_nonsense_fraction_is_rejected(fraction):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        resolve_budget_bytes(None, fraction)


