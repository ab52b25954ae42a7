"""The ensemble of instance models: calibrated probabilities averaged over every instance.

Members are stored in their library's native format (LightGBM text ``.txt``, XGBoost
UBJSON ``.ubj``); a small adapter per format gives them one interface, so an ensemble may
mix both (e.g. one instance retried on XGBoost external memory). Each member carries its
own calibration (fitted on its out-of-fold predictions, see :mod:`calibration`), applied to
its probabilities before averaging; weights are equal or proportional to a validation score.
The average itself is not calibrated again: a second map fitted on the ensemble's out-of-fold
average changed holdout logloss by at most 0.0001 on 2.1M rows (benchmarks/calibration_quality.py)
and would cost a pass of every member over all training rows.

Large members: when the model files together exceed ``max_resident_bytes`` the ensemble
keeps no model in memory and loads them one at a time for each prediction
(``one_at_a_time``); callers that predict many chunks then loop members outermost
(:meth:`Ensemble.iter_members`), so each model is loaded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lightgbm as lgb
import numpy as np

from memopt_pipeline.core.train.calibration import apply_calibration

# Loaded models take more memory than their files (LightGBM parses text into trees; measured
# about 2-3x); the resident-size check uses this factor.
MODEL_MEMORY_FACTOR = 3.0

@dataclass
class EnsembleMember:
    partition: str
    model_path: str
    weight: float = 1.0
    calibration: dict | None = None  # from calibration.fit_calibration; None = renormalise only


# The library's objective names -> the pipeline's (BoostingParams.objective): what a member's
# raw margins are (softmax logits, or one-vs-rest log-odds).
_OBJECTIVES = {"multiclass": "softmax", "multiclassova": "ovr", "multi:softprob": "softmax", "binary:logistic": "ovr"}


class LightGBMModel:
    kind = "lightgbm"

    def __init__(self, path: str):
        self.booster = lgb.Booster(model_file=path)
        self.feature_names = self.booster.feature_name()
        self.n_classes = self.booster.num_model_per_iteration()
        name = str(self.booster.params.get("objective", "unknown"))
        self.objective = _OBJECTIVES.get(name, name)

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
    kind = "xgboost"

    def __init__(self, path: str):
        import json

        from memopt_pipeline.core.train import xgboost_model

        self._backend = xgboost_model
        self.booster = xgboost_model.load_xgboost_model(path)
        self.feature_names = list(self.booster.feature_names or [])
        name = json.loads(self.booster.save_config())["learner"]["objective"]["name"]
        self.objective = _OBJECTIVES.get(name, name)

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


def validation_weights(scores: Sequence[float]) -> list[float]:
    """Weights from validation logloss (lower is better): proportional to 1 / logloss.

    Inverse loss rather than a softmax of scores: instances trained on similar data score
    within a few percent of each other, so weights stay close to equal and one lucky fold
    cannot take over the ensemble.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores)) or np.any(scores <= 0):
        raise ValueError(f"validation weighting needs positive finite losses, got {scores.tolist()}")
    weights = 1.0 / scores
    return (weights / weights.sum()).tolist()


class Ensemble:
    def __init__(self, members: Sequence[EnsembleMember], *, max_resident_bytes: int | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one instance model")
        missing = [m.model_path for m in members if not Path(m.model_path).exists()]
        if missing:
            raise FileNotFoundError(f"instance model files missing: {missing}; re-materialize instance_model")
        self.members = list(members)
        weights = np.array([m.weight for m in self.members], dtype=np.float64)
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"ensemble weights must be non-negative and not all zero, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self._file_bytes = [Path(m.model_path).stat().st_size for m in self.members]
        self.model_bytes = sum(self._file_bytes)
        self.one_at_a_time = (
            max_resident_bytes is not None and self.model_bytes * MODEL_MEMORY_FACTOR > max_resident_bytes
        )
        # Eager: every model stays loaded. One at a time: models are loaded per call (or once
        # per pass with iter_members), and the feature check happens as each is loaded.
        first = load_model(self.members[0].model_path)
        self.feature_names = first.feature_names
        self.n_classes = first.predict_raw(np.zeros((1, len(self.feature_names)), dtype=np.float32)).shape[-1]
        self.models = None if self.one_at_a_time else [first, *(self._load(m) for m in self.members[1:])]
        del first

    @property
    def resident_bytes(self) -> int:
        """Expected memory of the models held at once: all of them, or the largest one when they
        are loaded one at a time."""
        held = max(self._file_bytes) if self.one_at_a_time else self.model_bytes
        return int(held * MODEL_MEMORY_FACTOR)

    def _load(self, member: EnsembleMember):
        model = load_model(member.model_path)
        if model.feature_names != self.feature_names:
            raise ValueError(f"{member.model_path} was trained on different features than {self.members[0].model_path}")
        return model

    def iter_members(self) -> Iterator[tuple[float, EnsembleMember, object]]:
        """(normalised weight, member, loaded model), loading each model only while it is used."""
        for index, (weight, member) in enumerate(zip(self.weights, self.members)):
            model = self.models[index] if self.models is not None else self._load(member)
            yield float(weight), member, model
            del model

    @staticmethod
    def member_proba(member: EnsembleMember, model, features: np.ndarray) -> np.ndarray:
        """One member's calibrated class probabilities (rows sum to 1)."""
        return apply_calibration(member.calibration, model.predict_proba(features))

    def _average(self, method: str, features: np.ndarray) -> np.ndarray:
        total = None
        for weight, member, model in self.iter_members():
            if method == "predict_proba":
                values = self.member_proba(member, model, features)
            else:
                values = np.asarray(getattr(model, method)(features), dtype=np.float64)
            total = weight * values if total is None else total + weight * values
        return total

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Weighted mean of the instance models' calibrated class probabilities, shape (rows, classes)."""
        return self._average("predict_proba", features)

    def predict_proba_both(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated, uncalibrated) weighted means from one prediction per member: the
        uncalibrated one (rows renormalised) measures what calibration changed."""
        calibrated = uncalibrated = None
        for weight, member, model in self.iter_members():
            proba = model.predict_proba(features)
            cal = weight * apply_calibration(member.calibration, proba)
            unc = weight * apply_calibration(None, proba)
            calibrated = cal if calibrated is None else calibrated + cal
            uncalibrated = unc if uncalibrated is None else uncalibrated + unc
        return calibrated, uncalibrated

    def predict_raw(self, features: np.ndarray) -> np.ndarray:
        """Weighted mean of raw scores (margins), shape (rows, classes)."""
        return self._average("predict_raw", features)

    def predict_contributions(self, features: np.ndarray) -> np.ndarray:
        """Weighted mean of native SHAP contributions, shape (rows, classes, features + 1), in
        raw-score units; the last entry per class is the bias, so each row sums to predict_raw."""
        return self._average("predict_contributions", features)
