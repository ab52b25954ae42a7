"""Small PNG plots for asset metadata and the run report: memory, SHAP, PR and calibration.

Every function returns PNG bytes. Figures are drawn with matplotlib's object API on an Agg
canvas, never through pyplot: pyplot keeps global state (a current figure, a backend chosen
at first import) that is neither thread-safe nor wanted in a code server, and figures made
this way are freed as soon as they go out of scope.

Images are small on purpose (``DPI`` 72, a few inches wide: tens of KB): they travel inside
Dagster's event log as base64 in markdown metadata (``![title](data:image/png;base64,...)``,
the way to show an image in ``MetadataValue.md``) and inside the self-contained run report.
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

DPI = 72
PALETTE_COLOURS = 128
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# One colour per class, in class-index order (neither, donor, acceptor for splice data).
CLASS_COLOURS = ("#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b")


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    # A 128-colour palette PNG is 3-4x smaller than matplotlib's RGBA output (a beeswarm of
    # 1,000 rows: ~35 KB instead of ~130 KB) and looks the same for flat-coloured plots.
    # Pillow is already a dependency of matplotlib.
    canvas = figure.canvas
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    buffer = io.BytesIO()
    image.convert("RGB").quantize(colors=PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT).save(
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
    sample) and the plan's ``predicted_peak_bytes`` are drawn as horizontal marks.
    """
    figure = _figure(6.0, 2.8)
    axes = figure.add_subplot()
    if timeline:
        seconds = np.array([t for t, _ in timeline], dtype=np.float64)
        rss = np.array([r for _, r in timeline], dtype=np.float64) / GiB
        axes.plot(seconds, rss, color="#1f77b4", linewidth=1.5, label="RSS", drawstyle="steps-post")
        axes.fill_between(seconds, rss, step="post", color="#1f77b4", alpha=0.15)
    axes.axhline(budget_bytes / GiB, color="#d62728", linewidth=1.5, label=f"budget {budget_bytes / GiB:.2f}")
    axes.axhline(abort_bytes / GiB, color="#ff7f0e", linestyle="--", linewidth=1.2, label=f"abort {abort_bytes / GiB:.2f}")
    axes.axhline(cleanup_bytes / GiB, color="#bcbd22", linestyle=":", linewidth=1.2, label=f"cleanup {cleanup_bytes / GiB:.2f}")
    if predicted_peak_bytes is not None:
        axes.axhline(predicted_peak_bytes / GiB, color="#7f7f7f", linestyle="-.", linewidth=1.0,
                     label=f"planned peak {predicted_peak_bytes / GiB:.2f}")
    if peak_bytes is not None:
        axes.axhline(peak_bytes / GiB, color="#1f77b4", linestyle=(0, (1, 1)), linewidth=1.0,
                     label=f"measured peak {peak_bytes / GiB:.2f}")
    axes.set_ylim(0, max(budget_bytes, peak_bytes or 0) / GiB * 1.08)
    axes.set_xlabel("seconds since stage start")
    axes.set_ylabel("GiB")
    axes.set_title(title, fontsize=10)
    axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    axes.grid(alpha=0.3)
    return _png(figure)


def stage_peaks_png(stages: Sequence[Mapping], title: str = "peak RSS per stage") -> bytes:
    """Measured peak of each stage (bars) beside the plan's prediction (marks) and the budget.

    ``stages``: mappings with ``stage``, ``peak_rss_gb``, ``budget_gb`` and optionally
    ``predicted_peak_gb`` (None when the plan makes no prediction for that stage).
    """
    if not stages:
        raise ValueError("no stages to plot")
    figure = _figure(6.0, 0.9 + 0.32 * len(stages))
    axes = figure.add_subplot()
    y = np.arange(len(stages))[::-1]
    peaks = [float(s["peak_rss_gb"]) for s in stages]
    axes.barh(y, peaks, color="#1f77b4", alpha=0.8, label="measured peak")
    predicted = [(yy, s.get("predicted_peak_gb")) for yy, s in zip(y, stages) if s.get("predicted_peak_gb") is not None]
    if predicted:
        axes.scatter([p for _, p in predicted], [yy for yy, _ in predicted], marker="D", color="#ff7f0e",
                     zorder=3, label="planned peak")
    budget = max(float(s["budget_gb"]) for s in stages)
    axes.axvline(budget, color="#d62728", linewidth=1.5, label=f"budget {budget:.2f} GiB")
    axes.set_yticks(y, [str(s["stage"]) for s in stages], fontsize=8)
    axes.set_xlabel("GiB")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
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
    figure = _figure(6.0, 1.0 + 0.26 * len(order))
    axes = figure.add_subplot()
    y = np.arange(len(order))[::-1]
    left = np.zeros(len(order))
    for c, name in enumerate(classes):
        # Stacked segments sum to the per-class total; divided by classes it is the mean ranked on.
        values = mean_abs[c, order] / len(classes)
        axes.barh(y, values, left=left, color=_colour(c), label=str(name))
        left += values
    axes.set_yticks(y, [features[i] for i in order], fontsize=8)
    axes.set_xlabel("mean |SHAP| (raw score), averaged over classes")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="lower right", title="class", title_fontsize=8)
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
    figure = _figure(2.4 * len(classes) + 1.6, 0.9 + 0.3 * n)
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
        axes.set_title(str(name), fontsize=9)
        axes.set_xlabel("SHAP (raw score)", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(axis="x", alpha=0.3)
    axes_list[0].set_yticks(y_base, [features[j] for j in feature_indices], fontsize=8)
    mappable = axes_list[-1].collections[0] if axes_list[-1].collections else None
    if mappable is not None:
        bar = figure.colorbar(mappable, ax=list(axes_list), fraction=0.04, pad=0.02, ticks=[0, 1])
        bar.ax.set_yticklabels(["low", "high"], fontsize=7)
        bar.set_label("feature value", fontsize=8)
    figure.suptitle(f"{title} ({len(values):,} sampled rows)", fontsize=10)
    return _png(figure)


# -- holdout quality ---------------------------------------------------------------------


def pr_curves_png(pr: Mapping[str, Mapping], per_class: Mapping[str, Mapping], *, title: str = "precision-recall (holdout)") -> bytes:
    """One PR curve per class with its average precision, and the class prevalence (the PR
    curve of a random ranking) as a dashed line of the same colour.

    ``pr``: class -> {"recall": [...], "precision": [...]} (:func:`metrics.holdout_curves`);
    ``per_class``: class -> {"pr_auc", "prevalence"} (:func:`metrics.multiclass_metrics`).
    """
    figure = _figure(4.6, 3.4)
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
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="lower left")
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
    figure = _figure(4.6, 4.4)
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
    top.set_title(title, fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_xlabel("mean predicted probability")
    bottom.set_ylabel("rows", fontsize=8)
    bottom.tick_params(labelsize=7)
    bottom.grid(alpha=0.3)
    return _png(figure)
