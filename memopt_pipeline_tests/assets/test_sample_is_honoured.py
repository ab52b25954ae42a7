"""Regression: with a gene sample, no stage reads rows outside it, let alone the full dataset.

The failure this prevents: stages that each reloaded the whole dataset "for transcript
information" or "for evaluation" and used 20x-700x the memory the sample promised.
"""

import dagster as dg
import polars as pl

from memopt_pipeline.automation.local_run import materialize_pipeline
from memopt_pipeline.core.data import batch_reader as batches
from memopt_pipeline.definitions import build_resources
from memopt_pipeline_tests.checkpoint_layout import stored_value


def test_every_stage_reads_only_sampled_genes(tiny_dataset, tiny_metadata, tmp_path, monkeypatch):
    passes: list[tuple[str, list[str], int]] = []  # (purpose, genes, rows delivered)
    original_scan = batches.BatchReader._scan

    def recording_scan(self, genes, batch_rows, features, *, with_ids, purpose):
        genes = list(genes)
        rows = 0
        try:
            for batch in original_scan(self, genes, batch_rows, features, with_ids=with_ids, purpose=purpose):
                rows += len(batch.labels)
                yield batch
        finally:  # LightGBM stops consuming at the last row without exhausting the stream
            passes.append((purpose, genes, rows))

    original_sample = batches.BatchReader.sample_rows

    def recording_sample(self, genes, n_rows, **options):
        genes = list(genes)
        sample = original_sample(self, genes, n_rows, **options)
        passes.append(("bin sample", genes, len(sample)))
        return sample

    monkeypatch.setattr(batches.BatchReader, "_scan", recording_scan)
    monkeypatch.setattr(batches.BatchReader, "sample_rows", recording_sample)
    output = tmp_path / "out"
    run_config = {
        "ops": {
            "source_dataset": {"config": {"path": str(tiny_dataset)}},
            "gene_split": {"config": {"sample_genes": 12, "holdout_fraction": 0.25}},
            "instance_assignment": {"config": {"n_instances": 2}},
            "cv_folds": {"config": {"n_folds": 2}},
            "instance_model": {"config": {"max_rounds": 15, "min_data_in_leaf": 5, "num_threads": 2}},
            "shap_summary": {"config": {"sample_rows": 10_000, "chunk_rows": 100}},
        }
    }
    with dg.instance_for_test() as instance:
        collected = materialize_pipeline(
            instance, resources=build_resources(output_dir=str(output)), run_config=run_config, log=lambda m: None
        )

    split = stored_value(collected, "gene_split")
    sampled = set(split["train_genes"]) | set(split["holdout_genes"])
    stats = tiny_metadata.read_gene_stats()
    sampled_rows = int(stats.filter(pl.col("gene").is_in(sorted(sampled)))["rows"].sum())
    assert len(sampled) == 12 and sampled_rows < tiny_metadata.n_rows / 2

    assert passes, "no stage read through the batch reader"
    purposes = {purpose for purpose, _, _ in passes}
    # Bins from a sample, the instance binned once (the plan has room), out-of-fold, holdout, SHAP.
    assert {"bin sample", "binning the instance", "holdout prediction", "shap"} <= purposes
    for purpose, genes, rows in passes:
        assert set(genes) <= sampled, purpose
        assert rows <= sampled_rows < tiny_metadata.n_rows, purpose
    holdout_passes = [set(g) for p, g, _ in passes if p in ("holdout prediction", "shap")]
    assert all(genes <= set(split["holdout_genes"]) for genes in holdout_passes)
    training_passes = [set(g) for p, g, _ in passes if "binning" in p]
    assert all(genes <= set(split["train_genes"]) for genes in training_passes)
