"""Tasks the Dask tests run on worker processes: a memory hog and a reader with a bug.

Workers import this module to run them (functions travel by reference), so it stays light:
no test module, no Dagster.
"""

import threading
import time

import numpy as np

CHUNK_BYTES = 64 * 2**20


def hold_memory_until_killed(multiple: float = 3.0, limit: int | None = None) -> int:
    """Allocate and touch memory 64 MiB at a time up to ``multiple`` x this worker's memory
    limit, then wait. The worker's nanny terminates it above 95% of the limit long before: the
    function returns only when nothing enforced the limit."""
    if limit is None:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    blocks = []
    while len(blocks) * CHUNK_BYTES < multiple * limit:
        blocks.append(np.ones(CHUNK_BYTES // 8))
        time.sleep(0.02)
    time.sleep(30)
    return len(blocks)


def start_memory_hog(dask_worker, delay_s: float = 2.0) -> None:
    """For ``Client.run``: after ``delay_s``, a thread of this worker holds more than its memory
    limit (while the worker's tasks, e.g. XGBoost's training, carry on)."""
    limit = dask_worker.memory_manager.memory_limit

    def hog():
        time.sleep(delay_s)
        hold_memory_until_killed(limit=limit)

    threading.Thread(target=hog, daemon=True).start()


def hungry_read_gene_group(genes, metadata, features, batch_rows):
    """Stands in for ``xgboost_dask.read_gene_group``: reading a partition takes more than the worker has."""
    hold_memory_until_killed()


def broken_read_gene_group(genes, metadata, features, batch_rows):
    """Stands in for ``xgboost_dask.read_gene_group``: a reader bug, nothing to do with memory."""
    raise ValueError(f"simulated reader bug in genes {genes[:2]}")
