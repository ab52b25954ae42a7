"""Small PNG plots for asset metadata and the run report: memory, SHAP, PR and calibration.

Every function returns PNG bytes. Figures are drawn with matplotlib's object API on an Agg
canvas, never through pyplot: pyplot keeps global state (a current figure, a backend chosen
at first import) that is neither thread-safe nor wanted in a code server, and figures made
this way are freed as soon as they go out of scope.

Images are sized to be read where they are shown, and kept to tens of KB. The Dagster UI (1.13)
opens markdown metadata over 1,000 characters, which every image is, in a dialog that shows
the image at its own pixel size (up to 80% of the window's width): so ``DPI`` 100 and figures
about 8 x 4 inches give ~800 x 400 px images whose text, at least ``MIN_TEXT_PT``, is as large
as the UI's own. They travel inside Dagster's event log as base64 in markdown metadata
(``![title](data:image/png;base64,...)``, the way to show an image in ``MetadataValue.md``;
Dagster sets no size limit on it, but every materialization of a stage carries its images and
the UI loads many materializations at once) and inside the self-contained run report, so
they are palette PNGs and long timelines are downsampled.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from memopt_pipeline.core.storage import atomic_path
from memopt_pipeline.core.units import GiB

DPI = 100
# Text sizes in points: at DPI 100 shown at its own size, 9 pt is 12.5 px, the size of the UI's small text.
MIN_TEXT_PT = 9
TEXT_PT = 10
TITLE_PT = 12
PALETTE_COLOURS = 64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# One colour per class, in class-index order (neither, donor, acceptor for splice data).
CLASS_COLOURS = ("#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b")


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _readable_text(figure: Figure) -> None:
    """The same text sizes in every plot: axes titles ``TITLE_PT``, everything else ``TEXT_PT``
    (ticks, axis labels, legends, colour bars), whatever matplotlib's rc settings are."""
    for axes in figure.axes:
        axes.tick_params(labelsize=TEXT_PT)
        axes.xaxis.label.set_fontsize(TEXT_PT)
        axes.yaxis.label.set_fontsize(TEXT_PT)
        axes.title.set_fontsize(TITLE_PT)
        legend = axes.get_legend()
        if legend is not None:
            for text in (*legend.get_texts(), legend.get_title()):
                text.set_fontsize(TEXT_PT)


def _png(figure: Figure) -> bytes:
    _readable_text(figure)
    # A 64-colour palette PNG is 3-4x smaller than matplotlib's RGBA output and looks the same
    # for flat-coloured plots (a 920 x 510 px beeswarm of 1,000 random rows: ~63 KB, ~75 KB with
    # 128 colours; 32 visibly bands the colour bar). The octree quantiser keeps colours only a few
    # pixels use (a threshold's short legend line); median cut merged them into their neighbours.
    # Pillow is already a dependency of matplotlib.
    canvas = figure.canvas
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    buffer = io.BytesIO()
    image.convert("RGB").quantize(colors=PALETTE_COLOURS, method=Image.Quantize.FASTOCTREE).save(
        buffer, format="png", optimize=True
    )
    return buffer.getvalue()


def _colour(index: int) -> str:
    return CLASS_COLOURS[index % len(CLASS_COLOURS)]


# -- embedding ---------------------------------------------------------------------------


def markdown_image(png: bytes, title: str) -> str:
    """``![title](data:image/png;base64,...)``: an image inside markdown metadata or a report."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError(f"{title}: not PNG bytes")
    alt = title.replace("[", "(").replace("]", ")")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def write_png(png: bytes, path: str | Path) -> Path:
    """Write PNG bytes atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return path


def save_markdown_image(png: bytes, path: str | Path, title: str) -> str:
    """Write ``png`` to ``path`` and return the markdown snippet embedding it."""
    write_png(png, path)
    return markdown_image(png, title)


# -- memory ------------------------------------------------------------------------------


# Room above the highest RSS mark, and how far above it the budget may be and still be drawn:
# further up, the stage's own curve would be a flat line on the floor.
AXIS_MARGIN = 1.2
BUDGET_REACH = 1.5
# Samples drawn at most: a line 800 px wide shows no more, and the PNG stays small. 0.1 s
# sampling of an hour-long stage is 36,000 samples.
MAX_TIMELINE_POINTS = 800


def memory_axis_top(highest_gb: float, budget_gb: float) -> float:
    """Top of the memory timeline's y-axis (GiB): the highest of the stage's RSS, measured peak and
    planned peak with a margin, raised to show the budget only when the budget is near that."""
    if highest_gb <= 0:
        return budget_gb * 1.05
    top = highest_gb * AXIS_MARGIN
    if budget_gb <= highest_gb * BUDGET_REACH:
        top = max(top, budget_gb * 1.05)
    return top


def _threshold(axes, name: str, value_gb: float, limit_gb: float, *, vertical: bool = False, **style) -> None:
    """A GiB threshold as a line labelled with its value, or, above ``limit_gb``, only as a legend
    entry saying so: an empty line shows its style and value without stretching the axis."""
    if value_gb > limit_gb:
        axes.plot([], [], label=f"{name} {value_gb:.2f} GiB (off scale)", **style)
    elif vertical:
        axes.axvline(value_gb, label=f"{name} {value_gb:.2f} GiB", **style)
    else:
        axes.axhline(value_gb, label=f"{name} {value_gb:.2f} GiB", **style)


def downsample_max(seconds: np.ndarray, values: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` (+1) steps: each the maximum of consecutive samples, at the first
    one's time, so a peak is never averaged away; the last sample's time closes the line."""
    if len(values) <= max_points:
        return seconds, values
    starts = np.linspace(0, len(values), max_points, endpoint=False).astype(np.int64)
    peaks = np.maximum.reduceat(values, starts)
    return np.append(seconds[starts], seconds[-1]), np.append(peaks, peaks[-1])


def memory_timeline_png(
    timeline: Sequence[tuple[float, int]],
    *,
    budget_bytes: int,
    cleanup_bytes: int,
    abort_bytes: int,
    peak_bytes: int | None = None,
    predicted_peak_bytes: int | None = None,
    title: str = "memory",
) -> bytes:
    """RSS over the stage's time against the budget and the guard's cleanup / abort thresholds.

    ``timeline`` is :attr:`StageMonitor.timeline` ((seconds, RSS bytes) pairs). ``peak_bytes``
    (the monitor's peak, which may come from the kernel's high-water mark and so exceed every
    sample) and the plan's ``predicted_peak_bytes`` are drawn as horizontal marks. The y-axis
    follows the stage (:func:`memory_axis_top`); a threshold above it is named in the legend
    with its value, "(off scale)".
    """
    figure = _figure(8.0, 4.0)
    axes = figure.add_subplot()
    highest = max(peak_bytes or 0, predicted_peak_bytes or 0) / GiB
    if timeline:
        seconds = np.array([t for t, _ in timeline], dtype=np.float64)
        rss = np.array([r for _, r in timeline], dtype=np.float64) / GiB
        highest = max(highest, float(rss.max()))
        seconds, rss = downsample_max(seconds, rss, MAX_TIMELINE_POINTS)
        axes.plot(seconds, rss, color="#1f77b4", linewidth=1.5, label="RSS", drawstyle="steps-post")
        axes.fill_between(seconds, rss, step="post", color="#1f77b4", alpha=0.15)
    top = memory_axis_top(highest, budget_bytes / GiB)
    thresholds = (
        ("budget", budget_bytes, {"color": "#d62728", "linewidth": 1.5}),
        ("abort", abort_bytes, {"color": "#ff7f0e", "linestyle": "--", "linewidth": 1.2}),
        ("cleanup", cleanup_bytes, {"color": "#bcbd22", "linestyle": ":", "linewidth": 1.2}),
    )
    for name, value, style in thresholds:
        _threshold(axes, name, value / GiB, top, **style)
    if predicted_peak_bytes is not None:
        axes.axhline(predicted_peak_bytes / GiB, color="#7f7f7f", linestyle="-.", linewidth=1.2,
                     label=f"planned peak {predicted_peak_bytes / GiB:.2f} GiB")
    if peak_bytes is not None:
        axes.axhline(peak_bytes / GiB, color="#1f77b4", linestyle=(0, (1, 1)), linewidth=1.2,
                     label=f"measured peak {peak_bytes / GiB:.2f} GiB")
    axes.set_ylim(0, top)
    axes.set_xlabel("seconds since stage start")
    axes.set_ylabel("RSS (GiB)")
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes.grid(alpha=0.3)
    return _png(figure)


def stage_peaks_png(stages: Sequence[Mapping], title: str = "peak RSS per stage") -> bytes:
    """Measured peak of each stage (bars) beside the plan's prediction (marks) and the budget
    (named in the legend when far above every peak).

    ``stages``: mappings with ``stage``, ``peak_rss_gb``, ``budget_gb`` and optionally
    ``predicted_peak_gb`` (None when the plan makes no prediction for that stage).
    """
    if not stages:
        raise ValueError("no stages to plot")
    figure = _figure(8.0, 1.4 + 0.4 * len(stages))
    axes = figure.add_subplot()
    y = np.arange(len(stages))[::-1]
    peaks = [float(s["peak_rss_gb"]) for s in stages]
    axes.barh(y, peaks, color="#1f77b4", alpha=0.8, label="measured peak")
    predicted = [(yy, s.get("predicted_peak_gb")) for yy, s in zip(y, stages) if s.get("predicted_peak_gb") is not None]
    if predicted:
        axes.scatter([p for _, p in predicted], [yy for yy, _ in predicted], marker="D", color="#ff7f0e",
                     zorder=3, label="planned peak")
    budget = max(float(s["budget_gb"]) for s in stages)
    # Scaled like the memory timelines: to the peaks, the budget drawn when it is near them.
    right = memory_axis_top(max(peaks + [p for _, p in predicted]), budget)
    _threshold(axes, "budget", budget, right, vertical=True, color="#d62728", linewidth=1.5)
    axes.set_xlim(0, right)
    axes.set_yticks(y, [str(s["stage"]) for s in stages])
    axes.set_xlabel("GiB")
    axes.set_title(title)
    # Beside the axes, as in the memory timelines: inside, it would hide the longest bars.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


# -- SHAP --------------------------------------------------------------------------------


def shap_importance_png(
    features: Sequence[str], mean_abs: np.ndarray, classes: Sequence, *, top: int = 15, title: str = "mean |SHAP|"
) -> bytes:
    """Global importance: the ``top`` features by mean |SHAP| (averaged over classes), one
    stacked bar segment per class, as shap's multiclass bar summary.

    ``mean_abs`` has shape (classes, features), in raw-score units.
    """
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    order = np.argsort(-mean_abs.mean(axis=0))[:top]
    figure = _figure(8.0, 1.4 + 0.32 * len(order))
    axes = figure.add_subplot()
    y = np.arange(len(order))[::-1]
    left = np.zeros(len(order))
    for c, name in enumerate(classes):
        # Stacked segments sum to the per-class total; divided by classes it is the mean ranked on.
        values = mean_abs[c, order] / len(classes)
        axes.barh(y, values, left=left, color=_colour(c), label=str(name))
        left += values
    axes.set_yticks(y, [features[i] for i in order])
    axes.set_xlabel("mean |SHAP| (raw score), averaged over classes")
    axes.set_title(title)
    axes.legend(loc="lower right", title="class")
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def _swarm_offsets(x: np.ndarray, width: float = 0.4, bins: int = 60) -> np.ndarray:
    """Vertical offsets that spread points sharing an x bin, alternating up and down, scaled
    so the densest bin spans ``width`` (shap's beeswarm does the same)."""
    if len(x) == 0:
        return np.zeros(0)
    low, high = float(np.min(x)), float(np.max(x))
    index = np.zeros(len(x), dtype=np.int64) if high <= low else ((x - low) / (high - low) * (bins - 1)).round().astype(np.int64)
    order = np.argsort(index, kind="stable")
    rank = np.empty(len(x), dtype=np.int64)
    sorted_index = index[order]
    starts = np.searchsorted(sorted_index, sorted_index, side="left")
    rank[order] = np.arange(len(x)) - starts
    offsets = np.ceil(rank / 2) * np.where(rank % 2 == 0, 1.0, -1.0)
    scale = max(np.abs(offsets).max(), 1.0)
    return offsets / scale * width


def shap_beeswarm_png(
    features: Sequence[str],
    values: np.ndarray,
    contributions: np.ndarray,
    classes: Sequence,
    feature_indices: Sequence[int],
    *,
    title: str = "SHAP beeswarm",
) -> bytes:
    """Beeswarm of the reservoir rows: one panel per class, one row per feature (the most
    important first), each dot a row's contribution coloured by the feature's value (its
    rank within the sample: low blue, high red; missing grey).

    ``values`` (rows, features) and ``contributions`` (rows, classes, features) are the
    reservoir's sample (:meth:`ShapReservoir.sample`).
    """
    values = np.asarray(values, dtype=np.float64)
    contributions = np.asarray(contributions, dtype=np.float64)
    n = len(feature_indices)
    figure = _figure(2.4 * len(classes) + 2.0, 1.5 + 0.36 * n)
    axes_list = figure.subplots(1, len(classes), sharey=True, squeeze=False)[0]
    y_base = np.arange(n)[::-1]
    colour_map = "coolwarm"
    for c, (axes, name) in enumerate(zip(axes_list, classes)):
        for y, j in zip(y_base, feature_indices):
            x = contributions[:, c, j]
            v = values[:, j]
            finite = np.isfinite(v)
            colour = np.full(len(v), 0.5)
            if finite.sum() > 1:
                # Rank-based colour: robust to skewed k-mer counts, as shap's 5-95 percentile clip.
                ranks = np.argsort(np.argsort(v[finite], kind="stable"), kind="stable")
                colour[finite] = ranks / max(finite.sum() - 1, 1)
            offsets = _swarm_offsets(x)
            axes.scatter(x[finite], y + offsets[finite], c=colour[finite], cmap=colour_map, vmin=0, vmax=1,
                         s=4, linewidths=0, alpha=0.8, rasterized=True)
            if (~finite).any():
                axes.scatter(x[~finite], y + offsets[~finite], color="#bbbbbb", s=4, linewidths=0)
        axes.axvline(0, color="#444444", linewidth=0.8)
        axes.set_title(str(name))
        axes.set_xlabel("SHAP (raw score)")
        axes.grid(axis="x", alpha=0.3)
    axes_list[0].set_yticks(y_base, [features[j] for j in feature_indices])
    mappable = axes_list[-1].collections[0] if axes_list[-1].collections else None
    if mappable is not None:
        bar = figure.colorbar(mappable, ax=list(axes_list), fraction=0.04, pad=0.02, ticks=[0, 1])
        bar.ax.set_yticklabels(["low", "high"])
        bar.set_label("feature value")
    figure.suptitle(f"{title} ({len(values):,} sampled rows)", fontsize=TITLE_PT)
    return _png(figure)


# -- holdout quality ---------------------------------------------------------------------


def pr_curves_png(pr: Mapping[str, Mapping], per_class: Mapping[str, Mapping], *, title: str = "precision-recall (holdout)") -> bytes:
    """One PR curve per class with its average precision, and the class prevalence (the PR
    curve of a random ranking) as a dashed line of the same colour.

    ``pr``: class -> {"recall": [...], "precision": [...]} (:func:`metrics.holdout_curves`);
    ``per_class``: class -> {"pr_auc", "prevalence"} (:func:`metrics.multiclass_metrics`).
    """
    figure = _figure(6.4, 4.6)
    axes = figure.add_subplot()
    for c, (name, curve) in enumerate(pr.items()):
        if not curve["recall"]:
            continue  # a class absent from the holdout has no curve
        stats = per_class.get(name, {})
        axes.plot(curve["recall"], curve["precision"], color=_colour(c), linewidth=1.5,
                  label=f"{name} AP {stats.get('pr_auc', float('nan')):.3f}", drawstyle="steps-post")
        if "prevalence" in stats:
            axes.axhline(stats["prevalence"], color=_colour(c), linestyle="--", linewidth=0.8)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(title)
    axes.legend(loc="lower left")
    axes.grid(alpha=0.3)
    return _png(figure)


def calibration_png(
    reliability: Mapping[str, Mapping], ece: Mapping[str, float] | None = None, *, title: str = "calibration (holdout)"
) -> bytes:
    """Reliability curve per class (mean predicted probability vs observed frequency per
    bin; on the diagonal = calibrated), and below it the rows per bin on a log scale, since
    rare classes put almost every row in the lowest bin.

    ``reliability``: class -> {"mean_predicted", "fraction_positive", "count"}
    (:func:`metrics.holdout_curves`); ``ece``: class -> expected calibration error.
    """
    figure = _figure(6.4, 5.6)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="#444444", linestyle=":", linewidth=1.0, label="calibrated")
    for c, (name, bins) in enumerate(reliability.items()):
        if not bins["count"]:
            continue
        label = str(name) if ece is None or name not in ece else f"{name} ECE {ece[name]:.3f}"
        top.plot(bins["mean_predicted"], bins["fraction_positive"], marker="o", markersize=3, color=_colour(c),
                 linewidth=1.2, label=label)
        bottom.plot(bins["mean_predicted"], bins["count"], marker="o", markersize=2, color=_colour(c), linewidth=1.0)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("observed frequency")
    top.set_title(title)
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_xlabel("mean predicted probability")
    bottom.set_ylabel("rows")
    bottom.grid(alpha=0.3)
    return _png(figure)
