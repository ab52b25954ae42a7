"""Memory budget: thresholds and peak tracking under a fake RSS reader, cgroup parsing with
fake files, and one real over-budget allocation."""

from __future__ import annotations

import pickle
import sys
import threading
import time

import numpy as np
import pytest

from memopt_pipeline.core import memory
from memopt_pipeline.core.memory import (
    GiB,
    MemoryBudgetExceeded,
    StageMonitor,
    Thresholds,
    cgroup_memory_limit_bytes,
    resolve_budget_bytes,
)

MiB = 1024**2
BUDGET = 10 * GiB  # with default thresholds: cleanup above 7 GiB, abort above 9 GiB


class FakeRSS:
    """RSS reader returning ``values`` in order, then repeating the last; ``value`` sets a new constant."""

    def __init__(self, *values: int):
        self._values = list(values)
        self.reads = 0

    @property
    def value(self) -> int:
        return self._values[0]

    @value.setter
    def value(self, rss: int) -> None:
        self._values = [rss]

    def __call__(self) -> int:
        self.reads += 1
        return self._values.pop(0) if len(self._values) > 1 else self._values[0]


@pytest.fixture
def releases(monkeypatch) -> list[int]:
    """Replaces release_memory with a counter: one entry per call."""
    calls: list[int] = []

    def fake_release_memory() -> dict:
        calls.append(1)
        return {"rss_before": 0, "rss_after": 0, "freed_bytes": 0, "gc_objects": 0, "malloc_trim": False}

    monkeypatch.setattr(memory, "release_memory", fake_release_memory)
    return calls


def fake_monitor(reader: FakeRSS, thresholds: Thresholds = Thresholds(), **kwargs) -> StageMonitor:
    return StageMonitor("train", BUDGET, thresholds, rss_reader=reader, sampler=False, use_kernel_peak=False, **kwargs)


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# --- thresholds under a fake reader -----------------------------------------------------------


def test_below_cleanup_threshold_nothing_happens(releases):
    with fake_monitor(FakeRSS(6 * GiB)) as monitor:
        for _ in range(5):
            monitor.check()
    assert releases == []
    assert monitor.cleanups == 0


def test_above_cleanup_releases_memory_rate_limited(releases):
    reader = FakeRSS(8 * GiB)
    with fake_monitor(reader, Thresholds(cleanup_interval_s=3600)) as monitor:
        monitor.check()
        monitor.check()
        monitor.check()
    assert len(releases) == 1
    assert monitor.cleanups == 1


def test_without_rate_limit_every_check_above_cleanup_releases(releases):
    with fake_monitor(FakeRSS(8 * GiB), Thresholds(cleanup_interval_s=0)) as monitor:
        monitor.check()
        monitor.check()
    assert len(releases) == 2


def test_cleanup_that_frees_enough_avoids_the_abort(monkeypatch):
    reader = FakeRSS(int(9.5 * GiB))
    results = []

    def release_that_frees_two_gib() -> dict:
        reader.value -= 2 * GiB
        return {"freed_bytes": 2 * GiB}

    monkeypatch.setattr(memory, "release_memory", release_that_frees_two_gib)
    with fake_monitor(reader, on_cleanup=results.append) as monitor:
        monitor.check()  # 9.5 GiB > abort, but 7.5 GiB after cleanup
    assert monitor.cleanups == 1
    assert monitor.freed_bytes == 2 * GiB
    assert results == [{"freed_bytes": 2 * GiB}]
    assert monitor.peak_rss_bytes == int(9.5 * GiB)


def test_above_abort_raises_with_stage_rss_and_budget(releases):
    rss = int(9.5 * GiB)
    with pytest.raises(MemoryBudgetExceeded) as raised:
        with fake_monitor(FakeRSS(rss)) as monitor:
            monitor.check()
    error = raised.value
    assert (error.stage, error.rss_bytes, error.budget_bytes, error.abort_bytes) == ("train", rss, BUDGET, int(0.9 * BUDGET))
    assert error.current_rss_bytes is None
    message = str(error)
    assert "'train'" in message and "9.50 GiB" in message and "10.00 GiB" in message and "9.00 GiB" in message
    assert "lower batch_rows / max_bin" in message  # default advice
    assert len(releases) == 1  # cleanup was tried before giving up


def test_custom_advice_replaces_the_default(releases):
    with pytest.raises(MemoryBudgetExceeded, match="use max_bin=63") as raised:
        with fake_monitor(FakeRSS(int(9.5 * GiB)), advice="use max_bin=63") as monitor:
            monitor.check()
    assert "lower batch_rows" not in str(raised.value)


def test_exception_survives_pickling():
    error = MemoryBudgetExceeded("train", 9 * GiB, BUDGET, 8 * GiB, "advice", current_rss_bytes=7 * GiB)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert (copy.stage, copy.rss_bytes, copy.current_rss_bytes, copy.advice) == ("train", 9 * GiB, 7 * GiB, "advice")


def test_peak_and_summary(releases):
    reader = FakeRSS(1 * GiB, 3 * GiB, 2 * GiB, 2 * GiB)  # enter, check, check, exit
    with fake_monitor(reader) as monitor:
        monitor.check()
        monitor.check()
        time.sleep(0.01)
    assert monitor.start_rss_bytes == 1 * GiB
    assert monitor.peak_rss_bytes == 3 * GiB
    assert [rss for _, rss in monitor.timeline] == [1 * GiB, 3 * GiB, 2 * GiB, 2 * GiB]
    summary = monitor.summary()
    assert summary == {
        "stage": "train",
        "budget_gb": 10.0,
        "peak_rss_gb": 3.0,
        "headroom_gb": 7.0,
        "start_rss_gb": 1.0,
        "end_rss_gb": 2.0,
        "duration_s": pytest.approx(summary["duration_s"]),
        "cleanups": 0,
        "cleanup_freed_gb": 0.0,
        "peak_source": "sampler",
        "abort_threshold_gb": 9.0,
    }
    assert summary["duration_s"] >= 0.01


def test_timeline_is_bounded_and_keeps_the_peak(releases):
    reader = FakeRSS(*range(1, 2501), *range(2500, 0, -1))  # peak in the middle, likely decimated away
    with fake_monitor(reader) as monitor:
        for _ in range(5000):
            monitor.check()
    timeline = monitor.timeline
    assert len(timeline) <= memory.TIMELINE_MAX_POINTS
    assert len(timeline) >= memory.TIMELINE_MAX_POINTS // 4
    assert [t for t, _ in timeline] == sorted(t for t, _ in timeline)
    assert monitor.peak_rss_bytes == 2500


def test_check_outside_the_with_block_and_reuse_are_errors():
    monitor = fake_monitor(FakeRSS(GiB))
    with pytest.raises(RuntimeError, match="outside"):
        monitor.check()
    with monitor:
        pass
    with pytest.raises(RuntimeError, match="outside"):
        monitor.check()
    with pytest.raises(RuntimeError, match="already started"):
        monitor.__enter__()


@pytest.mark.parametrize(
    "cleanup, abort, interval",
    [(0.0, 0.9, 1.0), (0.9, 0.9, 1.0), (0.95, 0.9, 1.0), (0.7, 1.6, 1.0), (0.7, 0.9, -1.0)],
)
def test_nonsense_thresholds_are_rejected(cleanup, abort, interval):
    with pytest.raises(ValueError):
        Thresholds(cleanup, abort, interval)


def test_abort_may_exceed_the_budget():
    assert Thresholds(cleanup=0.9, abort=1.2).abort == 1.2


# --- background sampler -----------------------------------------------------------------------


def test_sampler_records_a_spike_without_any_check(releases):
    reader = FakeRSS(1 * GiB, 1 * GiB, 5 * GiB, 1 * GiB)  # the spike is the third read, once
    with StageMonitor("load", BUDGET, rss_reader=reader, interval_s=0.005, use_kernel_peak=False) as monitor:
        wait_until(lambda: reader.reads >= 5)
    assert monitor.peak_rss_bytes == 5 * GiB
    assert releases == []


def test_sampler_thread_stops_on_exit():
    with StageMonitor("load", BUDGET, rss_reader=FakeRSS(GiB), interval_s=0.005, use_kernel_peak=False) as monitor:
        thread = next(t for t in threading.enumerate() if t.name == "rss-sampler[load]")
        assert thread.daemon
    assert not thread.is_alive()
    assert all(t.name != "rss-sampler[load]" for t in threading.enumerate())


def test_exceptions_from_the_stage_propagate_and_stop_the_sampler():
    with pytest.raises(KeyError):
        with StageMonitor("load", BUDGET, rss_reader=FakeRSS(GiB), interval_s=0.005, use_kernel_peak=False):
            raise KeyError("boom")
    assert all(t.name != "rss-sampler[load]" for t in threading.enumerate())


def spike_then(reader: FakeRSS, monitor: StageMonitor, after_spike: int) -> None:
    """Let the sampler see RSS above abort, then settle at ``after_spike``."""
    reader.value = int(9.5 * GiB)
    wait_until(lambda: monitor.peak_rss_bytes == int(9.5 * GiB))
    reader.value = after_spike
    reads = reader.reads
    wait_until(lambda: reader.reads > reads + 1)  # the sampler has read the settled value


def test_spike_between_checks_aborts_when_rss_stays_above_cleanup(releases):
    reader = FakeRSS(GiB)
    with pytest.raises(MemoryBudgetExceeded, match="between check points") as raised:
        with StageMonitor("train", BUDGET, rss_reader=reader, interval_s=0.002, use_kernel_peak=False) as monitor:
            spike_then(reader, monitor, after_spike=8 * GiB)
            monitor.check()
    assert raised.value.rss_bytes == int(9.5 * GiB)
    assert raised.value.current_rss_bytes == 8 * GiB


def test_receded_spike_does_not_abort_but_shows_in_the_peak(releases):
    reader = FakeRSS(GiB)
    with StageMonitor("train", BUDGET, rss_reader=reader, interval_s=0.002, use_kernel_peak=False) as monitor:
        spike_then(reader, monitor, after_spike=2 * GiB)
        monitor.check()
        monitor.check()
    assert monitor.summary()["headroom_gb"] == pytest.approx(0.5)


# --- kernel peak (VmHWM) ----------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_kernel_peak_is_at_least_current_rss():
    assert memory.kernel_peak_rss_bytes() >= memory.process_rss_bytes() - 4 * MiB


def test_reset_kernel_peak_returns_a_bool_and_does_not_raise():
    assert memory.reset_kernel_peak() in (True, False)


def test_failed_kernel_peak_reset_falls_back_to_the_sampler(monkeypatch):
    monkeypatch.setattr(memory, "reset_kernel_peak", lambda: False)
    with StageMonitor("train", BUDGET, rss_reader=FakeRSS(GiB), sampler=False) as monitor:
        pass
    assert monitor.summary()["peak_source"] == "sampler"
    assert monitor.peak_rss_bytes == GiB


def test_kernel_peak_is_used_when_the_reset_works(monkeypatch):
    monkeypatch.setattr(memory, "reset_kernel_peak", lambda: True)
    monkeypatch.setattr(memory, "kernel_peak_rss_bytes", lambda: 3 * GiB)
    with StageMonitor("train", BUDGET, rss_reader=FakeRSS(GiB), sampler=False) as monitor:
        pass
    monkeypatch.setattr(memory, "kernel_peak_rss_bytes", lambda: 8 * GiB)  # after the stage: ignored
    assert monitor.summary()["peak_source"] == "kernel_hwm"
    assert monitor.peak_rss_bytes == 3 * GiB


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


# --- real process -----------------------------------------------------------------------------


def test_release_memory_reports_documented_keys():
    result = memory.release_memory()
    assert {"rss_before", "rss_after", "freed_bytes", "gc_objects", "malloc_trim"} <= set(result)
    assert result["rss_before"] > 0 and result["rss_after"] > 0
    assert result["freed_bytes"] == max(0, result["rss_before"] - result["rss_after"])
    assert isinstance(result["malloc_trim"], bool)


def test_real_allocation_over_budget_raises_and_the_process_survives():
    start = memory.process_rss_bytes()
    array = None
    with pytest.raises(MemoryBudgetExceeded) as raised:
        with StageMonitor("real", start + 200 * MiB, interval_s=0.01) as monitor:
            array = np.ones(50_000_000)  # 400 MB, touched page by page
            monitor.check()
    assert raised.value.rss_bytes > raised.value.abort_bytes
    assert monitor.peak_rss_bytes >= start + 350 * MiB
    assert monitor.summary()["headroom_gb"] < 0
    assert array.sum() == 50_000_000  # still alive and usable
    del array
    memory.release_memory()
    assert memory.process_rss_bytes() < start + 200 * MiB


# --- boosting callbacks -----------------------------------------------------------------------


def tiny_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 3))
    return features, (features[:, 0] > 0).astype(float)


def test_lightgbm_callback_checks_every_round_and_aborts_training(releases):
    import lightgbm as lgb

    features, labels = tiny_data()
    params = {"objective": "binary", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5}
    completed_rounds = []

    def record_round(env) -> None:
        completed_rounds.append(env.iteration)

    record_round.order = 50  # after the memory check

    # Under budget: trains to the end, one check per round (plus the read on entry).
    reader = FakeRSS(GiB)
    with fake_monitor(reader) as monitor:
        lgb.train(params, lgb.Dataset(features, labels), num_boost_round=4, callbacks=[memory.lightgbm_callback(monitor)])
    assert reader.reads == 1 + 4 + 1

    # Over budget from the second round on: the exception leaves lightgbm.train.
    reader = FakeRSS(GiB, GiB, int(9.5 * GiB))  # entry, round 0, round 1...
    with pytest.raises(MemoryBudgetExceeded):
        with fake_monitor(reader) as monitor:
            lgb.train(
                params,
                lgb.Dataset(features, labels),
                num_boost_round=10,
                callbacks=[record_round, memory.lightgbm_callback(monitor)],
            )
    assert completed_rounds == [0]


def test_xgboost_callback_checks_every_round_and_aborts_training(releases):
    import xgboost as xgb

    features, labels = tiny_data()
    params = {"objective": "binary:logistic", "nthread": 1, "max_depth": 2}

    reader = FakeRSS(GiB)
    with fake_monitor(reader) as monitor:
        xgb.train(params, xgb.DMatrix(features, labels), num_boost_round=4, callbacks=[memory.xgboost_callback(monitor)])
    assert reader.reads == 1 + 4 + 1

    reader = FakeRSS(GiB, GiB, int(9.5 * GiB))
    with pytest.raises(MemoryBudgetExceeded):
        with fake_monitor(reader) as monitor:
            xgb.train(params, xgb.DMatrix(features, labels), num_boost_round=10, callbacks=[memory.xgboost_callback(monitor)])
    assert reader.reads == 5  # entry, round 0, round 1 (over abort), re-read after cleanup, exit


def test_native_allocation_over_the_hard_cap_is_memory_error_not_a_kill():
    """In a real child process: a 4 GiB allocation under a ~0.5 GiB budget cap fails cleanly."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import numpy as np
        from memopt_pipeline.core.memory import hard_memory_cap, process_rss_bytes
        import resource
        before = resource.getrlimit(resource.RLIMIT_DATA)
        with hard_memory_cap(process_rss_bytes() + 512 * 2**20) as cap:
            assert cap is not None
            try:
                np.ones(4 * 2**30, dtype=np.uint8)
            except MemoryError as error:
                print("MemoryError", error)
            small = np.ones(64 * 2**20, dtype=np.uint8)  # within the cap: still works
        assert resource.getrlimit(resource.RLIMIT_DATA) == before
        big_after = np.ones(1 * 2**30, dtype=np.uint8)  # cap lifted afterwards
        print("alive", small.sum() + big_after[:1].sum())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "MemoryError Unable to allocate 4.00 GiB" in result.stdout
    assert "alive" in result.stdout


def test_leak_tracker_warns_with_numbers_only_past_the_threshold():
    from memopt_pipeline.core.memory import GiB, LeakTracker

    tracker = LeakTracker(threshold_bytes=GiB // 4)
    assert tracker.record("instance_model [instance_0]", GiB) is None
    assert tracker.record("instance_model [instance_1]", GiB + GiB // 8) is None
    warning = tracker.record("instance_model [instance_2]", GiB + GiB // 2)
    assert warning is not None
    assert "1.50 GiB after instance_model [instance_2]" in warning
    assert "0.50 GiB more than after instance_model [instance_0] (1.00 GiB)" in warning
    assert "over 3 stages" in warning
