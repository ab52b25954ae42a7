"""GPU memory status and cache release, safe on machines without a GPU.

Everything here is a probe or a best-effort cleanup: a missing driver, a missing library or
a failing NVML call turns into "no GPU" (with the reason) instead of an exception, because
the pipeline must run the same way on CPU-only machines.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from memopt_pipeline.core.units import GiB

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuStatus:
    """GPU memory summed over all devices NVML reports; ``reason`` says why ``available`` is False."""

    available: bool
    device_count: int
    used_bytes: int
    total_bytes: int
    reason: str

    def summary(self) -> str:
        """One line for metadata: the memory in use, or why there is no GPU."""
        if not self.available:
            return self.reason
        devices = f"{self.device_count} GPUs" if self.device_count > 1 else "1 GPU"
        return f"{devices}: {self.used_bytes / GiB:.2f} of {self.total_bytes / GiB:.2f} GiB in use"


def _unavailable(reason: str) -> GpuStatus:
    return GpuStatus(available=False, device_count=0, used_bytes=0, total_bytes=0, reason=f"no GPU: {reason}")


def gpu_status() -> GpuStatus:
    """Query NVML for device count and memory use; never raises."""
    try:
        import pynvml  # lazy: importing is cheap, but only this probe needs it
    except ImportError as error:
        return _unavailable(f"pynvml is not installed ({error})")

    # NVML failures are pynvml.NVMLError subclasses, but a broken driver install can also
    # surface as OSError from ctypes; a status probe must never take the pipeline down.
    try:
        pynvml.nvmlInit()
    except Exception as error:  # noqa: BLE001
        return _unavailable(f"pynvml could not initialise ({error})")
    try:
        device_count = pynvml.nvmlDeviceGetCount()
        used = total = 0
        for index in range(device_count):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            used += int(info.used)
            total += int(info.total)
    except Exception as error:  # noqa: BLE001
        return _unavailable(f"NVML query failed ({error})")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as error:  # noqa: BLE001
            logger.debug("nvmlShutdown failed: %s", error)

    if device_count == 0:
        return _unavailable("NVML reports no devices")
    return GpuStatus(available=True, device_count=device_count, used_bytes=used, total_bytes=total, reason="")


def gpu_available() -> bool:
    return gpu_status().available


def release_gpu_caches() -> list[str]:
    """Return cached GPU blocks of CuPy / PyTorch to the driver; names what was released.

    Only libraries this process has already imported are touched: a library that was never
    imported holds no cache, and importing torch or cupy here would cost seconds and hundreds
    of MB of RSS inside a function whose job is to free memory. Never raises.
    """
    released: list[str] = []

    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
            released.append("cupy")
        except Exception as error:  # noqa: BLE001 - best-effort cleanup (e.g. CUDA driver missing)
            logger.debug("cupy memory pool release failed: %s", error)

    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                released.append("torch")
        except Exception as error:  # noqa: BLE001 - best-effort cleanup
            logger.debug("torch.cuda.empty_cache failed: %s", error)

    return released
