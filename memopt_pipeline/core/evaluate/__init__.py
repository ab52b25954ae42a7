"""Using the trained models: the ensemble, holdout evaluation, metrics and SHAP.

Covers: loading instance models into an averaged :class:`~.ensemble.Ensemble`, streamed and
chunked predictions on the holdout genes with per-row output, multiclass metrics and curves,
and chunked native SHAP (``pred_contrib``) with a beeswarm reservoir.

Does not cover: training or calibration fitting (``core.train``), nor drawing the pictures
(``core.report``).
"""
