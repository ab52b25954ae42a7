"""What the memory-heavy assets share: retry policy, concurrency pool, ladder level, guarded reader."""

import dagster as dg

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.dataset import DatasetMetadata
from memopt_pipeline.core.memory.ladder import MAX_LEVEL, ladder_level
from memopt_pipeline.core.memory.monitor import StageMonitor

# Each retry runs one ladder level lower (core/memory/ladder.py). MemoryGuard turns every failure
# that is not out-of-memory into a non-retryable Failure, so only OOMs are retried.
MEMORY_RETRY_POLICY = dg.RetryPolicy(max_retries=MAX_LEVEL, delay=1.0)

# Concurrency pool of the memory-heavy steps; dagster.yaml limits how many run at once.
MEMORY_POOL = "memory_heavy"


def current_ladder_level(context: dg.AssetExecutionContext) -> int:
    return ladder_level(context.retry_number, context.run.tags)


def guarded_reader(
    context: dg.AssetExecutionContext,
    metadata: DatasetMetadata,
    monitor: StageMonitor,
    features: list[str] | None = None,
) -> BatchReader:
    """The batch reader of a stage under MemoryGuard: the guard's check point after every
    batch, progress lines in the run log, RSS reported against the stage's budget."""
    return BatchReader(
        metadata,
        checkpoint=monitor.check,
        log=context.log.info,
        budget_bytes=monitor.budget_bytes,
        features=features,
    )
