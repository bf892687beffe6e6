"""kNN clean-up of 3D region predictions (the ICIP 2021 paper's post-processing).

Per region, the ``keep`` largest 3D connected components (``scipy.ndimage.label``, 6-connected)
of the predicted label volume are trusted as seeds; every other voxel (small islands,
speckle) is relabelled by a majority vote of its ``k`` nearest seed voxels in 3D position
(``scipy.spatial.cKDTree``; positions scaled by the voxel ``spacing``; a tie goes to the
nearest seed's region). Seeds are subsampled for speed (deterministic: a fixed-seed
generator, at least ``min_seeds_per_region`` per region so a small region is not lost).

``region_accuracy`` scores a label volume against the ROI annotation where it exists.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from mtneuro_jax.volumes import spec

UNANNOTATED = 255  # roi_class value of voxels with no benchmark region label


def knn_cleanup(
  labels: np.ndarray,
  *,
  num_regions: int = len(spec.REGIONS),
  keep: int | tuple[int, ...] = 1,
  k: int = 5,
  spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
  valid: np.ndarray | None = None,
  max_seeds: int = 200_000,
  min_seeds_per_region: int = 2_000,
  seed: int = 0,
) -> np.ndarray:
  """Cleaned copy of ``labels`` (int ``[Z, Y, X]``, region index 0..num_regions-1).

  keep: m (all regions) or one m per region. valid: bool ``[Z, Y, X]``; voxels outside it are
  neither seeds nor relabelled (e.g. no prediction). Returns the same dtype.
  """
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"labels must be ZYX, got shape {labels.shape}")
  keeps = (keep,) * num_regions if isinstance(keep, (int, np.integer)) else tuple(keep)
  valid = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool)
  is_seed = np.zeros(labels.shape, bool)
  for r in range(num_regions):
    comp, n = ndimage.label((labels == r) & valid)
    if n == 0 or keeps[r] <= 0:
      continue
    sizes = np.bincount(comp.ravel())[1:]
    # Largest first; equal sizes by component id (scan order): deterministic.
    order = np.lexsort((np.arange(n), -sizes))[: keeps[r]] + 1
    is_seed |= np.isin(comp, order)
  relabel = valid & ~is_seed
  if not relabel.any() or not is_seed.any():
    return labels.copy()
  rng = np.random.default_rng(seed)
  seed_idx = []
  total = int(is_seed.sum())
  for r in range(num_regions):
    idx = np.flatnonzero(is_seed & (labels == r))
    if idx.size == 0:
      continue
    want = max(int(np.ceil(max_seeds * idx.size / total)), min_seeds_per_region)
    if idx.size > want:
      idx = np.sort(rng.choice(idx, size=want, replace=False))
    seed_idx.append(idx)
  seed_idx = np.concatenate(seed_idx)
  scale = np.asarray(spacing, np.float64)
  seed_pos = np.stack(np.unravel_index(seed_idx, labels.shape), -1) * scale
  seed_lab = labels.ravel()[seed_idx].astype(np.int64)
  q_idx = np.flatnonzero(relabel)
  q_pos = np.stack(np.unravel_index(q_idx, labels.shape), -1) * scale
  kk = min(k, seed_idx.size)
  _, nn = cKDTree(seed_pos).query(q_pos, k=kk)
  nn = nn.reshape(len(q_idx), kk)
  votes = np.zeros((len(q_idx), num_regions), np.float64)
  for j in range(kk):
    np.add.at(votes, (np.arange(len(q_idx)), seed_lab[nn[:, j]]), 1.0 if j else 1.0 + 1e-3)
  out = labels.copy()
  out.ravel()[q_idx] = votes.argmax(-1).astype(labels.dtype)
  return out


def roi_classes(roi_ids: np.ndarray) -> np.ndarray:
  """BossDB ``roi_labels`` ids -> region index (``spec.ROI_TO_TASK1_CLASS``), UNANNOTATED elsewhere."""
  lut = np.full(max(spec.ROI_IDS.values()) + 1, UNANNOTATED, np.uint8)
  for roi, cls in spec.ROI_TO_TASK1_CLASS.items():
    lut[roi] = cls
  ids = np.asarray(roi_ids).astype(np.int64)
  return np.where(ids < lut.size, lut[np.minimum(ids, lut.size - 1)], UNANNOTATED).astype(np.uint8)


def region_accuracy(
  pred: np.ndarray, truth: np.ndarray, *, num_regions: int = len(spec.REGIONS)
) -> dict:
  """Voxel accuracy of ``pred`` (region index) against ``truth`` (region index or UNANNOTATED).

  Returns ``{'overall', '<REGION>' (recall of that true region), 'voxels', 'voxels/<REGION>'}``;
  a region with no annotated voxel gets None.
  """
  pred = np.asarray(pred)
  truth = np.asarray(truth)
  ann = truth != UNANNOTATED
  out: dict = {"voxels": int(ann.sum())}
  out["overall"] = float((pred[ann] == truth[ann]).mean()) if ann.any() else None
  for r, name in enumerate(spec.REGIONS[:num_regions]):
    m = truth == r
    out[f"voxels/{name}"] = int(m.sum())
    out[name] = float((pred[m] == r).mean()) if m.any() else None
  return out
