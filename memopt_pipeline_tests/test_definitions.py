import dagster as dg
import pytest
import yaml
from dagster._core.snap import JobSnap
from dagster._core.snap.snap_to_yaml import default_values_yaml_from_type_snap

from memopt_pipeline.automation import jobs
from memopt_pipeline.definitions import build_resources, default_budget_gb, defs
from memopt_pipeline.resources import MemoryGuard
from memopt_pipeline.resources.chain_settings import ChainSettings


def test_definitions_load_with_every_asset_job_and_check():
    repository = defs.get_repository_def()
    keys = {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()}
    assert keys == {
        "source_dataset", "dataset_metadata", "memory_plan", "gene_split", "feature_screening", "instance_assignment",
        "cv_folds", "instance_model", "ensemble_model", "holdout_evaluation", "shap_summary", "run_report",
    }
    assert {job.name for job in repository.get_all_jobs()} >= {"prepare_instances", "train_instances", "evaluate_and_explain"}
    evaluate = repository.get_job("evaluate_and_explain")
    assert dg.AssetKey("run_report") in evaluate.asset_layer.executable_asset_keys
    assert dg.AssetCheckKey(dg.AssetKey("holdout_evaluation"), "holdout_beats_class_prior") in repository.asset_graph.asset_check_keys


def test_workspace_module_loads():
    dg.Definitions.validate_loadable(defs)


def _launchpad(job_name: str) -> dict:
    """The run config the Launchpad opens with (the webserver's GraphQL rootDefaultYaml)."""
    snapshot = JobSnap.from_job_def(defs.resolve_job_def(job_name))
    schema = snapshot.config_schema_snapshot
    root = schema.get_config_snap(snapshot.mode_def_snaps[0].root_config_key)
    return yaml.safe_load(default_values_yaml_from_type_snap(schema, root))


@pytest.mark.parametrize("job_name", ["full_training", "retrain_from_current_plan"])
def test_a_chain_jobs_launchpad_holds_every_chain_setting_and_the_budget(job_name):
    launchpad = _launchpad(job_name)
    # Every setting of the later runs, with its default (the resource's own config: no JSON tag).
    assert launchpad["resources"]["chain_settings"]["config"] == ChainSettings().model_dump()
    assert launchpad["resources"]["chain_settings"]["config"]["instance_model"]["max_rounds"] == 300
    # The budget a run would get here, pre-filled.
    assert launchpad["resources"]["memory_guard"]["config"]["budget_gb"] == default_budget_gb() > 0
    dg.validate_run_config(defs.resolve_job_def(job_name), launchpad)  # launchable as it opens
    if job_name == "full_training":
        assert launchpad["ops"]["instance_assignment"]["config"] == {"n_instances": 0, "overlap": 0.1, "seed": 0}


def test_the_jobs_a_chain_launches_take_no_chain_settings():
    for job_name in ("train_instances", "evaluate_and_explain"):
        assert "chain_settings" not in _launchpad(job_name).get("resources", {}), job_name


def test_the_budget_is_prefilled_only_where_memory_guard_is_left_unconfigured():
    @dg.op
    def budget(memory_guard: MemoryGuard) -> float | None:
        return memory_guard.budget_gb

    guard_only = {"memory_guard": build_resources()["memory_guard"]}
    job = dg.GraphDefinition("budget_job", node_defs=[budget]).to_job(resource_defs=guard_only)
    assert job.execute_in_process().output_for_node("budget") == default_budget_gb()
    # Config of memory_guard replaces the built values as a whole: budget_fraction applies again.
    fraction = {"resources": {"memory_guard": {"config": {"budget_fraction": 0.3}}}}
    assert job.execute_in_process(run_config=fraction).output_for_node("budget") is None


def test_prepare_instances_has_a_description_of_its_own():
    description = defs.resolve_job_def("prepare_instances").description
    assert description != jobs.__doc__ and description.count(". ") == 0 and description.endswith(".")
    assert "instance partition" in description
