"""The whole graph on a tiny generated dataset, through Dagster, in one test session."""

import base64
import hashlib
import re
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
import pytest

from memopt_pipeline.automation.local_run import materialize_pipeline
from memopt_pipeline.core.report.plots import PNG_SIGNATURE
from memopt_pipeline.core.report.run_report import SECTIONS
from memopt_pipeline.core.storage import read_json
from memopt_pipeline.definitions import build_resources
from memopt_pipeline_tests.checkpoint_layout import stage_run_dir, stored_value

HEAVY_STAGES = ("dataset_metadata", "instance_model [instance_0]", "instance_model [instance_1]", "holdout_evaluation", "shap_summary")


@pytest.fixture(scope="module")
def pipeline_run(tiny_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("output")
    run_config = {
        "ops": {
            "source_dataset": {"config": {"path": str(tiny_dataset)}},
            "gene_split": {"config": {"sample_genes": 30, "holdout_fraction": 0.25}},
            "instance_assignment": {"config": {"n_instances": 2, "overlap": 0.1}},
            "cv_folds": {"config": {"n_folds": 2}},
            "instance_model": {"config": {"max_rounds": 40, "early_stopping_rounds": 5, "min_data_in_leaf": 5, "num_threads": 2}},
            "shap_summary": {"config": {"sample_rows": 300, "chunk_rows": 100}},
        }
    }
    with dg.instance_for_test() as instance:
        collected = materialize_pipeline(
            instance, resources=build_resources(output_dir=str(output)), run_config=run_config, log=lambda m: None
        )
        yield collected, output


def test_every_asset_and_partition_materialized(pipeline_run):
    collected, _ = pipeline_run
    expected = {
        "source_dataset", "dataset_metadata", "memory_plan", "gene_split", "feature_screening", "instance_assignment",
        "cv_folds [instance_0]", "cv_folds [instance_1]", "instance_model [instance_0]", "instance_model [instance_1]",
        "ensemble_model", "holdout_evaluation", "shap_summary", "run_report",
    }
    assert {k for k in collected if not k.startswith("check ")} == expected


def test_the_plan_says_which_strategy_it_chose_and_why(pipeline_run):
    collected, _ = pipeline_run
    plan = collected["memory_plan"]
    # The tiny dataset fits one in-memory model at the default budget; two instances were asked for.
    assert plan["strategy"] == "in_memory"
    assert re.fullmatch(r"all [\d,]+ rows fit one in-memory model", plan["strategy_choice"])


def test_heavy_stages_record_memory_metadata(pipeline_run):
    collected, _ = pipeline_run
    for stage in HEAVY_STAGES:
        meta = collected[stage]
        assert 0 < meta["peak_rss_gb"] < meta["budget_gb"], stage
        # Each is rounded to 4 significant digits for display (assets/display.py): each is off by
        # less than 0.05% of the budget.
        headroom = pytest.approx(meta["budget_gb"] - meta["peak_rss_gb"], abs=2e-3 * meta["budget_gb"])
        assert meta["headroom_gb"] == headroom, stage
    assert collected["instance_model [instance_0]"]["predicted_peak_gb"] > 0


def test_holdout_beats_the_class_prior_and_the_check_passed(pipeline_run):
    collected, _ = pipeline_run
    holdout = collected["holdout_evaluation"]
    assert holdout["logloss"] < holdout["baseline_logloss"]
    assert holdout["donor_pr_auc"] > 2 * holdout["donor_prevalence"]
    assert holdout["acceptor_pr_auc"] > 2 * holdout["acceptor_prevalence"]
    assert collected["check holdout_beats_class_prior"] == {"passed": True}


def test_ensemble_covers_all_training_genes(pipeline_run):
    collected, _ = pipeline_run
    assert collected["ensemble_model"]["instances"] == 2
    assert collected["ensemble_model"]["gene_coverage"] == 1.0


def test_stages_read_only_the_sampled_genes(pipeline_run, tiny_metadata):
    collected, output = pipeline_run
    split = stored_value(collected, "gene_split")
    assignment = stored_value(collected, "instance_assignment")
    stats = tiny_metadata.read_gene_stats()
    rows_of = lambda genes: int(stats.filter(pl.col("gene").is_in(genes))["rows"].sum())  # noqa: E731
    assert split["sampled_genes"] == 30 < tiny_metadata.n_genes
    assert collected["holdout_evaluation"]["holdout_rows"] == rows_of(split["holdout_genes"])
    for key, instance in assignment["instances"].items():
        card = stored_value(collected, f"instance_model [{key}]")
        # Each fold reads its training and validation genes once for labels and twice for
        # LightGBM's two passes; the refit the same: never rows outside the instance.
        assert card["train_rows"] == instance["rows"]
        assert set(instance["genes"]) <= set(split["train_genes"])


def test_artifacts_are_native_formats(pipeline_run):
    collected, output = pipeline_run
    model = stage_run_dir(output, collected, "instance_model [instance_0]") / "model.txt"
    assert model.read_text().startswith("tree")
    assert not list(output.rglob("*.pkl")) and not list(output.rglob("*.pickle"))
    assert (stage_run_dir(output, collected, "holdout_evaluation") / "predictions.parquet").exists()


def test_downstream_stages_record_the_files_they_used_with_their_hashes(pipeline_run):
    collected, output = pipeline_run
    sha256 = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()  # noqa: E731
    ensemble = stored_value(collected, "ensemble_model")
    for member in ensemble["members"]:
        run_dir = stage_run_dir(output, collected, f"instance_model [{member['partition']}]")
        assert member["model_path"] == str(run_dir / "model.txt")
        assert member["model_sha256"] == sha256(member["model_path"])
        assert member["model_card_path"] == str(run_dir / "model_card.json")
        assert member["model_card_sha256"] == sha256(member["model_card_path"])
    recorded = {m["partition"]: (m["model_path"], m["model_sha256"]) for m in ensemble["members"]}
    in_metadata = collected["ensemble_model"]["models"]
    assert {k: (v["model_path"], v["model_sha256"]) for k, v in in_metadata.items()} == recorded
    for stage in ("holdout_evaluation", "shap_summary"):
        loaded = stored_value(collected, stage)["models"]
        assert {m["partition"]: (m["path"], m["sha256"]) for m in loaded} == recorded, stage
        assert collected[stage]["models"] == loaded, stage


def test_no_gene_is_shared_between_folds_or_with_the_holdout(pipeline_run):
    collected, output = pipeline_run
    split = stored_value(collected, "gene_split")
    holdout = set(split["holdout_genes"])
    assert holdout and not holdout & set(split["train_genes"])
    for key in ("instance_0", "instance_1"):
        folds = stored_value(collected, f"cv_folds [{key}]")["fold_of_gene"]
        # fold_of_gene maps each gene to one fold, so a gene cannot be in two folds of one
        # instance; what must also hold is that no fold holds a holdout gene.
        members = {}
        for gene, fold in folds.items():
            members.setdefault(fold, set()).add(gene)
        assert len(members) == 2
        for fold, genes in members.items():
            assert not genes & holdout, (key, fold)
            for other, other_genes in members.items():
                assert other == fold or not genes & other_genes
        card = read_json(stage_run_dir(output, collected, f"instance_model [{key}]") / "model_card.json")
        assert not set(card["genes"]) & holdout
        # Each fold's validation rows were predicted by the model that did not train on them.
        assert sum(f["valid_genes"] for f in card["folds"]) == len(folds)


def _embedded_pngs(markdown: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown)]


def test_plots_in_metadata_and_beside_the_artifacts(pipeline_run):
    collected, output = pipeline_run
    for stage in HEAVY_STAGES:
        [png] = _embedded_pngs(collected[stage]["memory_timeline"])
        assert png.startswith(PNG_SIGNATURE), stage
    for stage, key in (("holdout_evaluation", "pr_curves"), ("holdout_evaluation", "calibration_curve"),
                       ("shap_summary", "shap_importance"), ("shap_summary", "shap_beeswarm")):
        [png] = _embedded_pngs(collected[stage][key])
        assert png.startswith(PNG_SIGNATURE) and len(png) < 100_000, (stage, key)
    for stage, name in (("holdout_evaluation", "pr_curves.png"), ("holdout_evaluation", "calibration.png"),
                        ("holdout_evaluation", "memory_timeline.png"), ("shap_summary", "importance.png"),
                        ("shap_summary", "beeswarm.png"), ("shap_summary", "memory_timeline.png")):
        assert (stage_run_dir(output, collected, stage) / name).read_bytes().startswith(PNG_SIGNATURE), name
    assert collected["holdout_evaluation"]["donor_ece"] >= 0  # numeric, so the UI plots it across runs


def test_shap_writes_one_row_per_explained_row_and_a_bounded_sample(pipeline_run):
    collected, output = pipeline_run
    shap = collected["shap_summary"]
    rows = pq.read_table(stage_run_dir(output, collected, "shap_summary") / "rows.parquet")
    assert rows.num_rows == shap["rows_explained"] == 300
    assert shap["reservoir_rows"] == 300  # the default reservoir (1,000 rows) holds the whole small sample
    assert pq.read_table(stage_run_dir(output, collected, "shap_summary") / "reservoir.parquet").num_rows == 300


def test_run_report_is_written_with_every_section_and_valid_plots(pipeline_run):
    collected, output = pipeline_run
    meta = collected["run_report"]
    path = Path(meta["report_path"])
    assert path.parent == stage_run_dir(output, collected, "run_report") and path.name.startswith("report_")
    text = path.read_text()
    for heading in SECTIONS:
        assert f"\n## {heading}\n" in text
    for stage in HEAVY_STAGES:
        assert f"| {stage} |" in text, stage  # a row in the plan-vs-measured table
    assert "not available" not in text  # every plot was found
    pngs = _embedded_pngs(text)
    # stage peaks, one timeline per guarded stage (5 heavy + feature_screening), PR, calibration, importance, beeswarm
    assert len(pngs) == meta["images"] >= 1 + len(HEAVY_STAGES) + 4
    assert all(png.startswith(PNG_SIGNATURE) for png in pngs)
    assert meta["stages"] >= len(HEAVY_STAGES) and meta["max_stage_peak_gb"] > 0
    assert "data:image" not in meta["preview"] and "## Holdout" in meta["preview"]
    # One place in the UI with the three key pictures: stage peaks, PR curves, SHAP importance.
    key = _embedded_pngs(meta["key_plots"])
    assert len(key) == 3 and all(png.startswith(PNG_SIGNATURE) for png in key)
    for title in ("peak RSS per stage", "PR curves", "mean |SHAP|"):
        assert title in meta["key_plots"]
