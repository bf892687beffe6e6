"""UMAP views of Task 3 embeddings, coloured by region and by each semantic feature.

As the reference (and the paper's Fig. 4 / A4): embeddings standardised per dimension
(StandardScaler), then ``umap.UMAP(n_neighbors, random_state=42)`` to 2D. The reference
only calls ``plt.show()`` under the Agg backend, so its figures are never saved; here
each embedding gives one PNG with six panels (region + the five features; a feature's
colour scale spans its 1st..99th percentile, undefined (NaN) rows are grey).
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np

from mtneuro_jax.readout.features import FEATURE_LABELS, FEATURE_UNITS, FEATURES
from mtneuro_jax.volumes import spec

REGION_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")  # CTX, STR, VP, ZI


def subsample(n: int, max_points: int | None, seed: int = 0) -> np.ndarray:
  """Sorted row indices: all rows, or ``max_points`` drawn without replacement (fixed seed)."""
  if not max_points or max_points >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, int(max_points), replace=False))


def umap_2d(
  x: np.ndarray, *, n_neighbors: int = 100, n_epochs: int | None = None, random_state: int = 42
) -> np.ndarray:
  """float32 [N, 2] UMAP coordinates of standardised embeddings ``x`` [N, D]."""
  import umap  # umap-learn; imported late: numba compiles on first use

  x = np.asarray(x, np.float64)
  sd = x.std(0)
  x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
  reducer = umap.UMAP(
    n_neighbors=int(min(n_neighbors, len(x) - 1)),
    n_epochs=n_epochs,
    random_state=random_state,
  )
  with warnings.catch_warnings():
    # "n_jobs overridden by random_state": expected, the seed makes it single-threaded.
    warnings.filterwarnings("ignore", category=UserWarning, module="umap")
    return np.asarray(reducer.fit_transform(x), np.float32)


def save_umap_png(
  path: str,
  coords: np.ndarray,
  region: np.ndarray,
  features: Mapping[str, np.ndarray],
  *,
  title: str,
) -> str:
  """Writes the six-panel PNG of ``coords`` [N, 2] (rows of ``region`` [N], ``features`` [N])."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  coords = np.asarray(coords)
  region = np.asarray(region)
  fig, axes = plt.subplots(2, 3, figsize=(13.5, 8.5))
  ax = axes.flat[0]
  for i, name in enumerate(spec.REGIONS):
    m = region == i
    if m.any():
      ax.scatter(*coords[m].T, s=3, c=REGION_COLOURS[i], label=name, alpha=0.7, linewidths=0)
  ax.legend(markerscale=4, fontsize=8, loc="best")
  ax.set_title("region")
  for ax, k in zip(axes.flat[1:], FEATURES, strict=True):
    v = np.asarray(features[k], np.float64)
    ok = ~np.isnan(v)
    if (~ok).any():
      ax.scatter(*coords[~ok].T, s=3, c="lightgrey", linewidths=0, label="undefined")
      ax.legend(markerscale=4, fontsize=8, loc="best")
    if ok.any():
      lo, hi = np.percentile(v[ok], [1, 99])
      sc = ax.scatter(
        *coords[ok].T,
        s=3,
        c=v[ok],
        cmap="viridis",
        vmin=lo,
        vmax=max(hi, lo + 1e-12),
        linewidths=0,
      )
      fig.colorbar(sc, ax=ax, shrink=0.8)
    ax.set_title(f"{FEATURE_LABELS[k]} ({FEATURE_UNITS[k]})", fontsize=10)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
