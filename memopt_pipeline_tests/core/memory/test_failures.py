import subprocess
import sys

import pyarrow as pa
import pytest

from memopt_pipeline.core.memory.errors import MemoryBudgetExceeded
from memopt_pipeline.core.memory.failures import (
    exception_is_out_of_memory,
    exit_is_out_of_memory,
    text_is_out_of_memory,
)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        pa.ArrowMemoryError("malloc of size 1024 failed"),
        MemoryBudgetExceeded("instance_model", 10, 8, 9),
        RuntimeError("std::bad_alloc"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        ValueError("Unable to allocate 997. MiB for an array with shape (870000, 300)"),
    ],
)
def test_out_of_memory_exceptions(error):
    assert exception_is_out_of_memory(error)


def test_wrapped_memory_error_is_found_through_the_cause_chain():
    try:
        try:
            raise MemoryError()
        except MemoryError as inner:
            raise RuntimeError("step failed") from inner
    except RuntimeError as outer:
        assert exception_is_out_of_memory(outer)


@pytest.mark.parametrize("error", [ValueError("bad column"), KeyError("gene_id"), RuntimeError("LightGBM: label out of range")])
def test_other_exceptions_are_not_out_of_memory(error):
    assert not exception_is_out_of_memory(error)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Multiprocess executor: child process for step instance_model unexpectedly exited with code -9", True),
        ("process finished with exit code 137", True),
        ("child process unexpectedly exited with code -6\nmemory allocation of 8589934592 bytes failed", True),
        ("child process unexpectedly exited with code -6\nassertion failed", False),
        ("DatasetError: column 'x' holds infinite values", False),
        ("exit code 1", False),
        ("", False),
    ],
)
def test_failure_text(text, expected):
    assert text_is_out_of_memory(text) is expected


def test_real_sigkilled_child_is_out_of_memory():
    child = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert child.returncode == -9
    assert exit_is_out_of_memory(child.returncode)
    assert not exit_is_out_of_memory(1, "ValueError: nope")
    assert exit_is_out_of_memory(134, "memory allocation of 1024 bytes failed")
    assert not exit_is_out_of_memory(0)


def test_a_kill_is_out_of_memory_only_with_evidence():
    from memopt_pipeline.core.memory.failures import classify_kill

    budget = 4 * 2**30
    near = {"rss_bytes": int(0.93 * budget), "budget_bytes": budget}
    far = {"rss_bytes": int(0.10 * budget), "budget_bytes": budget}
    assert classify_kill(near) == (True, "out of memory: last RSS sample 3.72 GiB, 93% of the 4.00 GiB budget")
    out_of_memory, why = classify_kill(far)
    assert not out_of_memory and why.startswith("killed, not out of memory: last RSS sample 0.40 GiB")
    assert classify_kill(None)[0] is False
    # The cgroup's OOM-kill counter is evidence on its own, whatever the last sample said.
    assert classify_kill(far, oom_kills_before=2, oom_kills_after=3)[0] is True
    assert classify_kill(far, oom_kills_before=2, oom_kills_after=2)[0] is False


def test_oom_kill_count_is_read_from_cgroup_v2_and_v1_files(tmp_path):
    from memopt_pipeline.core.memory.limits import cgroup_oom_kill_count

    (tmp_path / "v2" / "job").mkdir(parents=True)
    (tmp_path / "v2" / "job" / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    (tmp_path / "cg2").write_text("0::/job\n")
    assert cgroup_oom_kill_count(tmp_path / "cg2", tmp_path / "v2") == 2
    (tmp_path / "v1" / "memory" / "docker").mkdir(parents=True)
    (tmp_path / "v1" / "memory" / "docker" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    (tmp_path / "cg1").write_text("4:memory:/docker\n0::/\n")
    assert cgroup_oom_kill_count(tmp_path / "cg1", tmp_path / "v1") == 5
    assert cgroup_oom_kill_count(tmp_path / "missing") is None
