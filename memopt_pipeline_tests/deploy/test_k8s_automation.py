"""On Kubernetes, every run the automation launches sizes its instance_model pod from the plan.

Each path is rendered as the daemon would launch it: the run request the sensor or schedule
returns with the Kubernetes code location, then the instance_model step's pod that dagster-k8s
builds from that run config. The expected memory is computed here from the plan's predicted
training peak: request = peak x 1.25, limit = request x 1.25 but at least request + 512 MiB,
MemoryGuard budget = request.
"""

import math
import shutil

import dagster as dg
import pytest
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

import memopt_pipeline.deploy.k8s as k8s_module
from memopt_pipeline.assets import ALL_ASSETS
from memopt_pipeline.assets import splits as split_assets
from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME
from memopt_pipeline.automation.dataset_sensor import DATA_DIR_ENV
from memopt_pipeline.automation.jobs import ALL_JOBS, CHAIN_ID_TAG, CHAIN_TAG, train_instances_job
from memopt_pipeline.automation.run_config import AUTOMATION_CONFIG_ENV
from memopt_pipeline.automation.sensors import RETRY_OF_TAG
from memopt_pipeline.core.memory.ladder import LADDER_TAG
from memopt_pipeline.core.memory.planner import GiB, MemoryPlan, make_plan
from memopt_pipeline.definitions import build_resources
from memopt_pipeline.definitions import defs as local_defs
from memopt_pipeline.deploy.k8s import build_k8s_definitions

MiB = 2**20
MARGIN = 0.25
CHAIN_SETTINGS = {"cv_folds": {"n_folds": 2}, "instance_model": {"max_rounds": 5, "num_threads": 1}}
# The chain's starting run sets the budget the plan is made for; it must not become the train
# pods' guard budget, which has to match each pod.
PLANNING_BUDGET = {"memory_guard": {"config": {"budget_gb": 4.0, "hard_cap": False}}}
MORE_CPU = {"resources": {"requests": {"cpu": "4"}}}
pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")


def expected_memory(plan: MemoryPlan, rows: int) -> tuple[int, int]:
    """(request, limit) of an instance pod, from the plan's predicted peak and the documented rule."""
    assert plan.strategy != "external_memory"  # the LightGBM layout's peak is then the instance's predicted peak
    request = math.ceil(plan.lightgbm_layout(rows).predicted_peak * (1 + MARGIN))
    return request, max(math.ceil(request * (1 + MARGIN)), request + 512 * MiB)


def instance_model_container(run_config: dict):
    """The instance_model step pod's container, as the k8s executor builds it from the run config:
    the executor's step_k8s_config, then its per_step_k8s_config for the op (dagster_k8s.executor)."""
    executor = (run_config.get("execution") or {}).get("config") or {}
    context = K8sContainerContext()
    per_op = (executor.get("per_step_k8s_config") or {}).get("instance_model") or {}
    for layer in (executor.get("step_k8s_config") or {}, per_op):
        context = context.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(layer)))
    pod_job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="memopt:test", dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance"),
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-instance-model",
        user_defined_k8s_config=context.run_k8s_config,
        component="step_worker",
    )
    return pod_job.spec.template.spec.containers[0]


def assert_plan_sized(definitions: dg.Definitions, run_config: dict, plan: MemoryPlan, rows: int) -> None:
    dg.validate_run_config(definitions.resolve_job_def("train_instances"), run_config)  # as the daemon will
    request, limit = expected_memory(plan, rows)
    container = instance_model_container(run_config)
    assert container.resources.requests["memory"] == str(request)
    assert container.resources.limits["memory"] == str(limit)
    # The step's guard stops cleanly inside that pod: its budget is the request.
    assert run_config["resources"]["memory_guard"]["config"]["budget_gb"] * GiB == pytest.approx(request)


@pytest.fixture
def planned(tmp_path):
    """An instance holding a materialized plan and assignment (two instances of different sizes)
    and their partitions, and the Kubernetes code location reading them from the same folder."""
    plan = make_plan(dataset_rows=3_000_000, n_features=300, n_classes=3, budget_bytes=8 * GiB, baseline_bytes=GiB // 3)
    rows = {"instance_0": plan.max_rows_per_instance, "instance_1": plan.max_rows_per_instance // 2}
    assignment = {"instances": {key: {"genes": [f"{key}_g{i}" for i in range(8)], "rows": n} for key, n in rows.items()}}

    @dg.asset(name="memory_plan")
    def stand_in_plan() -> dict:
        return plan.to_dict()

    @dg.asset(name="instance_assignment")
    def stand_in_assignment() -> dict:
        return assignment

    resources = build_resources(output_dir=str(tmp_path / "out"))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [stand_in_plan, stand_in_assignment], instance=instance, resources={"io_manager": resources["io_manager"]}
        )
        assert result.success
        instance.add_dynamic_partitions(INSTANCE_PARTITIONS_NAME, list(rows))
        yield build_k8s_definitions(margin=MARGIN, resources=resources), instance, plan, rows


def _succeeded(instance: dg.DagsterInstance, job_name: str, run_config: dict, tags: dict | None = None) -> dg.DagsterRun:
    """A run of a chain's starting job, stored as succeeded with ``run_config`` (what the daemon sees)."""
    return instance.add_run(
        dg.DagsterRun(
            job_name=job_name,
            run_config=run_config,
            tags={CHAIN_TAG: job_name, **(tags or {})},
            status=dg.DagsterRunStatus.SUCCESS,
        )
    )


def _chain_train_requests(definitions: dg.Definitions, instance: dg.DagsterInstance, start: dg.DagsterRun):
    sensor = definitions.resolve_sensor_def("chain_train_instances")
    success = dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_SUCCESS.value, job_name=start.job_name)
    return sensor(
        dg.build_run_status_sensor_context(
            sensor_name=sensor.name, dagster_event=success, dagster_instance=instance, dagster_run=start,
            repository_def=definitions.get_repository_def(),
        )
    )  # fmt: skip


def test_chain_train_runs_get_plan_sized_instance_model_pods(planned):
    definitions, instance, plan, rows = planned
    # A full_training run from the Launchpad, with settings for the chain and an executor config
    # of its own (more CPU for instance_model pods).
    start = _succeeded(
        instance,
        "full_training",
        {
            "resources": {**PLANNING_BUDGET, "chain_settings": {"config": CHAIN_SETTINGS}},
            "execution": {"config": {"per_step_k8s_config": {"instance_model": {"container_config": MORE_CPU}}}},
        },
    )
    requests = _chain_train_requests(definitions, instance, start)
    assert [r.partition_key for r in requests] == ["instance_0", "instance_1"]
    for request in requests:
        assert_plan_sized(definitions, request.run_config, plan, rows[request.partition_key])
        # The starting run's settings are kept beside the sizing: ops config, other guard fields, CPU.
        assert request.run_config["ops"] == {name: {"config": value} for name, value in CHAIN_SETTINGS.items()}
        assert request.run_config["resources"]["memory_guard"]["config"]["hard_cap"] is False
        assert instance_model_container(request.run_config).resources.requests["cpu"] == "4"
        assert request.tags[CHAIN_ID_TAG] == start.run_id
    request_0, request_1 = (int(instance_model_container(r.run_config).resources.requests["memory"]) for r in requests)
    assert request_0 > request_1  # each instance its own pod


def test_a_chain_started_by_the_nightly_schedule_trains_in_plan_sized_pods(planned, tmp_path, monkeypatch):
    definitions, instance, plan, rows = planned
    config = tmp_path / "automation.yaml"
    config.write_text(
        "ops:\n  instance_model: {config: {max_rounds: 50}}\nresources:\n  memory_guard: {config: {budget_gb: 2.0}}\n"
    )
    monkeypatch.setenv(AUTOMATION_CONFIG_ENV, str(config))
    schedule = definitions.resolve_schedule_def("nightly_retrain")
    [request] = schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests
    # retrain_from_current_plan has no instance_model step: its own run is not sized, its chain's runs are.
    dg.validate_run_config(definitions.resolve_job_def(schedule.job_name), request.run_config)
    assert "execution" not in request.run_config
    start = _succeeded(instance, schedule.job_name, request.run_config)
    requests = _chain_train_requests(definitions, instance, start)
    assert [r.partition_key for r in requests] == ["instance_0", "instance_1"]
    for train in requests:
        assert_plan_sized(definitions, train.run_config, plan, rows[train.partition_key])
        assert train.run_config["ops"] == {"instance_model": {"config": {"max_rounds": 50}}}


def test_a_chain_started_by_the_dataset_sensor_trains_in_plan_sized_pods(planned, tiny_dataset, tmp_path, monkeypatch):
    definitions, instance, plan, rows = planned
    folder = tmp_path / "shards"
    shutil.copytree(tiny_dataset, folder)
    monkeypatch.setenv(DATA_DIR_ENV, str(folder))
    monkeypatch.delenv(AUTOMATION_CONFIG_ENV, raising=False)
    sensor = definitions.resolve_sensor_def("dataset_change_sensor")
    cursor = None
    for change in (None, "add a shard", None):  # baseline, change seen, change settled: launch
        if change:
            shutil.copy(sorted(folder.glob("*.parquet"))[0], folder / "new_shard.parquet")
        result = sensor.evaluate_tick(dg.build_sensor_context(cursor=cursor, instance=instance))
        cursor = result.cursor
    [request] = result.run_requests
    # full_training makes the plan its chain's pods are sized from: its own request carries no sizing.
    dg.validate_run_config(definitions.resolve_job_def(sensor.job_name), request.run_config)
    assert "execution" not in request.run_config
    # The run succeeded, having materialized the plan (the fixture's stands in for it).
    start = _succeeded(instance, sensor.job_name, request.run_config, tags=request.tags)
    requests = _chain_train_requests(definitions, instance, start)
    assert [r.partition_key for r in requests] == ["instance_0", "instance_1"]
    for train in requests:
        assert_plan_sized(definitions, train.run_config, plan, rows[train.partition_key])


def test_a_chain_whose_plan_cannot_be_read_stops_with_the_fix(tmp_path):
    definitions = build_k8s_definitions(margin=MARGIN, resources=build_resources(output_dir=str(tmp_path / "out")))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(INSTANCE_PARTITIONS_NAME, ["instance_0"])  # but no plan materialized
        start = _succeeded(instance, "retrain_from_current_plan", {})
        result = _chain_train_requests(definitions, instance, start)
    assert isinstance(result, dg.SkipReason)  # reported on the tick, not raised: later chains go on
    assert "stopped before training" in result.skip_message and "run prepare_instances first" in result.skip_message


def out_of_memory(*args, **kwargs):
    raise MemoryError("Unable to allocate 997. MiB for an array")


def test_an_out_of_memory_rerun_is_plan_sized(tiny_dataset, tmp_path, monkeypatch):
    # A real plan (prepare_instances on the tiny dataset), and an instance partition's run that ran
    # out of memory with a run config of its own, without pod sizing.
    resources = build_resources(output_dir=str(tmp_path / "out"))
    project = dg.Definitions(assets=ALL_ASSETS, jobs=ALL_JOBS, resources=resources)
    k8s_definitions = build_k8s_definitions(margin=MARGIN, resources=resources)
    with dg.instance_for_test() as instance:
        prepare = project.resolve_job_def("prepare_instances").execute_in_process(
            instance=instance,
            run_config={
                "ops": {
                    "source_dataset": {"config": {"path": str(tiny_dataset)}},
                    "gene_split": {"config": {"sample_genes": 16}},
                    "instance_assignment": {"config": {"n_instances": 2}},
                }
            },
        )
        assert prepare.success
        monkeypatch.setattr(split_assets, "gene_folds", out_of_memory)
        failed = project.resolve_job_def("train_instances").execute_in_process(
            instance=instance,
            partition_key="instance_1",
            run_config={"ops": {"cv_folds": {"config": {"n_folds": 2}}}, "resources": PLANNING_BUDGET},
            raise_on_error=False,
        )
        assert not failed.success
        run = instance.get_run_by_id(failed.run_id)
        failure = instance.get_records_for_run(failed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records[0]
        sensor = k8s_definitions.resolve_sensor_def("oom_rematerialization_sensor")
        request = sensor(
            dg.build_run_status_sensor_context(
                sensor_name=sensor.name, dagster_event=failure.event_log_entry.dagster_event, dagster_instance=instance,
                dagster_run=run, repository_def=k8s_definitions.get_repository_def(),
            ).for_run_failure()
        )  # fmt: skip
        plan = MemoryPlan.from_dict(project.load_asset_value("memory_plan", instance=instance))
        assignment = project.load_asset_value("instance_assignment", instance=instance)

    assert isinstance(request, dg.RunRequest)
    assert (request.job_name, request.partition_key) == ("train_instances", "instance_1")
    assert request.tags[LADDER_TAG] == "1" and request.tags[RETRY_OF_TAG] == failed.run_id
    assert_plan_sized(k8s_definitions, request.run_config, plan, assignment["instances"]["instance_1"]["rows"])
    assert request.run_config["ops"] == {"cv_folds": {"config": {"n_folds": 2}}}
    assert request.run_config["resources"]["memory_guard"]["config"]["hard_cap"] is False


def test_the_local_code_location_sizes_nothing(planned):
    _, instance, _, _ = planned
    start = _succeeded(instance, "full_training", {"resources": {"chain_settings": {"config": CHAIN_SETTINGS}}})
    requests = _chain_train_requests(local_defs, instance, start)
    assert all("execution" not in r.run_config and "memory_guard" not in r.run_config.get("resources", {}) for r in requests)


def test_a_sensor_that_launches_train_instances_unsized_stops_the_k8s_code_location(monkeypatch):
    @dg.sensor(name="rogue_train_sensor", job=train_instances_job)
    def rogue(context):
        return dg.RunRequest(partition_key="instance_0", run_config={})

    project = dg.Definitions(
        assets=local_defs.assets,
        asset_checks=local_defs.asset_checks,
        jobs=local_defs.jobs,
        schedules=local_defs.schedules,
        sensors=[*local_defs.sensors, rogue],
        resources=local_defs.resources,
    )
    monkeypatch.setattr(k8s_module, "local_defs", project)
    with pytest.raises(RuntimeError, match="rogue_train_sensor launches train_instances runs"):
        build_k8s_definitions(margin=MARGIN)
