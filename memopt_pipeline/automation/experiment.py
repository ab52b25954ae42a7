"""An experiment is an output folder: its artifacts and, without DAGSTER_HOME, its own Dagster instance.

``memopt run --output DIR`` keeps runs, event log, pools and partitions in ``DIR/.dagster``
beside the artifacts, so two experiments never share runs, partitions or pool slots, and
``memopt ui --output DIR`` (``DAGSTER_HOME=DIR/.dagster dagster dev``) opens exactly that one.
With ``DAGSTER_HOME`` set, that instance is used, as every Dagster tool does.

One ``memopt run`` at a time works on an experiment: it holds an exclusive lock on
``DIR/.dagster/memopt-run.lock`` (``flock``, which the kernel releases when the process dies,
however it dies). Whoever takes the lock therefore knows that every run a ``memopt run`` left
unfinished belongs to a dead process: :func:`recover_dead_runs` marks those failed and frees
their pool slots, so a killed run never blocks the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import dagster as dg
import psutil
import yaml
from dagster._core.instance.ref import InstanceRef

from memopt_pipeline.resources.memory_guard import HEARTBEAT_FOLDER
from memopt_pipeline.resources.storage import OUTPUT_DIR_ENV, default_output_dir

INSTANCE_FOLDER = ".dagster"
LOCK_FILE = "memopt-run.lock"
# Tags of every run `memopt run` launches: who launched it, from which process.
LAUNCHER_TAG = "memopt/launcher"
LAUNCHER = "memopt run"
PID_TAG = "memopt/pid"
HOST_TAG = "memopt/host"
WAIT_LOG_INTERVAL_S = 30.0
_POLL_S = 1.0

# The instance of an experiment: no paths (storage, artifacts and compute logs default to
# DAGSTER_HOME itself, so the folder can be moved), the same pool, run-retry and
# run-monitoring settings as the repository's dagster.yaml.
EXPERIMENT_INSTANCE = {
    "telemetry": {"enabled": False},
    "concurrency": {"pools": {"granularity": "op", "default_limit": 1}},
    "run_retries": {"enabled": True, "max_retries": 1, "retry_on_asset_or_op_failure": False},
    "run_monitoring": {"enabled": True, "free_slots_after_run_end_seconds": 60},
}

UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


class Experiment:
    """The output folder of one experiment and, unless DAGSTER_HOME is set, its Dagster instance."""

    def __init__(self, output_dir: str | Path | None = None):
        self.output_dir = Path(output_dir or default_output_dir()).resolve()
        external = os.environ.get("DAGSTER_HOME")
        self.home = Path(external).resolve() if external else self.output_dir / INSTANCE_FOLDER
        self.uses_own_instance = not external

    def environment(self) -> dict[str, str]:
        """Variables that point Dagster tools (dagster dev, step processes) at this experiment."""
        return {"DAGSTER_HOME": str(self.home), OUTPUT_DIR_ENV: str(self.output_dir)}

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        config = self.home / "dagster.yaml"
        if self.uses_own_instance and not config.exists():
            config.write_text(
                "# The Dagster instance of this experiment (written by memopt run): runs, event log, pools and\n"
                "# partitions live in this folder, beside the experiment's artifacts.\n"
                + yaml.safe_dump(EXPERIMENT_INSTANCE, sort_keys=False)
            )

    def instance(self) -> dg.DagsterInstance:
        self.prepare()
        return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home)))

    @contextmanager
    def exclusive(self, log: Callable[[str], None]) -> Iterator[None]:
        """Hold the experiment's lock; while another live `memopt run` holds it, wait (interruptible)."""
        self.prepare()
        path = self.home / LOCK_FILE
        with open(path, "a+") as handle:
            waited_since = time.monotonic()
            last_logged = -WAIT_LOG_INTERVAL_S
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now - last_logged >= WAIT_LOG_INTERVAL_S:
                        handle.seek(0)
                        holder = handle.read().strip() or "another process"
                        log(
                            f"memopt: waiting for {holder} to finish with {self.output_dir} "
                            f"({now - waited_since:.0f} s so far; Ctrl-C to stop waiting)"
                        )
                        last_logged = now
                    time.sleep(_POLL_S)
            handle.seek(0)
            handle.truncate()
            handle.write(f"memopt run (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)


def launcher_tags() -> dict[str, str]:
    return {LAUNCHER_TAG: LAUNCHER, PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def recover_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None]) -> list[str]:
    """Mark failed every unfinished run launched by a `memopt run` that is gone, and free its slots.

    Call with the experiment's lock held: then no other `memopt run` is alive on this instance,
    and the only unfinished runs it launched that may still live are this process's own.
    Also frees pool slots still claimed by runs that have ended (Dagster frees those only
    through the daemon's run monitoring, which `memopt run` does not start).
    """
    recovered = []
    me = str(os.getpid())
    for run in instance.get_runs(dg.RunsFilter(statuses=UNFINISHED, tags={LAUNCHER_TAG: LAUNCHER})):
        if run.tags.get(PID_TAG) == me and run.tags.get(HOST_TAG) == socket.gethostname():
            continue
        reason = (
            f"the memopt run process that launched it (pid {run.tags.get(PID_TAG, '?')}) is gone: killed or "
            f"crashed; marked failed by the next memopt run (pid {me}), which resumes from the last checkpoints"
        )
        _stop_orphaned_steps(instance, run.run_id, log)
        instance.report_run_failed(run, message=reason)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log(f"memopt: run {run.run_id} ({run.job_name}) was left unfinished: {reason}")
        recovered.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for pool in storage.get_concurrency_keys():
            info = storage.get_concurrency_info(pool)
            for run_id in {s.run_id for s in info.claimed_slots} | {s.run_id for s in info.pending_steps}:
                run = instance.get_run_by_id(run_id)
                if run is None or run.is_finished:
                    storage.free_concurrency_slots_for_run(run_id)
                    log(f"memopt: freed the '{pool}' pool of finished run {run_id}")
    return recovered


def _stop_orphaned_steps(instance: dg.DagsterInstance, run_id: str, log: Callable[[str], None]) -> None:
    """A step process can outlive the `memopt run` that started it (a SIGKILL reaches one process
    only). Its guard's heartbeat names its pid: stop it before the stage runs again, so two
    processes never train the same stage at once."""
    for beat_file in (Path(instance.root_directory) / HEARTBEAT_FOLDER).glob(f"{run_id}.*.json"):
        try:
            beat = json.loads(beat_file.read_text())
            pid = beat["pid"]
            process = psutil.Process(pid)
            # A pid the kernel has given to another process since is not the step.
            if process.create_time() > beat["time"] or "python" not in process.name().lower():
                continue
            process.kill()
            process.wait(10)
            log(f"memopt: stopped step process {pid} left running by the dead run {run_id}")
        except (OSError, ValueError, KeyError, psutil.Error):
            continue


def wait_for_pool(instance: dg.DagsterInstance, pool: str, log: Callable[[str], None]) -> None:
    """Before launching a run with steps in ``pool``: wait while every slot is claimed by live runs
    (e.g. a run launched from the UI on this instance), saying who holds them every 30 s."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    started = time.monotonic()
    last_logged = -WAIT_LOG_INTERVAL_S
    while True:
        info = storage.get_concurrency_info(pool)
        limit = info.limit or info.slot_count or 1
        if len(info.claimed_slots) < limit:
            return
        now = time.monotonic()
        if now - last_logged >= WAIT_LOG_INTERVAL_S:
            holders = ", ".join(f"run {s.run_id} step {s.step_key}" for s in info.claimed_slots)
            log(f"memopt: waiting for a '{pool}' slot held by {holders} ({now - started:.0f} s so far; Ctrl-C stops)")
            last_logged = now
        time.sleep(_POLL_S)

