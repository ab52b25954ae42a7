"""The ensemble of instance models: probabilities averaged over every instance.

Members are stored in their library's native format (LightGBM text ``.txt``, XGBoost
UBJSON ``.ubj``); a small adapter per format gives them one interface, so an ensemble may
mix both (e.g. one instance retried on XGBoost external memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightgbm as lgb
import numpy as np


@dataclass
class EnsembleMember:
    partition: str
    model_path: str
    weight: float = 1.0


class LightGBMModel:
    def __init__(self, path: str):
        self.booster = lgb.Booster(model_file=path)
        self.feature_names = self.booster.feature_name()
        self.n_classes = self.booster.num_model_per_iteration()

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.booster.predict(features)

    def predict_raw(self, features: np.ndarray) -> np.ndarray:
        return self.booster.predict(features, raw_score=True)

    def predict_contributions(self, features: np.ndarray) -> np.ndarray:
        # LightGBM lays multiclass contributions out class-major in one row:
        # [class0: f0..fF-1, bias, class1: ...]; the reshape keeps that order.
        rows, n_features = features.shape
        flat = np.asarray(self.booster.predict(features, pred_contrib=True))
        return flat.reshape(rows, self.n_classes, n_features + 1)


class XGBoostModel:
    def __init__(self, path: str):
        from memopt_pipeline.core import xgboost_backend

        self._backend = xgboost_backend
        self.booster = xgboost_backend.load_xgboost_model(path)
        self.feature_names = list(self.booster.feature_names or [])

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self._backend.predict_proba_xgboost(self.booster, features)

    def predict_raw(self, features: np.ndarray) -> np.ndarray:
        return self._backend.predict_raw_xgboost(self.booster, features)

    def predict_contributions(self, features: np.ndarray) -> np.ndarray:
        return self._backend.predict_contributions_xgboost(self.booster, features)


def load_model(path: str) -> LightGBMModel | XGBoostModel:
    suffix = Path(path).suffix
    if suffix == ".txt":
        return LightGBMModel(path)
    if suffix == ".ubj":
        return XGBoostModel(path)
    raise ValueError(f"{path}: unknown model format {suffix!r}; expected LightGBM .txt or XGBoost .ubj")


class Ensemble:
    def __init__(self, members: Sequence[EnsembleMember]):
        if not members:
            raise ValueError("an ensemble needs at least one instance model")
        missing = [m.model_path for m in members if not Path(m.model_path).exists()]
        if missing:
            raise FileNotFoundError(f"instance model files missing: {missing}; re-materialize instance_model")
        self.members = list(members)
        self.models = [load_model(m.model_path) for m in self.members]
        weights = np.array([m.weight for m in self.members], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.feature_names = self.models[0].feature_names
        for member, model in zip(self.members, self.models):
            if model.feature_names != self.feature_names:
                raise ValueError(f"{member.model_path} was trained on different features than {self.members[0].model_path}")

    def _average(self, method: str, features: np.ndarray) -> np.ndarray:
        total = None
        for weight, model in zip(self.weights, self.models):
            part = weight * np.asarray(getattr(model, method)(features), dtype=np.float64)
            total = part if total is None else total + part
        return total

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Weighted mean of the instance models' class probabilities, shape (rows, classes)."""
        return self._average("predict_proba", features)

    def predict_raw(self, features: np.ndarray) -> np.ndarray:
        """Weighted mean of raw scores (margins), shape (rows, classes)."""
        return self._average("predict_raw", features)

    def predict_contributions(self, features: np.ndarray) -> np.ndarray:
        """Weighted mean of native SHAP contributions, shape (rows, classes, features + 1), in
        raw-score units; the last entry per class is the bias, so each row sums to predict_raw."""
        return self._average("predict_contributions", features)
