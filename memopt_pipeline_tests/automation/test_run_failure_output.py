"""What `memopt run` shows of a failed step: the reason once, without Dagster's stack trace unless --verbose."""

from types import SimpleNamespace

import dagster as dg
import pytest

from memopt_pipeline.automation.resumable_run import (
    CONCISE_LOGGER,
    RunSettings,
    _for_memopt_run,
    _Runner,
)
from memopt_pipeline.core.data.dataset import DatasetError


@dg.asset
def shards(context: dg.AssetExecutionContext) -> None:
    context.log.info("scanning 3 shards")  # progress: still shown
    try:
        raise DatasetError("data.parquet: gene column 'gene_id' not found; set the gene column")
    except DatasetError as error:
        # What the memory guard does with any error: a Failure, so that it is not retried.
        raise dg.Failure(description=f"{type(error).__name__}: {error}", allow_retries=False) from error


@dg.asset(deps=[shards])
def downstream() -> None:
    """Skipped after the failure: Dagster logs an error line for it."""


@dg.asset
def lookup() -> None:
    raise KeyError("gene_id")


@dg.asset
def guarded() -> None:
    raise dg.Failure(description="guarded: the process already uses 0.33 GiB. Set the memory budget to at least 0.7 GiB.")


def _run(assets: list, logger: str) -> dg.ExecuteInProcessResult:
    job = dg.Definitions(assets=assets, jobs=[dg.define_asset_job("job")]).resolve_job_def("job")
    return _for_memopt_run(job).execute_in_process(
        run_config={"loggers": {logger: {"config": {"log_level": "INFO"}}}}, raise_on_error=False
    )


def _explain(result: dg.ExecuteInProcessResult) -> str:
    return _Runner(instance=None, experiment=None, settings=None, log=None)._explain(result)


def test_the_reason_is_the_error_message_without_wrapper_class_names():
    result = _run([shards, downstream], CONCISE_LOGGER)
    assert not result.success
    # Not "shards: DagsterExecutionStepExecutionError: ...", nor "Failure: DatasetError: ...".
    assert _explain(result) == "shards: data.parquet: gene column 'gene_id' not found; set the gene column"
    # A class name that is not ours says something: it stays.
    assert _explain(_run([lookup], CONCISE_LOGGER)) == "lookup: KeyError: 'gene_id'"
    # The memory guard names the stage itself: not "guarded: guarded: ...".
    assert _explain(_run([guarded], CONCISE_LOGGER)) == (
        "guarded: the process already uses 0.33 GiB. Set the memory budget to at least 0.7 GiB."
    )


def test_console_shows_no_failure_trace_unless_verbose(capsys):
    _run([shards, downstream], CONCISE_LOGGER)
    concise = capsys.readouterr().err
    assert "scanning 3 shards" in concise
    assert "Stack Trace" not in concise and "STEP_FAILURE" not in concise and "Dependencies for step" not in concise

    _run([shards, downstream], "console")  # what --verbose uses
    verbose = capsys.readouterr().err
    assert "scanning 3 shards" in verbose and "STEP_FAILURE" in verbose and "Stack Trace" in verbose


@pytest.mark.parametrize(("verbose", "logger"), [(False, CONCISE_LOGGER), (True, "console")])
def test_memopt_runs_use_the_concise_console_unless_verbose(tmp_path, verbose, logger):
    runner = _Runner(None, SimpleNamespace(output_dir=tmp_path), RunSettings(ops_config={}, verbose=verbose), print)
    assert list(runner._run_config([], in_process=True)["loggers"]) == [logger]
