"""feature_screening hands its memory guard's check to the screening."""

import dagster as dg

from memopt_pipeline.assets import ALL_ASSETS, PREPARE_ASSETS, feature_screening
from memopt_pipeline.assets import screening as screening_assets
from memopt_pipeline.core.memory.monitor import StageMonitor
from memopt_pipeline.definitions import build_resources


def test_feature_screening_runs_the_guards_check(tiny_dataset, tmp_path, monkeypatch):
    real, checkpoints = screening_assets.screen_features, []

    def screen_features(*args, checkpoint=None, **kwargs):
        checkpoints.append(checkpoint)
        return real(*args, checkpoint=checkpoint, **kwargs)

    monkeypatch.setattr(screening_assets, "screen_features", screen_features)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ALL_ASSETS, selection=PREPARE_ASSETS[: PREPARE_ASSETS.index(feature_screening) + 1], instance=instance,
            resources=build_resources(output_dir=str(tmp_path / "out")),
            run_config={"ops": {"source_dataset": {"config": {"path": str(tiny_dataset)}}}},
        )
    assert result.success
    [checkpoint] = checkpoints
    assert isinstance(checkpoint.__self__, StageMonitor) and checkpoint.__name__ == "check"
    assert checkpoint.__self__.stage == "feature_screening"
