"""Task 1 self-supervised pretraining with MYOW-merged (the paper's "MYOW-m" row), online probe.

Run:
  python -m mtneuro_jax.train.loop --config configs/task1_myow_merged.py:quick \
      --workdir out/runs/t1_myow_merged_quick
  python -m mtneuro_jax.train.loop --config configs/task1_myow_merged.py:paper \
      --workdir out/runs/t1_myow_merged_paper --config.seed=1 --config.data.data_dir=out/data/bossdb
  (LARS instead of SGD: --config.optim.name=lars)

How long, what to expect (``test_corners/accuracy`` = the ONLINE probe, a linear head trained on
stop-gradient encoder features of the views during pretraining, scored on the four half-size
corners of each test tile; the frozen-encoder linear evaluation of Table 1 is a separate run
that loads this workdir's encoder with ``init_from``):
  quick  about 1 min on 2 CPU cores, JAX compilation included (8 encoder passes per step on
         half-size crops), with a short-run recipe (see configlib.task1_byol_family_config). SYNTHETIC phantom: the
         frozen-probe Table 1 numbers are in experiments/results/task1_quick/table1.md (ROI-C1
         ~0.7, above PCA); chance is 0.25. A smoke run, not a number to compare with the paper.
  paper  on accelerators: 1600 epochs of 2 steps at batch 512 = 256 queries + 256 pool
         (3200 steps, as BYOL's) on 64x64 crops of 128x128 tiles. The paper reports
         linear-evaluation accuracy on ROI-C1 (real data):
         0.94 +- 0.02 (ROI-C2 0.78 +- 0.03, ROI-C3 0.98 +- 0.01).
  tiny   seconds (tests).

Batch layout (mtneuro_jax/objectives/myow.py): each batch holds the B query tiles AND the
candidate pool (the reference's "one extra batch" from a second loader), split at
``objective.pool_size`` rows from the end (0 = half). So ``data.batch_size`` is 2 * B (paper
512, quick 64, tiny 16) and ``optim.lr_base_batch_size`` is 512, which keeps the LR at
0.03 * B / 256 as the reference. An epoch is one pass over the training set in batches of
2 * B, i.e. half as many steps as the reference's epoch of B queries, so every epoch count is
doubled to keep the reference's step counts: 1600 epochs, LR warm-up 20, MYOW ramp 20.

``arg`` (comma-separated, see mtneuro_jax/configlib.py for parsing and for what the sizes
``quick`` and ``tiny`` set):
  paper  (default) the MTNeuro SSL recipe at the paper's 2x downsampling (128x128 tiles):
         views = two random crops of half the tile (64x64; the reference's 128 of 256), placed
         per sample, no intensity augmentation; projector 512->4096->256, predictor
         256->4096->256; EMA 0.996 -> 1 (cosine); SGD momentum 0.9, coupled weight decay 5e-4
         on all params, lr 0.03 * queries / 256, 10 reference epochs linear warm-up then
         cosine to 0; 800 reference epochs (1600 here, see above); mined-view weight
         0 -> 0.1 linearly over 10 reference epochs; k = 1 nearest neighbour. Batch 256
         queries, not the reference's 8: the issue's LR rule keeps the reference's
         per-example LR, the heads' BatchNorm sees a usable batch, and 3200 steps replace
         107,200. The online probe has its own param group (lr 0.1, not batch-scaled, no
         decay): at the SSL LR (0.03 * B / 256) it would barely move.
  ref    the reference code's script (task1_ssl.py): full-resolution 256x256 tiles, batch 8
         queries + 8 pool (lr 9.375e-4), one crop offset shared by the whole batch, 800
         reference epochs of 134 steps.
  quick | tiny  the size presets (configlib.QUICK / configlib.TINY), applied after the recipe;
         both shorten the LR warm-up to half an epoch (8 steps at quick) and the MYOW ramp
         to one epoch (16 steps at quick) so they fit the run, and tiny also shrinks the
         heads' hidden width to 256 so tests stay fast.
"""

from __future__ import annotations

import ml_collections

from mtneuro_jax import configlib

RUNNER = "loop"  # mtneuro_jax.train.loop.train_and_evaluate
ARGS = ("paper", "ref", "quick", "tiny", "paper,quick", "paper,tiny", "ref,quick", "ref,tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = configlib.parse_arg(arg, recipes=("paper", "ref"))
  c = configlib.task1_byol_family_config(
    "myow_merged", recipe=a.recipe, size=a.size, mined=True, cascaded=False
  )
  c.lock()
  return c
