"""Telling people what happened: progress lines, plots and the run report.

Covers: rate-limited progress lines for long passes (rows/s, time left, RSS against budget),
PNG plots (memory timelines, PR and calibration curves, SHAP) and the Markdown run report
that gathers every stage's figures.

Does not cover: computing any of the numbers it shows; they come from the other packages.
"""
