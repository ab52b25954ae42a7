"""Fakes for XGBoost's device checks (core/train/xgboost_model.device_check) on GPU-less machines."""

import json
import sys
import types

import pytest
import xgboost

from memopt_pipeline.core.units import GiB
from memopt_pipeline_tests.core.memory.test_gpu import fake_pynvml


class FakeBooster:
    """What the trial training returns: only its configuration (the device it ran on) is read."""

    def __init__(self, device: str):
        self.device = device

    def save_config(self) -> str:
        return json.dumps({"learner": {"generic_param": {"device": self.device}}})


@pytest.fixture
def gpu_checks_pass(monkeypatch):
    """A machine where every check passes: NVML sees one 16 GiB GPU, the XGBoost build has CUDA,
    a training asked for "cuda" runs on "cuda:0". Returns the trial trainings' parameters and a
    namespace whose ``ran_on`` / ``error`` a test changes to make the trial fall back or fail."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices=[(1 * GiB, 16 * GiB)]))
    monkeypatch.setattr(xgboost, "build_info", lambda: {"USE_CUDA": True})
    trial = types.SimpleNamespace(ran_on="cuda:0", error=None, params=[])

    def fake_train(params, dtrain, num_boost_round=10, **kwargs):
        trial.params.append(params)
        if trial.error is not None:
            raise trial.error
        return FakeBooster(trial.ran_on)

    monkeypatch.setattr(xgboost, "train", fake_train)
    return trial
