"""Task 2 (microstructure segmentation: background/axon, vessel, cell), every model of Table 2.

Run:
  python -m mtneuro_jax.train.loop --config configs/task2_segmentation.py:unet2d,3class,quick \
      --workdir out/runs/t2_unet2d_quick
  python -m mtneuro_jax.train.loop --config configs/task2_segmentation.py:unet3d,4class \
      --workdir out/runs/t2_unet3d_paper --config.data.data_dir=out/data/bossdb \
      --config.optim.learning_rate=0.001 --config.data.batch_size=4
  (the Table 2 driver, experiments/task2_tables.py, runs the lr x batch grid and the seeds)

How long, what to expect (``test/iou_dataset/mean_fg``, mean IoU without background):
  quick  2D U-Net 3-class, lr 0.01: ~35-40 s per run on 2 shared CPU cores, compiles
         included; on the SYNTHETIC phantom test fg IoU 0.527 +- 0.021 over seeds 1, 100,
         350, where a majority-class predictor scores 0.000
         (experiments/results/task2_quick/table2.md).
  paper  on accelerators: 20 epochs at full resolution (256x256, 8x256x256 in 3D). The paper
         reports mean F1 / IoU over all classes, e.g. 2D U-Net 3-class 0.87 / 0.79.
  tiny   seconds (tests).

``arg`` (comma-separated, see mtneuro_jax/configlib.py for parsing; at most one word of each kind):
  model    unet2d (default) | unet3d | unetpp | manet | fpn | pan | pspnet | vnet_light |
           highresnet. 2D models train on slices, 3D ones (unet3d, vnet_light, highresnet)
           on 8-slice windows that stay inside one region. The 2D zoo uses a ResNet-18
           encoder from random init (the reference code's 'resnet18'; the paper used an
           ImageNet EfficientNet-b7, which cannot be downloaded here:
           --config.model.encoder_name / encoder_weights=<file.npz> to change it).
  setting  3class (default: bg+axon / vessel / cell, all four regions) | 4class (bg /
           vessel / cell / axon, CTX+STR+VP only).
  recipe   paper (default): Adam lr 0.001, batch 8 (the grid point the Table 2 driver
           overrides with the val-selected lr and batch), 20 epochs, constant lr, full
           resolution, normalised images, per-pixel CE, paired augmentation (flips, rot90,
           and z-flip in 3D, identical for image and mask; the paper does not say which
           augmentation it used). ref: the reference script (task2_main.py): SGD lr 0.01
           without momentum, 5 epochs, batch 8 (2D) / 1 (3D), images /255 only, no augmentation.
  size     quick | tiny: configlib.TASK2_QUICK / configlib.TINY, applied after the recipe.
"""

from __future__ import annotations

import ml_collections

from mtneuro_jax import configlib

RUNNER = "loop"  # mtneuro_jax.train.loop.train_and_evaluate
# model word -> (MODELS name, dims, extra kwargs with the reference's defaults).
MODELS = {
  "unet2d": ("unet", 2, {"start_filters": 32, "n_blocks": 4}),
  "unet3d": ("unet", 3, {"start_filters": 32, "n_blocks": 4}),
  "unetpp": ("unet_plusplus", 2, {"encoder_name": "resnet18", "encoder_weights": ""}),
  "manet": ("manet", 2, {"encoder_name": "resnet18", "encoder_weights": ""}),
  "fpn": ("fpn", 2, {"encoder_name": "resnet18", "encoder_weights": ""}),
  "pan": ("pan", 2, {"encoder_name": "resnet18", "encoder_weights": ""}),
  "pspnet": ("pspnet", 2, {"encoder_name": "resnet18", "encoder_weights": ""}),
  "vnet_light": ("vnet_light", 3, {}),
  "highresnet": ("highresnet", 3, {}),
}
SETTINGS = ("3class", "4class")
NUM_CLASSES = {"3class": 3, "4class": 4}
ARGS = (
  "unet2d",
  "quick",
  "tiny",
  "ref",
  "ref,tiny",
  "unet3d,4class,quick",
  "unet3d,ref,tiny",
  *(f"{m},{s},quick" for m in MODELS for s in SETTINGS),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = configlib.parse_arg(
    arg,
    recipes=("paper", "ref"),
    methods=tuple(MODELS),
    settings=SETTINGS,
    sizes=configlib.TASK2_SIZES,
  )
  model_name, dims, extra = MODELS[a.method]

  c = ml_collections.ConfigDict()
  c.data = configlib.data_config(
    f"task2_{dims}d_{a.setting}", downsample=1, batch_size=8, eval_batch_size=8
  )
  c.model_name = model_name
  c.model = ml_collections.ConfigDict(
    {"num_classes": NUM_CLASSES[a.setting], "dims": dims, "width_multiplier": 1.0, **extra}
  )
  c.objective_name = "segmentation"
  c.objective = ml_collections.ConfigDict(
    {
      "loss": "ce",  # 'ce' | 'dice_ce'
      "dice_weight": 1.0,
      "augment": {"flip": True, "rot90": True, "flip_z": True},
    }
  )
  c.optim = configlib.optim_config(name="adam", learning_rate=0.001, schedule="constant")
  configlib.loop_defaults(c, seed=1, num_epochs=20.0)
  c.evals = configlib.segmentation_evals(("test", "val"))

  if a.recipe == "ref":
    c.data.image_mean = 0.0  # ToTensor only: [0, 1] intensities
    c.data.image_std = 1.0
    c.data.batch_size = 8 if dims == 2 else 1
    c.data.eval_batch_size = c.data.batch_size
    c.objective.augment = ml_collections.ConfigDict(
      {"flip": False, "rot90": False, "flip_z": False}
    )
    c.optim = configlib.optim_config(
      name="sgd", learning_rate=0.01, momentum=0.0, schedule="constant"
    )
    c.num_epochs = 5.0
  configlib.apply_size(c, a.size)

  c.lock()
  return c
