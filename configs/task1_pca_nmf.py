"""Task 1 PCA / NMF baselines: 256-d linear embedding of the tiles + logistic regression.

Run:
  python -m mtneuro_jax.baselines.pca_nmf --config configs/task1_pca_nmf.py:pca,quick --workdir out/runs/t1_pca
  python -m mtneuro_jax.baselines.pca_nmf --config configs/task1_pca_nmf.py:nmf --workdir out/runs/t1_nmf \
      --config.seed=1 --config.data.data_dir=out/data/bossdb

``arg`` (comma-separated): the method ``pca`` | ``nmf`` (default pca) and a data
preset of ``configs/task1_supervised.py`` (``paper`` default, ``quick``, ``tiny``),
whose data settings (downsampling, normalisation, batch sizes) and evals are
reused so the baselines see exactly the networks' inputs and are scored alike.
Paper (Table 1, 2x downsampling, ROI-C1): PCA 0.59, NMF 0.62. One run (fit + val, ROI-C1
and ROI-C2 tests) at 4x on 2 shared CPU cores: PCA ~6 s, NMF ~25 s; 2x and full
resolution have 4x and 16x the pixels.
Only 'whole'-tile evals apply (the embedding is fitted at the tile's size).
"""
from __future__ import annotations

import ml_collections

from configs import task1_supervised


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "").split(",") if p]
  methods = [p for p in parts if p in ("pca", "nmf")]
  presets = [p for p in parts if p not in ("pca", "nmf")]
  if len(methods) > 1:
    raise ValueError(f"pick one method, got {methods}")
  sup = task1_supervised.get_config(",".join(presets) or None)

  c = ml_collections.ConfigDict()
  c.seed = sup.seed  # random_state of PCA/NMF
  c.method = methods[0] if methods else "pca"
  c.data = ml_collections.ConfigDict(sup.data.to_dict())
  c.baseline = ml_collections.ConfigDict()
  c.baseline.n_components = 256  # the paper's 256-d embedding
  c.baseline.nmf_max_iter = 400
  c.baseline.nmf_init = "nndsvda"
  c.baseline.classifier_c = 1.0  # L2 strength of the logistic regression (on standardised embeddings)
  c.baseline.classifier_max_iter = 2000
  c.evals = ml_collections.ConfigDict()
  for name, ecfg in sup.evals.items():
    if ecfg.get("protocol", "whole") == "whole":
      c.evals[name] = ml_collections.ConfigDict({k: v for k, v in ecfg.items() if k != "every_steps"})
  c.lock()
  return c
