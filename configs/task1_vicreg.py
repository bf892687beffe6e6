"""Task 1 self-supervised pretraining with VICReg (mtneuro_jax/objectives/vicreg.py).

Run:
  python -m mtneuro_jax.train.loop --config configs/task1_vicreg.py:quick \
      --workdir out/runs/t1_vicreg_quick
  # then linear evaluation of its frozen encoder:
  python -m mtneuro_jax.train.loop --config configs/task1_linear_probe.py:quick \
      --workdir out/runs/t1_vicreg_quick_probe --config.init_from.workdir=out/runs/t1_vicreg_quick

The model is the encoder only (resnet18_xray, num_classes 0). Two views per tile: random
crops of half the tile's side, normalised (``objective.views``, augment.make_view). The
objective owns the expander and an online linear probe on stop-gradient features
(``probe/acc`` in the training metrics; its own param group: Adam lr 0.01, no decay, no
schedule); the evals score that probe on the four half-size corners of each tile
(``test_corners``, ``val_corners``) and a kNN readout of the features (``test_knn``).

How long, what to expect:
  quick  a smoke run (~1 min on 2 CPU cores: two encoder passes per step); 96 steps are far
         too few for a representation, so only the probe's accuracy above chance is checked.
  paper  on accelerators; not timed here.
  tiny   seconds (tests).

``arg`` (comma-separated, see mtneuro_jax/configlib.py for parsing and for what the
sizes ``quick`` and ``tiny`` set):
  paper  (default) VICReg's loss (coefficients 25/25/1, gamma 1, eps 1e-4) with the
         MTNeuro SSL recipe around it, so it compares with BYOL/MYOW on equal terms: 2x
         downsampling (128x128 tiles, 64x64 views), SGD momentum 0.9, lr 0.03 x batch/256,
         weight decay 5e-4 (coupled, also on BN and biases), 10 warm-up epochs then cosine,
         800 epochs, batch 256. Expander 2048-2048-2048 (the paper: 8192 x 3 with ResNet-50
         on ImageNet, and LARS with lr 0.2 x batch/256, weight decay 1e-6, which our optimizer
         does not offer).
  quick | tiny  the size presets (configlib.QUICK / configlib.TINY), applied after the
         recipe; sized runs also shrink the expander to 256 x 3 and the warm-up to 1 epoch
         (10 epochs would span the whole short run).
"""

from __future__ import annotations

import ml_collections

from mtneuro_jax import configlib

RUNNER = "loop"  # mtneuro_jax.train.loop.train_and_evaluate
ARGS = ("paper", "quick", "tiny", "paper,quick", "paper,tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = configlib.parse_arg(arg, recipes=("paper",))

  c = ml_collections.ConfigDict()
  # ROI-C1 (cube A); task1_roi_c2 / task1_roi_c3 for the other settings.
  c.data = configlib.data_config("task1_roi_c1", downsample=2, batch_size=256, eval_batch_size=256)
  c.model_name = "resnet18_xray"
  c.model = ml_collections.ConfigDict({"num_classes": 0, "width_multiplier": 1.0})
  c.objective_name = "vicreg"
  c.objective = ml_collections.ConfigDict(
    {
      "num_classes": 4,  # the online probe's
      "expander": (2048, 2048, 2048),
      "sim_coeff": 25.0,
      "std_coeff": 25.0,
      "cov_coeff": 1.0,
      "gamma": 1.0,
      "eps": 1e-4,
      "views": {
        "crop_fraction": 0.5,
        "per_sample": True,
        "image_mean": configlib.XRAY_MEAN,
        "image_std": configlib.XRAY_STD,
      },
    }
  )
  c.optim = configlib.optim_config(
    name="sgd",
    learning_rate=0.03,
    lr_base_batch_size=256,
    momentum=0.9,
    weight_decay=5e-4,
    weight_decay_mode="coupled",
    schedule="cosine",
    warmup_epochs=10.0,
  )
  c.optim.param_groups.probe = ml_collections.ConfigDict(
    {
      "pattern": "^probe/",
      "name": "adam",
      "learning_rate": 0.01,
      "lr_base_batch_size": 0,
      "weight_decay": 0.0,
      "schedule": "constant",
      "warmup_epochs": 0.0,
    }
  )
  configlib.loop_defaults(c, seed=1, num_epochs=800.0)
  c.evals = configlib.classification_evals(("test", "val"), protocols=("corners",))
  c.evals.test_knn = ml_collections.ConfigDict(
    {"kind": "knn", "split": "test", "protocol": "corners", "k": 20, "temperature": 0.07}
  )

  configlib.apply_size(c, a.size)
  if a.size is not None:
    c.objective.expander = (256, 256, 256)
    c.optim.warmup_epochs = 1.0

  c.lock()
  return c
