"""Retry and concurrency settings shared by the memory-heavy assets."""

import dagster as dg

from memopt_pipeline.core.ladder import MAX_LEVEL, ladder_level

# Each retry runs one ladder level lower (core/ladder.py). MemoryGuard turns every failure
# that is not out-of-memory into a non-retryable Failure, so only OOMs are retried.
MEMORY_RETRY_POLICY = dg.RetryPolicy(max_retries=MAX_LEVEL, delay=1.0)

# Concurrency pool of the memory-heavy steps; dagster.yaml limits how many run at once.
MEMORY_POOL = "memory_heavy"


def current_ladder_level(context: dg.AssetExecutionContext) -> int:
    return ladder_level(context.retry_number, context.run.tags)
