"""Streamed holdout evaluation: the memory guard's check reaches the metrics over all holdout rows."""

import sys
from collections import Counter

import lightgbm as lgb
import numpy as np
import pytest

from memopt_pipeline.core.data.batch_reader import BatchReader
from memopt_pipeline.core.evaluate.ensemble import Ensemble, EnsembleMember
from memopt_pipeline.core.evaluate.holdout import evaluate_holdout


class _Stop(Exception):
    """What a test's checkpoint raises, as the memory guard's check raises MemoryBudgetExceeded."""


@pytest.fixture(scope="module")
def model_and_holdout(tiny_metadata, tmp_path_factory):
    """A small LightGBM multiclass model on half the genes; the other half is the holdout."""
    genes = tiny_metadata.read_gene_stats()["gene"].to_list()
    reader = BatchReader(tiny_metadata)
    batches = list(reader.iter_batches(genes[:18], batch_rows=5_000))
    features = np.concatenate([b.features for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    params = {"objective": "multiclass", "num_class": 3, "num_leaves": 7, "min_data_in_leaf": 5, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(features, labels, feature_name=list(reader.features)), num_boost_round=5)
    path = tmp_path_factory.mktemp("holdout") / "model.txt"
    booster.save_model(str(path))
    return Ensemble([EnsembleMember("instance_0", str(path))]), genes[18:]


def test_checkpoint_runs_in_every_metric_computed_over_all_holdout_rows(model_and_holdout, tiny_metadata, tmp_path):
    ensemble, holdout = model_and_holdout
    callers = []
    evaluate_holdout(
        ensemble, BatchReader(tiny_metadata), holdout, batch_rows=500, predictions_path=tmp_path / "p.parquet",
        checkpoint=lambda: callers.append(sys._getframe(1).f_code.co_name),
    )
    # Calibrated metrics (with the per-gene spread), uncalibrated metrics, then the curves; 3 classes.
    assert Counter(callers) == {"multiclass_metrics": 2 * (1 + 3), "per_gene_logloss_spread": 2, "holdout_curves": 3}


def test_a_checkpoint_that_raises_stops_the_evaluation_after_the_predictions(model_and_holdout, tiny_metadata, tmp_path):
    ensemble, holdout = model_and_holdout

    def checkpoint():
        raise _Stop

    with pytest.raises(_Stop):
        evaluate_holdout(
            ensemble, BatchReader(tiny_metadata), holdout, batch_rows=500, predictions_path=tmp_path / "p.parquet",
            checkpoint=checkpoint,
        )
    assert (tmp_path / "p.parquet").exists()  # the streamed part finished; the metrics stopped


def test_per_gene_spread_matches_the_written_predictions_grouped_by_gene_name(model_and_holdout, tiny_metadata, tmp_path):
    """Rows are grouped by an integer index of their gene, not its name: the spread must equal
    one computed independently from the predictions file, by gene name."""
    import polars as pl

    ensemble, holdout = model_and_holdout
    metrics = evaluate_holdout(
        ensemble, BatchReader(tiny_metadata), holdout, batch_rows=500, predictions_path=tmp_path / "p.parquet"
    )
    written = pl.read_parquet(tmp_path / "p.parquet")
    probabilities = written.select([f"p_{c}" for c in tiny_metadata.classes]).to_numpy().astype(np.float64)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    row_loss = -np.log(np.clip(probabilities[np.arange(written.height), written["label"].to_numpy()], 1e-15, 1.0))
    per_gene = (
        written.select(tiny_metadata.gene_column).with_columns(loss=pl.Series(row_loss))
        .group_by(tiny_metadata.gene_column).agg(pl.col("loss").mean())["loss"].to_numpy()
    )  # fmt: skip
    spread = metrics["per_gene_logloss"]
    assert spread["genes"] == len(holdout) == len(per_gene)
    assert spread["mean"] == pytest.approx(per_gene.mean(), rel=1e-4)
    assert spread["worst"] == pytest.approx(per_gene.max(), rel=1e-4)
    assert spread["median"] == pytest.approx(np.median(per_gene), rel=1e-4)
