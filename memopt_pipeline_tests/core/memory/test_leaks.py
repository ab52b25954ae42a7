from memopt_pipeline.core.memory.leaks import LeakTracker
from memopt_pipeline.core.units import GiB


def test_leak_tracker_warns_with_numbers_only_past_the_threshold():
    tracker = LeakTracker(threshold_bytes=GiB // 4)
    assert tracker.record("instance_model [instance_0]", GiB) is None
    assert tracker.record("instance_model [instance_1]", GiB + GiB // 8) is None
    warning = tracker.record("instance_model [instance_2]", GiB + GiB // 2)
    assert warning is not None
    assert "1.50 GiB after instance_model [instance_2]" in warning
    assert "0.50 GiB more than after instance_model [instance_0] (1.00 GiB)" in warning
    assert "over 3 stages" in warning
