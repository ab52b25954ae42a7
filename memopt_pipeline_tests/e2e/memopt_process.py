"""Drive `memopt run` as users do: a separate process, killed or signalled from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
from dagster._core.instance.ref import InstanceRef

from memopt_pipeline.automation.experiment import INSTANCE_FOLDER
from memopt_pipeline_tests import checkpoint_layout

FIRST_INSTANCE_TRAINING = "instance_model [instance_0]: budget"
SECOND_INSTANCE_TRAINING = "instance_model [instance_1]: budget"


def memopt_args(dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        "run", "--data", str(dataset), "--output", str(output), "--budget-gb", "4",
        "--instances", "2", "--folds", "2", "--max-rounds", "40", *extra,
    ]


class MemoptProcess:
    """`python -m memopt_pipeline.cli ...` in its own session, output in a log file."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MEMOPT_OUTPUT_DIR")}
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "memopt_pipeline.cli", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(f"memopt ended (rc {self.process.returncode}) before {text!r}:\n{self.output()[-3000:]}")
            assert time.monotonic() < deadline, f"{text!r} not seen in {timeout_s} s:\n{self.output()[-3000:]}"
            time.sleep(0.2)

    def wait(self, timeout_s: float = 900) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            self._log.close()

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill_main(self) -> list[psutil.Process]:
        """SIGKILL the memopt process only (what the kernel's OOM killer does to one process)."""
        children = self.descendants()
        self.process.send_signal(signal.SIGKILL)
        self.wait()
        return children

    def signal_and_time(self, signum: int) -> tuple[int, float]:
        started = time.monotonic()
        self.process.send_signal(signum)
        rc = self.wait(timeout_s=60)
        return rc, time.monotonic() - started


def run_memopt(args: list[str], log_path: Path, cwd: Path) -> tuple[int, str]:
    process = MemoptProcess(args, log_path, cwd)
    rc = process.wait()
    return rc, process.output()


def wait_gone(processes: list[psutil.Process], timeout_s: float = 30) -> None:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"


def experiment_instance(output: Path) -> dg.DagsterInstance:
    """The instance `memopt run --output OUTPUT` keeps in the experiment folder."""
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(output / INSTANCE_FOLDER)))


def materialization_counts(output: Path) -> dict[str, int]:
    """How many times each stage (asset, or asset [partition]) was materialized in the experiment."""
    counts: dict[str, int] = {}
    with experiment_instance(output) as instance:
        for key in instance.get_asset_keys():
            records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=10_000).records
            for record in records:
                partition = record.asset_materialization.partition
                label = f"{key.to_user_string()} [{partition}]" if partition else key.to_user_string()
                counts[label] = counts.get(label, 0) + 1
    return counts


def latest_value(output: Path, asset: str, partition: str | None = None) -> dict:
    with experiment_instance(output) as instance:
        return checkpoint_layout.latest_value(instance, asset, partition)


def runs_of(output: Path) -> list[dg.DagsterRun]:
    with experiment_instance(output) as instance:
        return list(instance.get_runs())
