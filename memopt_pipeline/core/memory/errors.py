"""The one exception a stage raises when it stops itself for memory, and the fix it suggests."""

from __future__ import annotations

from memopt_pipeline.core.units import GiB

DEFAULT_ADVICE = "raise the memory budget, lower batch_rows / max_bin, or split the data over more instances"


class MemoryBudgetExceeded(RuntimeError):
    """Raised at a cooperative check point when process RSS passes the abort threshold. Retryable.

    ``current_rss_bytes`` is set when the background sampler saw the over-threshold RSS
    between check points and RSS has since dropped; ``rss_bytes`` is then that sampled peak.
    """

    def __init__(
        self,
        stage: str,
        rss_bytes: int,
        budget_bytes: int,
        abort_bytes: int,
        advice: str = "",
        current_rss_bytes: int | None = None,
    ):
        self.stage = stage
        self.rss_bytes = rss_bytes
        self.budget_bytes = budget_bytes
        self.abort_bytes = abort_bytes
        self.advice = advice
        self.current_rss_bytes = current_rss_bytes
        if current_rss_bytes is None:
            observed = f"process RSS reached {rss_bytes / GiB:.2f} GiB"
        else:
            observed = (
                f"process RSS peaked at {rss_bytes / GiB:.2f} GiB between check points "
                f"({current_rss_bytes / GiB:.2f} GiB now)"
            )
        super().__init__(
            f"Stage '{stage}' exceeded its memory budget: {observed}, above the abort threshold of "
            f"{abort_bytes / GiB:.2f} GiB ({abort_bytes / budget_bytes:.0%} of the {budget_bytes / GiB:.2f} GiB "
            f"budget). The stage was stopped at a check point before the OS could kill the process, "
            f"so it can be retried. To fix: {advice or DEFAULT_ADVICE}."
        )

    def __reduce__(self):
        # The constructor takes the fields, not the message: pickle (e.g. across a process
        # pool) must rebuild from the fields.
        fields = (self.stage, self.rss_bytes, self.budget_bytes, self.abort_bytes, self.advice, self.current_rss_bytes)
        return (type(self), fields)
