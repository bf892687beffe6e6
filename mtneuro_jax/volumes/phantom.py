"""PLACEHOLDER phantom (to be replaced by the real generator; see issue #2).

API contract that the real generator keeps:
  GENERATOR_VERSION: str
  PhantomVolume(seed=0).cutout(channel_name: str, box: spec.Box) -> np.ndarray
    ZYX array of box.shape; uint8 for "image", uint64 for "roi_labels"/"pixel_labels";
    a pure function of (seed, voxel coordinates).
"""
from __future__ import annotations

import numpy as np

from mtneuro_jax.volumes import spec

GENERATOR_VERSION = "placeholder-0"


class PhantomVolume:

  def __init__(self, seed: int = 0):
    self.seed = int(seed)

  def _roi(self, box):
    z, y, x = np.meshgrid(*(np.arange(a, b) for a, b in zip(box.as_tuple()[::2], box.as_tuple()[1::2])), indexing="ij")
    roi = np.select([x < 2100, x < 3330, x < 4150], [5, 4, 2], 1).astype(np.uint64)
    annotated = (z >= spec.ROI_ANNOTATED_Z[0]) & (z < spec.ROI_ANNOTATED_Z[1])
    return np.where(annotated, roi, 0).astype(np.uint64), (z, y, x)

  def cutout(self, channel: str, box: spec.Box) -> np.ndarray:
    roi, (z, y, x) = self._roi(box)
    if channel == "roi_labels":
      return roi
    h = (z.astype(np.uint64) * np.uint64(73856093) ^ y.astype(np.uint64) * np.uint64(19349663)
         ^ x.astype(np.uint64) * np.uint64(83492791) ^ np.uint64(self.seed * 2654435761 % 2**32))
    if channel == "pixel_labels":
      return (h % np.uint64(4)).astype(np.uint64)
    return (h % np.uint64(256)).astype(np.uint8)
