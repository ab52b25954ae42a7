"""RSS and the kernel's high-water mark of this process."""

import sys

import pytest

from memopt_pipeline.core.memory import measure as memory
from memopt_pipeline.core.units import MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_kernel_peak_is_at_least_current_rss():
    assert memory.kernel_peak_rss_bytes() >= memory.process_rss_bytes() - 4 * MiB


def test_reset_kernel_peak_returns_a_bool_and_does_not_raise():
    assert memory.reset_kernel_peak() in (True, False)

