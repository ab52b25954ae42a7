"""Plots: valid, small PNGs, and the markdown that embeds them."""

import base64
import io

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text
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


@pytest.fixture
def drawn(monkeypatch) -> list[Figure]:
    """The figures the plot functions draw, after drawing (their PNG bytes are still returned)."""
    figures = []
    real = plots._png

    def keep(figure: Figure) -> bytes:
        png = real(figure)
        figures.append(figure)
        return png

    monkeypatch.setattr(plots, "_png", keep)
    return figures


def _legend(figure: Figure) -> list[str]:
    return [text.get_text() for axes in figure.axes if axes.get_legend() for text in axes.get_legend().get_texts()]


def _stage_timeline(peak_gb: float, samples: int = 2_000) -> list[tuple[float, int]]:
    return [(i * 0.1, int(peak_gb * GiB * (0.6 + 0.4 * np.sin(i / 20) ** 2))) for i in range(samples)]


def test_memory_timeline_is_big_enough_to_read_and_small_enough_to_embed():
    timeline = _stage_timeline(0.5)
    png = plots.memory_timeline_png(
        timeline, budget_bytes=GiB, cleanup_bytes=int(0.7 * GiB), abort_bytes=int(0.9 * GiB),
        peak_bytes=int(0.55 * GiB), predicted_peak_bytes=int(0.6 * GiB), title="stage",
    )
    width, height = _check_png(png)
    assert 700 <= width <= 1000 and 350 <= height <= 500  # shown at its own size in the UI's dialog


def test_memory_timeline_follows_the_stage_when_the_budget_is_far_above(drawn):
    # 0.5 GiB of RSS under a 14 GiB budget: scaled to the budget, the curve is a line on the floor.
    plots.memory_timeline_png(
        _stage_timeline(0.5), budget_bytes=14 * GiB, cleanup_bytes=int(10.5 * GiB), abort_bytes=int(12.6 * GiB),
        peak_bytes=GiB // 2, predicted_peak_bytes=int(0.6 * GiB),
    )
    (axes,) = drawn[0].axes
    bottom, top = axes.get_ylim()
    assert bottom == 0 and 0.6 < top <= 1.0  # above the planned peak, with a margin, nowhere near 14
    legend = _legend(drawn[0])
    assert "budget 14.00 GiB (off scale)" in legend
    assert "abort 12.60 GiB (off scale)" in legend and "cleanup 10.50 GiB (off scale)" in legend


def test_memory_timeline_draws_a_budget_near_the_peak(drawn):
    plots.memory_timeline_png(
        _stage_timeline(0.8), budget_bytes=GiB, cleanup_bytes=int(0.7 * GiB), abort_bytes=int(0.9 * GiB),
        peak_bytes=int(0.8 * GiB),
    )
    (axes,) = drawn[0].axes
    assert axes.get_ylim()[1] >= 1.0
    legend = _legend(drawn[0])
    assert "budget 1.00 GiB" in legend and not any("off scale" in label for label in legend)


def test_memory_axis_top():
    assert plots.memory_axis_top(0.5, 14.0) == pytest.approx(0.6)  # the stage, with a margin
    assert plots.memory_axis_top(0.8, 1.0) == pytest.approx(1.05)  # a near budget is in range
    assert plots.memory_axis_top(0.0, 2.0) == pytest.approx(2.1)  # nothing measured: the budget


def test_a_long_timeline_is_downsampled_without_losing_its_peak(drawn):
    timeline = [(i * 0.1, GiB // 4) for i in range(36_000)]  # an hour at 0.1 s
    timeline[12_345] = (1234.5, GiB // 2)  # one sample's spike
    plots.memory_timeline_png(timeline, budget_bytes=GiB, cleanup_bytes=GiB // 2, abort_bytes=GiB * 9 // 10)
    (rss,) = [line for line in drawn[0].axes[0].get_lines() if line.get_label() == "RSS"]
    assert len(rss.get_ydata()) <= plots.MAX_TIMELINE_POINTS + 1
    assert max(rss.get_ydata()) == 0.5 and rss.get_xdata()[-1] == timeline[-1][0]


def _every_plot(holdout) -> dict[str, bytes]:
    metrics, curves = holdout
    rng = np.random.default_rng(2)
    features = [f"kmer3_ACG_{i}" for i in range(50)]
    stages = [{"stage": "dataset_metadata", "peak_rss_gb": 0.4, "budget_gb": 14.0, "predicted_peak_gb": 0.5}]
    return {
        "memory_timeline": plots.memory_timeline_png(
            _stage_timeline(0.5), budget_bytes=GiB, cleanup_bytes=GiB // 2, abort_bytes=GiB * 9 // 10,
            peak_bytes=GiB // 2, predicted_peak_bytes=GiB // 2,
        ),
        "stage_peaks": plots.stage_peaks_png(stages),
        "shap_importance": plots.shap_importance_png(features, np.abs(rng.normal(size=(3, 50))), CLASSES),
        "shap_beeswarm": plots.shap_beeswarm_png(
            features, rng.normal(size=(200, 50)), rng.normal(size=(200, 3, 50)), CLASSES, list(range(10))
        ),
        "pr_curves": plots.pr_curves_png(curves["pr"], metrics["per_class"]),
        "calibration": plots.calibration_png(curves["reliability"], {c: 0.01 for c in CLASSES}),
    }


def test_every_plot_has_text_of_at_least_9_points(drawn, holdout):
    pngs = _every_plot(holdout)
    assert len(drawn) == len(pngs)
    for name, figure in zip(pngs, drawn):
        assert figure.dpi >= 100, name  # shown at its own pixel size, so points become pixels at this DPI
        texts = [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert texts, name
        small = {t.get_text(): t.get_fontsize() for t in texts if t.get_fontsize() < plots.MIN_TEXT_PT}
        assert not small, (name, small)
    assert plots.MIN_TEXT_PT >= 9


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


def test_stage_peaks_are_scaled_to_the_stages_and_name_a_far_budget(drawn):
    plots.stage_peaks_png([
        {"stage": "dataset_metadata", "peak_rss_gb": 0.4, "budget_gb": 14.0},
        {"stage": "shap_summary", "peak_rss_gb": 0.7, "budget_gb": 14.0, "predicted_peak_gb": 0.8},
    ])
    (axes,) = drawn[0].axes
    assert 0.8 < axes.get_xlim()[1] <= 1.0
    assert "budget 14.00 GiB (off scale)" in _legend(drawn[0])
