"""XGBoost's side of the shared vocabulary: parameters from :class:`BoostingParams`, the device,
the number of trees of an early-stopped model, native UBJSON files and predictions.

Used by both XGBoost backends (in memory / external memory, and Dask) and by the ensemble.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import xgboost

from memopt_pipeline.core.memory import gpu
from memopt_pipeline.core.storage import atomic_path
from memopt_pipeline.core.train.instance import BoostingParams
from memopt_pipeline.core.train.threads import resolve_threads

# XGBoost has no minimum number of rows per leaf, only a minimum sum of hessians
# (``min_child_weight``). For the softmax objective XGBoost's per-row, per-class hessian is
# 2 p (1 - p): at most 0.5, and small for rows the model is already sure about. We count a
# row as 0.05 of hessian (p ~ 0.026 or ~ 0.974), so LightGBM's default min_data_in_leaf=20
# maps to XGBoost's own default min_child_weight=1. Using the 0.5 maximum instead would be
# an exact "at least min_data_in_leaf rows" guarantee, but on imbalanced classes (rare
# donors/acceptors predicted at p ~ 0.01) it would demand hundreds of rows per leaf and
# stall learning of the rare classes.
HESSIAN_PER_ROW = 0.05

MODEL_SUFFIX = ".ubj"



def device_check() -> tuple[str, str]:
    """("cuda", what passed) when XGBoost can train on a GPU here, else ("cpu", the check that failed).

    Three checks, in order, each needed: NVML sees a device (a driver and a GPU); this XGBoost
    build has CUDA support (a CPU-only wheel rejects device="cuda"); and a one-round training on
    a tiny matrix runs on the device. The last one catches what the first two cannot: a GPU this
    process may not use, a CUDA runtime the driver is too old for, and XGBoost's own fallback
    (with no usable GPU it warns and trains on the CPU, which its configuration then says).
    """
    status = gpu.gpu_status()
    if not status.available:
        return "cpu", f"the NVML check failed ({status.reason})"
    if not xgboost.build_info().get("USE_CUDA"):
        return "cpu", f'this XGBoost {xgboost.__version__} was built without CUDA (xgboost.build_info()["USE_CUDA"] is false)'
    import json
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tiny = xgboost.DMatrix(np.arange(16, dtype=np.float32).reshape(8, 2), label=np.arange(8) % 2)
            booster = xgboost.train({"device": "cuda", "tree_method": "hist", "verbosity": 1}, tiny, num_boost_round=1)
            used = str(json.loads(booster.save_config())["learner"]["generic_param"]["device"])
    except Exception as error:  # noqa: BLE001 - any failure means: not this device
        return "cpu", f"a one-round XGBoost training on the GPU failed ({type(error).__name__}: {error})"
    if not used.startswith("cuda"):
        said = "; ".join(str(w.message).strip() for w in caught)
        return "cpu", f"a one-round XGBoost training asked for the GPU ran on {used!r}" + (f" ({said})" if said else "")
    return "cuda", f"{status.device_count} GPU(s) found by pynvml, XGBoost built with CUDA, a one-round training ran on {used}"


def choose_device(log: Callable[[str], None] = lambda message: None) -> str:
    """"cuda" when :func:`device_check` passes, else "cpu"; logs which, and why."""
    device, reason = device_check()
    if device == "cuda":
        log(f"XGBoost runs on the GPU (device=cuda): {reason}")
    else:
        log(f"XGBoost runs on the CPU (tree_method=hist): {reason}")
    return device


def xgboost_params(params: BoostingParams, *, n_classes: int, device: str) -> dict:
    """XGBoost parameters equivalent to :func:`lightgbm_backend.lightgbm_params`.

    Mapping from the LightGBM-named :class:`BoostingParams`:
    - learning_rate -> eta; lambda_l2 -> lambda; feature_fraction -> colsample_bytree
      (both sample features once per tree); max_bin -> max_bin (the matrices must be built
      with the same value, see :func:`build_dmatrix`); num_threads -> nthread (0 = the CPUs
      this process may use, core/train/threads.py); seed -> seed;
    - num_leaves -> max_leaves with grow_policy="lossguide" and max_depth=0 (no depth
      limit): leaf-wise growth like LightGBM, instead of XGBoost's default depth-wise;
    - min_data_in_leaf -> min_child_weight = min_data_in_leaf * HESSIAN_PER_ROW (see there);
    - bagging_fraction -> subsample (1 = no row subsampling, both libraries' default);
    - objective softmax -> multi:softprob; ovr -> binary:logistic on one-hot labels, which
      XGBoost trains as one binary output (one tree per class per round) per class, like
      LightGBM's multiclassova; its early-stopping metric is the mean binary logloss.

    External memory grows trees leaf-wise too, although XGBoost's external-memory guide
    recommends depth-wise growth (fewer passes over the cached pages): measured on 428k rows x
    338 features with large pages (benchmarks/external_memory.py), depth 5 was 1.45x faster per
    round but its holdout logloss 5.7% worse after the same rounds, and depth 6 (64 leaves)
    slower than leaf-wise for the same logloss. Large pages are what made it fast.
    """
    objective = (
        {"objective": "multi:softprob", "num_class": n_classes, "eval_metric": "mlogloss"}
        if params.objective == "softmax"
        else {"objective": "binary:logistic", "eval_metric": "logloss"}
    )
    return {
        **objective,
        "tree_method": "hist",
        "device": device,
        "max_bin": params.max_bin,
        "eta": params.learning_rate,
        "grow_policy": "lossguide",
        "max_leaves": params.num_leaves,
        "max_depth": 0,
        "min_child_weight": params.min_data_in_leaf * HESSIAN_PER_ROW,
        "subsample": params.bagging_fraction,
        "colsample_bytree": params.feature_fraction,
        "lambda": params.lambda_l2,
        "nthread": resolve_threads(params.num_threads),
        "seed": params.seed,
        "verbosity": 1,  # warnings only
    }



def best_rounds(booster: xgboost.Booster) -> int:
    """Trees at the best validation score, as a count.

    XGBoost's ``best_iteration`` is the 0-based index of the best round, so the number of
    trees to keep is ``best_iteration + 1`` (LightGBM's ``best_iteration`` is already a count).
    Note also that XGBoost keeps the ``early_stopping_rounds`` trees grown after the best one.
    """
    try:
        return int(booster.best_iteration) + 1
    except AttributeError:  # only defined with early stopping; then all rounds count
        return booster.num_boosted_rounds()


def one_hot_classes(params: BoostingParams, n_classes: int) -> int | None:
    """Classes to one-hot the labels into (one-vs-rest), or None (softmax takes class indices)."""
    return n_classes if params.objective == "ovr" else None



# --- persistence ---------------------------------------------------------------------------


def save_xgboost_model(booster: xgboost.Booster, path: str | Path) -> None:
    """Write the model in XGBoost's native UBJSON format, atomically.

    XGBoost picks the format of ``save_model``/``load_model`` from the file suffix, so the
    path must end in ``.ubj`` (a temporary name would not); the bytes come from
    ``save_raw("ubj")`` and go through :func:`storage.atomic_path`.
    """
    path = Path(path)
    if path.suffix != MODEL_SUFFIX:
        raise ValueError(f"XGBoost models are saved as UBJSON and need a '{MODEL_SUFFIX}' suffix, got {path}")
    raw = booster.save_raw(raw_format="ubj")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            file.write(raw)
            file.flush()
            os.fsync(file.fileno())


def load_xgboost_model(path: str | Path) -> xgboost.Booster:
    """Load a model written by :func:`save_xgboost_model`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; materialize the stage that trains it first")
    booster = xgboost.Booster()
    booster.load_model(bytearray(path.read_bytes()))  # bytes: format detected from content
    return booster


# --- prediction ----------------------------------------------------------------------------


def predict_proba_xgboost(
    booster: xgboost.Booster, features: np.ndarray, iteration_range: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Class probabilities, shape (rows, classes): softmax rows sum to 1, one-vs-rest rows
    are per-class sigmoids (renormalise with :func:`calibration.normalise_rows`).
    ``iteration_range`` (0, 0) means all trees."""
    return np.asarray(booster.inplace_predict(features, predict_type="value", iteration_range=iteration_range))


def predict_raw_xgboost(booster: xgboost.Booster, features: np.ndarray) -> np.ndarray:
    """Raw margins (before softmax / the per-class sigmoid), shape (rows, classes)."""
    return np.asarray(booster.inplace_predict(features, predict_type="margin"))


def predict_contributions_xgboost(booster: xgboost.Booster, features: np.ndarray) -> np.ndarray:
    """TreeSHAP contributions, shape (rows, classes, features + 1); the bias is the last column.

    For multiclass models XGBoost already returns this 3-d shape (LightGBM returns a flat
    (rows, classes * (features + 1))). Summed over the last axis they equal the margins of
    :func:`predict_raw_xgboost`. ``pred_contribs`` is not available through
    ``inplace_predict``, so a (non-binned) DMatrix of ``features`` is built here.
    """
    matrix = xgboost.DMatrix(features, feature_names=booster.feature_names, nthread=resolve_threads(0))
    contributions = booster.predict(matrix, pred_contribs=True)
    if contributions.ndim == 2:  # a single-output model: (rows, features + 1)
        contributions = contributions[:, np.newaxis, :]
    return contributions
