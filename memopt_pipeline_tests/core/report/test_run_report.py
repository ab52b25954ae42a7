"""The run report: sections, plan-vs-measured table, embedded plots, explicit notes for missing ones."""

import base64
import re

import numpy as np
import pytest

from memopt_pipeline.core.evaluate.metrics import holdout_curves, multiclass_metrics
from memopt_pipeline.core.report import plots
from memopt_pipeline.core.report.run_report import SECTIONS, StageMemory, build_report
from memopt_pipeline.core.units import GiB

CLASSES = ["neither", "donor", "acceptor"]
_IMAGES = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=2_000, p=[0.8, 0.1, 0.1])
    proba = rng.dirichlet([1.0, 1.0, 1.0], size=2_000)
    proba[np.arange(2_000), labels] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    holdout = multiclass_metrics(labels, proba, CLASSES, genes=np.repeat(np.arange(100), 20).astype(str))
    holdout |= {
        "genes": 100, "uncalibrated_logloss": holdout["logloss"] * 1.01,
        "ece_before_calibration": {"per_class": [0.02, 0.03, 0.04], "mean": 0.03},
        "ece_after_calibration": {"per_class": [0.01, 0.01, 0.02], "mean": 0.0133},
        "curves": holdout_curves(labels, proba, CLASSES),
        "predictions_path": str(tmp_path / "predictions.parquet"),
    }
    holdout["plots"] = {
        "pr_curves": str(plots.write_png(plots.pr_curves_png(holdout["curves"]["pr"], holdout["per_class"]), tmp_path / "pr.png")),
        "calibration": str(plots.write_png(plots.calibration_png(holdout["curves"]["reliability"]), tmp_path / "cal.png")),
    }
    features = [f"f{i}" for i in range(20)]
    mean_abs = np.abs(rng.normal(size=(3, 20)))
    shap = {
        "rows": 500, "chunks": 3, "additivity_max_error": 1e-9, "reservoir_rows": 200,
        "top_features": [(features[i], float(mean_abs[:, i].mean())) for i in np.argsort(-mean_abs.mean(axis=0))[:15]],
        "importance_path": str(tmp_path / "mean_abs_shap.parquet"), "rows_path": str(tmp_path / "rows.parquet"),
        "plots": {
            "importance": str(plots.write_png(plots.shap_importance_png(features, mean_abs, CLASSES), tmp_path / "imp.png")),
            "beeswarm": str(tmp_path / "never_written.png"),  # a plot file that went missing
        },
    }
    timeline = plots.markdown_image(
        plots.memory_timeline_png([(0.0, GiB // 4), (1.0, GiB // 3)], budget_bytes=GiB, cleanup_bytes=GiB // 2, abort_bytes=GiB * 9 // 10),
        "timeline",
    )
    stages = [
        StageMemory("dataset_metadata", 0.31, 1.0, None, 2.0, "aaaaaaaa1111", timeline),
        StageMemory("instance_model [instance_0]", 0.62, 1.0, 0.70, 30.0, "bbbbbbbb2222", timeline),
        StageMemory("holdout_evaluation", 0.45, 1.0, 0.40, 5.0, "cccccccc3333", None),
    ]
    fold = {"fold": 0, "train_genes": 40, "valid_genes": 20, "train_rows": 800, "valid_rows": 400, "best_iteration": 37,
            "valid_logloss": 0.21, "seconds": 3.5, "pr_auc": {"donor": 0.9, "acceptor": 0.8}}
    instances = {
        "instance_0": {"train_genes": 60, "train_rows": 1_200, "num_rounds": 37, "backend": "lightgbm", "ladder": {"level": 0},
                       "cv_logloss_mean": 0.21, "cv_logloss_std": 0.01, "folds": [fold, dict(fold, fold=1, valid_logloss=0.22)]},
    }
    return dict(
        run_id="0123456789abcdef",
        generated_at="2026-01-01 00:00 UTC",
        dataset={
            "n_rows": 3_000, "n_genes": 150, "features": features, "classes": CLASSES, "class_counts": [2_400, 300, 300],
            "shards": [{}, {}], "disk_bytes": 10 * 2**20, "excluded_columns": {"position": "id column"},
            "gene_column": "gene_id", "label_column": "splice_type",
        },
        plan={
            "strategy": "in_memory", "budget_bytes": GiB, "safety": 0.85, "baseline_bytes": GiB // 4, "batch_rows": 50_000,
            "max_bin": 255, "max_rows_per_instance": 1_000_000, "predicted_peak_full_data": GiB // 2,
        },
        split={"sampled_genes": 150, "dataset_genes": 150, "train_genes": ["g"] * 120, "holdout_genes": ["h"] * 30,
               "train_rows": 2_400, "holdout_rows": 600},
        stages=stages,
        instances=instances,
        ensemble={"members": [{"partition": "instance_0", "weight": 1.0}], "coverage": 1.0, "weighting": "equal"},
        holdout=holdout,
        shap=shap,
    )


def test_report_has_every_section_and_the_plan_vs_measured_table(inputs, tmp_path):
    report = build_report(**inputs)
    path = report.write(tmp_path / "report" / "report_0123.md")
    text = path.read_text()
    assert [heading for heading, _ in report.sections] == list(SECTIONS)
    for heading in SECTIONS:
        assert f"\n## {heading}\n" in text
    # Plan vs measured: planned, measured and error per stage; no prediction is "n/a", not 0.
    assert "| instance_model [instance_0] | 0.700 | 0.620 | -0.080 | 1.00 | 0.380 | 30.0 | bbbbbbbb |" in text
    assert "| dataset_metadata | n/a | 0.310 |" in text
    assert "0.2100 ± 0.0100" in text and "| 0 | 40 | 20 | 37 | 0.2100 |" in text  # instance card and its folds
    assert "`0123456789abcdef`" in text


def test_plots_are_embedded_and_missing_ones_are_named(inputs, tmp_path):
    report = build_report(**inputs)
    text = report.markdown(embed_images=True)
    embedded = _IMAGES.findall(text)
    # stage peaks + 2 timelines + PR + calibration + importance; the beeswarm file is missing and
    # the holdout stage recorded no timeline.
    assert len(embedded) == 6
    assert all(base64.b64decode(data).startswith(plots.PNG_SIGNATURE) for data in embedded)
    assert "SHAP beeswarm of the top features: not available" in text and "never_written.png does not exist" in text
    assert "holdout_evaluation: RSS over time: not available" in text
    assert sorted(i.title for i in report.images() if i.png is None) == [
        "SHAP beeswarm of the top features", "holdout_evaluation: RSS over time"
    ]


def test_preview_is_the_text_without_images(inputs):
    report = build_report(**inputs)
    preview = report.markdown(embed_images=False)
    assert "data:image" not in preview
    assert "[image: PR curves (holdout)" in preview
    assert len(preview) < len(report.markdown()) / 3
