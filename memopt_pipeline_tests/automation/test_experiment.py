"""An experiment is an output folder: its own instance, one memopt run at a time, dead runs recovered."""

import os
import subprocess
import sys
import time

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun

from memopt_pipeline.automation.experiment import (
    HOST_TAG,
    LAUNCHER,
    LAUNCHER_TAG,
    PID_TAG,
    Experiment,
    recover_dead_runs,
)


@pytest.fixture(autouse=True)
def no_dagster_home(monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


def test_two_output_folders_are_two_instances(tmp_path):
    with Experiment(tmp_path / "a").instance() as a, Experiment(tmp_path / "b").instance() as b:
        a.add_dynamic_partitions("instances", ["instance_0", "instance_1"])
        assert b.get_dynamic_partitions("instances") == []
        assert a.root_directory != b.root_directory
    assert (tmp_path / "a" / ".dagster" / "dagster.yaml").is_file()


def test_dagster_home_wins_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    experiment = Experiment(tmp_path / "out")
    assert experiment.home == (tmp_path / "home").resolve() and not experiment.uses_own_instance


def test_a_second_memopt_run_waits_for_the_first_and_says_so(tmp_path, monkeypatch):
    import memopt_pipeline.automation.experiment as experiment_module

    monkeypatch.setattr(experiment_module, "WAIT_LOG_INTERVAL_S", 0.5)
    experiment = Experiment(tmp_path / "out")
    experiment.prepare()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('memopt run (pid test)'); f.flush(); print('locked', flush=True); "
         "time.sleep(2)", str(experiment.home / "memopt-run.lock")],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    lines = []
    started = time.monotonic()
    with experiment.exclusive(lines.append):
        waited = time.monotonic() - started
    holder.wait()
    assert 1.0 < waited < 10
    assert any("waiting for memopt run (pid test)" in line for line in lines), lines


def _unfinished_run(instance, pid: int, host: str) -> DagsterRun:
    run = instance.add_run(
        DagsterRun(job_name="train_instances", status=dg.DagsterRunStatus.STARTED,
                   tags={LAUNCHER_TAG: LAUNCHER, PID_TAG: str(pid), HOST_TAG: host})
    )
    instance.event_log_storage.set_concurrency_slots("memory_heavy", 1)
    instance.event_log_storage.claim_concurrency_slot("memory_heavy", run.run_id, "instance_model")
    return run


def test_runs_of_a_dead_memopt_run_are_failed_and_their_slots_freed(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lines = []
    with Experiment(tmp_path / "out").instance() as instance:
        run = _unfinished_run(instance, dead.pid, socket.gethostname())
        mine = _unfinished_run(instance, os.getpid(), socket.gethostname())
        assert instance.event_log_storage.get_concurrency_info("memory_heavy").claimed_slots
        recovered = recover_dead_runs(instance, lines.append)
        assert recovered == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(mine.run_id).status == dg.DagsterRunStatus.STARTED  # this process's own
        claimed = {s.run_id for s in instance.event_log_storage.get_concurrency_info("memory_heavy").claimed_slots}
        assert run.run_id not in claimed
    assert any(run.run_id in line and "is gone" in line for line in lines), lines


def test_slots_held_by_finished_runs_are_freed(tmp_path):
    with Experiment(tmp_path / "out").instance() as instance:
        run = instance.add_run(DagsterRun(job_name="evaluate_and_explain", status=dg.DagsterRunStatus.FAILURE))
        instance.event_log_storage.set_concurrency_slots("memory_heavy", 1)
        instance.event_log_storage.claim_concurrency_slot("memory_heavy", run.run_id, "holdout_evaluation")
        recover_dead_runs(instance, lambda line: None)
        assert not instance.event_log_storage.get_concurrency_info("memory_heavy").claimed_slots
