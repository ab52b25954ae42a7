import pytest

from memopt_pipeline.core.memory.planner import GiB, MiB, PlanError, check_free_disk, make_plan, training_footprint

SHAPE = dict(n_features=300, n_classes=3, baseline_bytes=300 * MiB)


def test_plan_keeps_predicted_training_peak_under_budget_times_safety():
    plan = make_plan(dataset_rows=2_000_000, budget_bytes=1 * GiB, **SHAPE)
    usable = plan.budget_bytes * plan.safety
    layout = plan.lightgbm_layout(plan.max_rows_per_instance)
    # Sized for a layout: that layout fits the largest instance, and 100k more rows would not.
    assert layout.describe() == plan.instance_layout
    assert layout.predicted_peak <= usable
    assert plan.training_peak(
        plan.max_rows_per_instance + 100_000, cut_folds=layout.cut_folds, row_wise=layout.row_wise
    ) > usable


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
    assert footprint.raw_batch == 10_000 * 300 * 4 * 3
    assert footprint.bin_sample == 50_000 * 300 * 16
    # The sample is freed before any row is binned: it is not added to the binned rows.
    assert footprint.total == 300_000_000 + 1_000_000 * 3 * 24 + 63 * 300 * 255 * 16 + 10_000 * 300 * 4 * 3
    few = training_footprint(
        rows=10_000, n_features=300, n_classes=3, max_bin=255, num_leaves=7,
        batch_rows=1_000, bin_sample_rows=50_000, baseline_bytes=0,
    )
    assert few.total == few.bin_sample == 10_000 * 300 * 16  # a small instance: its sample is the peak


def test_binned_copies_of_each_layout():
    from memopt_pipeline.core.memory.planner import binned_copies

    # Streamed folds, column-wise: the fold's training + validation rows, i.e. the instance once.
    assert binned_copies(cut_folds=False, row_wise=False) == 1
    # Cut: the instance binned once beside the fold's sets.
    assert binned_copies(cut_folds=True, row_wise=False) == 2
    # Row-wise: two copies of the rows trained on; the refit (all rows) is the larger phase.
    assert binned_copies(cut_folds=False, row_wise=True) == 3
    # Both, 3 folds: 2 + 2 x 2/3 during the folds beats the refit's 3.
    assert binned_copies(cut_folds=True, row_wise=True, train_share=2 / 3) == pytest.approx(2 + 4 / 3)
    assert binned_copies(cut_folds=True, row_wise=True, train_share=0.95) == pytest.approx(3.9)


def test_free_disk_check_fails_early_with_the_numbers(tmp_path):
    assert check_free_disk(tmp_path, 1) > 1
    with pytest.raises(PlanError, match=r"GiB free but checkpoints and caches need about .* choose another output folder"):
        check_free_disk(tmp_path, 10**18)


def test_plan_estimates_disk_and_shap_memory():
    plan = make_plan(dataset_rows=2_000_000, budget_bytes=1 * GiB, **SHAPE)
    assert plan.disk_needed_bytes > 2_000_000 * 300  # at least one binned copy for caches
    assert plan.shap_peak(10_000) > plan.shap_peak(1_000) > plan.baseline_bytes


def test_when_no_in_memory_instance_fits_the_plan_chooses_external_memory():
    # 0.58 GiB: baseline + the bin sample alone exceed budget x safety (no in-memory instance), but
    # external memory needs only per-row state + histograms + one batch.
    plan = make_plan(dataset_rows=1_000_000, budget_bytes=int(0.58 * GiB), **SHAPE)
    assert plan.strategy == "external_memory"
    assert plan.instances_needed(1_000_000, overlap=0.1) == 1
    assert plan.max_rows_per_instance == 1_000_000


def test_lightgbm_layout_spends_headroom_on_row_wise_then_cut_folds_and_stays_under_budget():
    plan = make_plan(dataset_rows=2_000_000, n_features=300, n_classes=3, budget_bytes=4 * GiB, baseline_bytes=GiB // 4)
    usable = plan.budget_bytes * plan.safety

    def fits(rows, cut, row):
        return plan.training_peak(rows, cut_folds=cut, row_wise=row) <= usable

    # Descending row counts, so the first hit is the largest instance with that much headroom.
    def rows_where(condition):
        return next(r for r in range(3 * plan.max_rows_per_instance, 0, -1_000) if condition(r))

    both = plan.lightgbm_layout(rows_where(lambda r: fits(r, True, True)))
    assert both.cut_folds and both.row_wise and both.predicted_peak <= usable
    # Room for row-wise but not for cutting the folds as well: row-wise (the bigger speed-up).
    rows = rows_where(lambda r: fits(r, False, True) and not fits(r, True, True))
    one = plan.lightgbm_layout(rows)
    assert one.row_wise and not one.cut_folds
    assert one.predicted_peak == plan.training_peak(rows, row_wise=True) <= usable
    # No room for row-wise: folds cut, column-wise; no room for that either: the least memory.
    rows = rows_where(lambda r: fits(r, True, False) and not fits(r, False, True))
    assert plan.lightgbm_layout(rows).cut_folds and not plan.lightgbm_layout(rows).row_wise
    rows = rows_where(lambda r: not fits(r, True, False))
    least = plan.lightgbm_layout(rows)
    assert not least.cut_folds and not least.row_wise and least.predicted_peak == plan.training_peak(rows)


def test_instances_are_sized_for_the_fastest_layout_that_keeps_them_large_enough():
    shape = dict(dataset_rows=2_000_000, n_features=300, n_classes=3, budget_bytes=2 * GiB, baseline_bytes=GiB // 4)
    plan = make_plan(**shape, min_ensemble_instance_rows=250_000)
    assert plan.max_rows_per_instance >= 250_000
    assert plan.instance_layout == "folds cut from the instance binned once; row-wise histograms"
    layout = plan.lightgbm_layout(plan.max_rows_per_instance)
    assert layout.cut_folds and layout.row_wise
    # Demanding instances larger than the fast layouts allow: sized for the least memory, more rows each.
    big = make_plan(**shape, min_ensemble_instance_rows=1_500_000)
    assert big.instance_layout.endswith("column-wise histograms")
    assert big.max_rows_per_instance >= 1_500_000 > plan.max_rows_per_instance
    assert not big.lightgbm_layout(big.max_rows_per_instance).row_wise


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

    plan = make_plan(dataset_rows=1_000_000, budget_bytes=int(0.58 * GiB), **SHAPE)
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
    from memopt_pipeline.core.memory.strategy import choose_strategy

    strategy, why = choose_strategy(dataset_rows=4_000_000, max_rows=1_100_000, external_fits=True,
                                    min_ensemble_instance_rows=500_000)
    assert strategy == "multi_instance"
    assert "4 in-memory instances of about 1,000,000 rows" in why and "external-memory model would take" in why


def test_instances_too_small_for_the_quality_rule_give_way_to_external_memory_when_it_fits():
    from memopt_pipeline.core.memory.strategy import choose_strategy

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
    # 1 GiB, 2M rows x 300 features: at most ~1.4M rows per in-memory instance (column-wise).
    ensemble = make_plan(dataset_rows=2_000_000, budget_bytes=1 * GiB, min_ensemble_instance_rows=100_000, **SHAPE)
    assert ensemble.strategy == "multi_instance" and ensemble.max_rows_per_instance > 100_000
    assert ensemble.choice.startswith(f"{ensemble.min_instances_full_data} in-memory instances")
    external = make_plan(dataset_rows=2_000_000, budget_bytes=1 * GiB, min_ensemble_instance_rows=1_500_000, **SHAPE)
    assert external.strategy == "external_memory"
    assert external.instances_needed(1_600_000, overlap=0.1) == 1  # one model of all training rows
    assert external.external_memory_training_peak(2_000_000) <= external.budget_bytes * external.safety
    assert "external-memory model of all rows instead" in external.choice
    # A plan stored before the choice was recorded still loads.
    payload = ensemble.to_dict()
    del payload["choice"]
    assert type(ensemble).from_dict(payload).choice == ""


def test_a_fast_layout_is_not_bought_with_instances_below_the_quality_rule():
    # 400k rows x 338 at 1 GiB: row-wise layouts hold ~340k rows, so 2 instances of 200k rows,
    # below the 250k the quality rule wants; one instance of all rows with folds cut,
    # column-wise, holds them all: that is the plan, not two small instances (nor external memory).
    shape = dict(n_features=338, n_classes=3, budget_bytes=1 * GiB, baseline_bytes=int(0.39 * GiB))
    plan = make_plan(dataset_rows=400_000, min_ensemble_instance_rows=250_000, **shape)
    assert plan.strategy == "in_memory" and plan.instances_needed(400_000) == 1
    assert plan.instance_layout == "folds cut from the instance binned once; column-wise histograms"
    assert plan.lightgbm_layout(400_000).predicted_peak <= plan.budget_bytes * plan.safety
    # With the rule off, the fastest layout wins and the rows split in two.
    fast = make_plan(dataset_rows=400_000, min_ensemble_instance_rows=0, **shape)
    assert fast.instance_layout.endswith("row-wise histograms") and fast.instances_needed(400_000) == 2
