"""The Task 3 rows: every 128x128 quadrant of the ``task3`` export, in a fixed order.

The export (``mtneuro export --tasks task3``) stores one record per quadrant (4 cubes x
360 slices x 4 quadrants = 5760 on the full volume) in a shuffled order; ``load_rows``
reads all of them and sorts them by (cube set, region, z, quadrant), the order every
cached feature and embedding array of the readout uses.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mtneuro_jax.data import pipeline
from mtneuro_jax.data.manifest import DatasetError
from mtneuro_jax.volumes import spec

TASK = "task3"
SPLIT = "all"


@dataclasses.dataclass(frozen=True)
class Task3Rows:
  """All quadrants of a Task 3 export, sorted by (cube_set, region, z, quadrant).

  images, labels: uint8 [N, 128, 128] (raw intensities; BossDB pixel ids).
  region (0 CTX, 1 STR, 2 VP, 3 ZI), cube_set (0..3 = A..D), z, quadrant (0 TL, 1 TR,
  2 BL, 3 BR): int32 [N]. ``source``: the manifest's source record; ``content_sha256``:
  the export's digest (the cache key of everything derived from these rows).
  """

  images: np.ndarray
  labels: np.ndarray
  region: np.ndarray
  cube_set: np.ndarray
  z: np.ndarray
  quadrant: np.ndarray
  source: dict
  source_tag: str
  content_sha256: str
  limit_per_split: int | None

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def group(self) -> np.ndarray:
    """int64 [N]: one id per (cube set, region) stack of slices."""
    return self.cube_set.astype(np.int64) * len(spec.REGIONS) + self.region

  @property
  def synthetic(self) -> bool:
    return self.source.get("kind") == "phantom"


def load_rows(data_dir: str, task: str = TASK) -> Task3Rows:
  """Every record of the Task 3 export under ``data_dir`` (verified), sorted.

  Raises DatasetError (with the export command to run) if the export is missing.
  """
  manifest = pipeline.open_manifest(data_dir, task)
  if spec.get_task(task).kind != "task3":
    raise DatasetError(f"{task} is not a Task 3 dataset; give --task task3")
  source = pipeline.open_split(data_dir, task, SPLIT)
  n = len(source)
  if n == 0:
    raise DatasetError(f"the {task} export in {data_dir} is empty; export it again")
  recs = source.__getitems__(list(range(n)))
  meta = {
    k: np.asarray([int(r[k]) for r in recs], np.int32)
    for k in ("region", "cube_set", "z", "quadrant")
  }
  order = np.lexsort((meta["quadrant"], meta["z"], meta["region"], meta["cube_set"]))
  images = np.stack([np.asarray(recs[i]["image"], np.uint8) for i in order])
  labels = np.stack([np.asarray(recs[i]["pixel_labels"], np.uint8) for i in order])
  params = manifest.get("parameters", {})
  return Task3Rows(
    images=images,
    labels=labels,
    **{k: v[order] for k, v in meta.items()},
    source=dict(manifest.get("source") or params.get("source") or {}),
    source_tag=str(manifest.get("source_tag", "")),
    content_sha256=str(manifest.get("content_sha256", "")),
    limit_per_split=params.get("limit_per_split"),
  )
