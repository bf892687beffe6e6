"""The MTNeuro benchmark as data: channels, regions, cubes, z splits, label maps, tasks.

Every fact here comes from the MTNeuro paper (Quesada, Sathidevi et al., "MTNeuro: A
Benchmark for Evaluating Representations of Brain Structure Across Multiple Levels of
Abstraction", NeurIPS 2022 Datasets & Benchmarks: data description, cube coordinates, z
splits, class fractions) and the public reference code (MTNeuro/MTNeuro,
``taskconfig/*.json``, ``bossdbdataset.py``).
Nothing else in the project hard-codes a coordinate, a split or a label id:
import them from here.

Conventions
-----------
* Volumes are indexed ZYX with half-open ranges, like ``intern.array``.
* A ``Box`` is always in full-resolution (res 0) voxel coordinates.
* Label ids in ``ROI_*`` and ``PIXEL_*`` are BossDB's ids. The real expert masks
  shipped in ``mtneuro_jax/volumes/real_masks`` (xray-thc) use another convention;
  ``XRAY_THC_MASK_TO_PIXEL`` maps them.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Iterator, Mapping

import numpy as np

# ---------------------------------------------------------------------------
# The volume.
VOLUME_SHAPE_ZYX = (720, 1420, 5805)
VOXEL_SIZE_UM = 1.17  # isotropic
TISSUE_Z = (15, 680)  # tissue occupies z in [15, 680); outside is empty/zero
# ROI labels were interpolated by the annotators on z 109..459 only; every other
# slice is 0 ("clear") in `roi_labels`.
ROI_ANNOTATED_Z = (109, 460)

COLLECTION = "prasad"


@dataclasses.dataclass(frozen=True)
class Channel:
  """One BossDB channel. ``uri`` is ``bossdb://collection/experiment/channel``."""

  name: str
  uri: str
  dtype: str  # numpy dtype name as stored in BossDB
  kind: str  # "image" or "annotation"

  @property
  def collection(self) -> str:
    return self.uri.split("://", 1)[1].split("/")[0]

  @property
  def experiment(self) -> str:
    return self.uri.split("://", 1)[1].split("/")[1]

  @property
  def channel(self) -> str:
    return self.uri.split("://", 1)[1].split("/")[2]


CHANNELS: Mapping[str, Channel] = types.MappingProxyType(
  {
    "image": Channel("image", "bossdb://prasad/prasad2020/image", "uint8", "image"),
    "roi_labels": Channel(
      "roi_labels", "bossdb://prasad/prasad_analysis/roi_labels", "uint64", "annotation"
    ),
    "pixel_labels": Channel(
      "pixel_labels", "bossdb://prasad/prasad_analysis/pixel_labels", "uint64", "annotation"
    ),
  }
)

# ---------------------------------------------------------------------------
# Label ids.
ROI_IDS: Mapping[str, int] = types.MappingProxyType(
  {
    "clear": 0,  # unannotated
    "CTX": 1,
    "STR": 2,
    "TRN": 3,
    "VP": 4,
    "ZI": 5,
    "internal_capsule": 6,
    "hypothalamus": 7,
    "corpus_callosum": 8,
  }
)

# The four benchmark regions, in class-index order (Task 1 class k = REGIONS[k]).
REGIONS = ("CTX", "STR", "VP", "ZI")
REGION_INDEX: Mapping[str, int] = types.MappingProxyType({r: i for i, r in enumerate(REGIONS)})

# ROI id -> Task 1 class, as the reference code groups them. ROI id 0 is NOT in
# this map: an unannotated tile is excluded and counted (the reference silently
# calls it cortex, which caps its test accuracy at 0.85).
ROI_TO_TASK1_CLASS: Mapping[int, int] = types.MappingProxyType(
  {
    1: 0,
    2: 1,
    8: 1,
    3: 2,
    4: 2,
    5: 3,
    6: 3,
    7: 3,
  }
)

PIXEL_IDS: Mapping[str, int] = types.MappingProxyType(
  {
    "background": 0,
    "vessel": 1,
    "cell": 2,
    "axon": 3,
  }
)
# BossDB pixel id -> class id for each Task 2 label set.
PIXEL_CLASS_MAPS: Mapping[str, Mapping[int, int]] = types.MappingProxyType(
  {
    # cells, vessels, other (= background + axons); all four regions.
    "3class": types.MappingProxyType({0: 0, 1: 1, 2: 2, 3: 0}),
    # background, vessel, cell, axon; CTX, STR and VP only (ZI lacks axon labels).
    "4class": types.MappingProxyType({0: 0, 1: 1, 2: 2, 3: 3}),
  }
)
PIXEL_CLASS_NAMES: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
  {
    "3class": ("other", "vessel", "cell"),
    "4class": ("background", "vessel", "cell", "axon"),
  }
)
# The real xray-thc masks (volumes/real_masks) use 0 bg, 1 axon, 2 vessel, 3 cell.
XRAY_THC_MASK_TO_PIXEL: Mapping[int, int] = types.MappingProxyType({0: 0, 1: 3, 2: 1, 3: 2})
# xray-thc calls the VP cube "trn".
XRAY_THC_REGION_FILES: Mapping[str, str] = types.MappingProxyType(
  {
    "CTX": "masks_ctx.npz",
    "STR": "masks_str.npz",
    "VP": "masks_trn.npz",
    "ZI": "masks_zi.npz",
  }
)

# Paper: class fractions of the dense micro labels (bg, vessel, cell, axon).
PAPER_PIXEL_FRACTIONS: Mapping[str, tuple[float, float, float, float]] = types.MappingProxyType(
  {
    "CTX": (0.93, 0.0233, 0.0464, 0.0),
    "STR": (0.7263, 0.025, 0.0566, 0.1922),
    "VP": (0.2275, 0.0473, 0.0573, 0.668),
    "ZI": (0.3215, 0.054, 0.0941, 0.5304),
  }
)


def remap(labels: np.ndarray, mapping: Mapping[int, int], dtype=np.uint8) -> np.ndarray:
  """Applies an id->id map to a label array of any shape; unknown ids raise ValueError."""
  labels = np.asarray(labels)
  present = np.unique(labels)
  unknown = [int(v) for v in present if int(v) not in mapping]
  if unknown:
    raise ValueError(f"label ids {unknown} are not in the map {dict(mapping)}")
  lut = np.zeros(int(present.max()) + 1 if present.size else 1, dtype=dtype)
  for k, v in mapping.items():
    if k < lut.size:
      lut[k] = v
  return lut[labels.astype(np.int64)]


# ---------------------------------------------------------------------------
# Geometry.
@dataclasses.dataclass(frozen=True, order=True)
class Box:
  """A ZYX half-open box in full-resolution voxels."""

  z0: int
  z1: int
  y0: int
  y1: int
  x0: int
  x1: int

  def __post_init__(self):
    for name in ("z", "y", "x"):
      lo, hi = getattr(self, name + "0"), getattr(self, name + "1")
      if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))):
        raise TypeError(f"Box {name} bounds must be integers, got {lo!r}, {hi!r}")
      if hi <= lo:
        raise ValueError(f"empty Box: {name} range [{lo}, {hi})")

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0)

  @property
  def slices(self) -> tuple[slice, slice, slice]:
    return (slice(self.z0, self.z1), slice(self.y0, self.y1), slice(self.x0, self.x1))

  def as_tuple(self) -> tuple[int, int, int, int, int, int]:
    return (self.z0, self.z1, self.y0, self.y1, self.x0, self.x1)

  def __str__(self) -> str:
    return f"z[{self.z0}:{self.z1}] y[{self.y0}:{self.y1}] x[{self.x0}:{self.x1}]"

  def check_inside(self, shape_zyx=VOLUME_SHAPE_ZYX) -> None:
    """Raises ValueError naming the axis if the box leaves the volume."""
    for axis, lo, hi, n in zip(
      "zyx", (self.z0, self.y0, self.x0), (self.z1, self.y1, self.x1), shape_zyx
    ):
      if lo < 0 or hi > n:
        raise ValueError(
          f"box {self} lies outside the volume on {axis}: valid {axis} range is [0, {n}); "
          "fix the coordinates (they are full-resolution ZYX voxels)"
        )

  def split(self, parts_zyx: tuple[int, int, int]) -> list["Box"]:
    """Splits into a grid of sub-boxes (used to test that cutouts are consistent)."""
    edges = []
    for lo, hi, n in zip((self.z0, self.y0, self.x0), (self.z1, self.y1, self.x1), parts_zyx):
      e = np.linspace(lo, hi, n + 1).round().astype(int)
      edges.append([(int(a), int(b)) for a, b in zip(e[:-1], e[1:]) if b > a])
    return [
      Box(z0, z1, y0, y1, x0, x1)
      for z0, z1 in edges[0]
      for y0, y1 in edges[1]
      for x0, x1 in edges[2]
    ]


TILE = 256  # every cube is one 256x256 window in xy
QUADRANT = 128

# Cube sets, (x0, x1, y0, y1) per region. Set A is the Task 1 ROI-C1 / Task 2 /
# Task 3 cube; B, C, D are the extra cubes of ROI-C2 / ROI-C3.
CUBE_SETS: Mapping[str, Mapping[str, tuple[int, int, int, int]]] = types.MappingProxyType(
  {
    "A": types.MappingProxyType(
      {
        "CTX": (4600, 4856, 900, 1156),
        "STR": (3700, 3956, 500, 756),
        "VP": (3063, 3319, 850, 1106),
        "ZI": (1543, 1799, 650, 906),
      }
    ),
    "B": types.MappingProxyType(
      {
        "CTX": (5312, 5568, 388, 644),
        "STR": (3828, 4084, 912, 1168),
        "VP": (2551, 2807, 850, 1106),
        "ZI": (1287, 1543, 906, 1162),
      }
    ),
    "C": types.MappingProxyType(
      {
        "CTX": (5056, 5312, 644, 900),
        "STR": (3344, 3600, 400, 656),
        "VP": (2151, 2407, 950, 1206),
        "ZI": (1031, 1287, 906, 1162),
      }
    ),
    "D": types.MappingProxyType(
      {
        "CTX": (4600, 4856, 400, 656),
        "STR": (3800, 4056, 244, 500),
        "VP": (2295, 2551, 694, 950),
        "ZI": (1799, 2055, 650, 906),
      }
    ),
  }
)
CUBE_SET_INDEX: Mapping[str, int] = types.MappingProxyType({s: i for i, s in enumerate(CUBE_SETS)})


def cube_box(cube_set: str, region: str, z_range: tuple[int, int]) -> Box:
  x0, x1, y0, y1 = CUBE_SETS[cube_set][region]
  return Box(int(z_range[0]), int(z_range[1]), y0, y1, x0, x1)


# z splits of set A (Table A1 / reference taskconfig): train [110,379),
# val [380,409), test [420,470). The paper's "first 300 slices" for training are
# our train + val (the two guard slices 379 and 409 are unused).
Z_SPLITS: Mapping[str, tuple[int, int]] = types.MappingProxyType(
  {
    "train": (110, 379),
    "val": (380, 409),
    "test": (420, 470),
  }
)
Z_FULL = (110, 470)  # the 360 slices of Task 3 and of the ROI-C2/C3 extra cubes
# The reference train->val gap is 1 slice, although slice-to-slice correlation
# decays only after 5-7 slices; we keep the published protocol by default and
# make the guard explicit (a stricter minimum refuses the paper's split).
DEFAULT_MIN_GUARD_SLICES = 1
DECORRELATION_SLICES = 5

DOWNSAMPLE_FACTORS = (1, 2, 4)
WINDOW_3D = 8  # 3D models take 8-slice non-overlapping sub-volumes


# ---------------------------------------------------------------------------
# Tasks.
@dataclasses.dataclass(frozen=True)
class SplitPart:
  """One contiguous source of samples: a cube set, a z range, and the regions."""

  cube_set: str
  z_range: tuple[int, int]
  regions: tuple[str, ...] = REGIONS


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task setting = how to cut samples and which labels they carry.

  kind:
    "task1": one 2D tile per (cube, z); label = Task 1 class of the ROI mode.
    "task2": 2D tile (window=1) or ``window``-slice 3D sub-volume with a dense
      pixel-class mask; ``label_set`` picks the class map.
    "task3": the four 128x128 quadrants of each 2D tile, image + BossDB pixel ids.
  """

  name: str
  kind: str
  splits: Mapping[str, tuple[SplitPart, ...]]
  description: str
  window: int = 1  # slices per sample (z)
  label_set: str | None = None  # task2: "3class" | "4class"
  channels: tuple[str, ...] = ("image", "roi_labels")


def _split(parts) -> tuple[SplitPart, ...]:
  return tuple(parts)


_A_SPLITS = {k: _split([SplitPart("A", v)]) for k, v in Z_SPLITS.items()}
_A_SPLITS_NO_ZI = {k: _split([SplitPart("A", v, REGIONS[:3])]) for k, v in Z_SPLITS.items()}
_TEST_CD = _split([SplitPart("C", Z_FULL), SplitPart("D", Z_FULL)])

TASKS: Mapping[str, TaskSpec] = types.MappingProxyType(
  {
    "task1_roi_c1": TaskSpec(
      "task1_roi_c1",
      "task1",
      types.MappingProxyType(dict(_A_SPLITS)),
      "Task 1 ROI-C1: train/val/test on cube set A (z splits).",
    ),
    "task1_roi_c2": TaskSpec(
      "task1_roi_c2",
      "task1",
      types.MappingProxyType(
        {"train": _A_SPLITS["train"], "val": _A_SPLITS["val"], "test": _TEST_CD}
      ),
      "Task 1 ROI-C2: train as ROI-C1; test on all 360 slices of cube sets C and D (domain shift).",
    ),
    "task1_roi_c3": TaskSpec(
      "task1_roi_c3",
      "task1",
      types.MappingProxyType(
        {
          "train": _split([SplitPart("A", Z_SPLITS["train"]), SplitPart("B", Z_FULL)]),
          "val": _A_SPLITS["val"],
          "test": _TEST_CD,
        }
      ),
      "Task 1 ROI-C3: train on set A (train split) + all of set B; test as ROI-C2.",
    ),
    "task2_2d_3class": TaskSpec(
      "task2_2d_3class",
      "task2",
      types.MappingProxyType(dict(_A_SPLITS)),
      "Task 2, 2D, 3 classes (other, vessel, cell), all four regions.",
      window=1,
      label_set="3class",
      channels=("image", "pixel_labels"),
    ),
    "task2_2d_4class": TaskSpec(
      "task2_2d_4class",
      "task2",
      types.MappingProxyType(dict(_A_SPLITS_NO_ZI)),
      "Task 2, 2D, 4 classes (bg, vessel, cell, axon), CTX/STR/VP (no ZI).",
      window=1,
      label_set="4class",
      channels=("image", "pixel_labels"),
    ),
    "task2_3d_3class": TaskSpec(
      "task2_3d_3class",
      "task2",
      types.MappingProxyType(dict(_A_SPLITS)),
      "Task 2, 3D 8-slice windows, 3 classes, all four regions.",
      window=WINDOW_3D,
      label_set="3class",
      channels=("image", "pixel_labels"),
    ),
    "task2_3d_4class": TaskSpec(
      "task2_3d_4class",
      "task2",
      types.MappingProxyType(dict(_A_SPLITS_NO_ZI)),
      "Task 2, 3D 8-slice windows, 4 classes, CTX/STR/VP (no ZI).",
      window=WINDOW_3D,
      label_set="4class",
      channels=("image", "pixel_labels"),
    ),
    "task3": TaskSpec(
      "task3",
      "task3",
      types.MappingProxyType({"all": _split([SplitPart("A", Z_FULL)])}),
      "Task 3: 4 cubes x 360 slices, four 128x128 quadrants per slice (5760 samples).",
      channels=("image", "pixel_labels"),
    ),
  }
)


def get_task(name: str) -> TaskSpec:
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  return TASKS[name]


@dataclasses.dataclass(frozen=True)
class SampleRef:
  """Where one sample comes from: region, cube set, the z start and the xy box.

  ``box`` covers the whole sample (``window`` slices; for task3 the quadrant).
  """

  split: str
  region: str
  cube_set: str
  box: Box
  quadrant: int = -1  # task3 only: 0 TL, 1 TR, 2 BL, 3 BR

  @property
  def key(self) -> str:
    q = f"-q{self.quadrant}" if self.quadrant >= 0 else ""
    return f"{self.split}-{self.cube_set}-{self.region}-z{self.box.z0:03d}{q}"


def windows(z_range: tuple[int, int], window: int) -> list[tuple[int, int]]:
  """Non-overlapping ``window``-slice windows inside ``z_range``; the remainder is dropped.

  Windows never cross ``z_range`` (so never cross a region's cube or a split),
  and are never truncated: the reference does both, which crashes its 3D U-Net.
  """
  z0, z1 = z_range
  n = (z1 - z0) // window
  return [(z0 + i * window, z0 + (i + 1) * window) for i in range(n)]


def iter_samples(task: TaskSpec, split: str) -> Iterator[SampleRef]:
  """Enumerates the candidate samples of a split, in a fixed order (region, set, z).

  Task 1 candidates still need the ROI check (``task1_label``): unannotated
  tiles are dropped by the exporter and counted in the manifest.
  """
  if split not in task.splits:
    raise KeyError(f"task {task.name} has no split {split!r}; splits: {', '.join(task.splits)}")
  for part in task.splits[split]:
    for region in part.regions:
      x0, x1, y0, y1 = CUBE_SETS[part.cube_set][region]
      for wz0, wz1 in windows(part.z_range, task.window):
        if task.kind == "task3":
          for q, (qy, qx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            yq, xq = y0 + qy * QUADRANT, x0 + qx * QUADRANT
            yield SampleRef(
              split, region, part.cube_set, Box(wz0, wz1, yq, yq + QUADRANT, xq, xq + QUADRANT), q
            )
        else:
          yield SampleRef(split, region, part.cube_set, Box(wz0, wz1, y0, y1, x0, x1))


def task1_label(roi_tile: np.ndarray) -> int | None:
  """Task 1 class of a tile of ROI ids (any shape): the class of its modal ROI id.

  Returns None when the modal id is 0 (unannotated): such tiles are excluded.
  Raises ValueError for an id outside the ROI table.
  """
  ids, counts = np.unique(np.asarray(roi_tile), return_counts=True)
  mode = int(ids[np.argmax(counts)])  # ties -> smallest id, like torch.mode
  if mode == 0:
    return None
  if mode not in ROI_TO_TASK1_CLASS:
    raise ValueError(f"ROI id {mode} is not a known ROI label (known: {sorted(ROI_IDS.values())})")
  return ROI_TO_TASK1_CLASS[mode]


def guard_bands(task: TaskSpec) -> list[dict]:
  """Gaps (in slices) between every pair of splits that share a cube (set, region).

  A negative gap means the splits overlap.
  """
  out = []
  names = list(task.splits)
  for i, a in enumerate(names):
    for b in names[i + 1 :]:
      for pa in task.splits[a]:
        for pb in task.splits[b]:
          if pa.cube_set != pb.cube_set or not set(pa.regions) & set(pb.regions):
            continue
          (a0, a1), (b0, b1) = pa.z_range, pb.z_range
          gap = b0 - a1 if a1 <= b0 else a0 - b1
          out.append({"splits": (a, b), "cube_set": pa.cube_set, "gap_slices": int(gap)})
  return out


def check_guard_bands(
  task: TaskSpec, min_guard_slices: int = DEFAULT_MIN_GUARD_SLICES
) -> list[dict]:
  """Returns the guard bands; raises ValueError if any is below ``min_guard_slices``."""
  bands = guard_bands(task)
  for band in bands:
    if band["gap_slices"] < min_guard_slices:
      a, b = band["splits"]
      raise ValueError(
        f"task {task.name}: splits {a!r} and {b!r} of cube set {band['cube_set']} are only "
        f"{band['gap_slices']} slice(s) apart (minimum {min_guard_slices}); adjacent slices share "
        f"cells, so this leaks. Lower --min_guard_slices only if you accept that, or move the z ranges."
      )
  return bands
