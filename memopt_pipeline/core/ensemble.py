"""The ensemble of instance models: probabilities averaged over every instance.

Models are kept in LightGBM's native text format; this class only loads and averages them.
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


class Ensemble:
    def __init__(self, members: Sequence[EnsembleMember]):
        if not members:
            raise ValueError("an ensemble needs at least one instance model")
        missing = [m.model_path for m in members if not Path(m.model_path).exists()]
        if missing:
            raise FileNotFoundError(f"instance model files missing: {missing}; re-materialize instance_model")
        self.members = list(members)
        self.boosters = [lgb.Booster(model_file=m.model_path) for m in self.members]
        weights = np.array([m.weight for m in self.members], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.feature_names = self.boosters[0].feature_name()
        for member, booster in zip(self.members, self.boosters):
            if booster.feature_name() != self.feature_names:
                raise ValueError(f"{member.model_path} was trained on different features than {self.members[0].model_path}")

    @property
    def n_classes(self) -> int:
        return self.boosters[0].num_model_per_iteration()

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Weighted mean of the instance models' class probabilities, shape (rows, classes)."""
        total = np.zeros((features.shape[0], self.n_classes), dtype=np.float64)
        for weight, booster in zip(self.weights, self.boosters):
            total += weight * booster.predict(features, num_threads=0)
        return total

    def predict_contributions(self, features: np.ndarray) -> np.ndarray:
        """Weighted mean of native SHAP contributions, shape (rows, classes, features + 1).

        LightGBM lays multiclass contributions out class-major in one row:
        [class0: f0..fF-1, bias, class1: ..., ...]; reshape keeps that order. The last entry
        per class is the expected value (bias). Contributions are in raw-score (margin) units.
        """
        rows, n_features = features.shape
        total = np.zeros((rows, self.n_classes, n_features + 1), dtype=np.float64)
        for weight, booster in zip(self.weights, self.boosters):
            contributions = booster.predict(features, pred_contrib=True)
            total += weight * np.asarray(contributions).reshape(rows, self.n_classes, n_features + 1)
        return total

    def predict_raw(self, features: np.ndarray) -> np.ndarray:
        total = np.zeros((features.shape[0], self.n_classes), dtype=np.float64)
        for weight, booster in zip(self.weights, self.boosters):
            total += weight * booster.predict(features, raw_score=True)
        return total
