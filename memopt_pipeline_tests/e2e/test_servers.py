"""Real servers: dagster-webserver and dagster-daemon as subprocesses, driven through GraphQL.

One temporary DAGSTER_HOME (the project's dagster.yaml with absolute storage paths), both
servers on 127.0.0.1 loading the project's workspace.yaml, the pipeline pointed at the tiny
test dataset and a temporary output folder. In file order:

- full_training through the GraphQL client: the chain sensors in the daemon launch the train
  runs and the evaluation with the chain settings of its Launchpad config, and tag it with its
  chain id; materializations checked through GraphQL; a misspelt setting refused at launch;
- the UI of that run in headless Chromium, driven through the DevTools protocol
  (browser_check.py): the lineage and an asset page, every plot behind a "Show Markdown" link
  of every asset page (memory timelines, PR and calibration curves, SHAP, the report's key
  plots) opened and its image checked, and full_training's Launchpad pre-filled with the chain
  settings and the memory budget; screenshots under $MEMOPT_SCREENSHOT_DIR or pytest's tmp;
- an out-of-memory kill of one step in a train run, then a re-execution from failure
  through GraphQL that runs only that step;
- the dataset sensor, started through GraphQL, launching full_training when a shard appears.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psutil
import pytest
import requests
import yaml
from dagster._core.instance.ref import InstanceRef
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from memopt_pipeline.assets import ALL_ASSETS
from memopt_pipeline.automation.dataset_sensor import DATA_DIR_ENV, FINGERPRINT_TAG, INTERVAL_ENV
from memopt_pipeline.automation.jobs import CHAIN_ID_TAG, CHAIN_TAG
from memopt_pipeline.automation.run_config import AUTOMATION_CONFIG_ENV
from memopt_pipeline.core.memory.failures import text_is_out_of_memory
from memopt_pipeline.resources.chain_settings import ChainSettings
from memopt_pipeline.resources.storage import OUTPUT_DIR_ENV
from memopt_pipeline_tests.e2e import browser_check

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCATION = "memopt_pipeline"  # workspace.yaml's location_name
REPOSITORY = "__repository__"

# Small and fast everywhere: few rounds, two folds, one thread, a SHAP sample of 100 rows. As
# the Launchpad holds them (the chain_settings resource), and as an automation file holds them
# (the later stages' ops).
CHAIN_SETTINGS = {
    "cv_folds": {"n_folds": 2},
    "instance_model": {"max_rounds": 10, "num_threads": 1},
    "shap_summary": {"sample_rows": 100, "chunk_rows": 50},
}
CHAIN_OPS = {name: {"config": config} for name, config in CHAIN_SETTINGS.items()}
BUDGET_GB = 4.0


@dataclass
class Servers:
    url: str
    port: int
    home: Path
    output: Path
    watched: Path
    dataset: Path
    logs: dict[str, Path]
    processes: dict[str, subprocess.Popen]
    client: DagsterGraphQLClient

    def query(self, text: str, **variables) -> dict:
        response = requests.post(f"{self.url}/graphql", json={"query": text, "variables": variables}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), f"GraphQL errors: {body['errors']}"
        return body["data"]

    def log_tails(self) -> str:
        return "\n".join(f"--- {name} log (tail) ---\n{path.read_text()[-3000:]}" for name, path in self.logs.items())

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(what: str, check, timeout: float, servers: Servers | None = None, interval: float = 0.5):
    """Poll ``check`` until it returns something truthy; fail with the servers' logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (requests.RequestException, KeyError) as error:  # server still starting
            last_error = error
        for name, process in (servers.processes.items() if servers else ()):
            assert process.poll() is None, f"{name} exited with {process.returncode}\n{servers.log_tails()}"
        time.sleep(interval)
    tails = servers.log_tails() if servers else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})\n{tails}")


def _instance_yaml(home: Path) -> dict:
    # The project's instance settings (pools, run retries, run monitoring) with storage in the
    # temporary home; sensors in threads so the chain sensors do not wait behind each other.
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    config["storage"] = {"sqlite": {"base_dir": str(home / "storage")}}
    config["local_artifact_storage"]["config"]["base_dir"] = str(home)
    config["compute_logs"]["config"]["base_dir"] = str(home / "compute_logs")
    config["sensors"] = {"use_threads": True, "num_workers": 4}
    return config


def _start(command: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    # Own session: the server, its code server and its run workers form one process group,
    # which teardown ends by the server's id.
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children that left the group (none expected) are ended one by one, by id.
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


_DAEMON_HEALTH = "{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }"
_LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries { name
    locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
_SENSOR = """query ($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
    __typename ... on Sensor { sensorState { status ticks(limit: 10) { status skipReason runIds error { message } } } } } }"""


def _selector(sensor: str) -> dict:
    return {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": sensor}


def _sensor_ticks(servers: Servers, sensor: str) -> list[dict]:
    return servers.query(_SENSOR, selector=_selector(sensor))["sensorOrError"]["sensorState"]["ticks"]


@pytest.fixture(scope="module")
def servers(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(_instance_yaml(home)))
    # Create the SQLite schemas before two servers (and their code servers) race to create
    # them at once, which leaves alembic with two heads.
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        instance.get_runs(limit=1)
        instance.fetch_run_status_changes(dg.DagsterEventType.RUN_SUCCESS, limit=1)
        instance.all_instigator_state()
    watched = root / "watched_dataset"  # the dataset sensor's folder, a copy the test may change
    shutil.copytree(tiny_dataset, watched)
    automation = root / "automation.yaml"  # settings of the runs the dataset sensor launches
    automation.write_text(yaml.safe_dump({"ops": {"gene_split": {"config": {"sample_genes": 16}}, **CHAIN_OPS}}))
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        OUTPUT_DIR_ENV: str(root / "out"),
        DATA_DIR_ENV: str(watched),
        AUTOMATION_CONFIG_ENV: str(automation),
        INTERVAL_ENV: "2",
        "PYTHONUNBUFFERED": "1",
    }
    workspace = str(REPO_ROOT / "workspace.yaml")
    logs = {"webserver": root / "webserver.log", "daemon": root / "daemon.log"}
    processes: dict[str, subprocess.Popen] = {}
    try:
        processes["webserver"] = _start(
            [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", workspace], logs["webserver"], env, root
        )
        processes["daemon"] = _start([str(BIN / "dagster-daemon"), "run", "-w", workspace], logs["daemon"], env, root)
        servers = Servers(
            url=f"http://127.0.0.1:{port}", port=port, home=home, output=root / "out", watched=watched,
            dataset=tiny_dataset, logs=logs, processes=processes,
            client=DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60),
        )  # fmt: skip

        def location_loaded():
            [entry] = servers.query(_LOCATIONS)["workspaceOrError"]["locationEntries"]
            state = entry["locationOrLoadError"]
            assert state is None or state["__typename"] != "PythonError", f"code location failed to load: {state}"
            return state is not None and state["__typename"] == "RepositoryLocation"

        def daemons_healthy():
            statuses = servers.query(_DAEMON_HEALTH)["instance"]["daemonHealth"]["allDaemonStatuses"]
            return all(s["healthy"] for s in statuses if s["required"])

        _wait_for("the webserver to load the code location", location_loaded, 180, servers)
        _wait_for("the daemon to report healthy", daemons_healthy, 180, servers)
        # Run status sensors only see runs that end after their first tick.
        for sensor in ("chain_train_instances", "chain_evaluate_and_explain", "tag_chain_start"):
            _wait_for(f"a first tick of {sensor}", lambda: _sensor_ticks(servers, sensor), 120, servers)
        yield servers
    finally:
        for process in processes.values():
            _stop(process)


_RUNS = """query ($filter: RunsFilter) { runsOrError(filter: $filter) { ... on Runs { results {
    runId jobName status runConfigYaml tags { key value } } } } }"""
_RUN = """query ($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run {
    runId jobName status tags { key value } stepStats { stepKey status } } } }"""
_MESSAGES = """query ($runId: ID!) { logsForRun(runId: $runId, limit: 5000) { ... on EventConnection {
    events { __typename ... on MessageEvent { message stepKey } ... on ExecutionStepFailureEvent { error { message } } } } } }"""


def _runs(servers: Servers, **run_filter) -> list[dict]:
    results = servers.query(_RUNS, filter=run_filter)["runsOrError"]["results"]
    for run in results:
        run["tags"] = {tag["key"]: tag["value"] for tag in run["tags"]}
    return results


def _run(servers: Servers, run_id: str) -> dict:
    return servers.query(_RUN, runId=run_id)["runOrError"]


def _messages(servers: Servers, run_id: str, step_key: str | None = None) -> str:
    events = servers.query(_MESSAGES, runId=run_id)["logsForRun"]["events"]
    texts = []
    for event in events:
        if step_key is None or event.get("stepKey") == step_key:
            texts.append(event.get("message") or "")
            texts.append((event.get("error") or {}).get("message") or "")
    return "\n".join(texts)


def _wait_for_run(servers: Servers, run_id: str, timeout: float = 240) -> str:
    def finished():
        status = servers.client.get_run_status(run_id)
        return status.value if status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED) else None

    return _wait_for(f"run {run_id} to finish", finished, timeout, servers, interval=1.0)


@pytest.fixture(scope="module")
def full_chain(servers):
    """full_training launched through the GraphQL client, followed to the end of its chain."""
    started = time.monotonic()
    root = servers.client.submit_job_execution(
        "full_training",
        repository_location_name=LOCATION,
        repository_name=REPOSITORY,
        run_config={
            "ops": {
                "source_dataset": {"config": {"path": str(servers.dataset)}},
                "gene_split": {"config": {"sample_genes": 16}},
                "instance_assignment": {"config": {"n_instances": 2}},
            },
            "resources": {
                "memory_guard": {"config": {"budget_gb": BUDGET_GB}},
                "chain_settings": {"config": CHAIN_SETTINGS},
            },
            # One process per run: the fastest for a tiny dataset; the chain keeps it for every run.
            "execution": {"config": {"in_process": {}}},
        },
    )
    assert _wait_for_run(servers, root) == "SUCCESS", _messages(servers, root)[-3000:]

    def chain_finished():
        runs = [r for r in _runs(servers, tags=[{"key": CHAIN_ID_TAG, "value": root}]) if r["runId"] != root]
        failed = [r for r in runs if r["status"] in ("FAILURE", "CANCELED")]
        assert not failed, f"chained run failed: {failed}\n{_messages(servers, failed[0]['runId'])[-3000:]}"
        evaluations = [r for r in runs if r["jobName"] == "evaluate_and_explain" and r["status"] == "SUCCESS"]
        return runs if evaluations else None

    chain = _wait_for("the chain to train every instance and evaluate", chain_finished, 300, servers, interval=1.0)
    print(f"full_training chain finished in {time.monotonic() - started:.0f} s")
    return root, chain


_ASSETS = """{ assetNodes { assetKey { path } isPartitioned partitionStats { numMaterialized numPartitions }
    assetMaterializations(limit: 1) { runId metadataEntries { label
        ... on FloatMetadataEntry { floatValue } ... on IntMetadataEntry { intValue } } } } }"""


def test_full_training_chains_train_and_evaluate_runs(servers, full_chain):
    root, chain = full_chain
    # The starting run is in its chain too: tag_chain_start tagged it when it was launched.
    [start] = [r for r in _runs(servers, tags=[{"key": CHAIN_ID_TAG, "value": root}]) if r["runId"] == root]
    assert start["jobName"] == "full_training" and start["tags"][CHAIN_TAG] == "full_training"
    by_job = {}
    for run in chain:
        by_job.setdefault(run["jobName"], []).append(run)
    assert sorted(by_job) == ["evaluate_and_explain", "train_instances"]
    assert sorted(r["tags"]["dagster/partition"] for r in by_job["train_instances"]) == ["instance_0", "instance_1"]
    for run in chain:
        assert run["status"] == "SUCCESS"
        assert run["tags"][CHAIN_TAG] == "full_training" and run["tags"]["dagster/sensor_name"].startswith("chain_")
        # The starting run's resources and its chain settings reached every chained run.
        config = yaml.safe_load(run["runConfigYaml"])
        assert config["resources"] == {"memory_guard": {"config": {"budget_gb": BUDGET_GB}}}
    train_config = yaml.safe_load(by_job["train_instances"][0]["runConfigYaml"])
    assert train_config["ops"]["instance_model"]["config"] == CHAIN_SETTINGS["instance_model"]
    evaluate_config = yaml.safe_load(by_job["evaluate_and_explain"][0]["runConfigYaml"])
    assert evaluate_config["ops"] == {"shap_summary": {"config": CHAIN_SETTINGS["shap_summary"]}}

    nodes = {tuple(n["assetKey"]["path"]): n for n in servers.query(_ASSETS)["assetNodes"]}
    chain_runs = {root, *(r["runId"] for r in chain)}
    for asset in ALL_ASSETS:
        node = nodes[tuple(asset.key.path)]
        assert node["assetMaterializations"], f"{asset.key.to_user_string()} was not materialized"
        assert node["assetMaterializations"][0]["runId"] in chain_runs
    assert nodes[("instance_model",)]["partitionStats"] == {"numMaterialized": 2, "numPartitions": 2}
    holdout = {e["label"]: e for e in nodes[("holdout_evaluation",)]["assetMaterializations"][0]["metadataEntries"]}
    assert holdout["logloss"]["floatValue"] < holdout["baseline_logloss"]["floatValue"]
    assert holdout["budget_gb"]["floatValue"] == BUDGET_GB


def test_a_misspelt_chain_setting_is_refused_at_launch(servers, full_chain):
    runs_before = len(_runs(servers, pipelineName="full_training"))
    with pytest.raises(DagsterGraphQLClientError, match="RunConfigValidationInvalid") as refused:
        servers.client.submit_job_execution(
            "full_training",
            repository_location_name=LOCATION,
            repository_name=REPOSITORY,
            run_config={"resources": {"chain_settings": {"config": {"instance_model": {"max_round": 10}}}}},
        )
    assert "max_round" in str(refused.value)  # Dagster's reason, as the Launchpad shows it
    assert len(_runs(servers, pipelineName="full_training")) == runs_before  # no run was created


def test_ui_pages_render_in_headless_chromium(servers, full_chain, tmp_path_factory):
    chromium = browser_check.find_chromium()
    if chromium is None:
        message = "Chromium is not installed (apt-get install -y chromium); the UI browser check needs it"
        if os.environ.get(browser_check.REQUIRE_BROWSER_ENV) == "1":
            pytest.fail(f"{message} and {browser_check.REQUIRE_BROWSER_ENV}=1 requires it")
        pytest.skip(message)
    out = Path(os.environ.get("MEMOPT_SCREENSHOT_DIR") or tmp_path_factory.mktemp("ui_screenshots"))
    # The plots of this run's assets, on one page per instance partition the chain trained.
    _, chain = full_chain
    partitions = tuple(sorted(r["tags"]["dagster/partition"] for r in chain if r["jobName"] == "train_instances"))
    report = browser_check.check_pages(servers.url, out, chromium=chromium, plots=browser_check.plot_pages(partitions))
    # The two pages, each shown with what it must show.
    assert [p.name for p in report.pages] == ["asset_graph.png", "holdout_evaluation.png"]
    # Every plot dialog: each image an inline PNG that decoded in the browser, drawn at least
    # MIN_PLOT_WIDTH_PX wide (checked there), and the dialog screenshotted.
    timeline = "memory_timeline"
    assert [(p.page, p.label) for p in report.plots] == [
        ("dataset_metadata", timeline),
        ("feature_screening", timeline),
        ("instance_model_instance_0", timeline),
        ("instance_model_instance_1", timeline),
        ("holdout_evaluation", timeline),
        ("holdout_evaluation", "pr_curves"),
        ("holdout_evaluation", "calibration_curve"),
        ("shap_summary", timeline),
        ("shap_summary", "shap_importance"),
        ("shap_summary", "shap_beeswarm"),
        ("run_report", "key_plots"),
    ]
    for plot in report.plots:
        assert plot.path.name == f"{plot.page}_{plot.label}.png" and plot.path.parent == out
        assert len(plot.images) == (3 if plot.label == "key_plots" else 1), plot
        assert all(width >= browser_check.MIN_PLOT_WIDTH_PX and height > 0 for width, height in plot.images), plot
    # The Launchpad of full_training: pre-filled with the chain settings' defaults and a memory
    # budget, both on screen, and valid as it stands.
    launchpad = report.launchpad
    assert launchpad is not None and launchpad.path.name == "launchpad_full_training.png"
    resources = launchpad.config["resources"]
    assert resources["chain_settings"]["config"] == ChainSettings().model_dump()
    assert resources["memory_guard"]["config"]["budget_gb"] > 0
    assert "max_rounds: 300" in launchpad.visible and "budget_gb: " in launchpad.visible
    for png in report.screenshots:
        assert png.read_bytes()[:8] == browser_check.PNG_SIGNATURE and png.stat().st_size > 10_000, (png, png.stat().st_size)
    print(f"screenshots ({len(report.screenshots)}): {out}; still changing when captured: {report.unsettled or 'none'}")


class _StepKiller(threading.Thread):
    """SIGKILLs every attempt of one step of one run, as the kernel's OOM killer would.

    Each attempt runs in its own process (multiprocess executor) whose pid is on the step's
    start event; only processes under the daemon this test started are ever killed."""

    def __init__(self, servers: Servers, run_id: str, step_key: str):
        super().__init__(daemon=True)
        self.servers, self.run_id, self.step_key = servers, run_id, step_key
        self.killed: list[int] = []
        self.done = threading.Event()

    def _ours(self, pid: int) -> bool:
        try:
            process = psutil.Process(pid)
            return any(parent.pid == self.servers.processes["daemon"].pid for parent in process.parents())
        except psutil.NoSuchProcess:
            return False

    def run(self):
        starts = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_RESTARTED}
        with self.servers.instance() as instance:
            while not self.done.is_set():
                for record in instance.get_records_for_run(self.run_id, of_type=starts).records:
                    event = record.event_log_entry.dagster_event
                    if event.step_key == self.step_key and event.pid not in self.killed and self._ours(event.pid):
                        os.kill(event.pid, signal.SIGKILL)
                        self.killed.append(event.pid)
                time.sleep(0.05)


def test_out_of_memory_step_is_reexecuted_from_failure_alone(servers, full_chain):
    train_run = servers.client.submit_job_execution(
        "train_instances",
        repository_location_name=LOCATION,
        repository_name=REPOSITORY,
        run_config={
            # Enough rounds that every attempt is still training when it is killed.
            "ops": {"cv_folds": CHAIN_OPS["cv_folds"], "instance_model": {"config": {"max_rounds": 150, "early_stopping_rounds": 150, "num_threads": 1}}},
            # Every step in its own process, so a kill takes one step, not the run; forked from a
            # server that imported the code once, so the four attempts start in a second each.
            "execution": {"config": {"multiprocess": {"start_method": {"forkserver": {"preload_modules": ["memopt_pipeline.definitions"]}}}}},
        },
        # dagster.yaml resumes runs that end in a run-level exception, and Dagster reports a step
        # process that crashed on its last retry as one; that automatic resume would race the
        # re-execution this test launches by hand, so this run opts out of it.
        tags={"dagster/partition": "instance_0", "dagster/max_retries": "0"},
    )
    killer = _StepKiller(servers, train_run, "instance_model")
    killer.start()
    try:
        assert _wait_for_run(servers, train_run) == "FAILURE"
    finally:
        killer.done.set()
        killer.join()
    # The step's retry policy tried every memory ladder level; each attempt was killed.
    assert len(killer.killed) == 4, killer.killed
    assert text_is_out_of_memory(_messages(servers, train_run, "instance_model"))
    parent_steps = {s["stepKey"]: s["status"] for s in _run(servers, train_run)["stepStats"]}
    assert parent_steps == {"cv_folds": "SUCCESS", "instance_model": "FAILURE"}

    launched = servers.query(
        """mutation ($parent: String!) { launchRunReexecution(reexecutionParams: {parentRunId: $parent, strategy: FROM_FAILURE}) {
            __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
        parent=train_run,
    )["launchRunReexecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    reexecution = launched["run"]["runId"]
    assert _wait_for_run(servers, reexecution) == "SUCCESS", _messages(servers, reexecution)[-3000:]
    run = _run(servers, reexecution)
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    assert tags["dagster/parent_run_id"] == train_run and tags["dagster/partition"] == "instance_0"
    # Only the failed step ran again; cv_folds' output from the failed run was reused.
    assert [(s["stepKey"], s["status"]) for s in run["stepStats"]] == [("instance_model", "SUCCESS")]
    # Nothing else re-ran the failed run (no automatic resume, no out-of-memory sensor run:
    # every ladder level was used up, so the sensor leaves it to a person).
    assert [r["runId"] for r in _runs(servers, tags=[{"key": "dagster/parent_run_id", "value": train_run}])] == [reexecution]
    assert not _runs(servers, tags=[{"key": "memopt/oom_retry_of", "value": train_run}])
    latest = servers.query(
        """{ assetNodes(assetKeys: [{path: ["instance_model"]}]) { latestMaterializationByPartition(partitions: ["instance_0"]) { runId } } }"""
    )["assetNodes"][0]["latestMaterializationByPartition"]
    assert latest == [{"runId": reexecution}]


def test_dataset_sensor_launches_full_training_when_a_shard_appears(servers, full_chain):
    started = servers.query(
        """mutation ($selector: SensorSelector!) { startSensor(sensorSelector: $selector) {
            __typename ... on Sensor { sensorState { status } } ... on PythonError { message } } }""",
        selector=_selector("dataset_change_sensor"),
    )["startSensor"]
    assert started == {"__typename": "Sensor", "sensorState": {"status": "RUNNING"}}, started

    def ticked(text):
        return lambda: any(text in (t["skipReason"] or "") for t in _sensor_ticks(servers, "dataset_change_sensor"))

    _wait_for("the sensor's first look at the dataset", ticked("watching"), 120, servers)
    new_shard = servers.watched / "new_shard.parquet"
    shutil.copy(sorted(servers.watched.glob("*.parquet"))[0], new_shard)

    def launched():
        return _runs(servers, tags=[{"key": "dagster/sensor_name", "value": "dataset_change_sensor"}])

    [run] = _wait_for("the daemon to launch full_training for the new shard", launched, 120, servers)
    assert run["jobName"] == "full_training"
    assert run["tags"][FINGERPRINT_TAG] in run["tags"]["dagster/run_key"]
    config = yaml.safe_load(run["runConfigYaml"])
    assert config["ops"]["source_dataset"]["config"]["path"] == str(servers.watched.resolve())
    # The automation file's later-stage ops became the run's chain settings.
    assert config["resources"]["chain_settings"]["config"] == CHAIN_SETTINGS
    def tick_recorded():  # the tick is marked done a moment after its run is created
        return any(run["runId"] in t["runIds"] for t in _sensor_ticks(servers, "dataset_change_sensor"))

    _wait_for("the sensor tick to record the run", tick_recorded, 60, servers)
    # The run itself is full_training as above; ending it here keeps the machine free.
    servers.client.terminate_run(run["runId"])
