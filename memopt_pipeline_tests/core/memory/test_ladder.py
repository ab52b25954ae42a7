from memopt_pipeline.core.memory.ladder import (
    EVALUATION_LADDER,
    LADDER_TAG,
    MAX_LEVEL,
    MIN_BATCH_ROWS,
    MIN_SHAP_ROWS,
    evaluation_settings_for,
    ladder_level,
    next_level_after_failure,
    settings_for,
)


def test_each_level_lowers_memory_settings_monotonically():
    settings = [settings_for(level, batch_rows=32_768, max_bin=255, bin_sample_rows=50_000) for level in range(MAX_LEVEL + 1)]
    assert settings[0].batch_rows == 32_768 and settings[0].max_bin == 255 and not settings[0].external_memory
    for lower, higher in zip(settings, settings[1:]):
        if not higher.external_memory:  # external memory wants big pages (see core/ladder.py)
            assert higher.batch_rows <= lower.batch_rows
        assert higher.max_bin <= lower.max_bin
        assert higher.bin_sample_rows <= lower.bin_sample_rows
        assert higher != lower
    assert settings[2].max_bin == 63 and settings[2].histogram_pool_mb == 64.0
    assert settings[-1].external_memory


def test_levels_past_the_end_stay_at_the_last_step_and_small_batches_have_a_floor():
    assert settings_for(99, batch_rows=1_000, max_bin=15, bin_sample_rows=2_000).level == MAX_LEVEL
    assert settings_for(2, batch_rows=1_000, max_bin=15, bin_sample_rows=2_000).batch_rows == 256
    assert settings_for(3, batch_rows=1_000, max_bin=15, bin_sample_rows=2_000).max_bin == 15


def test_level_from_retry_number_and_sensor_tag():
    assert ladder_level(0, {}) == 0
    assert ladder_level(2, {}) == 2
    assert ladder_level(0, {LADDER_TAG: "1"}) == 1
    assert ladder_level(1, {LADDER_TAG: "3"}) == 3
    assert ladder_level(7, {}) == MAX_LEVEL
    assert ladder_level(0, {LADDER_TAG: "junk"}) == 0


def test_next_level_after_an_oom_failure_continues_where_the_attempts_stopped():
    assert next_level_after_failure(0, 1) == 1  # one attempt at level 0 (e.g. a killed step)
    assert next_level_after_failure(1, 1) == 2
    assert next_level_after_failure(0, 2) == 2  # levels 0 and 1 tried in the run
    assert next_level_after_failure(0, MAX_LEVEL + 1) is None  # every level tried
    assert next_level_after_failure(MAX_LEVEL, 1) is None


def test_a_tagged_run_retries_one_level_further_per_attempt():
    assert ladder_level(1, {LADDER_TAG: "1"}) == 2  # tagged 1 by the sensor, first step retry
    assert [ladder_level(retry, {LADDER_TAG: "1"}) for retry in range(MAX_LEVEL)] == list(range(1, MAX_LEVEL + 1))
    assert ladder_level(MAX_LEVEL, {LADDER_TAG: str(MAX_LEVEL)}) == MAX_LEVEL  # never above the last level
    assert ladder_level(0, {LADDER_TAG: "-2"}) == 0


def test_next_level_after_failure_follows_the_levels_the_attempts_ran_at():
    for tagged in range(MAX_LEVEL + 1):
        for attempts in range(1, MAX_LEVEL + 2):
            last_attempt = ladder_level(attempts - 1, {LADDER_TAG: str(tagged)})
            expected = None if last_attempt == MAX_LEVEL else last_attempt + 1
            assert next_level_after_failure(tagged, attempts) == expected, (tagged, attempts)
    assert next_level_after_failure(1, 2) == 3  # attempts at levels 1 and 2


def test_the_evaluation_ladder_has_the_training_ladders_levels_and_shrinks_monotonically():
    assert [step.level for step in EVALUATION_LADDER] == list(range(MAX_LEVEL + 1))
    settings = [evaluation_settings_for(level, batch_rows=65_536, shap_rows=2_000) for level in range(MAX_LEVEL + 1)]
    assert settings[0].batch_rows == 65_536 and settings[0].shap_rows == 2_000 and not settings[0].models_one_at_a_time
    for lower, higher in zip(settings, settings[1:]):
        assert higher.batch_rows < lower.batch_rows
        assert higher.shap_rows <= lower.shap_rows
        assert higher.models_one_at_a_time >= lower.models_one_at_a_time
    assert [s.batch_rows for s in settings] == [65_536, 16_384, 8_192, 4_096]
    assert [s.shap_rows for s in settings] == [2_000, 2_000, 1_000, 500]
    assert settings[-1].models_one_at_a_time
    assert evaluation_settings_for(99, batch_rows=65_536, shap_rows=2_000) == settings[-1]


def test_evaluation_settings_have_floors_and_never_exceed_the_configuration():
    assert evaluation_settings_for(MAX_LEVEL, batch_rows=1_000, shap_rows=600).batch_rows == MIN_BATCH_ROWS
    assert evaluation_settings_for(MAX_LEVEL, batch_rows=1_000, shap_rows=600).shap_rows == MIN_SHAP_ROWS
    assert evaluation_settings_for(MAX_LEVEL, batch_rows=100, shap_rows=50).batch_rows == 100
    assert evaluation_settings_for(MAX_LEVEL, batch_rows=100, shap_rows=50).shap_rows == 50
