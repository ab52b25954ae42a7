"""The Kubernetes profile loads without a cluster, and sizes instance pods from the plan."""

import math
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job
from dagster_postgres import DagsterPostgresStorage

import memopt_pipeline.deploy
from memopt_pipeline.core.memory.concurrency import CONTAINER_LIMIT_MIN_HEADROOM_BYTES
from memopt_pipeline.core.memory.planner import GiB, make_plan
from memopt_pipeline.definitions import build_resources
from memopt_pipeline.definitions import defs as local_defs
from memopt_pipeline.deploy.k8s import build_k8s_definitions, defs

INSTANCE_CONFIG = Path(memopt_pipeline.deploy.__file__).parent / "dagster.k8s.yaml"


def _k8s_defs(output: Path, margin: float | None = 0.25) -> dg.Definitions:
    return build_k8s_definitions(margin=margin, resources=build_resources(output_dir=str(output)))


@pytest.fixture
def materialized_plan(tmp_path, monkeypatch):
    """A plan and an instance assignment, materialized (through the code location's IO manager) into
    the instance the code location uses ($DAGSTER_HOME)."""
    plan = make_plan(dataset_rows=3_000_000, n_features=300, n_classes=3, budget_bytes=8 * GiB, baseline_bytes=GiB // 3)
    rows = {"instance_0": plan.max_rows_per_instance, "instance_1": plan.max_rows_per_instance // 2}
    assignment = {"instances": {key: {"genes": [f"g{key}"], "rows": n} for key, n in rows.items()}}
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    @dg.asset(name="memory_plan")
    def stand_in_plan() -> dict:
        return plan.to_dict()

    @dg.asset(name="instance_assignment")
    def stand_in_assignment() -> dict:
        return assignment

    io_manager = build_resources(output_dir=str(tmp_path))["io_manager"]
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([stand_in_plan, stand_in_assignment], instance=instance, resources={"io_manager": io_manager})
    assert result.success
    return plan, rows


def test_every_job_runs_on_the_k8s_executor():
    dg.Definitions.validate_loadable(defs)
    repository = defs.get_repository_def()
    assert {job.name for job in repository.get_all_jobs()} >= {"prepare_instances", "train_instances", "evaluate_and_explain"}
    for job in repository.get_all_jobs():
        if not job.name.startswith("__"):
            assert job.executor_def is k8s_job_executor, job.name
    train = repository.get_job("train_instances")
    assert train.partitioned_config is not None
    # Sensors that launch train_instances target the plan-sized job (one definition per name).
    targets = [j for s in repository.sensor_defs if s.has_jobs for j in s.jobs if j.name == "train_instances"]
    assert targets and all(isinstance(j.config, dg.PartitionedConfig) for j in targets)


def test_the_budget_is_not_prefilled_from_the_code_servers_pod():
    # The local code location pre-fills the budget of the process that loads it; in the cluster
    # that is the code server's pod, so each step's guard takes a share of its own pod instead.
    assert local_defs.resources["memory_guard"].budget_gb is not None
    assert defs.resources["memory_guard"].budget_gb is None
    assert defs.resources["chain_settings"] is local_defs.resources["chain_settings"]


def test_instance_pods_request_the_predicted_peak_plus_the_margin(materialized_plan, tmp_path):
    plan, rows = materialized_plan
    job = _k8s_defs(tmp_path).resolve_job_def("train_instances")
    for key, instance_rows in rows.items():
        run_config = job.partitioned_config.get_run_config_for_partition_key(key)
        assert dg.validate_run_config(job, run_config)  # the k8s executor accepts it
        step_config = run_config["execution"]["config"]["per_step_k8s_config"]["instance_model"]
        resources = step_config["container_config"]["resources"]
        request, limit = int(resources["requests"]["memory"]), int(resources["limits"]["memory"])
        assert request == math.ceil(plan.lightgbm_layout(instance_rows).predicted_peak * 1.25)
        assert limit == max(math.ceil(request * 1.25), request + CONTAINER_LIMIT_MIN_HEADROOM_BYTES)
        # The guard's budget is the request: its clean stop and hard cap fire below the limit.
        assert run_config["resources"]["memory_guard"]["config"]["budget_gb"] * GiB == pytest.approx(request)

        # What dagster-k8s builds from it: the step pod's container asks for exactly that.
        context = K8sContainerContext().merge(
            K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(step_config))
        )
        pod_job = construct_dagster_k8s_job(
            DagsterK8sJobConfig(job_image="memopt:test", dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance"),
            args=["dagster", "api", "execute_step"],
            job_name=f"dagster-step-{key.replace('_', '-')}",
            user_defined_k8s_config=context.run_k8s_config,
            component="step_worker",
        )
        container = pod_job.spec.template.spec.containers[0]
        assert container.resources.requests == {"memory": str(request)}
        assert container.resources.limits == {"memory": str(limit)}


def test_a_bigger_instance_gets_a_bigger_pod(materialized_plan, tmp_path):
    job = _k8s_defs(tmp_path).resolve_job_def("train_instances")
    memory = {
        key: int(job.partitioned_config.get_run_config_for_partition_key(key)["execution"]["config"]["per_step_k8s_config"]
                 ["instance_model"]["container_config"]["resources"]["requests"]["memory"])
        for key in ("instance_0", "instance_1")
    }  # fmt: skip
    assert memory["instance_0"] > memory["instance_1"]


def test_without_a_materialized_plan_the_launch_fails_with_the_fix(tmp_path):
    job = _k8s_defs(tmp_path).resolve_job_def("train_instances")
    with pytest.raises(RuntimeError, match="run prepare_instances first"):
        job.partitioned_config.get_run_config_for_partition_key("instance_0")


def test_an_unknown_partition_or_a_bad_margin_is_refused(materialized_plan, tmp_path, monkeypatch):
    job = _k8s_defs(tmp_path).resolve_job_def("train_instances")
    with pytest.raises(ValueError, match="re-materialize instance_assignment"):
        job.partitioned_config.get_run_config_for_partition_key("instance_9")
    with pytest.raises(ValueError, match="margin"):
        _k8s_defs(tmp_path, margin=-0.5)
    monkeypatch.setenv("MEMOPT_K8S_MEMORY_MARGIN", "a quarter")
    with pytest.raises(ValueError, match="MEMOPT_K8S_MEMORY_MARGIN"):
        _k8s_defs(tmp_path, margin=None)


def test_the_example_instance_config_is_valid_for_postgres_and_the_k8s_run_launcher(monkeypatch):
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB", "DAGSTER_K8S_NAMESPACE"):
        monkeypatch.setenv(name, "memopt")
    config, _ = dagster_instance_config(str(INSTANCE_CONFIG.parent), config_filename=INSTANCE_CONFIG.name)
    raw = yaml.safe_load(INSTANCE_CONFIG.read_text())
    # Each configurable class accepts its section (no connection is made).
    assert process_config(DagsterPostgresStorage.config_type(), raw["storage"]["postgres"]).success
    assert raw["run_launcher"]["class"] == "K8sRunLauncher"
    launcher = process_config(K8sRunLauncher.config_type(), raw["run_launcher"]["config"])
    assert launcher.success, launcher.errors
    assert config["concurrency"]["pools"]["granularity"] == "op"
