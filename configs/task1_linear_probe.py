"""Task 1 linear evaluation of a frozen (self-supervised) encoder: a linear probe, plus kNN.

Run: (after an SSL run wrote its checkpoints to out/runs/t1_byol_quick)
  python -m mtneuro_jax.train.loop --config configs/task1_linear_probe.py:quick \
      --workdir out/runs/t1_byol_quick_probe --config.init_from.workdir=out/runs/t1_byol_quick
  python -m mtneuro_jax.train.loop --config configs/task1_linear_probe.py:paper \
      --workdir out/runs/t1_byol_paper_probe --config.init_from.workdir=out/runs/t1_byol_paper \
      --config.data.data_dir=out/data/bossdb

The encoder (``model.width_multiplier`` and the data's resolution must match the SSL run)
comes from ``init_from`` (``subtree`` 'encoder' is preset; its BatchNorm statistics come
with it, ``init_from.model_state``); ``optim.freeze = ('^encoder/',)`` gives it exactly zero
update and the objective (mtneuro_jax/objectives/linear_probe.py) runs it in inference mode
under stop-gradient, so its params and BN statistics stay bitwise unchanged. Without
``init_from`` it probes a random encoder and logs a warning (that is what the tests run).

How long, what to expect (``test_corners/accuracy``: four half-size corners per test tile):
  quick  ~30 s on 2 CPU cores (probe steps are forward passes of the frozen encoder).
         A random encoder's probe is the floor an SSL encoder must beat.
  paper  100 epochs at batch 8 (the reference's linear-evaluation length and batch); not
         timed here. Compare with the SSL rows of the paper's Table 1.
  tiny   seconds (tests).

``arg`` (comma-separated, see mtneuro_jax/configlib.py for parsing and for what the
sizes ``quick`` and ``tiny`` set):
  paper  (default) linear evaluation done right (``objective.protocol='ssl'``): the probe
         trains on random half-side crops normalised like pretraining (``objective.views``),
         the encoder frozen in inference mode; scored on the four half-size corners at the
         Task 1 resolution (2x downsampling: 128x128 tiles, 64x64 corners). Optimizer as
         the reference's BYOL linear-evaluation config: Adam lr 0.01, betas (0.9, 0.999), no
         weight decay, no schedule, 100 epochs, batch 8. (The reference's MYOW configs use
         SGD lr 0.01 for 10 epochs instead: ``--config.optim.name=sgd
         --config.optim.momentum=0 --config.num_epochs=10``.)
  ref    the reference code's linear evaluation with its bugs, on purpose
         (``objective.protocol='reference'``): full-resolution 256x256 tiles, un-normalised
         ([0, 1]) input, the encoder's BatchNorm statistics re-estimated in train mode.
  quick | tiny  the size presets (configlib.QUICK / configlib.TINY), applied after the
         recipe; they also set the model width, which must match the encoder's run.
"""

from __future__ import annotations

import ml_collections

from mtneuro_jax import configlib

RUNNER = "loop"  # mtneuro_jax.train.loop.train_and_evaluate
ARGS = ("paper", "ref", "quick", "tiny", "paper,quick", "paper,tiny", "ref,quick", "ref,tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = configlib.parse_arg(arg, recipes=("paper", "ref"))

  c = ml_collections.ConfigDict()
  # ROI-C1 (cube A); task1_roi_c2 / task1_roi_c3 for the other settings.
  c.data = configlib.data_config("task1_roi_c1", downsample=2, batch_size=8, eval_batch_size=256)
  c.model_name = "resnet18_xray"
  c.model = ml_collections.ConfigDict({"num_classes": 0, "width_multiplier": 1.0})
  c.objective_name = "linear_probe"
  c.objective = ml_collections.ConfigDict(
    {
      "num_classes": 4,
      "protocol": "ssl",
      # image_mean/std must equal data.image_mean/std (they undo it in 'reference').
      "views": {
        "crop_fraction": 0.5,
        "per_sample": True,
        "image_mean": configlib.XRAY_MEAN,
        "image_std": configlib.XRAY_STD,
      },
    }
  )
  c.optim = configlib.optim_config(
    name="adam", learning_rate=0.01, weight_decay=0.0, schedule="constant", freeze=("^encoder/",)
  )
  configlib.loop_defaults(c, seed=1, num_epochs=100.0)
  c.init_from.subtree = "encoder"
  c.evals = configlib.classification_evals(("test", "val"), protocols=("corners",))
  c.evals.test_knn = ml_collections.ConfigDict(
    {"kind": "knn", "split": "test", "protocol": "corners", "k": 20, "temperature": 0.07}
  )

  if a.recipe == "ref":
    c.objective.protocol = "reference"
    c.data.downsample = 1
  configlib.apply_size(c, a.size)

  c.lock()
  return c
