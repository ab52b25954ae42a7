"""Plots: valid, small PNGs, and the markdown that embeds them."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from memopt_pipeline.core.evaluate.metrics import holdout_curves, multiclass_metrics
from memopt_pipeline.core.report import plots
from memopt_pipeline.core.units import GiB

CLASSES = ["neither", "donor", "acceptor"]
# "Tens of KB": every plot must stay well below this to travel in the event log.
MAX_PNG_BYTES = 80 * 1024


def _check_png(png: bytes) -> tuple[int, int]:
    assert png.startswith(plots.PNG_SIGNATURE)
    assert len(png) < MAX_PNG_BYTES
    with Image.open(io.BytesIO(png)) as image:
        image.verify()
    with Image.open(io.BytesIO(png)) as image:
        return image.size


@pytest.fixture(scope="module")
def holdout():
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=4_000, p=[0.9, 0.05, 0.05])
    proba = rng.dirichlet([1.0, 1.0, 1.0], size=4_000)
    proba[np.arange(4_000), labels] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    return multiclass_metrics(labels, proba, CLASSES), holdout_curves(labels, proba, CLASSES)


def test_memory_timeline_is_a_small_png():
    timeline = [(i * 0.1, int(0.3 * GiB + 0.2 * GiB * np.sin(i / 20) ** 2)) for i in range(2_000)]
    png = plots.memory_timeline_png(
        timeline, budget_bytes=GiB, cleanup_bytes=int(0.7 * GiB), abort_bytes=int(0.9 * GiB),
        peak_bytes=int(0.55 * GiB), predicted_peak_bytes=int(0.6 * GiB), title="stage",
    )
    width, height = _check_png(png)
    assert width <= 600 and height <= 300  # 72 dpi, a few inches


def test_memory_timeline_of_a_stage_with_one_sample():
    png = plots.memory_timeline_png([(0.0, GiB // 4)], budget_bytes=GiB, cleanup_bytes=GiB // 2, abort_bytes=GiB * 9 // 10)
    _check_png(png)


def test_shap_plots_top_features_and_missing_values():
    rng = np.random.default_rng(1)
    features = [f"feature_{i}" for i in range(300)]
    mean_abs = np.abs(rng.normal(size=(3, 300)))
    values = rng.normal(size=(1_000, 300))
    values[::7, 0] = np.nan  # missing values are drawn grey, not dropped
    contributions = rng.normal(size=(1_000, 3, 300))
    _check_png(plots.shap_importance_png(features, mean_abs, CLASSES, top=15))
    _check_png(plots.shap_beeswarm_png(features, values, contributions, CLASSES, list(range(10))))


def test_swarm_offsets_spread_dense_bins_more():
    x = np.concatenate([np.zeros(50), np.linspace(1, 10, 10)])
    offsets = plots._swarm_offsets(x, width=0.4)
    assert np.abs(offsets).max() == pytest.approx(0.4)
    assert np.abs(offsets[:50]).max() > np.abs(offsets[50:]).max()


def test_pr_and_calibration_curves(holdout):
    metrics, curves = holdout
    _check_png(plots.pr_curves_png(curves["pr"], metrics["per_class"]))
    _check_png(plots.calibration_png(curves["reliability"], {"neither": 0.01, "donor": 0.02, "acceptor": 0.03}))


def test_an_absent_class_is_left_out_of_the_pr_plot(holdout):
    metrics, curves = holdout
    pr = dict(curves["pr"], acceptor={"recall": [], "precision": []})
    _check_png(plots.pr_curves_png(pr, metrics["per_class"]))


def test_stage_peaks_with_and_without_a_prediction():
    stages = [
        {"stage": "dataset_metadata", "peak_rss_gb": 0.4, "budget_gb": 1.0, "predicted_peak_gb": None},
        {"stage": "instance_model [instance_0]", "peak_rss_gb": 0.7, "budget_gb": 1.0, "predicted_peak_gb": 0.8},
    ]
    _check_png(plots.stage_peaks_png(stages))
    with pytest.raises(ValueError, match="no stages"):
        plots.stage_peaks_png([])


def test_markdown_embeds_the_png_and_the_file_holds_the_same_bytes(tmp_path):
    png = plots.stage_peaks_png([{"stage": "s", "peak_rss_gb": 0.5, "budget_gb": 1.0}])
    snippet = plots.save_markdown_image(png, tmp_path / "plots" / "peaks.png", "peak [RSS]")
    assert snippet.startswith("![peak (RSS)](data:image/png;base64,") and snippet.endswith(")")
    assert base64.b64decode(snippet.split("base64,", 1)[1][:-1]) == png == (tmp_path / "plots" / "peaks.png").read_bytes()
    with pytest.raises(ValueError, match="not PNG"):
        plots.markdown_image(b"GIF89a", "not a png")
