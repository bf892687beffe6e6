"""Label statistics of dense micro labels: class fractions and 2D component morphology.

Shared by the phantom's fidelity report and its tests, and usable on any
``pixel_labels`` cutout. Labels are BossDB pixel ids (``spec.PIXEL_IDS``:
0 background, 1 vessel, 2 cell, 3 axon). Components are 2D, 8-connected, one
class at a time (everything else is background), counted per 128x128 tile,
like the Task 3 semantic features. The real expert masks (xray-thc) ship in
``real_masks/`` next to this module; ``load_real_masks`` reads them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import os
import pathlib
import types
from typing import Mapping

import numpy as np
import scipy.ndimage as ndi

from mtneuro_jax.errors import UserError
from mtneuro_jax.volumes import spec

_EIGHT = np.ones((3, 3), bool)
CLASS_NAMES = ("background", "vessel", "cell", "axon")  # index = BossDB pixel id
_PIX_VESSEL, _PIX_CELL, _PIX_AXON = (spec.PIXEL_IDS[c] for c in ("vessel", "cell", "axon"))


def class_fractions(labels: np.ndarray) -> np.ndarray:
  """Fractions of BossDB pixel ids 0..3 in ``labels`` (any shape): float64 [4], sums to 1."""
  counts = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=4)[:4]
  return counts / max(1, counts.sum())


def quadrants(tiles: np.ndarray, size: int = spec.QUADRANT) -> np.ndarray:
  """[N, Y, X] slices -> [N * (Y//size) * (X//size), size, size] non-overlapping tiles.

  Order: slice-major, then row, then column (for 256x256 slices: TL, TR, BL, BR,
  like Task 3's quadrants).
  """
  tiles = np.asarray(tiles)
  n, h, w = tiles.shape
  ny, nx = h // size, w // size
  t = tiles[:, : ny * size, : nx * size].reshape(n, ny, size, nx, size)
  return t.transpose(0, 1, 3, 2, 4).reshape(n * ny * nx, size, size)


def components(mask2d: np.ndarray) -> tuple[np.ndarray, int]:
  """8-connected components of a 2D bool mask: (label image int32 [Y, X], count)."""
  lab, n = ndi.label(np.asarray(mask2d, bool), structure=_EIGHT)
  return lab, int(n)


def component_shapes(lab: np.ndarray, n: int) -> dict[str, np.ndarray]:
  """Per-component area (pixels) and elongation (sqrt of the ratio of the second-moment
  eigenvalues; 1 = round) for a label image from ``components``. Arrays of length n."""
  if n == 0:
    return {"area": np.zeros(0), "elongation": np.zeros(0)}
  yy, xx = np.indices(lab.shape)
  lab_r = lab.ravel()
  area = np.bincount(lab_r, minlength=n + 1)[1:].astype(np.float64)
  moments = {}
  for name, v in (("y", yy), ("x", xx), ("yy", yy * yy), ("xx", xx * xx), ("xy", yy * xx)):
    moments[name] = (
      np.bincount(lab_r, weights=v.ravel().astype(np.float64), minlength=n + 1)[1:] / area
    )
  vyy = moments["yy"] - moments["y"] ** 2 + 1.0 / 12  # +1/12: a pixel's own extent
  vxx = moments["xx"] - moments["x"] ** 2 + 1.0 / 12
  vxy = moments["xy"] - moments["y"] * moments["x"]
  tr, det = vyy + vxx, vyy * vxx - vxy**2
  disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0.0))
  l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-12)
  return {"area": area, "elongation": np.sqrt(l1 / l2)}


def tile_stats(tiles: np.ndarray) -> dict:
  """Morphology of labels tiles ``[N, H, W]`` (BossDB pixel ids; usually 128x128).

  Returns a JSON-able dict: ``fractions`` {class: fraction}, and per class
  (vessel, cell, axon) ``components_per_tile`` (mean), ``median_area``,
  ``mean_area`` (pixels; over all components of all tiles), ``median_elongation``;
  for axons also ``largest_component_share`` (mean over tiles with axons of the
  largest component's share of the axon pixels: ~1 for one dense fibre mass).
  """
  tiles = np.asarray(tiles)
  if tiles.ndim != 3:
    raise ValueError(f"tiles must be [N, H, W], got shape {tiles.shape}")
  out: dict = {
    "n_tiles": int(len(tiles)),
    "tile_shape": list(tiles.shape[1:]),
    "fractions": dict(zip(CLASS_NAMES, class_fractions(tiles).round(5).tolist(), strict=True)),
  }
  for cid, name in enumerate(CLASS_NAMES):
    if cid == 0:
      continue
    counts, areas, elong, largest = [], [], [], []
    for t in tiles:
      lab, n = components(t == cid)
      counts.append(n)
      if n:
        sh = component_shapes(lab, n)
        areas.append(sh["area"])
        elong.append(sh["elongation"])
        largest.append(sh["area"].max() / sh["area"].sum())
    a = np.concatenate(areas) if areas else np.zeros(0)
    e = np.concatenate(elong) if elong else np.zeros(0)
    st = {
      "components_per_tile": float(np.mean(counts)),
      "median_area": float(np.median(a)) if a.size else 0.0,
      "mean_area": float(a.mean()) if a.size else 0.0,
      "median_elongation": float(np.median(e)) if e.size else 0.0,
    }
    if name == "axon":
      st["largest_component_share"] = float(np.mean(largest)) if largest else 0.0
    out[name] = st
  return out


# Issue 12's calibration targets: per-tile quantities whose region means (and, for axons, the
# tile-to-tile spread) the phantom must match against the real masks.
CALIBRATION_KEYS = (
  "cells_per_tile",  # 8-connected cell components per tile
  "cell_area",  # mean cell component area (pixels), over all cells of all tiles
  "cell_nn_distance",  # mean distance (pixels) from a cell centroid to its nearest cell in its tile
  "vessel_density",  # vessel pixel fraction per tile
  "axon_density",  # axon pixel fraction per tile
)


def calibration_stats(tiles: np.ndarray) -> dict:
  """Per-tile morphology of label tiles ``[N, H, W]`` (BossDB pixel ids; 128x128 tiles).

  Returns a JSON-able dict ``{key: {"mean": float, "sd": float, "n": int}}`` for every
  ``CALIBRATION_KEYS`` entry. ``mean``/``sd`` are over tiles (population sd), except
  ``cell_area`` (over all cell components) and ``cell_nn_distance`` (over all cells that have
  a neighbour in their tile); ``n`` is how many values entered; an empty set gives NaN.
  """
  tiles = np.asarray(tiles)
  if tiles.ndim != 3:
    raise ValueError(f"tiles must be [N, H, W], got shape {tiles.shape}")
  values: dict[str, list] = {k: [] for k in CALIBRATION_KEYS}
  for t in tiles:
    lab, n = components(t == _PIX_CELL)
    values["cells_per_tile"].append([n])
    values["vessel_density"].append([float(np.mean(t == _PIX_VESSEL))])
    values["axon_density"].append([float(np.mean(t == _PIX_AXON))])
    if n:
      idx = np.arange(1, n + 1)
      area = ndi.sum_labels(np.ones(lab.shape), lab, idx)
      values["cell_area"].append(area)
      if n >= 2:
        cy, cx = np.asarray(ndi.center_of_mass(np.ones(lab.shape), lab, idx)).T
        d = np.hypot(cy[:, None] - cy[None], cx[:, None] - cx[None])
        np.fill_diagonal(d, np.inf)
        values["cell_nn_distance"].append(d.min(axis=1))
  out = {}
  for k, parts in values.items():
    v = np.concatenate([np.asarray(p, np.float64) for p in parts]) if parts else np.zeros(0)
    out[k] = {
      "mean": float(v.mean()) if v.size else float("nan"),
      "sd": float(v.std()) if v.size else float("nan"),
      "n": int(v.size),
    }
  return out


def calibration_check(phantom: dict, real: dict, rel_tol: float = 0.25, sd_factor: float = 2.0):
  """Issue 12's acceptance on two ``calibration_stats`` dicts of one region.

  Every key's phantom mean within ``rel_tol`` of the real mean (axon density: absolute
  0.02 when the real mean is ~0, as in ZI), and the axon-density tile-to-tile sd within a
  factor ``sd_factor`` of the real one (or both below 0.01). Returns ``{check: bool}``.
  """
  out = {}
  for k in CALIBRATION_KEYS:
    p, r = phantom[k]["mean"], real[k]["mean"]
    if k == "axon_density" and r < 0.02:
      out[k] = bool(abs(p - r) <= 0.02)
    else:
      out[k] = bool(abs(p - r) <= rel_tol * abs(r))
  ps, rs = phantom["axon_density"]["sd"], real["axon_density"]["sd"]
  out["axon_density_sd"] = bool(
    (ps < 0.01 and rs < 0.01) or (rs > 0 and 1.0 / sd_factor <= ps / rs <= sd_factor)
  )
  return out


# ---------------------------------------------------------------------------
# The real expert masks shipped with the package (``real_masks/``: xray-thc, Prasad et al. 2020,
# CC-BY-4.0; its README gives the source and the label ids).
REAL_MASKS_ENV = "MTNEURO_REAL_MASKS"
# Pinned so that a truncated, re-saved or look-alike file fails loudly instead of silently
# changing the calibration numbers.
REAL_MASKS_SHA256: Mapping[str, str] = types.MappingProxyType(
  {
    "masks_ctx.npz": "e3d2f710cc723b70b5a1991de308b100d206c4bee47eff5bfe48d7f1ad7bc3e2",
    "masks_str.npz": "7579b3efd00f1dc2a4de7139540c7e00b8618fe035d334cafb04633979114016",
    "masks_trn.npz": "a1447d9e9e726a679e586274a04c9cc60cda1cf0cf66bdd56ba2e580b9912cc0",
    "masks_zi.npz": "de83ecccd2076af511402b4f124a5b9a8565ee9efaec3ce228aa400654dc6c51",
  }
)


def _override(masks_dir: str | None, shipped: bool) -> str | None:
  if shipped:
    if masks_dir:
      raise ValueError("masks_dir and shipped=True exclude each other")
    return None
  return masks_dir or os.environ.get(REAL_MASKS_ENV)


def real_masks_source(masks_dir: str | None = None, *, shipped: bool = False) -> str:
  """Where ``load_real_masks`` reads: ``masks_dir``, else ``$MTNEURO_REAL_MASKS``, else the shipped copy.

  ``shipped=True``: always the shipped copy (``$MTNEURO_REAL_MASKS`` ignored). Returns a short
  description for reports (the override's path, or the package-relative folder).
  """
  override = _override(masks_dir, shipped)
  if override:
    return f"{override} (override)"
  return "mtneuro_jax/volumes/real_masks (shipped with the package)"


def _read_verified(name: str, masks_dir: str | None, shipped: bool = False) -> bytes:
  """Bytes of mask file ``name`` after checking its SHA-256; UserError naming the file otherwise."""
  override = _override(masks_dir, shipped)
  if override:
    where = os.path.join(override, name)
    fix = f"point {REAL_MASKS_ENV} (or masks_dir) at a folder with the xray-thc masks"
    resource = pathlib.Path(override) / name
  else:
    # importlib.resources, so that the files are found in any install (editable, wheel, zip).
    where = f"mtneuro_jax/volumes/real_masks/{name}"
    fix = "reinstall the package or restore the file from git"
    resource = importlib.resources.files(__package__) / "real_masks" / name
  try:
    data = resource.read_bytes()
  except OSError as e:
    raise UserError(
      f"real mask file {where} cannot be read ({e.__class__.__name__}); {fix}"
    ) from None
  digest = hashlib.sha256(data).hexdigest()
  if digest != REAL_MASKS_SHA256[name]:
    raise UserError(
      f"real mask file {where} has SHA-256 {digest}, expected {REAL_MASKS_SHA256[name]} "
      f"(corrupted or not the xray-thc release); {fix}"
    )
  return data


def load_real_masks(
  region: str, masks_dir: str | None = None, *, shipped: bool = False
) -> np.ndarray:
  """The real masks of ``region`` (CTX/STR/VP/ZI) as BossDB pixel ids, uint8 [16, 128, 128] (tile, Y, X).

  Reads the shipped copy unless ``masks_dir`` or ``$MTNEURO_REAL_MASKS`` names another folder
  (``shipped=True``: the shipped copy, whatever the environment says); the file's SHA-256 must
  match ``REAL_MASKS_SHA256`` either way.
  """
  name = spec.XRAY_THC_REGION_FILES[region]
  with np.load(io.BytesIO(_read_verified(name, masks_dir, shipped))) as f:
    return spec.remap(f["masks"], spec.XRAY_THC_MASK_TO_PIXEL)


def real_mask_stats(masks_dir: str | None = None, *, shipped: bool = False) -> Mapping[str, dict]:
  """``tile_stats`` of the real masks, per region (``shipped``: as in ``load_real_masks``)."""
  return {r: tile_stats(load_real_masks(r, masks_dir, shipped=shipped)) for r in spec.REGIONS}


def real_calibration_stats(
  masks_dir: str | None = None, *, shipped: bool = False
) -> Mapping[str, dict]:
  """``calibration_stats`` of the real masks, per region (issue 12's targets)."""
  return {
    r: calibration_stats(load_real_masks(r, masks_dir, shipped=shipped)) for r in spec.REGIONS
  }
