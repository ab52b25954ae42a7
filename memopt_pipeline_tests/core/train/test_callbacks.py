"""The memory check point as a boosting-round callback: every round is checked, and an abort stops training."""

import numpy as np
import pytest

from memopt_pipeline.core.memory.errors import MemoryBudgetExceeded
from memopt_pipeline.core.train import callbacks as memory
from memopt_pipeline.core.units import GiB
from memopt_pipeline_tests.core.memory.fakes import FakeRSS, fake_monitor


def tiny_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 3))
    return features, (features[:, 0] > 0).astype(float)


def test_lightgbm_callback_checks_every_round_and_aborts_training(releases):
    import lightgbm as lgb

    features, labels = tiny_data()
    params = {"objective": "binary", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5}
    completed_rounds = []

    def record_round(env) -> None:
        completed_rounds.append(env.iteration)

    record_round.order = 50  # after the memory check

    # Under budget: trains to the end, one check per round (plus the read on entry).
    reader = FakeRSS(GiB)
    with fake_monitor(reader) as monitor:
        lgb.train(params, lgb.Dataset(features, labels), num_boost_round=4, callbacks=[memory.lightgbm_callback(monitor)])
    assert reader.reads == 1 + 4 + 1

    # Over budget from the second round on: the exception leaves lightgbm.train.
    reader = FakeRSS(GiB, GiB, int(9.5 * GiB))  # entry, round 0, round 1...
    with pytest.raises(MemoryBudgetExceeded):
        with fake_monitor(reader) as monitor:
            lgb.train(
                params,
                lgb.Dataset(features, labels),
                num_boost_round=10,
                callbacks=[record_round, memory.lightgbm_callback(monitor)],
            )
    assert completed_rounds == [0]


def test_xgboost_callback_checks_every_round_and_aborts_training(releases):
    import xgboost as xgb

    features, labels = tiny_data()
    params = {"objective": "binary:logistic", "nthread": 1, "max_depth": 2}

    reader = FakeRSS(GiB)
    with fake_monitor(reader) as monitor:
        xgb.train(params, xgb.DMatrix(features, labels), num_boost_round=4, callbacks=[memory.xgboost_callback(monitor)])
    assert reader.reads == 1 + 4 + 1

    reader = FakeRSS(GiB, GiB, int(9.5 * GiB))
    with pytest.raises(MemoryBudgetExceeded):
        with fake_monitor(reader) as monitor:
            xgb.train(params, xgb.DMatrix(features, labels), num_boost_round=10, callbacks=[memory.xgboost_callback(monitor)])
    assert reader.reads == 5  # entry, round 0, round 1 (over abort), re-read after cleanup, exit

