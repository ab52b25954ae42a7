"""Reading this process's memory: RSS, the kernel's high-water mark (VmHWM) and data segment (VmData)."""

from __future__ import annotations

import os
import re

import psutil

_VMHWM_PATTERN = re.compile(rb"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)

_process: psutil.Process | None = None


def process_rss_bytes() -> int:
    """Current resident set size of this process."""
    global _process
    # Reuse the Process object (creating one costs more than the read itself); a forked
    # child has a new pid and must not report its parent.
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return _process.memory_info().rss


def physical_memory_bytes() -> int:
    return psutil.virtual_memory().total


def kernel_peak_rss_bytes() -> int | None:
    """The kernel's peak RSS of this process (VmHWM), or None where /proc is unavailable."""
    try:
        with open("/proc/self/status", "rb") as status:
            match = _VMHWM_PATTERN.search(status.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_kernel_peak() -> bool:
    """Reset VmHWM to the current RSS ("5" > /proc/self/clear_refs); False where not permitted."""
    # "5" only resets the peak counter; it does not touch page flags like the other values.
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # no /proc, no permission, or a kernel older than 4.0
        return False
    return True


def virtual_data_bytes() -> int | None:
    """VmData (private writable mappings: heap, anonymous mmaps) from /proc/self/status."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

