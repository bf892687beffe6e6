"""Task 1 supervised ResNet-18 xray with mixup (the paper's "Sup w/ Mixup").

Run:
  python -m mtneuro_jax.train.loop --config configs/task1_mixup.py:quick --workdir out/runs/t1_mixup \
      --config.objective.p=0.3

``arg`` is passed to ``configs/task1_supervised.py`` (paper | ref | quick | tiny);
only the objective changes: ``objective_name = 'mixup'`` with per-sample mixing
probability ``p`` and partner weight lambda ~ U(lambda_min, lambda_max) = U(0, 0.5),
as kornia's RandomMixUp in the reference (see ``mtneuro_jax/objectives/mixup.py``).
The paper sweeps p in {0.01, 0.1, 0.3, 0.5, 0.7} and reports the best
(experiments/task1_tables.py picks it on the validation split). Paper ROI-C1 at
2x: 0.90 +- 0.04 (vs 0.88 +- 0.03 without mixup).
"""
from __future__ import annotations

import ml_collections

from configs import task1_supervised

P_GRID = (0.01, 0.1, 0.3, 0.5, 0.7)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = task1_supervised.get_config(arg)
  c.unlock()
  c.objective_name = "mixup"
  c.objective = ml_collections.ConfigDict()
  c.objective.p = 0.3
  c.objective.lambda_min = 0.0
  c.objective.lambda_max = 0.5
  c.lock()
  return c
