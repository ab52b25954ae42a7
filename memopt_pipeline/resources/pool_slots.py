"""A Dagster pool's limit, held on this machine with file locks as well.

Why: with SQLite instance storage (the default), Dagster assigns a pool slot with a read and
a write in separate statements, so step processes of two runs starting together can both be
handed the same free slot, and a limit of 2 lets 3 memory-heavy steps run side by side (seen
in CI, on instance trainings sized so that only 2 fit the budget). ``flock`` is atomic and
the kernel releases it when the process dies, so a kill -9 never leaves a slot held, and it
costs nothing when Dagster's own claim was right.

What it does not cover: steps on other machines (Kubernetes pods, Dask workers) have memory
of their own; the locks only span the processes sharing one instance directory.

Imports only the standard library and Dagster: test stand-ins load it in spawned processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path
from typing import Callable, Iterator

import dagster as dg

SLOT_FOLDER = "pool_slots"

# Pools whose slot this process holds now: a nested guarded stage of the same step must not
# wait for a second slot (flock locks of one process on two descriptors conflict).
_HELD: dict[str, int] = {}


def pool_limit(instance: dg.DagsterInstance, pool: str) -> int | None:
    """How many steps of ``pool`` Dagster lets run at once; None where nothing limits it."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return None
    slots = storage.get_concurrency_info(pool).slot_count
    return slots or None


@contextlib.contextmanager
def pool_slot(
    instance: dg.DagsterInstance,
    pool: str,
    log: Callable[[str], None],
    poll_s: float = 0.2,
    report_every_s: float = 30.0,
) -> Iterator[int | None]:
    """Hold one of the pool's slots on this machine for the block; yields its index (None when
    the pool has no limit). Waits, logging every ``report_every_s``, while all are held."""
    limit = pool_limit(instance, pool)
    if limit is None or pool in _HELD:
        yield _HELD.get(pool)
        return
    folder = Path(instance.root_directory) / SLOT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    next_report = started + report_every_s
    while True:
        for index in range(limit):
            handle = open(folder / f"{pool}.{index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _HELD[pool] = index
            try:
                yield index
            finally:
                del _HELD[pool]
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        now = time.monotonic()
        if now >= next_report:
            log(f"waiting for one of the {limit} '{pool}' slots on this machine ({now - started:.0f} s so far)")
            next_report += report_every_s
        time.sleep(poll_s)
