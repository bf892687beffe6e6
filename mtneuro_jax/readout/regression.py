"""Linear readout of semantic features from embeddings: R^2 in-sample and held out.

For every feature separately, rows where the feature is NaN (undefined, e.g. a
nearest-neighbour distance with fewer than two cells) are dropped for that feature
only. The model is ordinary least squares with an intercept, no standardisation or
regularisation (as the paper's scikit-learn ``LinearRegression``), solved by
``numpy.linalg.lstsq`` (minimum-norm when the embedding is rank deficient).

* **Paper protocol (in-sample)**: fit on all rows, R^2 on the same rows, as the
  reference code does (``reg.fit(X, y); reg.score(X, y)``). Optimistic: with D-dim
  embeddings it rewards D free parameters.
* **Held out**: grouped K-fold over contiguous z-blocks (``HeldOutConfig``). Slices are
  cut into blocks of ``block_size`` consecutive z (block b = (z - z_min) // block_size,
  z_min per cube/region stack); block b goes to fold b % folds, for every region at once,
  so each test fold holds all regions in equal parts. A z-block is never split between
  train and test; additionally, training drops the rows within ``gap`` slices of a test
  slice of the same stack, so a cell seen in the test block cannot sit in a training
  slice next to it. R^2 is pooled over the out-of-fold predictions of all rows:
  1 - sum (y - y_oof)^2 / sum (y - mean y)^2. Per-fold R^2 values are kept too.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from mtneuro_jax.errors import UserError

IN_SAMPLE = "paper protocol (in-sample)"
HELD_OUT = "held out (z-block CV)"


class RegressionError(UserError):
  """Bad input to the readout."""


@dataclasses.dataclass(frozen=True)
class HeldOutConfig:
  """Grouped K-fold over contiguous z-blocks (see the module docstring).

  Defaults for 360-slice stacks: 10 blocks of 36 slices, 5 folds (2 blocks each), and
  8 slices (about one cell diameter, 9 um) purged from training on each side of a
  test block.
  """

  block_size: int = 36
  folds: int = 5
  gap: int = 8

  def __post_init__(self):
    if self.block_size < 1 or self.folds < 2 or self.gap < 0:
      raise RegressionError(
        f"held-out CV needs block_size >= 1, folds >= 2, gap >= 0 (got {self}); fix the values"
      )


def z_blocks(z: np.ndarray, group: np.ndarray, block_size: int) -> np.ndarray:
  """Block index int64 [N] of each row: (z - min z of its group) // block_size."""
  z, group = np.asarray(z, np.int64), np.asarray(group, np.int64)
  zmin = np.zeros_like(z)
  for g in np.unique(group):
    m = group == g
    zmin[m] = z[m].min()
  return (z - zmin) // int(block_size)


def folds(
  z: np.ndarray, group: np.ndarray, config: HeldOutConfig = HeldOutConfig()
) -> list[tuple[np.ndarray, np.ndarray]]:
  """[(train row indices, test row indices)] of the grouped z-block K-fold.

  Args:
    z: int [N] slice of each row; group: int [N] its stack (cube set x region).
  Folds whose train or test part is empty are left out.
  """
  z, group = np.asarray(z, np.int64), np.asarray(group, np.int64)
  block = z_blocks(z, group, config.block_size)
  fold_of = block % config.folds
  out = []
  for k in range(config.folds):
    test = fold_of == k
    train = ~test
    if config.gap:
      for g in np.unique(group):
        m = group == g
        tz = np.unique(z[m & test])
        if not tz.size:
          continue
        zg = z[m]
        i = np.clip(np.searchsorted(tz, zg), 1, tz.size) - 1
        near = np.minimum(np.abs(zg - tz[i]), np.abs(zg - tz[np.minimum(i + 1, tz.size - 1)]))
        drop = np.zeros_like(train)
        drop[np.flatnonzero(m)] = near <= config.gap
        train &= ~drop
    tr, te = np.flatnonzero(train), np.flatnonzero(test)
    if tr.size and te.size:
      out.append((tr, te))
  return out


def _fit_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray) -> np.ndarray:
  """OLS with intercept for one or more targets y_tr [n] or [n, T]: predictions for x_te.

  Solved on the centred normal equations with a minimum-norm least-squares solve of the
  D x D Gram matrix (D = embedding size, small next to the rows), which is what makes
  dozens of fits per embedding cheap; rank-deficient embeddings get the minimum-norm fit.
  """
  mx, my = x_tr.mean(0), y_tr.mean(0)
  xc = x_tr - mx
  w, *_ = np.linalg.lstsq(xc.T @ xc, xc.T @ (y_tr - my), rcond=None)
  return (x_te - mx) @ w + my


def r2(y: np.ndarray, pred: np.ndarray) -> float:
  """1 - SSE / SST (NaN when y is constant)."""
  y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
  sst = float(((y - y.mean()) ** 2).sum())
  if sst <= 0:
    return float("nan")
  return 1.0 - float(((y - pred) ** 2).sum()) / sst


def readout(
  x: np.ndarray,
  features: Mapping[str, np.ndarray],
  *,
  z: np.ndarray,
  group: np.ndarray,
  config: HeldOutConfig = HeldOutConfig(),
) -> dict[str, dict]:
  """R^2 of a linear readout of each feature from embeddings ``x`` float [N, D].

  Returns {feature: {'in_sample': R^2, 'held_out': pooled out-of-fold R^2,
  'held_out_folds': [R^2 per fold], 'n_rows': rows used, 'n_dropped': NaN rows,
  'fold_sizes': [test rows per fold]}}.
  """
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  z, group = np.asarray(z), np.asarray(group)
  if x.ndim != 2 or len(z) != n or len(group) != n:
    raise RegressionError(
      f"embeddings {x.shape}, z {z.shape}, group {group.shape}: give [N, D] and [N] arrays"
    )
  if not np.all(np.isfinite(x)):
    raise RegressionError("embeddings contain NaN or inf; recompute them")
  ys_all = {}
  for name, y in features.items():
    y = np.asarray(y, np.float64)
    if y.shape != (n,):
      raise RegressionError(f"feature {name} has shape {y.shape}; expected ({n},)")
    ys_all[name] = y
  # Features with the same defined rows share every fit (one solve, several targets).
  by_mask: dict[bytes, list[str]] = {}
  for name, y in ys_all.items():
    by_mask.setdefault(np.packbits(~np.isnan(y)).tobytes(), []).append(name)
  out = {}
  for names in by_mask.values():
    keep = ~np.isnan(ys_all[names[0]])
    xs, zs, gs = x[keep], z[keep], group[keep]
    ys = np.stack([ys_all[k][keep] for k in names], axis=1)  # [n_keep, T]
    base = {"n_rows": int(keep.sum()), "n_dropped": int(n - keep.sum())}
    if keep.sum() < 3:
      for k in names:
        out[k] = {
          **base,
          "in_sample": float("nan"),
          "held_out": float("nan"),
          "held_out_folds": [],
          "fold_sizes": [],
        }
      continue
    fit = _fit_predict(xs, ys, xs)
    oof = np.full(ys.shape, np.nan)
    fold_r2: list[list[float]] = []
    sizes = []
    for tr, te in folds(zs, gs, config):
      oof[te] = _fit_predict(xs[tr], ys[tr], xs[te])
      fold_r2.append([r2(ys[te, t], oof[te, t]) for t in range(len(names))])
      sizes.append(int(te.size))
    done = ~np.isnan(oof[:, 0])
    for t, k in enumerate(names):
      out[k] = {
        **base,
        "in_sample": r2(ys[:, t], fit[:, t]),
        "held_out": r2(ys[done, t], oof[done, t]) if done.sum() >= 2 else float("nan"),
        "held_out_folds": [f[t] for f in fold_r2],
        "fold_sizes": sizes,
      }
  return {k: out[k] for k in ys_all}
