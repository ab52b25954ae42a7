from memopt_pipeline.core.report.progress import GiB, RowProgress


def test_progress_logs_rate_eta_and_rss_against_budget_at_most_every_interval():
    now = [0.0]
    lines = []
    progress = RowProgress(
        "binning", 1_000, lines.append, budget_bytes=2 * GiB, every_seconds=5,
        rss_reader=lambda: GiB // 2, clock=lambda: now[0],
    )
    now[0] = 1.0
    progress.advance(100)
    assert lines == []  # too soon
    now[0] = 5.0
    progress.advance(400)
    assert lines == ["binning: 500/1,000 rows (50%), 100 rows/s, ~5 s left, RSS 0.50/2.00 GiB"]


def test_progress_without_total_or_budget():
    now = [0.0]
    lines = []
    progress = RowProgress("ingest", None, lines.append, every_seconds=0, rss_reader=lambda: GiB, clock=lambda: now[0])
    now[0] = 2.0
    progress.advance(10)
    assert lines == ["ingest: 10 rows, 5 rows/s, RSS 1.00 GiB"]
