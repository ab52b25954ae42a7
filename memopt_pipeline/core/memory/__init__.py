"""Staying inside the memory budget, and explaining it when the process did not.

Covers: the limits that apply (physical RAM, cgroup ``memory.max``) and the budget derived
from them; RSS measurement and the kernel's high-water mark; releasing memory (gc,
``malloc_trim``, Arrow pool, GPU caches); the per-stage monitor with its cleanup and abort
thresholds; the RLIMIT_DATA hard cap; leak tracking across stages; classifying a failure as
out-of-memory; the downshift ladder; the planner that sizes a run before anything is loaded;
concurrency sizing from the plan; GPU discovery (pynvml), which degrades to "no GPU".

Does not cover: spilling or pausing work (unlike a dask worker, a stage cannot give its data
away: it can only clean up or stop cleanly at a check point), retries themselves (Dagster's
RetryPolicy runs them; this package only says which ladder level comes next), nor any model
library: the boosting-round callbacks that call the monitor live in ``core.train.callbacks``.
"""
