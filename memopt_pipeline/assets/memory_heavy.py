"""What the memory-heavy assets share: retry policy, concurrency pool, ladder level, guarded reader."""

import json
from pathlib import Path

import dagster as dg

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.data.dataset import DatasetMetadata
from memopt_pipeline.core.memory.failures import classify_kill, text_is_kill
from memopt_pipeline.core.memory.ladder import MAX_LEVEL, ladder_level
from memopt_pipeline.core.memory.limits import cgroup_oom_kill_count
from memopt_pipeline.core.memory.monitor import StageMonitor
from memopt_pipeline.resources.memory_guard import heartbeat_path

# Each retry runs one ladder level lower (core/memory/ladder.py). MemoryGuard turns every failure
# that is not out-of-memory into a non-retryable Failure, so only OOMs are retried.
MEMORY_RETRY_POLICY = dg.RetryPolicy(max_retries=MAX_LEVEL, delay=1.0)

# Concurrency pool of the memory-heavy steps; dagster.yaml limits how many run at once.
MEMORY_POOL = "memory_heavy"


def current_ladder_level(context: dg.AssetExecutionContext) -> int:
    """The ladder level of this attempt: the run's tagged level, one lower for every earlier attempt
    that ran out of memory, the same after a SIGKILL without memory evidence (allowed once).

    Dagster retries a step whose process was SIGKILLed like any failure; whether that kill was
    the OOM killer is read from the killed attempt's heartbeat and the cgroup's OOM-kill count
    (core/memory/failures.classify_kill). The level reached is kept beside the heartbeats.
    """
    tagged = ladder_level(0, context.run.tags)
    step_key = context.get_step_execution_context().step.key
    state_file = heartbeat_path(context.instance, context.run.run_id, step_key).with_suffix(".ladder.json")
    if context.retry_number == 0:
        state = {"level": tagged, "kills_without_evidence": 0, "oom_kills": cgroup_oom_kill_count()}
    else:
        state = _read_state(state_file) or {"level": ladder_level(context.retry_number - 1, context.run.tags),
                                             "kills_without_evidence": 0, "oom_kills": None}
        out_of_memory, why = _previous_attempt_out_of_memory(context, step_key, state)
        if out_of_memory:
            state["level"] = min(state["level"] + 1, MAX_LEVEL)
            context.log.warning(f"{step_key}: the previous attempt ran out of memory ({why})")
        elif state["kills_without_evidence"] >= 1:
            raise dg.Failure(description=f"{step_key} was killed again, {why}; not retried", allow_retries=False)
        else:
            state["kills_without_evidence"] += 1
            context.log.warning(f"{step_key}: the previous attempt was {why}: retrying once at the same level")
        state["oom_kills"] = cgroup_oom_kill_count()
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state))
    return state["level"]


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _previous_attempt_out_of_memory(context: dg.AssetExecutionContext, step_key: str, state: dict) -> tuple[bool, str]:
    retries = [
        entry for entry in context.instance.all_logs(context.run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
        if entry.step_key == step_key
    ]
    error = retries[-1].dagster_event.event_specific_data.error if retries else None
    text = ""
    while error is not None:
        text += f"{error.cls_name}: {error.message}\n"
        error = error.cause
    if "ChildProcessCrashException" not in text and not text_is_kill(text):
        # An exception the guard let through: only out-of-memory ones are retried (MemoryGuard.stage).
        return True, text.strip().splitlines()[-1] if text.strip() else "an out-of-memory error"
    beat_file = heartbeat_path(context.instance, context.run.run_id, step_key)
    beat = _read_state(beat_file)
    return classify_kill(beat, state.get("oom_kills"), cgroup_oom_kill_count())


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
