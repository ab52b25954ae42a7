"""GPU probe: no GPU on the test machine, plus fake pynvml modules for the other paths."""

from __future__ import annotations

import sys
import types

import pytest

from memopt_pipeline.core.memory.gpu import GpuStatus, gpu_available, gpu_status, release_gpu_caches
from memopt_pipeline.core.units import GiB


class FakeNVMLError(Exception):
    pass


def fake_pynvml(*, devices: list[tuple[int, int]], init_error: str | None = None) -> types.ModuleType:
    """A pynvml stand-in reporting ``devices`` as (used, total) bytes; records calls."""
    module = types.ModuleType("pynvml")
    module.NVMLError = FakeNVMLError
    module.calls = []

    def nvmlInit():
        module.calls.append("init")
        if init_error is not None:
            raise FakeNVMLError(init_error)

    def nvmlDeviceGetMemoryInfo(handle):
        used, total = devices[handle]
        return types.SimpleNamespace(used=used, total=total, free=total - used)

    module.nvmlInit = nvmlInit
    module.nvmlShutdown = lambda: module.calls.append("shutdown")
    module.nvmlDeviceGetCount = lambda: len(devices)
    module.nvmlDeviceGetHandleByIndex = lambda index: index
    module.nvmlDeviceGetMemoryInfo = nvmlDeviceGetMemoryInfo
    return module


def test_real_machine_without_gpu_reports_unavailable_with_reason():
    status = gpu_status()
    if status.available:
        pytest.skip("this machine has a GPU")
    assert status == GpuStatus(False, 0, 0, 0, status.reason)
    assert status.reason.startswith("no GPU: ")
    assert not gpu_available()


def test_fake_device_memory_is_reported_and_nvml_shut_down(monkeypatch):
    module = fake_pynvml(devices=[(3 * GiB, 16 * GiB)])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert gpu_status() == GpuStatus(True, 1, 3 * GiB, 16 * GiB, "")
    assert gpu_available()
    assert module.calls == ["init", "shutdown", "init", "shutdown"]


def test_memory_is_summed_over_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices=[(1 * GiB, 8 * GiB), (2 * GiB, 8 * GiB)]))
    status = gpu_status()
    assert (status.device_count, status.used_bytes, status.total_bytes) == (2, 3 * GiB, 16 * GiB)


def test_init_failure_is_unavailable_not_an_exception(monkeypatch):
    module = fake_pynvml(devices=[], init_error="NVML Shared Library Not Found")
    monkeypatch.setitem(sys.modules, "pynvml", module)
    status = gpu_status()
    assert not status.available
    assert status.reason == "no GPU: pynvml could not initialise (NVML Shared Library Not Found)"
    assert module.calls == ["init"]  # nothing to shut down


def test_query_failure_still_shuts_nvml_down(monkeypatch):
    module = fake_pynvml(devices=[(0, GiB)])

    def failing_count():
        raise FakeNVMLError("GPU is lost")

    module.nvmlDeviceGetCount = failing_count
    monkeypatch.setitem(sys.modules, "pynvml", module)
    status = gpu_status()
    assert not status.available and "GPU is lost" in status.reason
    assert module.calls == ["init", "shutdown"]


def test_zero_devices_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices=[]))
    assert gpu_status().reason == "no GPU: NVML reports no devices"


def test_missing_pynvml_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    status = gpu_status()
    assert not status.available and "pynvml is not installed" in status.reason


def test_release_gpu_caches_without_gpu_libraries_imports_nothing(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert release_gpu_caches() == []
    assert "cupy" not in sys.modules and "torch" not in sys.modules


def test_release_gpu_caches_frees_imported_libraries_and_survives_failures(monkeypatch):
    freed = []
    pool = types.SimpleNamespace(free_all_blocks=lambda: freed.append("pool"))
    fake_cupy = types.SimpleNamespace(get_default_memory_pool=lambda: pool, get_default_pinned_memory_pool=lambda: pool)

    def broken_empty_cache():
        raise RuntimeError("CUDA driver gone")

    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True, empty_cache=broken_empty_cache))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert release_gpu_caches() == ["cupy"]
    assert freed == ["pool", "pool"]
