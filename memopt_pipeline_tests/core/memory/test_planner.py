import pytest

from memopt_pipeline.core.memory.planner import GiB, MiB, PlanError, check_free_disk, make_plan, training_footprint

SHAPE = dict(n_features=300, n_classes=3, baseline_bytes=300 * MiB)


def test_plan_keeps_predicted_training_peak_under_budget_times_safety():
    plan = make_plan(dataset_rows=2_000_000, budget_bytes=1 * GiB, **SHAPE)
    assert plan.training_peak(plan.max_rows_per_instance) <= plan.budget_bytes * plan.safety
    assert plan.training_peak(plan.max_rows_per_instance + 100_000) > plan.budget_bytes * plan.safety


def test_data_bigger_than_budget_needs_several_instances():
    plan = make_plan(dataset_rows=2_000_000, budget_bytes=1 * GiB, **SHAPE)
    assert plan.strategy == "multi_instance"
    assert plan.min_instances_full_data >= 2
    assert plan.predicted_peak_full_data > plan.budget_bytes
    # 10% overlap means more rows in total, so never fewer instances.
    assert plan.instances_needed(2_000_000, overlap=0.1) >= plan.instances_needed(2_000_000)


def test_small_data_fits_one_instance():
    plan = make_plan(dataset_rows=50_000, budget_bytes=4 * GiB, **SHAPE)
    assert plan.strategy == "in_memory"
    assert plan.instances_needed(50_000) == 1


def test_more_budget_allows_more_rows_and_fewer_bins_allow_more_rows():
    small = make_plan(dataset_rows=1, budget_bytes=1 * GiB, **SHAPE)
    large = make_plan(dataset_rows=1, budget_bytes=2 * GiB, **SHAPE)
    nibble = make_plan(dataset_rows=1, budget_bytes=1 * GiB, max_bin=15, **SHAPE)
    assert large.max_rows_per_instance > small.max_rows_per_instance
    assert nibble.max_rows_per_instance > small.max_rows_per_instance


def test_budget_too_small_names_the_smallest_budget_that_works():
    with pytest.raises(PlanError, match=r"smallest budget that works is (\d+\.\d+) GiB") as error:
        make_plan(dataset_rows=1_000_000, budget_bytes=200 * MiB, **SHAPE)
    needed_gib = float(error.value.args[0].split("smallest budget that works is ")[1].split(" GiB")[0])
    plan = make_plan(dataset_rows=1_000_000, budget_bytes=int((needed_gib + 0.01) * GiB), **SHAPE)
    assert plan.max_rows_per_instance >= 1_000


def test_footprint_matches_the_design_memory_model():
    footprint = training_footprint(
        rows=1_000_000, n_features=300, n_classes=3, max_bin=255, num_leaves=63,
        batch_rows=10_000, bin_sample_rows=50_000, baseline_bytes=0,
    )
    assert footprint.binned_data == 300_000_000  # one byte per cell at max_bin <= 255
    assert footprint.per_row_state == 1_000_000 * 3 * 24
    assert footprint.histograms == 63 * 300 * 255 * 16
    assert footprint.transient == 50_000 * 300 * 16  # the bin sample dominates one batch here


def test_free_disk_check_fails_early_with_the_numbers(tmp_path):
    assert check_free_disk(tmp_path, 1) > 1
    with pytest.raises(PlanError, match=r"GiB free but checkpoints and caches need about .* choose another output folder"):
        check_free_disk(tmp_path, 10**18)


def test_plan_estimates_disk_and_shap_memory():
    plan = make_plan(dataset_rows=2_000_000, budget_bytes=1 * GiB, **SHAPE)
    assert plan.disk_needed_bytes > 2_000_000 * 300  # at least one binned copy for caches
    assert plan.shap_peak(10_000) > plan.shap_peak(1_000) > plan.baseline_bytes


def test_when_no_in_memory_instance_fits_the_plan_chooses_external_memory():
    # 0.62 GiB: baseline + bin sample + histograms leave room for < 1,000 binned rows, but
    # external memory needs only per-row state + histograms + one batch.
    plan = make_plan(dataset_rows=1_000_000, budget_bytes=int(0.62 * GiB), **SHAPE)
    assert plan.strategy == "external_memory"
    assert plan.instances_needed(1_000_000, overlap=0.1) == 1
    assert plan.max_rows_per_instance == 1_000_000


def test_lightgbm_layout_spends_headroom_on_cut_folds_then_row_wise_and_stays_under_budget():
    plan = make_plan(dataset_rows=2_000_000, n_features=300, n_classes=3, budget_bytes=4 * GiB, baseline_bytes=GiB // 4)
    usable = plan.budget_bytes * plan.safety
    binned = 300  # bytes per row at max_bin 255
    full = plan.lightgbm_layout(plan.max_rows_per_instance)  # the instance fills the plan: no room left
    assert not full.cut_folds and not full.row_wise and full.predicted_peak == plan.training_peak(plan.max_rows_per_instance)
    small = plan.max_rows_per_instance // 4  # room for two more binned copies
    both = plan.lightgbm_layout(small)
    assert both.cut_folds and both.row_wise
    assert both.predicted_peak == plan.training_peak(small) + 2 * small * binned <= usable
    # Room for one copy only: folds are cut (fewer passes over the data), histograms stay column-wise.
    rows = next(
        r for r in range(plan.max_rows_per_instance, 0, -1_000)
        if plan.training_peak(r) + r * binned <= usable < plan.training_peak(r) + 2 * r * binned
    )
    one = plan.lightgbm_layout(rows)
    assert one.cut_folds and not one.row_wise and one.predicted_peak <= usable


def test_external_memory_bin_sample_fits_in_the_raw_batch_the_peak_counts():
    from memopt_pipeline.core.memory.planner import (
        RAW_BATCH_COPIES,
        XGBOOST_SAMPLE_BYTES_PER_CELL,
        external_memory_bin_sample_rows,
    )

    for batch_rows in (17_000, 65_536):
        rows = external_memory_bin_sample_rows(batch_rows=batch_rows, bin_sample_rows=50_000, max_bin=255)
        assert 5_000 < rows <= 50_000
        assert rows * XGBOOST_SAMPLE_BYTES_PER_CELL <= batch_rows * 4 * RAW_BATCH_COPIES
    # Too small a batch for a sample worth its bins: none, XGBoost sketches each matrix.
    assert external_memory_bin_sample_rows(batch_rows=1_024, bin_sample_rows=50_000, max_bin=255) == 0
    # A smaller max_bin needs fewer rows per edge set.
    assert external_memory_bin_sample_rows(batch_rows=8_192, bin_sample_rows=50_000, max_bin=63) > 0


def test_external_memory_pages_use_half_the_room_left_and_the_peak_counts_them():
    from memopt_pipeline.core.memory.planner import MAX_PAGE_ROWS, PAGE_BYTES_PER_CELL

    plan = make_plan(dataset_rows=1_000_000, budget_bytes=int(0.62 * GiB), **SHAPE)
    assert plan.strategy == "external_memory"
    usable = plan.budget_bytes * plan.safety
    page_rows = plan.external_memory_page_rows(1_000_000)
    assert plan.batch_rows < page_rows <= MAX_PAGE_ROWS
    without_page = plan.external_memory_training_peak(1_000_000, page_rows=0)
    with_page = plan.external_memory_training_peak(1_000_000)
    assert with_page - without_page == page_rows * SHAPE["n_features"] * PAGE_BYTES_PER_CELL
    assert with_page <= usable and with_page - without_page == pytest.approx((usable - without_page) / 2, rel=0.01)
    # No room at all: one reader batch per page.
    assert plan.external_memory_page_rows(50_000_000) == plan.batch_rows


# --- ensemble or external memory -------------------------------------------------------------


def test_an_ensemble_of_large_instances_is_chosen_over_slower_external_memory():
    from memopt_pipeline.core.memory.planner import choose_strategy

    strategy, why = choose_strategy(dataset_rows=4_000_000, max_rows=1_100_000, external_fits=True,
                                    min_ensemble_instance_rows=500_000)
    assert strategy == "multi_instance"
    assert "4 in-memory instances of about 1,000,000 rows" in why and "external-memory model would take" in why


def test_instances_too_small_for_the_quality_rule_give_way_to_external_memory_when_it_fits():
    from memopt_pipeline.core.memory.planner import choose_strategy

    strategy, why = choose_strategy(dataset_rows=4_000_000, max_rows=300_000, external_fits=True,
                                    min_ensemble_instance_rows=500_000)
    assert strategy == "external_memory"
    assert "14 in-memory instances" in why and "fewer than 500,000 rows" in why and "0.5%" in why
    # External memory does not fit: the ensemble, with the expected loss said.
    strategy, why = choose_strategy(dataset_rows=4_000_000, max_rows=300_000, external_fits=False,
                                    min_ensemble_instance_rows=500_000)
    assert strategy == "multi_instance" and "does not fit the budget either" in why
    # The rule turned off: always the ensemble when its instances fit.
    assert choose_strategy(dataset_rows=4_000_000, max_rows=300_000, external_fits=True,
                           min_ensemble_instance_rows=0)[0] == "multi_instance"


def test_the_plan_records_its_choice_and_follows_the_quality_rule():
    # 1 GiB: instances of about 330k rows for 2M rows x 300 features.
    ensemble = make_plan(dataset_rows=2_000_000, budget_bytes=1 * GiB, min_ensemble_instance_rows=100_000, **SHAPE)
    assert ensemble.strategy == "multi_instance" and ensemble.max_rows_per_instance > 100_000
    assert ensemble.choice.startswith(f"{ensemble.min_instances_full_data} in-memory instances")
    external = make_plan(dataset_rows=2_000_000, budget_bytes=1 * GiB, min_ensemble_instance_rows=1_000_000, **SHAPE)
    assert external.strategy == "external_memory"
    assert external.instances_needed(1_600_000, overlap=0.1) == 1  # one model of all training rows
    assert external.external_memory_training_peak(2_000_000) <= external.budget_bytes * external.safety
    assert "external-memory model of all rows instead" in external.choice
    # A plan stored before the choice was recorded still loads.
    payload = ensemble.to_dict()
    del payload["choice"]
    assert type(ensemble).from_dict(payload).choice == ""
