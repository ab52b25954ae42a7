import pytest

from memopt_pipeline.core.memory import monitor


@pytest.fixture
def releases(monkeypatch) -> list[int]:
    """Replaces release_memory with a counter: one entry per call."""
    calls: list[int] = []

    def fake_release_memory() -> dict:
        calls.append(1)
        return {"rss_before": 0, "rss_after": 0, "freed_bytes": 0, "gc_objects": 0, "malloc_trim": False}

    monkeypatch.setattr(monitor, "release_memory", fake_release_memory)
    return calls

