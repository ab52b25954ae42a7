"""Per-round callbacks for the boosting libraries: the memory check point and progress lines."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from memopt_pipeline.core.memory.measure import process_rss_bytes
from memopt_pipeline.core.memory.monitor import StageMonitor
from memopt_pipeline.core.units import GiB

if TYPE_CHECKING:
    import lightgbm as lgb
    import xgboost


def lightgbm_callback(monitor: StageMonitor) -> Callable[[Any], None]:
    """LightGBM callback running ``monitor.check()`` after every boosting round.

    MemoryBudgetExceeded propagates out of ``lightgbm.train`` (only EarlyStopException is
    caught there).
    """

    def check_memory(env: Any) -> None:
        monitor.check()

    # LightGBM sorts callbacks by `order`; its built-ins use 10 (logging), 20 (recording)
    # and 30 (early stopping). 0 puts the check first, so no work is done for a round that
    # has already blown the budget.
    check_memory.order = 0
    check_memory.before_iteration = False
    return check_memory


def xgboost_callback(monitor: StageMonitor) -> xgboost.callback.TrainingCallback:
    """XGBoost callback running ``monitor.check()`` after every boosting round."""
    import xgboost  # lazy: LightGBM-only runs should not pay for importing xgboost

    class MemoryCheckCallback(xgboost.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            monitor.check()
            return False  # False = keep training; stopping is done by raising

    return MemoryCheckCallback()


def lightgbm_progress_callback(log: Callable[[str], None], label: str, total_rounds: int, every_seconds: float = 10.0):
    """LightGBM callback logging the round, rate, time left and RSS at most every ``every_seconds``."""
    state = {"last": time.monotonic(), "start": time.monotonic()}

    def callback(env: lgb.callback.CallbackEnv) -> None:
        now = time.monotonic()
        if now - state["last"] >= every_seconds:
            done = env.iteration + 1
            rate = done / max(now - state["start"], 1e-9)
            log(
                f"{label}: round {done}/{total_rounds} ({rate:.1f} rounds/s, at most {(total_rounds - done) / rate:.0f} s left), "
                f"RSS {process_rss_bytes() / GiB:.2f} GiB"
            )
            state["last"] = now

    callback.order = 40  # after evaluation, before early stopping's check
    return callback



def xgboost_progress_callback(
    log: Callable[[str], None], label: str, total_rounds: int, every_seconds: float = 10.0
) -> xgboost.callback.TrainingCallback:
    """XGBoost callback logging the round, rate and time left at most every ``every_seconds``."""
    import xgboost  # lazy: LightGBM-only runs should not pay for importing xgboost

    class ProgressCallback(xgboost.callback.TrainingCallback):
        """Logs the round, rate and time left at most every ``every_seconds``."""

        def __init__(self, log: Callable[[str], None], label: str, total_rounds: int, every_seconds: float = 10.0):
            super().__init__()
            self.log, self.label, self.total_rounds, self.every_seconds = log, label, total_rounds, every_seconds
            self.start = self.last = time.monotonic()

        def after_iteration(self, model, epoch: int, evals_log) -> bool:
            now = time.monotonic()
            if now - self.last >= self.every_seconds:
                done = epoch + 1
                rate = done / max(now - self.start, 1e-9)
                self.log(
                    f"{self.label}: round {done}/{self.total_rounds} ({rate:.1f} rounds/s, "
                    f"at most {(self.total_rounds - done) / rate:.0f} s left)"
                )
                self.last = now
            return False

    return ProgressCallback(log, label, total_rounds, every_seconds)
