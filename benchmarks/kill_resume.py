"""Work lost to a kill: `memopt run` SIGKILLed at several points, then run again.

    python benchmarks/kill_resume.py --data DIR [--budget-gb 4] [--instances 2] [--max-rounds 20]

First one uninterrupted run (its stage timings are the reference). Then, per kill point, a
fresh experiment: `memopt run` is started, SIGKILLed (the memopt process only, as the kernel's
OOM killer would) a few seconds after the named stage starts, and started again at once. The
table compares the resumed run's wall time with the work the uninterrupted run still had left
from the start of the killed stage: with checkpoints, the rerun costs at most the stage that
was running plus what came after it (and the process start-up), never the finished stages.
It also checks that the resumed run's models and holdout logloss equal the uninterrupted run's.

Run it alone on the machine: a second busy process distorts the timings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

KILL_POINTS = {
    "dataset_metadata": "dataset_metadata: budget",
    "instance_model [instance_1]": "instance_model [instance_1]: budget",
    "holdout_evaluation": "holdout_evaluation: budget",
}
_LINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ")


def memopt(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "memopt_pipeline.cli", "run", *args],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_for(log: Path, text: str, process: subprocess.Popen) -> float:
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None:
            raise SystemExit(f"memopt ended before {text!r}; see {log}")
        time.sleep(0.1)
    return time.monotonic()


def stage_starts(log: Path, process_start: float) -> dict[str, float]:
    """Seconds from the process start (wall clock) to the first log line naming each kill point."""
    starts = {}
    for line in log.read_text(errors="replace").splitlines():
        match = _LINE_TIME.match(line)
        if not match:
            continue
        # Dagster's console lines are stamped in UTC, to the second.
        stamp = datetime.strptime(match.group(1) + " +0000", "%Y-%m-%d %H:%M:%S %z").timestamp()
        for name, pattern in KILL_POINTS.items():
            if pattern in line and name not in starts:
                starts[name] = max(stamp - process_start, 0.0)
    return starts


def results(output: Path) -> dict:
    """Model hashes and holdout logloss of an experiment, from its latest materializations."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    from memopt_pipeline.automation.resume import latest_record

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(output / ".dagster"))) as instance:
        def value(asset, partition=None):
            record = latest_record(instance, asset, partition)
            return json.loads(Path(record.asset_materialization.metadata["path"].value).read_text())

        models = {
            p: hashlib.sha256(Path(value("instance_model", p)["model_path"]).read_bytes()).hexdigest()[:16]
            for p in instance.get_dynamic_partitions("instances")
        }
        return {"models": models, "logloss": value("holdout_evaluation")["logloss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder (e.g. python -m memopt_pipeline.core.data.synthetic)")
    parser.add_argument("--budget-gb", default="4")
    parser.add_argument("--instances", default="2")
    parser.add_argument("--max-rounds", default="20")
    parser.add_argument("--delay", type=float, default=3.0, help="seconds after the stage starts before the kill")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kill_resume_"))
    common = ["--data", args.data, "--budget-gb", args.budget_gb, "--instances", args.instances,
              "--folds", "2", "--max-rounds", args.max_rounds]

    reference = work / "reference"
    started, wall_start = time.monotonic(), time.time()
    process = memopt([*common, "--output", str(reference / "out")], work / "reference.log")
    if process.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed; see {work / 'reference.log'}")
    total = time.monotonic() - started
    starts = stage_starts(work / "reference.log", wall_start)
    expected = results(reference / "out")
    print(f"uninterrupted run: {total:.1f} s; stage starts (s): {json.dumps({k: round(v, 1) for k, v in starts.items()})}")

    rows = []
    for name, pattern in KILL_POINTS.items():
        output = work / name.replace(" ", "_").replace("[", "").replace("]", "") / "out"
        log = work / f"{output.parent.name}.killed.log"
        first_started = time.monotonic()
        process = memopt([*common, "--output", str(output)], log)
        seen = wait_for(log, pattern, process)
        time.sleep(args.delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_after = time.monotonic() - first_started
        resumed_started = time.monotonic()
        rerun = memopt([*common, "--output", str(output)], work / f"{output.parent.name}.resumed.log")
        rc = rerun.wait()
        resumed = time.monotonic() - resumed_started
        text = (work / f"{output.parent.name}.resumed.log").read_text(errors="replace")
        reused = re.search(r"reused (\d+) stage", text)
        same = rc == 0 and results(output) == expected
        remaining = total - starts.get(name, 0.0)
        rows.append((name, killed_after, seen - first_started, resumed, remaining, reused.group(1) if reused else "?", same))
        shutil.rmtree(output, ignore_errors=True)

    print()
    print("| killed in | killed after s | resumed run s | uninterrupted run's work left from that stage's start s | stages reused | models and logloss equal |")
    print("|---|---:|---:|---:|---:|---|")
    for name, killed_after, _, resumed, remaining, reused, same in rows:
        print(f"| {name} | {killed_after:.1f} | {resumed:.1f} | {remaining:.1f} | {reused} | {'yes' if same else 'NO'} |")
    print(f"\nuninterrupted run: {total:.1f} s. Logs in {work}")
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
