"""Task 1 supervised ResNet-18 xray with mixup (the paper's "Sup w/ Mixup").

Run:
  python -m mtneuro_jax.train.loop --config configs/task1_mixup.py:quick \
      --workdir out/runs/t1_mixup --config.objective.p=0.3

How long, what to expect (test accuracy, ``test_whole/accuracy``, ROI-C1):
  quick  ~30 s on 2 CPU cores with a warm JAX compilation cache (add ~1 min cold);
         the SYNTHETIC phantom reaches ~0.99 (Task 1 quick tables, p = 0.5: 0.997 +- 0.004).
  paper  on accelerators, as configs/task1_supervised.py:paper (minutes on one GPU, not
         timed here). The paper reports 0.90 +- 0.04 at 2x for the best p (vs 0.88 +- 0.03
         without mixup).
  tiny   seconds (tests).

The same as configs/task1_supervised.py for every ``arg`` (recipes ``paper`` | ``ref``,
sizes ``quick`` | ``tiny``: see mtneuro_jax/configlib.py) except the objective:
``objective_name = 'mixup'`` with per-sample mixing probability ``p`` and partner weight
lambda ~ U(lambda_min, lambda_max) = U(0, 0.5), as kornia's RandomMixUp in the reference
(see ``mtneuro_jax/objectives/mixup.py``). The paper sweeps p over ``P_GRID`` and reports
the best (experiments/task1_tables.py picks it on the validation split, never on test).
tests/test_configs.py checks that only the objective differs from task1_supervised.
"""

from __future__ import annotations

import ml_collections

from mtneuro_jax import configlib

RUNNER = "loop"  # mtneuro_jax.train.loop.train_and_evaluate
ARGS = ("paper", "ref", "quick", "tiny", "paper,quick", "paper,tiny", "ref,quick", "ref,tiny")
P_GRID = (0.01, 0.1, 0.3, 0.5, 0.7)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = configlib.parse_arg(arg, recipes=("paper", "ref"))

  c = ml_collections.ConfigDict()
  # ROI-C1 (cube A); task1_roi_c2 / task1_roi_c3 for the other settings.
  c.data = configlib.data_config("task1_roi_c1", downsample=2, batch_size=256, eval_batch_size=256)
  c.model_name = "resnet18_xray"
  c.model = ml_collections.ConfigDict({"num_classes": 4, "width_multiplier": 1.0, "dropout": 0.2})
  c.objective_name = "mixup"
  c.objective = ml_collections.ConfigDict({"p": 0.3, "lambda_min": 0.0, "lambda_max": 0.5})
  c.optim = configlib.optim_config(
    name="sgd",
    learning_rate=0.03,
    momentum=0.9,
    weight_decay=0.3,
    weight_decay_mode="coupled",
    schedule="cosine",
  )
  configlib.loop_defaults(c, seed=1, num_epochs=100.0)
  c.evals = configlib.classification_evals(("test", "val"))

  if a.recipe == "ref":
    configlib.apply_task1_ref_recipe(c)
  configlib.apply_size(c, a.size)

  c.lock()
  return c
