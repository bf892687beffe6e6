"""Sliding-window inference of any 2D or 3D model over a ZYX volume, Gaussian-blended.

Geometry (all ZYX, in model-input voxels, i.e. after any xy downsampling):

* ``window_starts(size, window, stride)``: starts ``0, stride, 2*stride, ...`` while the window
  fits, plus one last window flush with the far edge, so every window lies inside the volume
  and every voxel is covered. Border handling: a volume smaller than the window on an axis is
  edge-padded (``np.pad(mode='edge')``) up to the window and the output is cropped back, so
  the model always sees full windows (there is no partial window and no zero padding).
* A 2D model's window is ``(1, wy, wx)`` (one z-slice per window, z stride 1); a 3D model's is
  ``(wz, wy, wx)``.
* Blending: every window's class probabilities are weighted by a Gaussian importance map
  (MONAI's ``sigma_scale=0.125`` of the window per axis, max 1, floored at ``1e-3`` so the
  voxels at a volume corner, covered by one window's edge only, still get a well-defined
  value) and ``out = sum_w(w * p) / sum_w(w)``, so a constant model output comes back exactly
  constant (up to float32 rounding) whatever the overlap.

Model outputs (docs/CONTRACTS.md, "Model outputs for deployment"): ``'logits'``
``[B, (Z,) Y, X, C]`` pixel logits -> the ``'micro'`` map, or ``[B, C]`` (a classifier: one class
per window) -> the ``'region'`` map, the window's probabilities broadcast over it;
``'region_logits'`` ``[B, R]`` -> the ``'region'`` map the same way. Other keys are ignored.

The model runs through one ``jax.jit`` whose batch axis is sharded on the ``('data',)`` mesh of
``mtneuro_jax.sharding`` (the batch is padded to a multiple of the mesh size; padded rows are
dropped). This module knows nothing of files: ``blockwise`` feeds it one block at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtneuro_jax import sharding
from mtneuro_jax.errors import UserError

# MONAI's sliding_window_inference defaults.
DEFAULT_OVERLAP = 0.25
DEFAULT_SIGMA_SCALE = 0.125
MIN_WEIGHT = 1e-3


class WindowError(UserError, ValueError):
  """A window / stride / batch that cannot tile a volume."""


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Window and stride, ZYX, in model-input voxels (``window[0] == 1`` for a 2D model)."""

  window: tuple[int, int, int]
  stride: tuple[int, int, int]

  def __post_init__(self):
    for name in ("window", "stride"):
      v = getattr(self, name)
      if len(v) != 3 or any(int(a) < 1 for a in v):
        raise WindowError(f"{name} {v} must be 3 positive ZYX sizes; e.g. --{name} 1,64,64")
    for a, (w, s) in enumerate(zip(self.window, self.stride, strict=True)):
      if s > w:
        raise WindowError(
          f"stride {self.stride} is larger than the window {self.window} on axis {'zyx'[a]}: "
          "voxels between windows would get no prediction; use a stride <= the window"
        )


def default_stride(window: tuple[int, int, int], overlap: float = DEFAULT_OVERLAP):
  """MONAI's rule: ``stride = max(1, floor(window * (1 - overlap)))`` per axis."""
  if not 0.0 <= overlap < 1.0:
    raise WindowError(f"overlap {overlap} must be in [0, 1); e.g. 0.25")
  return tuple(max(1, int(math.floor(w * (1.0 - overlap)))) for w in window)


def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Window starts along one axis of length ``size`` (see the module docstring)."""
  if window >= size:
    return [0]
  starts = list(range(0, size - window + 1, stride))
  if starts[-1] + window < size:
    starts.append(size - window)
  return starts


def window_grid(shape_zyx, tiling: Tiling) -> list[tuple[int, int, int]]:
  """Every window's (z, y, x) start in a volume of ``shape_zyx`` (after edge padding)."""
  axes = [
    window_starts(n, w, s) for n, w, s in zip(shape_zyx, tiling.window, tiling.stride, strict=True)
  ]
  return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def gaussian_importance(window, sigma_scale: float = DEFAULT_SIGMA_SCALE) -> np.ndarray:
  """float32 ``window``-shaped weights: a separable Gaussian, max 1, floored at ``MIN_WEIGHT``.

  An axis of length 1 (a 2D model's z) gets weight 1.
  """
  w = np.ones((), np.float64)
  for n in window:
    if n == 1:
      g = np.ones((1,))
    else:
      c = (n - 1) / 2.0
      sigma = max(n * sigma_scale, 1e-6)
      g = np.exp(-((np.arange(n) - c) ** 2) / (2.0 * sigma**2))
    w = np.multiply.outer(w, g)
  w = w / w.max()
  return np.maximum(w, MIN_WEIGHT).astype(np.float32)


class WindowPredictor:
  """Runs a model on batches of windows: jitted, batch sharded over the ('data',) mesh.

  ``apply_fn(variables, x) -> dict``: x float32 ``[B, Y, X, 1]`` (``dims=2``) or
  ``[B, Z, Y, X, 1]`` (``dims=3``), already normalised; returns the contract's outputs.
  ``variables`` are replicated on the mesh once. Calling the predictor on
  windows float32 ``[N, Z, Y, X]`` returns ``{'micro': [N, Z, Y, X, C] or None, 'region':
  [N, R] or None}`` float32 probabilities (softmax over classes) on the host.
  """

  def __init__(
    self,
    apply_fn: Callable[[Any, jax.Array], dict],
    variables: Any = None,
    *,
    dims: int,
    batch: int = 8,
    mesh=None,
  ):
    if dims not in (2, 3):
      raise WindowError(f"dims must be 2 or 3, got {dims}")
    self.dims = dims
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    ndev = int(self.mesh.devices.size)
    if batch < 1:
      raise WindowError(f"batch {batch} must be >= 1; e.g. --batch 8")
    # A batch that splits evenly over the devices (rounded up to the mesh size).
    self.batch = int(math.ceil(batch / ndev) * ndev)
    data = sharding.data_sharding(self.mesh)

    def run(variables, x):
      out = apply_fn(variables, x[..., None])
      res = {}
      logits = out["logits"]
      if logits.ndim == 2:
        res["region"] = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      else:
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        res["micro"] = p[:, None] if dims == 2 else p
      if "region_logits" in out:
        res["region"] = jax.nn.softmax(out["region_logits"].astype(jnp.float32), axis=-1)
      return res

    self._run = jax.jit(
      run, in_shardings=(sharding.replicated_sharding(self.mesh), data), out_shardings=data
    )
    self._variables = sharding.replicate(variables if variables is not None else {}, self.mesh)
    self._sharding = data

  def __call__(self, windows: np.ndarray) -> dict[str, np.ndarray | None]:
    n = windows.shape[0]
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, self.batch):
      chunk = np.asarray(windows[i : i + self.batch], np.float32)
      m = chunk.shape[0]
      if m < self.batch:  # pad the last batch: one compiled shape for every call
        pad = np.zeros((self.batch - m,) + chunk.shape[1:], np.float32)
        chunk = np.concatenate([chunk, pad])
      if self.dims == 2:
        chunk = chunk[:, 0]
      res = self._run(self._variables, jax.device_put(chunk, self._sharding))
      for k, v in res.items():
        outs.setdefault(k, []).append(np.asarray(v)[:m])
    return {
      "micro": np.concatenate(outs["micro"]) if "micro" in outs else None,
      "region": np.concatenate(outs["region"]) if "region" in outs else None,
    }


def blend(
  volume: np.ndarray,
  predictor: Callable[[np.ndarray], dict],
  tiling: Tiling,
  *,
  sigma_scale: float = DEFAULT_SIGMA_SCALE,
  max_windows: int = 256,
) -> dict[str, np.ndarray]:
  """Sliding-window prediction of a whole ``volume`` float32 ``[Z, Y, X]`` (model input space).

  Returns ``{'micro': float32 [Z, Y, X, C], 'region': float32 [Z, Y, X, R]}`` (the keys the
  model produces), blended probabilities. Windows are fed ``max_windows`` at a time (host memory
  bound); the order of windows, hence of the float sums, is fixed by the grid, so the result
  does not depend on the batch size or the number of devices beyond float rounding of the model.
  """
  volume = np.asarray(volume, np.float32)
  if volume.ndim != 3:
    raise WindowError(f"volume must be ZYX, got shape {volume.shape}")
  shape = volume.shape
  padded_shape = tuple(max(n, w) for n, w in zip(shape, tiling.window, strict=True))
  if padded_shape != shape:
    volume = np.pad(
      volume, [(0, p - n) for p, n in zip(padded_shape, shape, strict=True)], mode="edge"
    )
  starts = window_grid(padded_shape, tiling)
  wz, wy, wx = tiling.window
  weight = gaussian_importance(tiling.window, sigma_scale)
  wsum = np.zeros(padded_shape, np.float32)
  for z, y, x in starts:
    wsum[z : z + wz, y : y + wy, x : x + wx] += weight
  acc: dict[str, np.ndarray] = {}
  for i in range(0, len(starts), max_windows):
    group = starts[i : i + max_windows]
    windows = np.stack([volume[z : z + wz, y : y + wy, x : x + wx] for z, y, x in group])
    probs = predictor(windows)
    for key in ("micro", "region"):
      p = probs.get(key)
      if p is None:
        continue
      if key not in acc:
        acc[key] = np.zeros(padded_shape + (p.shape[-1],), np.float32)
      a = acc[key]
      for j, (z, y, x) in enumerate(group):
        # p[j]: [C] (one class vector per window, spread over it) or [Z, Y, X, C].
        a[z : z + wz, y : y + wy, x : x + wx] += weight[..., None] * p[j]
  crop = tuple(slice(0, n) for n in shape)
  return {k: (v / wsum[..., None])[crop] for k, v in acc.items()}


def apply_fn_for(model) -> Callable[[Any, jax.Array], dict]:
  """``(variables, x) -> model.apply(variables, x, train=False)``."""

  def apply(variables, x):
    return model.apply(variables, x, train=False)

  return apply
