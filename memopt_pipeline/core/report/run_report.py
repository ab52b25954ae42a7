"""The run report: one self-contained markdown file per run, readable without the Dagster UI.

It gathers what the assets recorded (their JSON values and the memory measurements of their
materializations) into sections: data, memory plan vs measured peaks, training folds, holdout
metrics, SHAP, with the plots embedded as base64 PNG (``![title](data:image/png;base64,...)``)
so the file can be mailed, archived or opened in any markdown viewer that renders data URIs
(VS Code, JupyterLab, most desktop viewers) without the PNG files beside it. The same text
without images serves as a preview in the asset's metadata.

Nothing here reads Dagster: the asset passes plain dicts in.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from memopt_pipeline.core.report import plots
from memopt_pipeline.core.storage import atomic_path
from memopt_pipeline.core.units import GiB

_DATA_URI_IMAGE = re.compile(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")
SECTIONS = ("Summary", "Data", "Memory: plan vs measured", "Training", "Holdout", "Explanation (SHAP)")


@dataclass
class StageMemory:
    """What one guarded stage recorded in its latest materialization."""

    stage: str  # asset key, with " [partition]" for partitioned assets
    peak_rss_gb: float
    budget_gb: float
    predicted_peak_gb: float | None  # None: the plan makes no prediction for this stage
    seconds: float | None
    run_id: str | None = None
    timeline_markdown: str | None = None  # the stage's memory_timeline metadata (embedded PNG)

    @property
    def plan_error_gb(self) -> float | None:
        return None if self.predicted_peak_gb is None else self.peak_rss_gb - self.predicted_peak_gb


@dataclass
class Image:
    """A plot in the report: PNG bytes, or why there is none (shown, never silently dropped)."""

    title: str
    png: bytes | None = None
    path: str | None = None
    missing: str | None = None

    @classmethod
    def from_file(cls, title: str, path: str | Path | None, producer: str) -> "Image":
        if path is None:
            return cls(title, missing=f"{producer} recorded no such plot; re-materialize {producer}")
        path = Path(path)
        if not path.exists():
            return cls(title, path=str(path), missing=f"{path} does not exist; re-materialize {producer}")
        return cls(title, png=path.read_bytes(), path=str(path))

    @classmethod
    def from_markdown(cls, title: str, markdown: str | None, producer: str) -> "Image":
        match = _DATA_URI_IMAGE.search(markdown or "")
        if match is None:
            return cls(title, missing=f"{producer} recorded no memory timeline; re-materialize it")
        return cls(title, png=base64.b64decode(match.group(2)))

    def render(self, embed: bool) -> str:
        if self.png is None:
            return f"*{self.title}: not available ({self.missing})*"
        if embed:
            return plots.markdown_image(self.png, self.title)
        return f"*[image: {self.title}{f' — {self.path}' if self.path else ''}]*"


@dataclass
class RunReport:
    title: str
    sections: list[tuple[str, list[str | Image]]] = field(default_factory=list)

    def add(self, heading: str, *parts: str | Image) -> None:
        self.sections.append((heading, list(parts)))

    def markdown(self, embed_images: bool = True) -> str:
        lines = [f"# {self.title}", ""]
        for heading, parts in self.sections:
            lines += [f"## {heading}", ""]
            for part in parts:
                lines += [part.render(embed_images) if isinstance(part, Image) else part, ""]
        return "\n".join(lines)

    def images(self) -> list[Image]:
        return [part for _, parts in self.sections for part in parts if isinstance(part, Image)]

    def write(self, path: str | Path) -> Path:
        """The report with embedded images, written atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(self.markdown(embed_images=True))
        return path


# -- formatting --------------------------------------------------------------------------


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table (pipes inside cells become "/"), for reports and asset metadata."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# -- sections ----------------------------------------------------------------------------


def _summary(plan: Mapping, stages: Sequence[StageMemory], instances: Mapping, holdout: Mapping, shap: Mapping) -> str:
    improvement = 1.0 - holdout["logloss"] / holdout["baseline_logloss"]
    lines = [
        f"- holdout logloss **{holdout['logloss']:.4f}** vs class prior {holdout['baseline_logloss']:.4f} "
        f"({improvement:.1%} lower), accuracy {holdout['accuracy']:.4f}, on {holdout['rows']:,} rows of "
        f"{holdout['genes']:,} unseen genes",
    ]
    if stages:
        worst = max(stages, key=lambda s: s.peak_rss_gb)
        lines.append(
            f"- highest stage peak RSS **{worst.peak_rss_gb:.2f} GiB** ({worst.stage}) of a {worst.budget_gb:.2f} GiB budget"
        )
    lines.append(
        f"- {len(instances)} instance model(s), strategy `{plan['strategy']}`; SHAP on {shap['rows']:,} holdout rows"
    )
    top = ", ".join(f"`{name}`" for name, _ in shap["top_features"][:5])
    lines.append(f"- top features: {top}")
    return "\n".join(lines)


def _data(dataset: Mapping, split: Mapping) -> str:
    total = max(sum(dataset["class_counts"]), 1)
    overview = markdown_table(
        ["rows", "genes", "features", "classes", "shards", "on disk GiB", "raw float32 GiB"],
        [[
            f"{dataset['n_rows']:,}", f"{dataset['n_genes']:,}", len(dataset["features"]), len(dataset["classes"]),
            len(dataset["shards"]), _num(dataset["disk_bytes"] / GiB, 3),
            _num(dataset["n_rows"] * len(dataset["features"]) * 4 / GiB, 3),
        ]],
    )
    classes = markdown_table(
        ["class", "rows", "share"],
        [[c, f"{n:,}", f"{n / total:.2%}"] for c, n in zip(dataset["classes"], dataset["class_counts"])],
    )
    sample = (
        f"Sample: {split['sampled_genes']:,} of {split['dataset_genes']:,} genes; training {len(split['train_genes']):,} "
        f"genes ({split['train_rows']:,} rows), holdout {len(split['holdout_genes']):,} genes ({split['holdout_rows']:,} rows)."
    )
    excluded = dataset.get("excluded_columns") or {}
    parts = [overview, classes, sample]
    if excluded:
        listed = ", ".join(f"`{c}` ({why})" for c, why in list(excluded.items())[:8])
        parts.append(f"Not features: {listed}" + (f" and {len(excluded) - 8} more" if len(excluded) > 8 else "") + ".")
    parts.append(f"Gene column `{dataset['gene_column']}`, label column `{dataset['label_column']}`.")
    return "\n\n".join(parts)


def _memory(plan: Mapping, stages: Sequence[StageMemory]) -> list[str | Image]:
    settings = (
        f"Plan: strategy `{plan['strategy']}`, budget {plan['budget_bytes'] / GiB:.2f} GiB (plans to {plan['safety']:.0%} "
        f"of it), process baseline {plan['baseline_bytes'] / GiB:.2f} GiB, batch rows {plan['batch_rows']:,}, max_bin "
        f"{plan['max_bin']}, up to {plan['max_rows_per_instance']:,} rows per instance; all rows in one model would "
        f"need {plan['predicted_peak_full_data'] / GiB:.2f} GiB."
    )
    if not stages:
        return [settings, "*No guarded stage has recorded a peak yet.*"]
    table = markdown_table(
        ["stage", "planned peak GiB", "measured peak GiB", "plan error GiB", "budget GiB", "headroom GiB", "seconds", "run"],
        [[
            s.stage, _num(s.predicted_peak_gb, 3), _num(s.peak_rss_gb, 3), _num(s.plan_error_gb, 3), _num(s.budget_gb, 2),
            _num(s.budget_gb - s.peak_rss_gb, 3), _num(s.seconds, 1), (s.run_id or "")[:8],
        ] for s in stages],
    )
    peaks = Image(
        "peak RSS per stage vs plan and budget",
        png=plots.stage_peaks_png(
            [{"stage": s.stage, "peak_rss_gb": s.peak_rss_gb, "budget_gb": s.budget_gb, "predicted_peak_gb": s.predicted_peak_gb} for s in stages]
        ),
    )
    note = (
        "Measured peaks are each stage's own (the kernel's high-water mark reset at stage start, or the 100 ms "
        "sampler); *run* is the run that materialized the stage last."
    )
    parts: list[str | Image] = [settings, table, note, peaks, "### Memory timelines"]
    parts += [Image.from_markdown(f"{s.stage}: RSS over time", s.timeline_markdown, s.stage) for s in stages]
    return parts


def _training(instances: Mapping[str, Mapping], ensemble: Mapping) -> str:
    overview = markdown_table(
        ["instance", "genes", "rows", "rounds", "backend", "ladder level", "CV logloss mean ± std", "folds"],
        [[
            key, _num(card.get("train_genes")), _num(card.get("train_rows")), card.get("num_rounds"), card.get("backend"),
            card.get("ladder", {}).get("level", "n/a"),
            f"{_num(card.get('cv_logloss_mean'))} ± {_num(card.get('cv_logloss_std'))}", len(card.get("folds", [])),
        ] for key, card in sorted(instances.items())],
    )
    parts = [overview]
    for key, card in sorted(instances.items()):
        folds = card.get("folds", [])
        if not folds:
            continue
        classes = list(folds[0].get("pr_auc", {}))
        parts.append(f"**{key}** folds")
        parts.append(markdown_table(
            ["fold", "train genes", "valid genes", "best iteration", "valid logloss", *[f"PR-AUC {c}" for c in classes], "seconds"],
            [[
                f["fold"], f["train_genes"], f["valid_genes"], f["best_iteration"], _num(f["valid_logloss"]),
                *[_num(f["pr_auc"].get(c), 3) for c in classes], _num(f["seconds"], 1),
            ] for f in folds],
        ))
    weights = ", ".join(f"{m['partition']} {m['weight']:.3f}" for m in ensemble.get("members", []))
    parts.append(
        f"Ensemble: {len(ensemble.get('members', []))} model(s), weighting `{ensemble.get('weighting', 'equal')}` "
        f"({weights}), gene coverage {ensemble.get('coverage', float('nan')):.0%}."
    )
    return "\n\n".join(parts)


def _holdout(holdout: Mapping, classes: Sequence) -> list[str | Image]:
    overall = markdown_table(
        ["logloss", "class prior logloss", "uncalibrated logloss", "accuracy", "mean ECE before → after calibration"],
        [[
            _num(holdout["logloss"]), _num(holdout["baseline_logloss"]), _num(holdout.get("uncalibrated_logloss")),
            _num(holdout["accuracy"]),
            f"{_num(holdout.get('ece_before_calibration', {}).get('mean'))} → {_num(holdout.get('ece_after_calibration', {}).get('mean'))}",
        ]],
    )
    ece = dict(zip(holdout["per_class"], holdout.get("ece_after_calibration", {}).get("per_class", [])))
    per_class = markdown_table(
        ["class", "support", "prevalence", "PR-AUC", "ROC-AUC", "best F1", "top-k accuracy", "ECE"],
        [[
            name, _num(v.get("support")), _num(v["prevalence"]), _num(v["pr_auc"]), _num(v["roc_auc"]),
            _num(v["best_f1"]), _num(v["top_k_accuracy"]), _num(ece.get(name)),
        ] for name, v in holdout["per_class"].items()],
    )
    matrix = markdown_table(
        ["true \\ predicted", *map(str, classes)],
        [[c, *[f"{n:,}" for n in row]] for c, row in zip(classes, holdout["confusion_matrix"])],
    )
    spread = holdout.get("per_gene_logloss")
    parts: list[str | Image] = [overall, per_class, "Confusion matrix (argmax):", matrix]
    if spread:
        parts.append(
            f"Per-gene logloss: median {spread['median']:.4f}, p10 {spread['p10']:.4f}, p90 {spread['p90']:.4f}, "
            f"worst {spread['worst']:.4f} over {spread['genes']:,} genes."
        )
    found = holdout.get("plots", {})
    parts.append(Image.from_file("PR curves (holdout)", found.get("pr_curves"), "holdout_evaluation"))
    parts.append(Image.from_file("calibration (holdout)", found.get("calibration"), "holdout_evaluation"))
    parts.append(f"Predictions: `{holdout.get('predictions_path', 'n/a')}`")
    return parts


def _shap(shap: Mapping) -> list[str | Image]:
    facts = (
        f"{shap['rows']:,} holdout rows explained in {shap['chunks']} chunks; additivity error (contributions + bias "
        f"vs raw score) {shap['additivity_max_error']:.1e}; beeswarm from a uniform sample of "
        f"{shap.get('reservoir_rows', 'n/a')} rows. Values are in raw-score (margin) units, averaged over the "
        "instance models."
    )
    top = markdown_table(["rank", "feature", "mean abs SHAP"], [[i + 1, f, _num(v)] for i, (f, v) in enumerate(shap["top_features"])])
    found = shap.get("plots", {})
    files = "\n".join(
        f"- {what}: `{shap[key]}`"
        for what, key in (("importance per class", "importance_path"), ("per-row strongest features", "rows_path"),
                          ("beeswarm sample", "reservoir_path"))
        if key in shap
    )
    return [
        facts,
        top,
        Image.from_file("mean |SHAP| per feature and class", found.get("importance"), "shap_summary"),
        Image.from_file("SHAP beeswarm of the top features", found.get("beeswarm"), "shap_summary"),
        files,
    ]


def build_report(
    *,
    run_id: str,
    generated_at: str,
    dataset: Mapping,
    plan: Mapping,
    split: Mapping,
    stages: Sequence[StageMemory],
    instances: Mapping[str, Mapping],
    ensemble: Mapping,
    holdout: Mapping,
    shap: Mapping,
) -> RunReport:
    """The report of one run from the assets' values (JSON dicts) and the stages' memory records."""
    report = RunReport(title="memopt run report")
    header = f"Run `{run_id}`, generated {generated_at}."
    report.add("Summary", header, _summary(plan, stages, instances, holdout, shap))
    report.add("Data", _data(dataset, split))
    report.add("Memory: plan vs measured", *_memory(plan, stages))
    report.add("Training", _training(instances, ensemble))
    report.add("Holdout", *_holdout(holdout, dataset["classes"]))
    report.add("Explanation (SHAP)", *_shap(shap))
    return report
