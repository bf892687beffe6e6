"""Task 1 PCA / NMF baselines: 256-d linear embedding of the tiles + logistic regression.

Run:
  python -m mtneuro_jax.baselines.pca_nmf --config configs/task1_pca_nmf.py:pca,quick \
      --workdir out/runs/t1_pca
  python -m mtneuro_jax.baselines.pca_nmf --config configs/task1_pca_nmf.py:nmf \
      --workdir out/runs/t1_nmf --config.seed=1 --config.data.data_dir=out/data/bossdb

How long, what to expect (test accuracy, ``test_whole/accuracy``, ROI-C1):
  quick  one fit + evals at 4x on 2 shared CPU cores: PCA ~5 s, NMF ~20 s (50 iterations).
         The SYNTHETIC phantom gives PCA ~0.65, NMF ~0.32 (Task 1 quick tables).
  paper  CPU is enough (sklearn): 2x has 4x the pixels of quick (full resolution 16x), NMF
         at 400 iterations takes minutes. The paper reports PCA 0.59, NMF 0.62 (2x, real data).
  tiny   seconds (tests).

``arg`` (comma-separated): the method ``pca`` | ``nmf`` (default pca), a recipe ``paper``
(default) | ``ref`` and a size ``quick`` | ``tiny`` (mtneuro_jax/configlib.py). The data
settings (downsampling, normalisation, batch sizes) and evals are those of
configs/task1_supervised.py for the same recipe and size, so the baselines see exactly the
networks' inputs and are scored alike (tests/test_configs.py checks it). Only 'whole'-tile
evals apply (the embedding is fitted at the tile's size).
"""

from __future__ import annotations

import ml_collections

from mtneuro_jax import configlib

RUNNER = "baseline"  # mtneuro_jax.baselines.pca_nmf.fit_and_evaluate
ARGS = (
  "pca",
  "nmf",
  "paper",
  "ref",
  "quick",
  "tiny",
  "pca,quick",
  "nmf,quick",
  "pca,tiny",
  "nmf,tiny",
  "pca,ref",
  "nmf,ref",
  "pca,ref,quick",
  "nmf,ref,tiny",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = configlib.parse_arg(arg, recipes=("paper", "ref"), methods=("pca", "nmf"))

  c = ml_collections.ConfigDict()
  c.seed = 1  # random_state of PCA/NMF
  c.method = a.method
  # As task1_supervised's data: ROI-C1 (cube A); task1_roi_c2 / task1_roi_c3 for the other settings.
  c.data = configlib.data_config("task1_roi_c1", downsample=2, batch_size=256, eval_batch_size=256)
  c.baseline = ml_collections.ConfigDict()
  c.baseline.n_components = 256  # the paper's 256-d embedding
  c.baseline.nmf_max_iter = 400
  c.baseline.nmf_init = "nndsvda"
  # L2 strength of the logistic regression (on standardised embeddings).
  c.baseline.classifier_c = 1.0
  c.baseline.classifier_max_iter = 2000
  c.evals = configlib.classification_evals(("test", "val"), curve_splits=())

  if a.recipe == "ref":
    configlib.apply_task1_ref_recipe(c)
  configlib.apply_size(c, a.size)

  c.lock()
  return c
