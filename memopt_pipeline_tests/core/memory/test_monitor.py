"""Stage monitor: thresholds and peak tracking under a fake RSS reader, the background sampler,
the kernel peak, and one real over-budget allocation."""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest

from memopt_pipeline.core.memory import measure
from memopt_pipeline.core.memory import monitor as memory
from memopt_pipeline.core.memory.errors import MemoryBudgetExceeded
from memopt_pipeline.core.memory.monitor import StageMonitor, Thresholds
from memopt_pipeline.core.memory.release import release_memory
from memopt_pipeline.core.units import GiB, MiB
from memopt_pipeline_tests.core.memory.fakes import BUDGET, FakeRSS, fake_monitor


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
    with StageMonitor("load", BUDGET, rss_reader=FakeRSS(GiB), interval_s=0.005, use_kernel_peak=False):
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


def test_real_allocation_over_budget_raises_and_the_process_survives():
    start = measure.process_rss_bytes()
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
    release_memory()
    assert measure.process_rss_bytes() < start + 200 * MiB




def test_heartbeat_file_holds_the_last_sample_against_the_budget(tmp_path):
    import json

    path = tmp_path / "beats" / "run.step.json"
    reader = FakeRSS(3 * GiB)
    with StageMonitor("train", BUDGET, rss_reader=reader, interval_s=0.01, use_kernel_peak=False, heartbeat_path=path):
        wait_until(path.exists)
    beat = json.loads(path.read_text())
    assert beat["rss_bytes"] == 3 * GiB and beat["budget_bytes"] == BUDGET and beat["stage"] == "train"
    assert beat["pid"] > 0 and beat["cleanup_bytes"] == int(0.7 * BUDGET)
