"""Throughput and peak memory of chunked native SHAP against one-shot and shap.TreeExplainer.

    python benchmarks/shap_throughput.py                          # both modes on a generated 2000-gene dataset
    python benchmarks/shap_throughput.py --mode throughput --rows 10000 --chunk-sweep 500,8000
    python benchmarks/shap_throughput.py --mode memory --memory-rows 10000,100000
    python benchmarks/shap_throughput.py --data DIR --train-genes 300 --rounds 150

One LightGBM multiclass model is trained (in a child process, see ``asset_default_chunk_rows``
for why the parent stays small) on ``--train-genes`` genes of the dataset; the rows explained
come from the other genes, always the same rows in the same order (the pipeline's BatchReader
order). Then, each in its own child process:

throughput mode, on the first ``--rows`` explained rows, in ``--repeat`` interleaved rounds
(each approach's fastest round is reported):
- ``read``           the BatchReader pass alone (batches of ``--chunk-rows``): what reading costs;
- ``chunked``        ``core.explain.chunked_shap`` as the shap_summary asset runs it (reservoir and
                     per-row Parquet included), reading inside; one row per ``--chunk-sweep`` size;
- ``one_shot``       all rows read into one matrix first (timed apart), then one
                     ``booster.predict(X, pred_contrib=True)``;
- ``tree_explainer`` ``shap.TreeExplainer(booster).shap_values`` on the first ``--shap-rows`` rows.

memory mode: ``chunked`` for each of ``--memory-rows`` (e.g. 10k and 100k): the peak must not
grow with the number of rows explained.

Peak RSS: the child's StageMonitor peak over the measured part (the kernel's high-water mark,
reset when the monitor starts, after the imports and the model load) and the child's
``ru_maxrss`` from ``os.wait4``, read the way ``train_memory.py`` does (the monitor's reset of the
high-water mark also resets what ``ru_maxrss`` reports, so the two agree).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # train_memory's helpers: dataset, child processes, wait4

import train_memory  # noqa: E402

from memopt_pipeline.core.units import GiB

RESULTS_DIR = BENCH_DIR / "results"
CHILD_MODES = ("prepare", "read", "chunked", "one_shot", "tree_explainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, default=2000, help="genes in the generated dataset (~70 rows each; default 2000)")
    parser.add_argument("--mean-exons", type=int, default=6, help="mean exons per gene of the generated dataset (default 6)")
    parser.add_argument("--data", default=None, help="reuse this dataset instead of generating one")
    parser.add_argument("--mode", choices=("throughput", "memory", "both"), default="both")
    parser.add_argument("--train-genes", type=int, default=300, help="genes the model is trained on (default 300)")
    parser.add_argument("--rounds", type=int, default=150, help="boosting rounds of the model (default 150)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows explained in throughput mode (default 10000)")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="chunk of the chunked approach (default: the shap_summary asset's default)")
    parser.add_argument("--chunk-sweep", default="", help="comma list of extra chunk sizes for the chunked approach")
    parser.add_argument("--shap-rows", type=int, default=2_000, help="rows for shap.TreeExplainer (default 2000)")
    parser.add_argument("--memory-rows", default="10000,100000", help="rows explained per memory-mode child")
    parser.add_argument("--repeat", type=int, default=3,
                        help="throughput mode: rounds over all approaches, interleaved; each approach's fastest round is "
                        "reported (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="threads (default 0 = all cores)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the children's output")
    # Internal: how the parent starts a child.
    parser.add_argument("--child", choices=CHILD_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--child-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    return args


def asset_default_chunk_rows() -> int:
    """The shap_summary asset's default chunk, asked of a short-lived process: importing Dagster
    here would raise this parent's RSS, and a child's ru_maxrss starts from its parent's RSS at
    spawn time (exec keeps the larger of the old and the new image's high-water mark)."""
    import subprocess

    code = ("from memopt_pipeline.assets.evaluation import ShapConfig; "
            "print(ShapConfig.model_fields['chunk_rows'].default)")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=BENCH_DIR.parent).stdout)


# ======================================================================================
# Parent
# ======================================================================================


def prepare(data: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    """Scan the data, train the model, fix the genes to explain: in a child, for the reason in
    :func:`asset_default_chunk_rows` (training would leave this parent at hundreds of MB)."""
    command = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", "prepare", "--spec", str(data),
               "--out", str(run_dir / "spec.json"), "--train-genes", str(args.train_genes), "--rounds", str(args.rounds),
               "--threads", str(args.threads), "--mode", args.mode, "--rows", str(args.rows),
               "--memory-rows", args.memory_rows, "--shap-rows", str(args.shap_rows)]
    result = train_memory.run_child(command, run_dir / "prepare.log", env=train_memory.child_env(args.threads), prefix="  [prepare] ")
    if result["failure"]:
        raise SystemExit(f"preparing the model failed: {result['failure']} (log: {run_dir / 'prepare.log'})")
    return json.loads((run_dir / "spec.json").read_text())


def prepare_child(data: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    import lightgbm as lgb
    import numpy as np

    from memopt_pipeline.core.data.batch_reader import BatchReader
    from memopt_pipeline.core.data.dataset import list_shards, scan_dataset
    from memopt_pipeline.core.data.synthetic import GENE_COLUMN, LABEL_COLUMN

    metadata = scan_dataset(list_shards(data), gene_column=GENE_COLUMN, label_column=LABEL_COLUMN,
                            gene_stats_path=run_dir / "gene_stats.parquet")
    genes = sorted(metadata.read_gene_stats()["gene"].to_list())
    order = np.random.default_rng(0).permutation(len(genes))
    train_genes = sorted(genes[i] for i in order[: args.train_genes])
    explain_genes = sorted(genes[i] for i in order[args.train_genes :])
    reader = BatchReader(metadata)
    explain_rows = reader.count_rows(explain_genes)
    needed = max(args.rows if args.mode != "memory" else 0,
                 max(int(n) for n in args.memory_rows.split(",")) if args.mode != "throughput" else 0)
    if explain_rows < needed:
        raise SystemExit(f"only {explain_rows:,} rows outside the training genes, {needed:,} needed: use more --genes")
    started = time.monotonic()
    batches = list(reader.iter_batches(train_genes, batch_rows=100_000))
    features = np.concatenate([b.features for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    params = {"objective": "multiclass", "num_class": metadata.n_classes, "num_leaves": 31, "learning_rate": 0.1,
              "min_data_in_leaf": 20, "verbose": -1, "num_threads": args.threads, "seed": 0}
    booster = lgb.train(params, lgb.Dataset(features, labels, feature_name=list(reader.features)), num_boost_round=args.rounds)
    model_path = run_dir / "model.txt"
    booster.save_model(str(model_path))
    print(f"model: {args.rounds} rounds x {metadata.n_classes} classes on {len(labels):,} rows of {len(train_genes)} genes "
          f"({time.monotonic() - started:.1f} s) -> {model_path}", flush=True)
    spec = {
        "metadata": metadata.to_dict(),
        "model_path": str(model_path),
        "explain_genes": explain_genes,
        "explain_rows": explain_rows,
        "train_rows": int(len(labels)),
        "shap_rows": args.shap_rows,
        "threads": args.threads,
    }
    (run_dir / "spec.json").write_text(json.dumps(spec))
    return spec


def run(mode: str, rows: int, run_dir: Path, args: argparse.Namespace, chunk_rows: int | None = None, round_: int = 0) -> dict:
    chunk_rows = chunk_rows or args.chunk_rows
    label = f"{mode}_{rows}" + (f"_c{chunk_rows}" if mode == "chunked" else "") + (f"_r{round_}" if round_ else "")
    out = run_dir / f"{label}.json"
    command = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", mode, "--spec", str(run_dir / "spec.json"),
               "--out", str(out), "--child-rows", str(rows), "--chunk-rows", str(chunk_rows)]
    print(f"\n== {label}", flush=True)
    row = {"approach": mode, **train_memory.run_child(command, run_dir / f"{label}.log", env=train_memory.child_env(args.threads),
                                                       prefix=f"  [{label}] ", echo=not args.quiet)}
    if not row["failure"]:
        row.update(json.loads(out.read_text()))
        print(f"== {label}: {row['rows']:,} rows in {row['seconds']:.2f} s ({row['rows'] / row['seconds']:,.0f} rows/s), "
              f"monitor peak {row['monitor_peak_gb']:.3f} GiB, ru_maxrss {row['peak_rss_gb']:.3f} GiB", flush=True)
    return row


def best_round(rounds: list[dict]) -> dict:
    """The fastest round of one approach (least disturbed), with the highest peak of all rounds."""
    ok = [r for r in rounds if not r.get("failure")]
    if not ok:
        return rounds[0]
    best = dict(min(ok, key=lambda r: r["seconds"]))
    best["peak_rss_gb"] = max(r["peak_rss_gb"] for r in ok)
    best["monitor_peak_gb"] = max(r["monitor_peak_gb"] for r in ok)
    best["walls"] = [round(r["seconds"], 2) for r in ok]
    best["note"] = f"best of {len(ok)} rounds ({', '.join(f'{w:.1f}' for w in best['walls'])} s); " + best.get("note", "")
    return best


def format_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["approach"] == "one_shot" and not r.get("failure")), None)
    lines = ["| approach | chunk rows | rows | wall s | CPU s | rows/s | vs one-shot | vs one-shot (CPU) | peak RSS GiB (monitor) "
             "| ru_maxrss GiB | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("failure"):
            lines.append(f"| {r['approach']} | | | | | | | | | {r['peak_rss_gb']:.3f} | FAILED: {r['failure']} |")
            continue
        rate = r["rows"] / r["seconds"]
        compare = base is not None and r["approach"] != "read"
        ratio = f"{rate / (base['rows'] / base['seconds']):.2f}x" if compare else ""
        cpu_ratio = f"{(r['rows'] / r['cpu_seconds']) / (base['rows'] / base['cpu_seconds']):.2f}x" if compare else ""
        note = r.get("note", "")
        if r.get("foreign_cpu_share", 0) > 0.1:  # train_memory's measure: CPU other processes used meanwhile
            note += f"; DISTURBED: other processes used {r['foreign_cpu_share']:.0%} of the CPU"
        lines.append(
            f"| {r['approach']} | {r.get('chunk_rows') or ''} | {r['rows']:,} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
            f"{rate:,.0f} | {ratio} | {cpu_ratio} | {r['monitor_peak_gb']:.3f} | {r['peak_rss_gb']:.3f} | {note} |"
        )
    return "\n".join(lines)


def main_parent(args: argparse.Namespace) -> int:
    import psutil

    if args.chunk_rows is None:
        args.chunk_rows = asset_default_chunk_rows()
    data = train_memory.ensure_dataset(args)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = RESULTS_DIR / f"shap_throughput_{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = prepare(data, run_dir, args)
    metadata = spec["metadata"]
    header = [
        f"dataset {data}: {metadata['n_rows']:,} rows x {len(metadata['features'])} features, {metadata['n_genes']:,} genes",
        f"model: LightGBM multiclass ({len(metadata['classes'])} classes), {args.rounds} rounds, 31 leaves, trained on "
        f"{spec['train_rows']:,} rows of {args.train_genes} genes; explained rows come from the other "
        f"{len(spec['explain_genes']):,} genes ({spec['explain_rows']:,} rows)",
        f"{args.threads} threads, {os.cpu_count()} cores, {psutil.virtual_memory().total / GiB:.1f} GiB RAM; "
        f"chunked uses chunk_rows {args.chunk_rows:,} (BatchReader batches are also cut at Parquet row groups)",
    ]
    print("\n".join(header), flush=True)
    busy = psutil.cpu_percent(interval=1.0)
    if busy > 20:
        print(f"WARNING: the CPU is {busy:.0f}% busy before we start; timings will be inflated", flush=True)

    sections = []
    results: dict[str, list[dict]] = {}
    if args.mode in ("throughput", "both"):
        configs = [("read", None), ("chunked", None)]
        configs += [("chunked", int(c)) for c in args.chunk_sweep.split(",") if c.strip() and int(c) != args.chunk_rows]
        configs += [("one_shot", None), ("tree_explainer", None)]
        # Rounds over every approach rather than N runs of one then N of the next: on a shared
        # machine the load drifts over minutes, and interleaving exposes every approach to it alike.
        runs = [[run(mode, args.rows, run_dir, args, chunk, round_=r + 1) for mode, chunk in configs] for r in range(args.repeat)]
        rows = [best_round([round_[i] for round_ in runs]) for i in range(len(configs))]
        results["throughput"] = rows
        sections.append(("throughput", format_table(rows)))
    if args.mode in ("memory", "both"):
        rows = [run("chunked", int(n), run_dir, args) for n in args.memory_rows.split(",")]
        results["memory"] = rows
        table = format_table(rows)
        ok = [r for r in rows if not r.get("failure")]
        if len(ok) >= 2:
            low, high = ok[0], ok[-1]
            growth = high["monitor_peak_gb"] / low["monitor_peak_gb"] - 1
            whole = high["peak_rss_gb"] / low["peak_rss_gb"] - 1
            table += (f"\n\npeak for {high['rows']:,} vs {low['rows']:,} rows: monitor {growth:+.1%}, "
                      f"ru_maxrss {whole:+.1%} (target: < 10%)")
        sections.append(("memory", table))

    markdown = "\n".join([f"# shap_throughput {stamp}", "", *[f"- {line}" for line in header], ""]
                         + [f"## {name}\n\n{table}\n" for name, table in sections]
                         + ["rows/s = rows / wall s of the measured part (model loaded, imports done; throughput mode: "
                            f"each approach's fastest of {args.repeat} interleaved rounds, CPU s of that round; "
                            "'vs one-shot (CPU)' compares rows per CPU second, less sensitive to other processes). chunked includes "
                            "reading its rows; one_shot's wall excludes its read (in its note); read is the reader alone. "
                            "monitor: StageMonitor peak over the measured part (data load included); ru_maxrss: the whole "
                            "child (imports included), from os.wait4.", ""])
    for name, table in sections:
        print(f"\n{name}\n{table}")
    md_path = RESULTS_DIR / f"shap_throughput_{stamp}.md"
    md_path.write_text(markdown)
    (RESULTS_DIR / f"shap_throughput_{stamp}.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if k not in ("child", "spec", "out", "child_rows")},
         "header": header, "results": results}, indent=2))
    print(f"\nwritten {md_path}")
    return 0


# ======================================================================================
# Children: each measures one approach on the first --child-rows explained rows
# ======================================================================================


def _measure(work) -> tuple[float, float, object]:
    """(wall s, CPU s of this process, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main_child(args: argparse.Namespace) -> int:
    if args.child == "prepare":
        prepare_child(Path(args.spec), Path(args.out).parent, args)
        return 0

    import numpy as np

    from memopt_pipeline.core.data.batch_reader import BatchReader
    from memopt_pipeline.core.data.dataset import DatasetMetadata
    from memopt_pipeline.core.evaluate.ensemble import Ensemble, EnsembleMember
    from memopt_pipeline.core.memory.limits import available_memory_bytes
    from memopt_pipeline.core.memory.monitor import StageMonitor

    spec = json.loads(Path(args.spec).read_text())
    metadata = DatasetMetadata.from_dict(spec["metadata"])
    genes = spec["explain_genes"]
    rows = args.child_rows
    chunk_rows = args.chunk_rows
    ensemble = Ensemble([EnsembleMember("model", spec["model_path"])])
    booster = ensemble.models[0].booster
    reader = BatchReader(metadata, features=ensemble.feature_names)

    def read_all(n: int) -> np.ndarray:
        """The first n explained rows as one float32 matrix, in the reader's order (the same rows chunked sees)."""
        parts, have = [], 0
        for batch in reader.iter_batches(genes, chunk_rows, purpose="read"):
            parts.append(batch.features[: n - have])
            have += len(parts[-1])
            if have >= n:
                break
        return np.concatenate(parts)

    def read_only() -> int:
        have = 0
        for batch in reader.iter_batches(genes, chunk_rows, purpose="read"):
            have += min(len(batch.features), rows - have)
            if have >= rows:
                break
        return have

    result: dict = {"chunk_rows": None}
    # Monitor only: a budget far above what any approach needs, so it never aborts.
    with StageMonitor(args.child, available_memory_bytes()) as monitor:
        if args.child == "read":
            wall, cpu, have = _measure(read_only)
            result.update(rows=have, chunk_rows=chunk_rows, note="BatchReader pass only, batches as chunked reads them")
        elif args.child == "chunked":
            from memopt_pipeline.core.evaluate.shap_summary import chunked_shap

            rows_path = Path(args.out).with_suffix(".rows.parquet")
            wall, cpu, summary = _measure(lambda: chunked_shap(
                ensemble, reader, genes, sample_rows=rows, chunk_rows=chunk_rows, rows_path=rows_path))
            result.update(rows=summary.rows, chunk_rows=chunk_rows,
                          note=f"{summary.chunks} chunks; additivity error {summary.additivity_max_error:.1e}")
        elif args.child == "one_shot":
            started = time.perf_counter()
            matrix = read_all(rows)
            load = time.perf_counter() - started
            wall, cpu, contributions = _measure(lambda: booster.predict(matrix, pred_contrib=True))
            result.update(rows=len(matrix),
                          note=f"read {load:.2f} s apart; output {contributions.nbytes / GiB:.2f} GiB float64")
        else:
            import shap

            subset = min(rows, spec["shap_rows"])
            matrix = read_all(subset)
            started = time.perf_counter()
            explainer = shap.TreeExplainer(booster)
            init = time.perf_counter() - started
            wall, cpu, values = _measure(lambda: explainer.shap_values(matrix))
            result.update(rows=len(matrix),
                          note=f"subset of {subset:,} rows; TreeExplainer() {init:.2f} s apart; output {np.shape(values)}; "
                          "shap calls LightGBM's pred_contrib for LightGBM models")
    summary = monitor.summary()
    result.update(seconds=wall, cpu_seconds=cpu, monitor_peak_gb=summary["peak_rss_gb"],
                  monitor_start_gb=summary["start_rss_gb"], peak_source=summary["peak_source"])
    Path(args.out).write_text(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return main_child(args) if args.child else main_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
