"""Fakes for memory tests: a scripted RSS reader and a monitor without sampler or kernel peak."""

from __future__ import annotations

from memopt_pipeline.core.memory.monitor import StageMonitor, Thresholds
from memopt_pipeline.core.units import GiB

BUDGET = 10 * GiB  # with default thresholds: cleanup above 7 GiB, abort above 9 GiB


class FakeRSS:
    """RSS reader returning ``values`` in order, then repeating the last; ``value`` sets a new constant."""

    def __init__(self, *values: int):
        self._values = list(values)
        self.reads = 0

    @property
    def value(self) -> int:
        return self._values[0]

    @value.setter
    def value(self, rss: int) -> None:
        self._values = [rss]

    def __call__(self) -> int:
        self.reads += 1
        return self._values.pop(0) if len(self._values) > 1 else self._values[0]


def fake_monitor(reader: FakeRSS, thresholds: Thresholds = Thresholds(), **kwargs) -> StageMonitor:
    return StageMonitor("train", BUDGET, thresholds, rss_reader=reader, sampler=False, use_kernel_peak=False, **kwargs)

