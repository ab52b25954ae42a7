"""`memopt run`: the whole graph into an experiment's instance, resumable and step-isolated.

- Resume: stages whose latest materialization is still current (automation/resume.py) are
  reused; only what is missing or stale runs. ``force`` recomputes everything.
- Step isolation: memory-heavy runs (instance training, evaluation) use Dagster's multiprocess
  executor, so every step is a process of its own: a kernel OOM kill of a training step is a step
  failure this process survives and handles. The light prepare stages run in this process.
- A SIGKILLed training step is retried one ladder level lower only with evidence that memory was
  the reason (failures.classify_kill: the guard's heartbeat, the cgroup's OOM-kill counter);
  otherwise it is "killed, not out of memory" and retried once at the same level.
- Stop signals: SIGINT / SIGTERM reach this process as KeyboardInterrupt; Dagster forwards the
  interrupt to the step processes, the run ends as canceled, and :class:`Stopped` is raised. No
  ladder level is spent, and running the same command again resumes.
"""

from __future__ import annotations

import json
import logging
import re
import signal
from dataclasses import dataclass, field
from typing import Callable

import dagster as dg

from memopt_pipeline.assets import FINALIZE_ASSETS, INSTANCE_ASSETS, PREPARE_ASSETS
from memopt_pipeline.assets.memory_heavy import MEMORY_POOL
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.automation.experiment import (
    PID_TAG,
    UNFINISHED,
    Experiment,
    launcher_tags,
    recover_dead_runs,
    wait_for_pool,
)
from memopt_pipeline.automation.resume import Decision, ResumePlanner, latest_record
from memopt_pipeline.core.memory.failures import classify_kill, text_is_kill, text_is_out_of_memory
from memopt_pipeline.core.memory.ladder import LADDER_TAG, MAX_LEVEL
from memopt_pipeline.core.memory.limits import cgroup_oom_kill_count
from memopt_pipeline.resources import MemoryGuard
from memopt_pipeline.resources.checkpoints import prune_checkpoints
from memopt_pipeline.resources.memory_guard import heartbeat_path


class RunFailed(Exception):
    """A run failed for a reason that running again unchanged would not fix; the message says why."""


class Stopped(Exception):
    """SIGINT or SIGTERM stopped the work; what finished is kept."""


_stop_signal: str | None = None  # the last stop signal this process received
STOPPED_TAG = "memopt/stopped"  # on a run a stop signal ended: not a failure of the work


def install_stop_handlers() -> None:
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, `kill`) both stop `memopt run` as an interrupt.

    Dagster's executor forwards the interrupt to the step processes (which also receive SIGINT
    from the terminal, and SIGTERM when a scheduler signals the whole group); the guard turns a
    SIGTERM there into the same interrupt (resources/memory_guard.stop_on_sigterm).
    """

    def stop(signum, frame):
        global _stop_signal
        _stop_signal = signal.Signals(signum).name
        raise KeyboardInterrupt(f"stopped by signal {_stop_signal}")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


_INTERRUPT_ERRORS = ("DagsterExecutionInterruptedError", "KeyboardInterrupt")


def _was_interrupted(result: dg.ExecuteJobResult) -> bool:
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            if error is not None and (error.cls_name in _INTERRUPT_ERRORS or "stopped by signal" in error.message):
                return True
        elif event.event_type == dg.DagsterEventType.ENGINE_EVENT and "termination signal" in (event.message or ""):
            return True
    return False


CONCISE_LOGGER = "memopt_console"  # the console logger of `memopt run` without --verbose


def _without_failure_traces(record: logging.LogRecord) -> bool:
    """Console filter: no Dagster failure events, whose text is a 60-100 line stack trace, and no
    "Dependencies for step ... Not executing." line per skipped step. memopt prints the reason
    once when the run ends; the run's event log (memopt ui) keeps everything, --verbose prints it."""
    event = getattr(record, "dagster_event", None)
    if record.levelno >= logging.ERROR:
        original = (getattr(record, "dagster_meta", None) or {}).get("orig_message") or ""
        return event is None and not original.startswith("Dependencies for step")
    if event is not None and getattr(event.event_specific_data, "error", None) is not None:
        record.msg = str(record.msg).split("\n\n", 1)[0]  # e.g. a retry notice: its line, not its trace
    return True


@dg.logger(dg.colored_console_logger.config_schema, description="Dagster's console logger without failure traces.")
def concise_console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    console = dg.colored_console_logger.logger_fn(init_context)
    console.addFilter(_without_failure_traces)
    return console


def _for_memopt_run(job: dg.JobDefinition) -> dg.JobDefinition:
    # Step processes rebuild the job from these functions, so they get the concise logger too.
    return job.with_logger_defs({**job.loggers, CONCISE_LOGGER: concise_console_logger})


def prepare_job() -> dg.JobDefinition:
    from memopt_pipeline.definitions import defs

    return _for_memopt_run(defs.resolve_job_def("prepare_instances"))


def train_job() -> dg.JobDefinition:
    from memopt_pipeline.definitions import defs

    return _for_memopt_run(defs.resolve_job_def("train_instances"))


def finalize_job() -> dg.JobDefinition:
    from memopt_pipeline.definitions import defs

    return _for_memopt_run(defs.resolve_job_def("evaluate_and_explain"))


@dataclass
class RunSettings:
    ops_config: dict
    budget_gb: float | None = None
    force: bool = False
    log_level: str = "INFO"
    verbose: bool = False  # Dagster's console logger as is: failures with their stack traces


@dataclass
class Outcome:
    collected: dict[str, dict] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


def _step_failures(result: dg.ExecuteJobResult) -> list[tuple[str, str]]:
    """(step key, error text) of every failed step of a finished run."""
    return [(e.step_key, _error_text(e.step_failure_data.error)) for e in _failure_events(result)]


def _failure_events(result: dg.ExecuteJobResult) -> list[dg.DagsterEvent]:
    return [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]


def _error_text(error) -> str:
    """Every error of a SerializableErrorInfo chain, as 'Class: message' lines."""
    text = ""
    while error is not None:
        text += f"{error.cls_name}: {error.message}\n"
        error = error.cause
    return text.strip()


# Most lines of an error message shown; a longer one is cut (the run's logs keep all of it).
REASON_MAX_LINES = 5
_QUALIFIED_PREFIX = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?|$)")


def reason_text(qualified_name: str, message: str) -> str:
    """An error as one user reads it: our errors (and Dagster's ``Failure``) by their message, which
    says the problem and the fix; any other by its short class name too (``KeyError: 'x'``)."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) > REASON_MAX_LINES:
        lines = [*lines[:REASON_MAX_LINES], "..."]
    text = "\n".join(lines)
    if text and (qualified_name.startswith("memopt_pipeline.") or qualified_name.endswith("events.Failure")):
        return text
    short = qualified_name.rsplit(".", 1)[-1]
    return f"{short}: {text}" if text else short


def _name_and_text(error) -> tuple[str, str]:
    # The message repeats the class ("pkg.module.DatasetError: ..."); it names the module, the
    # class name alone does not.
    match = _QUALIFIED_PREFIX.match(error.message)
    if match and match.group(1).rsplit(".", 1)[-1] == error.cls_name:
        return match.group(1), error.message[match.end():]
    return error.cls_name, error.message


def failure_reason(error) -> str:
    """The reason in a step's SerializableErrorInfo chain: the first error that is not one of
    Dagster's wrappers (DagsterExecutionStepExecutionError: 'Error occurred while executing op')."""
    while error.cause is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    name, text = _name_and_text(error)
    if error.cls_name == "Failure" and error.cause is not None:
        # The guard and assets re-raise errors as Failure("DatasetError: ...") to stop retries:
        # report the error itself, not "Failure: DatasetError: ...".
        cause_name, cause_text = _name_and_text(error.cause)
        if cause_text.strip() and cause_text.strip() in text:
            name, text = cause_name, cause_text
    return reason_text(name, text)


class _Runner:
    def __init__(self, instance: dg.DagsterInstance, experiment: Experiment, settings: RunSettings, log):
        self.instance = instance
        self.experiment = experiment
        self.settings = settings
        self.log = log
        self.run_ids: list[str] = []

    def _run_config(self, selection: list[dg.AssetsDefinition], in_process: bool) -> dict:
        names = {a.key.to_user_string() for a in selection}
        out = str(self.experiment.output_dir)
        guard = {"budget_gb": self.settings.budget_gb} if self.settings.budget_gb is not None else {}
        return {
            "ops": {k: v for k, v in self.settings.ops_config.items() if k in names},
            "resources": {
                "memory_guard": {"config": guard},
                "artifacts": {"config": {"base_dir": out}},
                "io_manager": {"config": {"base_dir": out}},
            },
            "execution": {"config": {"in_process": {}} if in_process else {"multiprocess": {"max_concurrent": 1}}},
            "loggers": {
                "console" if self.settings.verbose else CONCISE_LOGGER: {"config": {"log_level": self.settings.log_level}}
            },
        }

    def execute(self, job_fn, selection, *, partition=None, level=None, in_process=False) -> dg.ExecuteJobResult:
        tags = launcher_tags()
        if partition:
            tags["dagster/partition"] = partition
        if level:
            tags[LADDER_TAG] = str(level)
        if any(a.op.pool == MEMORY_POOL for a in selection):
            wait_for_pool(self.instance, MEMORY_POOL, self.log)
        label = f"[{partition}] " if partition else ""
        self.log(f"memopt: {label}running {', '.join(a.key.to_user_string() for a in selection)}")
        try:
            result = dg.execute_job(
                dg.reconstructable(job_fn),
                instance=self.instance,
                run_config=self._run_config(selection, in_process),
                tags=tags,
                asset_selection=[a.key for a in selection],
            )
        except KeyboardInterrupt as interrupt:
            self._cancel_unfinished(str(interrupt) or "interrupted")
            raise Stopped(str(interrupt) or "interrupted") from None
        self.run_ids.append(result.run_id)
        run = self.instance.get_run_by_id(result.run_id)
        if run is not None and run.status == dg.DagsterRunStatus.CANCELED:
            raise Stopped(f"run {result.run_id} was canceled")
        if not result.success and (_stop_signal or _was_interrupted(result)):
            # Dagster maps SIGTERM onto its SIGINT handler while a run executes, so which of the two
            # arrived is known only when it came between runs.
            self.instance.add_run_tags(result.run_id, {STOPPED_TAG: "signal"})
            self.instance.event_log_storage.free_concurrency_slots_for_run(result.run_id)
            raise Stopped(f"stopped by signal ({_stop_signal or 'SIGINT or SIGTERM'}) during run {result.run_id}")
        return result

    def _cancel_unfinished(self, reason: str) -> None:
        """Runs this process started and did not finish: canceled, slots freed, so they resume cleanly."""

        tags = {PID_TAG: launcher_tags()[PID_TAG]}
        for run in self.instance.get_runs(dg.RunsFilter(statuses=UNFINISHED, tags=tags)):
            self.instance.report_run_canceled(run, message=f"stopped by signal ({reason}); run memopt run again to resume")
            self.instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)

    def run(self, job_fn, selection, *, in_process=False) -> None:
        result = self.execute(job_fn, selection, in_process=in_process)
        if not result.success:
            raise RunFailed(self._explain(result))

    def run_training(self, selection, partition: str) -> None:
        """One instance partition, with out-of-memory kills stepping down the ladder."""
        level, killed_retry_used = 0, False
        while True:
            oom_kills_before = cgroup_oom_kill_count()
            result = self.execute(train_job, selection, partition=partition, level=level)
            if result.success:
                return
            failures = _step_failures(result)
            killed = [(step, text) for step, text in failures if text_is_kill(text)]
            if not killed:
                raise RunFailed(self._explain(result))
            step, _ = killed[0]
            beat_file = heartbeat_path(self.instance, result.run_id, step)
            beat = json.loads(beat_file.read_text()) if beat_file.is_file() else None
            out_of_memory, why = classify_kill(beat, oom_kills_before, cgroup_oom_kill_count())
            retried = sum(1 for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY)
            reached = min(level + retried, MAX_LEVEL)
            done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events() if e.asset_key}
            selection = [a for a in selection if a.key.to_user_string() not in done]
            if out_of_memory:
                if reached >= MAX_LEVEL:
                    raise RunFailed(f"[{partition}] {step} was killed ({why}) at the last ladder level; raise the budget or use more instances")
                level = reached + 1
                self.log(f"memopt: [{partition}] {step} was killed, {why}: retrying at ladder level {level}")
            elif not killed_retry_used:
                killed_retry_used, level = True, reached
                self.log(f"memopt: [{partition}] {step} was {why}: retrying once at ladder level {level}")
            else:
                raise RunFailed(f"[{partition}] {step} was killed twice, {why}; see run {result.run_id}")

    def _explain(self, result: dg.ExecuteJobResult) -> str:
        failures = [e for e in _failure_events(result) if e.step_failure_data.error is not None]
        if not failures:
            return f"run {result.run_id} failed (see the run in the UI: memopt ui)"
        step, error = failures[0].step_key, failures[0].step_failure_data.error
        oom = text_is_out_of_memory(_error_text(error))
        hint = " (out of memory at every ladder level: raise the budget or use more instances)" if oom else ""
        reason = failure_reason(error)
        # Guard failures name their stage already ("dataset_metadata: the process already uses ...").
        return f"{reason if reason.startswith((f'{step}:', f'{step} ')) else f'{step}: {reason}'}{hint}"


def collect(instance: dg.DagsterInstance, stages: list[tuple[str, str | None]]) -> dict[str, dict]:
    """Latest materialization metadata of each stage, whether it ran now or was reused."""
    collected = {}
    for asset, partition in stages:
        record = latest_record(instance, asset, partition)
        if record is not None:
            key = f"{asset} [{partition}]" if partition else asset
            collected[key] = {k: v.value for k, v in record.asset_materialization.metadata.items()}
    return collected


def run_experiment(experiment: Experiment, settings: RunSettings, log: Callable[[str], None] = print) -> Outcome:
    outcome = Outcome()
    with experiment.exclusive(log), experiment.instance() as instance:
        recover_dead_runs(instance, log)
        guard = MemoryGuard(budget_gb=settings.budget_gb)
        planner = ResumePlanner(
            instance,
            [*PREPARE_ASSETS, *INSTANCE_ASSETS, *FINALIZE_ASSETS],
            ops_config=settings.ops_config,
            memory_guard=guard,
            output_dir=experiment.output_dir,
            force=settings.force,
        )
        runner = _Runner(instance, experiment, settings, log)

        def stale(assets, partition=None):
            chosen = []
            for assets_def in assets:
                decision = planner.decide(assets_def.key.to_user_string(), partition)
                if decision.reuse:
                    log(f"memopt: {decision.label}: {decision.reason}")
                else:
                    chosen.append(assets_def)
            return chosen

        try:
            selection = stale(PREPARE_ASSETS)
            if selection:
                runner.run(prepare_job, selection, in_process=True)
            partitions = list(instance.get_dynamic_partitions(INSTANCE_PARTITIONS_NAME))
            for partition in partitions:
                selection = stale(INSTANCE_ASSETS, partition)
                if selection:
                    runner.run_training(selection, partition)
            selection = stale(FINALIZE_ASSETS)
            if selection:
                runner.run(finalize_job, selection)
        finally:
            outcome.decisions = planner.decisions
            outcome.runs = runner.run_ids
        # Everything is current now: files no latest materialization references (stopped or failed
        # attempts, superseded versions) can go.
        pruned = prune_checkpoints(instance, experiment.output_dir, log=lambda message: None)
        if pruned.removed:
            log(f"memopt: removed {len(pruned.removed)} superseded checkpoint(s), {pruned.bytes_freed / 2**20:.1f} MiB")
        stages = [(a.key.to_user_string(), None) for a in PREPARE_ASSETS]
        stages += [(a.key.to_user_string(), p) for p in partitions for a in INSTANCE_ASSETS]
        stages += [(a.key.to_user_string(), None) for a in FINALIZE_ASSETS]
        outcome.collected = collect(instance, stages)
    return outcome


def experiment_summary(outcome: Outcome) -> str:
    reused = [d.label for d in outcome.decisions if d.reuse]
    ran = [f"{d.label} ({d.reason})" for d in outcome.decisions if not d.reuse]
    lines = [f"reused {len(reused)} stage(s): {', '.join(reused) or '-'}", f"ran {len(ran)} stage(s): {', '.join(ran) or '-'}"]
    return "\n".join(lines)

