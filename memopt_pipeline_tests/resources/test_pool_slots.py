"""The pool limit held with file locks: never more holders than slots, across processes, and a
killed holder's slot comes free. The processes here claim nothing from Dagster, as when its
SQLite claim hands one slot to two runs: only the locks hold them back."""

import contextlib
import fcntl
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import dagster as dg
import pytest

from memopt_pipeline.resources.pool_slots import SLOT_FOLDER, pool_limit, pool_slot

POOL = "memory_heavy"


def _hold(instance_ref, marker, seconds):
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        with pool_slot(instance, POOL, log=print, poll_s=0.02) as index:
            started = time.time()
            time.sleep(seconds)
            ended = time.time()
    with open(marker, "w") as handle:
        json.dump([index, started, ended], handle)


def _most_at_once(intervals):
    return max(sum(1 for s, e in intervals if s <= start < e) for start, _ in intervals)


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def test_no_limit_no_lock(instance):
    assert pool_limit(instance, POOL) is None
    with pool_slot(instance, POOL, log=print) as index:
        assert index is None


def test_never_more_holders_than_slots_across_processes(instance, tmp_path):
    instance.event_log_storage.set_concurrency_slots(POOL, 2)
    context = multiprocessing.get_context("spawn")
    markers = [tmp_path / f"{i}.json" for i in range(5)]
    workers = [context.Process(target=_hold, args=(instance.get_ref(), str(m), 1.0)) for m in markers]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    held = [json.loads(m.read_text()) for m in markers]
    intervals = [(start, end) for _, start, end in held]
    assert {index for index, _, _ in held} <= {0, 1}
    assert _most_at_once(intervals) == 2  # at the limit, never above it


def test_a_nested_stage_of_the_same_process_does_not_wait_for_a_second_slot(instance):
    instance.event_log_storage.set_concurrency_slots(POOL, 1)
    with pool_slot(instance, POOL, log=print) as outer:
        with pool_slot(instance, POOL, log=print) as inner:
            assert inner == outer == 0


def _slot_is_held(path) -> bool:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_a_killed_holder_frees_its_slot(instance, tmp_path):
    instance.event_log_storage.set_concurrency_slots(POOL, 1)
    lock_file = Path(instance.root_directory) / SLOT_FOLDER / f"{POOL}.0.lock"
    holder = multiprocessing.get_context("spawn").Process(
        target=_hold, args=(instance.get_ref(), str(tmp_path / "killed.json"), 600)
    )
    holder.start()
    deadline = time.monotonic() + 60
    while not (lock_file.exists() and _slot_is_held(lock_file)):
        assert time.monotonic() < deadline, "the holder never took the slot"
        time.sleep(0.1)
    waits = []
    with pytest.raises(TimeoutError):  # held: a second holder waits (and says so)
        with _time_limit(1.0):
            with pool_slot(instance, POOL, log=waits.append, poll_s=0.05, report_every_s=0.3):
                pass
    assert waits and "waiting for one of the 1 'memory_heavy' slots" in waits[0]
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    started = time.monotonic()
    with pool_slot(instance, POOL, log=print) as index:  # the kernel released the dead holder's lock
        assert index == 0
    assert time.monotonic() - started < 5


@contextlib.contextmanager
def _time_limit(seconds: float):
    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
