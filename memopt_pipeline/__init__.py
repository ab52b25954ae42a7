"""memopt_pipeline: train gradient-boosted trees on gene-grouped data bigger than memory."""

import os

# LightGBM's and XGBoost's OpenMP threads busy-wait between parallel regions by default.
# When anything else wants the cores (another step, another run) that spinning starves it:
# measured here, a demo training step went from 25 s to over 500 s beside one other busy
# process. Passive waiting costs little when alone. It must be set before the OpenMP
# runtime loads, i.e. before lightgbm/xgboost are imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
