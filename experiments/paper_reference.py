"""The MTNeuro paper's Task 1 and Task 3 numbers, as data (Table 1, Table A3; Table 3 at the end).

Source: Quesada, Sathidevi et al., "MTNeuro: A Benchmark for Evaluating
Representations of Brain Structure Across Multiple Levels of Abstraction",
NeurIPS 2022 Datasets & Benchmarks, Table 1 and appendix Table A3. Test
accuracy on the real BossDB volume; mean and sd over the seeds
``PAPER_SEEDS`` (PCA and NMF are reported without an sd). A value is
``(mean, sd)``; ``sd`` is None where the paper gives none.

These are the only copies of the paper's numbers in the code; tables import them.
"""

from __future__ import annotations

import types
from typing import Mapping

PAPER_SOURCE = "MTNeuro (NeurIPS 2022 D&B), real BossDB data"
PAPER_SEEDS = (1, 100, 350, 631, 872)
SETTINGS = ("ROI-C1", "ROI-C2", "ROI-C3")
DOWNSAMPLINGS = (4, 2, 1)  # Table A3 column order: 4x, 2x, full resolution

# Method keys as used by experiments/task1_tables.py -> the paper's row label.
METHOD_LABELS: Mapping[str, str] = types.MappingProxyType(
  {
    "supervised": "Supervised",
    "mixup": "Sup w/ Mixup",
    "byol": "BYOL",
    "myow": "MYOW",
    "myow_merged": "MYOW-m",
    "pca": "PCA",
    "nmf": "NMF",
  }
)

# Table 1: accuracy at 2x downsampling, per setting.
TABLE1: Mapping[str, Mapping[str, tuple[float, float | None]]] = types.MappingProxyType(
  {
    "supervised": types.MappingProxyType(
      {"ROI-C1": (0.88, 0.03), "ROI-C2": (0.77, 0.03), "ROI-C3": (0.88, 0.02)}
    ),
    "mixup": types.MappingProxyType(
      {"ROI-C1": (0.90, 0.04), "ROI-C2": (0.78, 0.03), "ROI-C3": (0.90, 0.02)}
    ),
    "byol": types.MappingProxyType(
      {"ROI-C1": (0.88, 0.02), "ROI-C2": (0.76, 0.02), "ROI-C3": (0.97, 0.01)}
    ),
    "myow": types.MappingProxyType(
      {"ROI-C1": (0.90, 0.02), "ROI-C2": (0.78, 0.05), "ROI-C3": (0.98, 0.01)}
    ),
    "myow_merged": types.MappingProxyType(
      {"ROI-C1": (0.94, 0.02), "ROI-C2": (0.78, 0.03), "ROI-C3": (0.98, 0.01)}
    ),
    "pca": types.MappingProxyType(
      {"ROI-C1": (0.59, None), "ROI-C2": (0.25, None), "ROI-C3": (0.07, None)}
    ),
    "nmf": types.MappingProxyType(
      {"ROI-C1": (0.62, None), "ROI-C2": (0.27, None), "ROI-C3": (0.50, None)}
    ),
  }
)

# Table A3: ROI-C1 accuracy by downsampling factor (keys 4, 2, 1 = full resolution); no sd given.
TABLE_A3: Mapping[str, Mapping[int, tuple[float, float | None]]] = types.MappingProxyType(
  {
    "supervised": types.MappingProxyType({4: (0.83, None), 2: (0.88, None), 1: (0.87, None)}),
    "mixup": types.MappingProxyType({4: (0.85, None), 2: (0.90, None), 1: (0.91, None)}),
    "byol": types.MappingProxyType({4: (0.83, None), 2: (0.88, None), 1: (0.98, None)}),
    "myow": types.MappingProxyType({4: (0.84, None), 2: (0.90, None), 1: (0.96, None)}),
    "myow_merged": types.MappingProxyType({4: (0.84, None), 2: (0.94, None), 1: (0.99, None)}),
    "pca": types.MappingProxyType({4: (0.59, None), 2: (0.59, None), 1: (0.59, None)}),
    "nmf": types.MappingProxyType({4: (0.55, None), 2: (0.62, None), 1: (0.54, None)}),
  }
)

# Table 1 is measured at 2x; its ROI-C1 column must agree with Table A3's 2x column.
assert all(TABLE1[m]["ROI-C1"][0] == TABLE_A3[m][2][0] for m in TABLE1)


def format_paper(value: tuple[float, float | None] | None) -> str:
  """'0.88 ± 0.03', '0.59' (no sd) or '—' (not reported)."""
  if value is None:
    return "—"
  mean, sd = value
  return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


# ---------------------------------------------------------------------------
# Task 2 (microstructure segmentation): the paper's Table 2.
# Mean over classes (background included) of the class-wise F1 and IoU on the test set,
# mean ± sd over PAPER_SEEDS; the paper does not say whether a class's score is aggregated over
# the whole test set or averaged over images (the reference code computes both). Adam, 20
# epochs, lr x batch chosen on val. 2D zoo: EfficientNet-b7 encoder with ImageNet weights.
TASK2_SETTINGS = ("3class", "4class")
TASK2_MODEL_LABELS: Mapping[str, str] = types.MappingProxyType(
  {
    "unet2d": "2D U-Net",
    "manet": "MA-Net",
    "fpn": "FPN",
    "unetpp": "U-Net++",
    "pan": "PAN",
    "pspnet": "PSPNet",
    "unet3d": "3D U-Net",
    "vnet_light": "VNetLight",
    "highresnet": "HighResNet",
  }
)


def _t2(f3, i3, f4, i4):
  return types.MappingProxyType(
    {
      "3class": types.MappingProxyType({"f1": f3, "iou": i3}),
      "4class": types.MappingProxyType({"f1": f4, "iou": i4}),
    }
  )


# model -> setting -> {'f1': (mean, sd), 'iou': (mean, sd)}
TABLE2: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]] = types.MappingProxyType(
  {
    "unet2d": _t2((0.87, 0.012), (0.79, 0.014), (0.90, 0.003), (0.74, 0.008)),
    "manet": _t2((0.88, 0.003), (0.81, 0.003), (0.90, 0.002), (0.78, 0.011)),
    "fpn": _t2((0.85, 0.01), (0.76, 0.015), (0.86, 0.004), (0.72, 0.021)),
    "unetpp": _t2((0.89, 0.002), (0.81, 0.002), (0.89, 0.015), (0.76, 0.036)),
    "pan": _t2((0.79, 0.035), (0.69, 0.039), (0.84, 0.007), (0.70, 0.014)),
    "pspnet": _t2((0.73, 0.013), (0.65, 0.043), (0.78, 0.012), (0.62, 0.015)),
    "unet3d": _t2((0.88, 0.006), (0.80, 0.007), (0.84, 0.032), (0.65, 0.045)),
    "vnet_light": _t2((0.85, 0.012), (0.76, 0.013), (0.76, 0.063), (0.56, 0.061)),
    "highresnet": _t2((0.85, 0.019), (0.77, 0.026), (0.72, 0.083), (0.52, 0.075)),
  }
)
# The paper's per-class F1 of the 2D U-Net, 4-class (no sd given).
TABLE2_UNET2D_4CLASS_F1 = types.MappingProxyType(
  {"background": 0.97, "vessel": 0.82, "cell": 0.87, "axon": 0.94}
)
TASK2_LR_GRID = (0.1, 0.05, 0.01, 0.005, 0.001)
TASK2_BATCH_GRID = (2, 4, 6, 8, 10)
TASK2_EPOCHS = 20


# Task 3 (Table 3): in-sample R^2 of a linear regression of each semantic feature from the
# frozen embeddings of all 5760 quadrants (no split). Means over seeds; the transcription
# used here carries no sd. Feature keys as in mtneuro_jax/readout/features.py.
TABLE3_FEATURES = ("vessel_density", "axon_density", "cell_count", "cell_size", "nn_distance")


def _t3(*values: float) -> Mapping[str, tuple[float, None]]:
  return types.MappingProxyType(
    {k: (v, None) for k, v in zip(TABLE3_FEATURES, values, strict=True)}
  )


# Encoders trained on ROI-C1 (the rows Table 3 reports for every method).
TABLE3: Mapping[str, Mapping[str, tuple[float, float | None]]] = types.MappingProxyType(
  {
    "supervised": _t3(0.77, 0.94, 0.67, 0.61, 0.48),
    "mixup": _t3(0.82, 0.95, 0.71, 0.67, 0.47),
    "byol": _t3(0.85, 0.94, 0.75, 0.69, 0.49),
    "myow": _t3(0.85, 0.94, 0.74, 0.69, 0.50),
    "myow_merged": _t3(0.87, 0.95, 0.77, 0.69, 0.51),
    "pca": _t3(0.75, 0.82, 0.55, 0.47, 0.31),
    "nmf": _t3(0.81, 0.85, 0.59, 0.55, 0.34),
  }
)
# The SSL encoders trained on ROI-C3.
TABLE3_ROI_C3: Mapping[str, Mapping[str, tuple[float, float | None]]] = types.MappingProxyType(
  {
    "byol": _t3(0.88, 0.96, 0.79, 0.73, 0.53),
    "myow": _t3(0.88, 0.96, 0.79, 0.72, 0.52),
    "myow_merged": _t3(0.87, 0.96, 0.78, 0.72, 0.53),
  }
)
