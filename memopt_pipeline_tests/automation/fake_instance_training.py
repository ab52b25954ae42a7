"""A stand-in for instance_model, for tests that run partitions in worker processes.

A module of its own that imports only Dagster (and the pool slot it holds as MemoryGuard
does), so each spawned worker process starts in a few seconds instead of importing the
whole pipeline.
"""

import json
import time
from pathlib import Path

import dagster as dg

from memopt_pipeline.resources.pool_slots import pool_slot

FAKE_POOL = "memory_heavy"  # instance_model's pool (a test checks it equals policies.MEMORY_POOL)
FAKE_PARTITIONS = [f"instance_{i}" for i in range(4)]


class FakeTrainingConfig(dg.Config):
    marker_dir: str


@dg.asset(partitions_def=dg.StaticPartitionsDefinition(FAKE_PARTITIONS), pool=FAKE_POOL)
def fake_instance_training(context: dg.AssetExecutionContext, config: FakeTrainingConfig) -> dg.MaterializeResult:
    """Keeps its slot until another training runs beside it, or all the others are done, so
    that the parallelism a limit allows really happens however slowly the worker processes
    start (with a limit of 1 each step would wait 30 s, and the overlap would show 1)."""
    running, done = Path(config.marker_dir, "running"), Path(config.marker_dir, "done")
    with pool_slot(context.instance, FAKE_POOL, context.log.info):
        started = time.time()
        (running / context.partition_key).touch()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(list(running.iterdir())) > 1 or len(list(done.iterdir())) == len(FAKE_PARTITIONS) - 1:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        (running / context.partition_key).unlink()
        ended = time.time()
    # The "training" interval, while the slot was held: what the memory budget has to cover.
    (done / context.partition_key).write_text(json.dumps([started, ended]))
    return dg.MaterializeResult()


FAKE_ASSETS = [fake_instance_training]
