from memopt_pipeline.core.memory import release as memory


def test_release_memory_reports_documented_keys():
    result = memory.release_memory()
    assert {"rss_before", "rss_after", "freed_bytes", "gc_objects", "malloc_trim"} <= set(result)
    assert result["rss_before"] > 0 and result["rss_after"] > 0
    assert result["freed_bytes"] == max(0, result["rss_before"] - result["rss_after"])
    assert isinstance(result["malloc_trim"], bool)

