"""The engine: pure Python, no Dagster import (a test enforces it over every module below).

Packages follow the pipeline:

* ``data``     - reading and shaping the dataset: scan and metadata, the batch reader, CSV
  ingest, the synthetic demo data, gene sampling, folds, feature screening, fingerprints;
* ``memory``   - staying inside the budget: limits, measurement, release, the stage monitor,
  the hard cap, leak tracking, failure classification, the ladder, the planner;
* ``train``    - fitting one instance: parameters and shared types, one module per backend,
  callbacks, calibration;
* ``evaluate`` - using the models: the ensemble, holdout evaluation, metrics, SHAP;
* ``report``   - telling people: progress lines, plots, the run report.

``storage`` (atomic files, JSON, incremental Parquet) and ``units`` are shared by all of them.

Not here: anything that knows about assets, runs, partitions or the UI (``assets/``,
``resources/``, ``automation/``), and the command line (``cli.py``).
"""
