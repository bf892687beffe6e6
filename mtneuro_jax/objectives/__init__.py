"""Objective registry: ``OBJECTIVES[config.objective_name]`` -> base.Objective.

Add an objective by adding one line (the interface is in ``base.py``).
"""

from mtneuro_jax.objectives.byol import BYOL
from mtneuro_jax.objectives.linear_probe import LINEAR_PROBE
from mtneuro_jax.objectives.mixup import MIXUP
from mtneuro_jax.objectives.multiscale import MULTITASK, PIXEL_CE, REGION_RECON
from mtneuro_jax.objectives.myow import MYOW, MYOW_MERGED
from mtneuro_jax.objectives.segmentation import SEGMENTATION
from mtneuro_jax.objectives.supervised import SUPERVISED
from mtneuro_jax.objectives.vicreg import VICREG
from mtneuro_jax.registry import Registry

OBJECTIVES = Registry(
  "objective",
  {
    "supervised": SUPERVISED,
    "mixup": MIXUP,
    "byol": BYOL,
    "myow": MYOW,
    "myow_merged": MYOW_MERGED,
    "vicreg": VICREG,
    "linear_probe": LINEAR_PROBE,
    "segmentation": SEGMENTATION,
    "region_recon": REGION_RECON,
    "multitask": MULTITASK,
    "pixel_ce": PIXEL_CE,
  },
)
