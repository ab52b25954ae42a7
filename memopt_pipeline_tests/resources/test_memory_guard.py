"""MemoryGuard.metadata: a stage's memory record, with GPU use only where there is a GPU."""

import pytest

from memopt_pipeline.core.memory.gpu import GpuStatus
from memopt_pipeline.core.memory.monitor import StageMonitor
from memopt_pipeline.core.units import GiB
from memopt_pipeline.resources import memory_guard
from memopt_pipeline.resources.memory_guard import MEMORY_METADATA_KEYS, MemoryGuard


@pytest.fixture(scope="module")
def monitor() -> StageMonitor:
    with StageMonitor("stage", 2 * GiB, rss_reader=lambda: GiB // 2, sampler=False, use_kernel_peak=False) as stage:
        stage.check()
    return stage


def test_without_a_gpu_the_stage_metadata_has_no_gpu_entry(monitor, monkeypatch):
    no_gpu = GpuStatus(False, 0, 0, 0, "no GPU: NVML Shared Library Not Found")
    monkeypatch.setattr(memory_guard, "gpu_status", lambda: no_gpu)
    values = MemoryGuard.metadata(monitor, predicted_peak_bytes=GiB)
    assert "gpu" not in values
    assert set(values) <= set(MEMORY_METADATA_KEYS)


def test_with_a_gpu_the_stage_metadata_says_its_use(monitor, monkeypatch):
    monkeypatch.setattr(memory_guard, "gpu_status", lambda: GpuStatus(True, 2, 3 * GiB, 32 * GiB, ""))
    assert MemoryGuard.metadata(monitor)["gpu"] == "2 GPUs: 3.00 of 32.00 GiB in use"
