"""Task 3 semantic features of dense micro labels, one row per 128x128 quadrant.

Input: ``pixel_labels`` with BossDB ids (``spec.PIXEL_IDS``: 0 background, 1 vessel,
2 cell, 3 axon). Every feature is computed on one class at a time (everything else is
background). Features, in ``FEATURES`` order:

* ``vessel_density``: fraction of the quadrant's pixels labelled vessel (0..1; the
  reference reports percent, which changes no R^2). 0 for a vessel-free quadrant.
* ``axon_density``: fraction of pixels labelled axon (0..1).
* ``cell_count``: number of cell components present in the quadrant.
* ``cell_size``: mean area (pixels, 1 px = 1.17 um) of those cells' cross-sections in
  the quadrant's slice; NaN when fewer than ``min_cells_for_size`` (1) cells.
* ``nn_distance``: mean over the quadrant's cells of the Euclidean distance (pixels)
  from the cell's centroid to the nearest other cell's centroid; NaN when fewer than
  two cells (a nearest neighbour needs two). Self-distances are never averaged in.

NaN marks "undefined here": the regression drops those rows for that feature only.

Choices (``FeatureConfig``), each explicit:

* ``components``: ``'3d'`` (default) labels cells as 3D connected components of the
  region's stack of consecutive slices, as the reference code does (cc3d); a cell seen
  in two disconnected pieces within one quadrant counts once, with the pieces' pooled
  area and centroid. ``'2d'`` labels each full slice on its own. Stacks of
  non-consecutive slices (the shipped real masks) must use ``'2d'``.
* ``connectivity``: ``'face'`` (default: 4-connected in 2D, 6-connected in 3D, the
  reference's cc3d setting) or ``'full'`` (8 / 26).
* Components are labelled on the whole slice (2D) or the whole stack (3D), then cut
  to each quadrant, so a cell that crosses the quadrant border is one cell on each
  side. ``border``: ``'clip'`` (default) counts a cut cell in every quadrant it
  touches, with the part inside that quadrant (area, centroid); ``'exclude'`` drops
  every cell that touches the quadrant's edge rows/columns (like skimage's
  ``clear_border``), for count, size and distances alike.

Only numpy and scipy.ndimage; nothing here reads files except ``real_mask_features``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import scipy.ndimage as ndi

from mtneuro_jax.errors import UserError
from mtneuro_jax.volumes import morphology, spec

FEATURES = ("vessel_density", "axon_density", "cell_count", "cell_size", "nn_distance")
# The paper's Table 3 column names.
FEATURE_LABELS: Mapping[str, str] = {
  "vessel_density": "Vessels",
  "axon_density": "Axons",
  "cell_count": "Cell count",
  "cell_size": "Cell size",
  "nn_distance": "NN distance",
}
FEATURE_UNITS: Mapping[str, str] = {
  "vessel_density": "fraction of pixels",
  "axon_density": "fraction of pixels",
  "cell_count": "cells",
  "cell_size": "pixels",
  "nn_distance": "pixels (1 px = 1.17 um)",
}
COMPONENTS = ("3d", "2d")
CONNECTIVITY = ("face", "full")
BORDER = ("clip", "exclude")

_VESSEL = spec.PIXEL_IDS["vessel"]
_CELL = spec.PIXEL_IDS["cell"]
_AXON = spec.PIXEL_IDS["axon"]


class FeatureError(UserError):
  """Bad input to the feature extractor."""


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """How the features are defined (see the module docstring)."""

  components: str = "3d"
  connectivity: str = "face"
  border: str = "clip"
  min_cells_for_size: int = 1
  quadrant: int = spec.QUADRANT

  def __post_init__(self):
    for name, known in (
      ("components", COMPONENTS),
      ("connectivity", CONNECTIVITY),
      ("border", BORDER),
    ):
      if getattr(self, name) not in known:
        raise FeatureError(
          f"feature {name}={getattr(self, name)!r} is unknown; use one of {', '.join(known)}"
        )
    if self.min_cells_for_size < 1:
      raise FeatureError(
        f"min_cells_for_size={self.min_cells_for_size}; a mean area needs at least 1 cell"
      )
    if self.quadrant < 1:
      raise FeatureError(f"quadrant={self.quadrant}; give a positive tile side in pixels")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _structure(ndim: int, connectivity: str) -> np.ndarray:
  return ndi.generate_binary_structure(ndim, 1 if connectivity == "face" else ndim)


def label_cells(labels: np.ndarray, config: FeatureConfig = FeatureConfig()) -> np.ndarray:
  """Cell components of a stack of slices: int64 [Z, Y, X], 0 = no cell, ids unique in the stack.

  ``labels``: BossDB pixel ids [Z, Y, X]; with ``components='3d'`` the Z slices must be
  consecutive (cells connect across them).
  """
  cells = np.asarray(labels) == _CELL
  if config.components == "3d":
    lab, _ = ndi.label(cells, structure=_structure(3, config.connectivity))
    return lab.astype(np.int64)
  out = np.zeros(cells.shape, np.int64)
  offset = 0
  s2 = _structure(2, config.connectivity)
  for z in range(cells.shape[0]):
    lab, n = ndi.label(cells[z], structure=s2)
    out[z] = np.where(lab > 0, lab.astype(np.int64) + offset, 0)
    offset += n
  return out


def _nn_mean(centroids: np.ndarray) -> float:
  """Mean distance from each point [n, 2] to its nearest other point (n >= 2)."""
  d = np.sqrt(((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1))
  np.fill_diagonal(d, np.inf)  # a cell is not its own neighbour
  return float(d.min(axis=1).mean())


def stack_features(
  labels: np.ndarray, config: FeatureConfig = FeatureConfig()
) -> dict[str, np.ndarray]:
  """Features of every quadrant of a stack of slices.

  Args:
    labels: BossDB pixel ids [Z, Y, X] (Y and X multiples of ``config.quadrant``; for
      ``components='3d'`` consecutive slices of one region).
    config: the feature definitions.

  Returns:
    {feature: float64 [Z * (Y // q) * (X // q)]}, rows ordered slice-major, then quadrant
    row, then quadrant column (for 256x256 slices: TL, TR, BL, BR = Task 3's quadrant ids).
  """
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise FeatureError(f"labels have shape {labels.shape}; give a [Z, Y, X] stack of slices")
  z, h, w = labels.shape
  q = config.quadrant
  if h % q or w % q or z == 0:
    raise FeatureError(
      f"labels of shape {labels.shape} do not tile into {q}x{q} quadrants; "
      f"give slices whose sides are multiples of {q}"
    )
  ny, nx = h // q, w // q
  nq = z * ny * nx

  def density(class_id: int) -> np.ndarray:
    m = (labels == class_id).reshape(z, ny, q, nx, q)
    return m.mean(axis=(2, 4), dtype=np.float64).reshape(nq)

  out = {"vessel_density": density(_VESSEL), "axon_density": density(_AXON)}

  lab = label_cells(labels, config)
  zz, yy, xx = np.nonzero(lab)
  ids = lab[zz, yy, xx]
  qi = zz * (ny * nx) + (yy // q) * nx + (xx // q)  # quadrant row of each cell pixel
  # One key per (quadrant, cell): the cell's part inside that quadrant of that slice.
  key = qi * (int(ids.max(initial=0)) + 1) + ids
  uniq, inv, area = np.unique(key, return_inverse=True, return_counts=True)
  cy = np.bincount(inv, weights=yy % q) / area
  cx = np.bincount(inv, weights=xx % q) / area
  cell_q = uniq // (int(ids.max(initial=0)) + 1)
  if config.border == "exclude":
    ly, lx = yy % q, xx % q
    edge = (ly == 0) | (ly == q - 1) | (lx == 0) | (lx == q - 1)
    keep = np.bincount(inv, weights=edge) == 0
    cell_q, area, cy, cx = cell_q[keep], area[keep], cy[keep], cx[keep]

  count = np.bincount(cell_q, minlength=nq).astype(np.float64)
  area_sum = np.bincount(cell_q, weights=area, minlength=nq)
  with np.errstate(invalid="ignore", divide="ignore"):
    size = np.where(count >= config.min_cells_for_size, area_sum / count, np.nan)
  nn = np.full(nq, np.nan)
  starts = np.searchsorted(cell_q, np.arange(nq + 1))  # cell_q is sorted (keys were)
  cent = np.stack([cy, cx], axis=1)
  for i in np.flatnonzero(count >= 2):
    nn[i] = _nn_mean(cent[starts[i] : starts[i + 1]])
  out.update(cell_count=count, cell_size=size, nn_distance=nn)
  return {k: out[k] for k in FEATURES}


# ---------------------------------------------------------------------------
# Task 3 rows (quadrants of 256x256 slices of several regions).
def rows_features(
  labels: np.ndarray,
  *,
  group: np.ndarray,
  z: np.ndarray,
  quadrant: np.ndarray,
  config: FeatureConfig = FeatureConfig(),
  grid: int = 2,
) -> dict[str, np.ndarray]:
  """Features of Task 3 rows, one 128x128 quadrant each, in the rows' own order.

  The quadrants of each ``group`` (one cube of one region) are put back into whole
  ``grid*q`` slices (quadrant id k at row k // grid, column k % grid; a missing quadrant
  is background) so that components see across quadrant borders; 3D components are
  labelled per run of consecutive z (never across a gap or across groups).

  Args:
    labels: uint [N, q, q] BossDB pixel ids of each row's quadrant.
    group, z, quadrant: int [N]: the row's cube/region group, slice z and quadrant id.

  Returns:
    {feature: float64 [N]}.
  """
  labels = np.asarray(labels)
  group, z, quadrant = (np.asarray(a, np.int64) for a in (group, z, quadrant))
  n, q = labels.shape[0], config.quadrant
  if labels.shape[1:] != (q, q):
    raise FeatureError(f"rows have shape {labels.shape[1:]}; expected {q}x{q} quadrants")
  if not (len(group) == len(z) == len(quadrant) == n):
    raise FeatureError("labels, group, z and quadrant must have one entry per row")
  if n and (quadrant.min() < 0 or quadrant.max() >= grid * grid):
    raise FeatureError(f"quadrant ids must be in 0..{grid * grid - 1}")
  out = {k: np.full(n, np.nan) for k in FEATURES}
  seen = set()
  for key in zip(group.tolist(), z.tolist(), quadrant.tolist(), strict=True):
    if key in seen:
      raise FeatureError(f"row (group, z, quadrant) = {key} occurs twice; rows must be unique")
    seen.add(key)
  for g in np.unique(group):
    rows_g = np.flatnonzero(group == g)
    zs = np.unique(z[rows_g])
    # Runs of consecutive z: 3D components never bridge a missing slice.
    breaks = np.flatnonzero(np.diff(zs) != 1) + 1
    for run in np.split(zs, breaks):
      stack = np.zeros((len(run), grid * q, grid * q), labels.dtype)
      sel = rows_g[np.isin(z[rows_g], run)]
      zi = np.searchsorted(run, z[sel])
      for r, j in zip(sel, zi, strict=True):
        qy, qx = divmod(int(quadrant[r]), grid)
        stack[j, qy * q : (qy + 1) * q, qx * q : (qx + 1) * q] = labels[r]
      feats = stack_features(stack, config)
      idx = zi * grid * grid + quadrant[sel]
      for k in FEATURES:
        out[k][sel] = feats[k][idx]
  return out


# ---------------------------------------------------------------------------
# The real expert masks (16 tiles of 128x128 per region, not neighbouring slices).
def real_mask_features(
  config: FeatureConfig = FeatureConfig(), masks_dir: str | None = None
) -> dict[str, dict[str, np.ndarray]]:
  """{region: {feature: float64 [16]}} of the shipped real masks (one row per tile).

  The tiles are independent 2D tiles, so components are always 2D here, whatever
  ``config.components`` says (the returned features say which config was used in
  ``real_mask_config``).
  """
  cfg = real_mask_config(config)
  return {r: stack_features(morphology.load_real_masks(r, masks_dir), cfg) for r in spec.REGIONS}


def real_mask_config(config: FeatureConfig) -> FeatureConfig:
  """``config`` with 2D components and the masks' tile size (the real masks are 2D tiles)."""
  return dataclasses.replace(config, components="2d", quadrant=spec.QUADRANT)


def region_means(features: Mapping[str, np.ndarray], region: np.ndarray) -> dict:
  """{region name: {feature: mean over rows where it is defined, or None; 'n_rows': n}}."""
  region = np.asarray(region)
  out = {}
  for i, name in enumerate(spec.REGIONS):
    m = region == i
    if not m.any():
      continue
    row: dict = {"n_rows": int(m.sum())}
    for k in FEATURES:
      v = np.asarray(features[k], np.float64)[m]
      v = v[~np.isnan(v)]
      row[k] = float(v.mean()) if v.size else None
      row[f"{k}_defined"] = int(v.size)
    out[name] = row
  return out
