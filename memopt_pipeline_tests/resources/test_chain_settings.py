"""ChainSettings: the later stages' config classes as one resource, and the checks made at a chain's start."""

import pytest

from memopt_pipeline.assets import FINALIZE_ASSETS, INSTANCE_ASSETS
from memopt_pipeline.resources.chain_settings import ChainSettings


def test_every_configurable_later_stage_is_a_setting_with_the_same_fields():
    # The chain sensors turn chain_settings.<field> into ops.<field>.config of the chained runs,
    # so a stage whose config is missing here could not be configured in a chain at all.
    schemas = {a.key.to_user_string(): a.op.config_schema.as_field().config_type for a in [*INSTANCE_ASSETS, *FINALIZE_ASSETS]}
    configurable = {name: set(schema.fields) for name, schema in schemas.items() if getattr(schema, "fields", None)}
    assert set(ChainSettings.model_fields) == set(configurable)
    for name, fields in configurable.items():
        assert set(ChainSettings.model_fields[name].annotation.model_fields) == fields, name
        assert ChainSettings.model_fields[name].description, name


def test_the_defaults_work_on_instances_big_enough_for_three_folds():
    assert ChainSettings().problems([3, 40]) == []


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cv_folds": {"n_folds": 6}}, "cv_folds: 6 folds needs at least 6 genes per instance, but the smallest instance has 5"),
        ({"cv_folds": {"fast": True}}, "cv_folds: fast mode's validation split needs at least 20 genes per instance"),
        ({"cv_folds": {"n_folds": 1}}, "cv_folds.n_folds is 1: cross-validation needs at least 2 folds"),
        (
            {"instance_model": {"quantized_gradients": True, "bagging_fraction": 0.5}},
            "instance_model: quantized_gradients cannot be combined with bagging",
        ),
        ({"instance_model": {"num_threads": -1}}, "instance_model: num_threads must be 0"),
    ],
)
def test_settings_that_cannot_work_are_named_with_the_fix(settings, message):
    [problem] = ChainSettings(**settings).problems([5, 7])
    assert problem.startswith(message)
