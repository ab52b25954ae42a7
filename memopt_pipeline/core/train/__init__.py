"""Fitting one instance's model: two phases (gene-aware k-fold early stopping, then a refit).

Covers: boosting parameters and the types every backend shares (``instance``), one module per
backend (LightGBM, XGBoost in memory or external memory, XGBoost on Dask), the per-round
callbacks (memory check points, progress), and per-class calibration on out-of-fold predictions.

Does not cover: choosing sizes (``core.memory.planner``), reading rows (``core.data``), nor
combining instances or scoring unseen genes (``core.evaluate``).
"""
