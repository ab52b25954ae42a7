"""Training threads follow the CPUs the process may use: affinity, then the cgroup CPU quota."""

import os

import pytest

from memopt_pipeline.core.train import threads
from memopt_pipeline.core.train.instance import BoostingParams
from memopt_pipeline.core.train.lightgbm_backend import lightgbm_params
from memopt_pipeline.core.train.xgboost_model import xgboost_params


def _cgroup(tmp_path, lines):
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("\n".join(lines) + "\n")
    return proc


def test_v2_quota_is_the_smallest_along_the_path(tmp_path):
    root = tmp_path / "cg"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    (root / "kubepods" / "cpu.max").write_text("300000 100000\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    proc = _cgroup(tmp_path, ["0::/kubepods/pod1"])
    assert threads.cgroup_cpu_quota(proc, root) == pytest.approx(1.5)
    (root / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_quota(proc, root) == pytest.approx(3.0)  # the parent's still caps


def test_v1_quota_and_unlimited(tmp_path):
    root = tmp_path / "cg"
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("200000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = _cgroup(tmp_path, ["4:cpu,cpuacct:/docker/abc", "3:memory:/docker/abc"])
    assert threads.cgroup_cpu_quota(proc, root) == pytest.approx(2.0)
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_quota(proc, root) is None


def test_no_cgroup_files_no_quota(tmp_path):
    assert threads.cgroup_cpu_quota(tmp_path / "missing", tmp_path) is None


def test_usable_cpus_is_affinity_capped_by_the_quota_rounded_down(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    assert threads.usable_cpus() == 8
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 2.5)
    assert threads.usable_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 0.5)  # under one CPU: still one thread
    assert threads.usable_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # taskset -c 3
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 4.0)
    assert threads.usable_cpus() == 1


def test_zero_threads_become_the_usable_cpus_in_both_libraries(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 3)
    params = BoostingParams(num_threads=0)
    assert lightgbm_params(params, n_classes=3, bin_sample_rows=1000)["num_threads"] == 3
    assert xgboost_params(params, n_classes=3, device="cpu")["nthread"] == 3
    explicit = BoostingParams(num_threads=5)
    assert lightgbm_params(explicit, n_classes=3, bin_sample_rows=1000)["num_threads"] == 5


def test_negative_threads_are_refused():
    with pytest.raises(ValueError, match="num_threads"):
        BoostingParams(num_threads=-1)
