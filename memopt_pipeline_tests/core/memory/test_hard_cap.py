def test_native_allocation_over_the_hard_cap_is_memory_error_not_a_kill():
    """In a real child process: a 4 GiB allocation under a ~0.5 GiB budget cap fails cleanly."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import numpy as np
        from memopt_pipeline.core.memory.hard_cap import hard_memory_cap
        from memopt_pipeline.core.memory.measure import process_rss_bytes
        import resource
        before = resource.getrlimit(resource.RLIMIT_DATA)
        with hard_memory_cap(process_rss_bytes() + 512 * 2**20) as cap:
            assert cap is not None
            try:
                np.ones(4 * 2**30, dtype=np.uint8)
            except MemoryError as error:
                print("MemoryError", error)
            small = np.ones(64 * 2**20, dtype=np.uint8)  # within the cap: still works
        assert resource.getrlimit(resource.RLIMIT_DATA) == before
        big_after = np.ones(1 * 2**30, dtype=np.uint8)  # cap lifted afterwards
        print("alive", small.sum() + big_after[:1].sum())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "MemoryError Unable to allocate 4.00 GiB" in result.stdout
    assert "alive" in result.stdout

