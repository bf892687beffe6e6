"""PCA/NMF baselines: fit on a tiny exported dataset, scored by the shared classification evaluator."""

import json
import os

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from configs import task1_pca_nmf
from mtneuro_jax.baselines import pca_nmf
from mtneuro_jax.data import pipeline


def _config(method, data_dir, n_components=8):
  c = task1_pca_nmf.get_config(f"{method},tiny")
  c.data.data_dir = data_dir
  c.data.task = "task1_roi_c1"
  c.baseline.n_components = n_components
  c.baseline.nmf_max_iter = 100
  c.unlock()
  # ROI-C1 model, ROI-C2 test set: the train-once-test-twice evals the tables use.
  c.evals.test_c2 = {
    "kind": "classification",
    "split": "test",
    "protocol": "whole",
    "task": "task1_roi_c2",
  }
  c.lock()
  return c


@pytest.mark.parametrize("method", ["pca", "nmf"])
def test_fit_and_evaluate_on_tiny_export(tiny_data_dir, tmp_path, method):
  c = _config(method, tiny_data_dir)
  res = pca_nmf.fit_and_evaluate(c, str(tmp_path))
  assert res["baseline/method"] == method and res["baseline/n_components"] == 8
  for name in ("test_whole", "val_whole", "test_c2"):
    assert 0.0 <= res[f"{name}/accuracy"] <= 1.0
    assert res[f"{name}/n"] > 0
    assert os.path.exists(tmp_path / "eval" / f"{name}_step0_confusion.png")
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["test_whole/accuracy"] == res["test_whole/accuracy"]
  # Every valid test tile counted once; the C2 eval really reads the ROI-C2 test set.
  for name, task in (("test_whole", "task1_roi_c1"), ("test_c2", "task1_roi_c2")):
    assert res[f"{name}/n"] == pipeline.dataset_info(c.data, task=task)["num_examples"]["test"]
  x1, _ = pca_nmf.load_split(pipeline, c.data, "test")
  x2, _ = pca_nmf.load_split(pipeline, c.data, "test", task="task1_roi_c2")
  assert x1.shape != x2.shape or not np.array_equal(x1, x2)


def test_pca_matches_a_direct_sklearn_pipeline(tiny_data_dir):
  """Same data through sklearn by hand -> the same test predictions and metrics."""
  c = _config("pca", tiny_data_dir)
  x, y = pca_nmf.load_split(pipeline, c.data, "train")
  xt, yt = pca_nmf.load_split(pipeline, c.data, "test")
  assert x.ndim == 3 and x.shape[1:] == (64, 64)  # 256 / 4x downsampling
  z = PCA(n_components=8, random_state=c.seed).fit(x.reshape(len(x), -1))
  sc = StandardScaler().fit(z.transform(x.reshape(len(x), -1)))
  clf = LogisticRegression(C=1.0, max_iter=2000).fit(
    sc.transform(z.transform(x.reshape(len(x), -1))), y
  )
  want = clf.predict(sc.transform(z.transform(xt.reshape(len(xt), -1))))
  res = pca_nmf.fit_and_evaluate(c, None)
  assert res["test_whole/n"] == len(yt)
  assert res["test_whole/accuracy"] == pytest.approx(accuracy_score(yt, want))
  assert res["test_whole/balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yt, want))


def test_nmf_sees_nonnegative_intensities_and_separable_data_is_learned():
  rng = np.random.default_rng(0)
  # Four classes = four mean intensities, normalised like the pipeline does.
  y = np.repeat(np.arange(4), 20)
  raw = np.clip(0.2 + 0.2 * y[:, None, None] + 0.02 * rng.normal(size=(80, 8, 8)), 0, 1)
  mean, std = 0.5, 0.25
  x = ((raw - mean) / std).astype(np.float32)
  m = pca_nmf.LinearEmbeddingClassifier(
    "nmf", n_components=4, seed=0, image_mean=mean, image_std=std
  )
  np.testing.assert_allclose(m._flat(x), raw.reshape(80, -1), atol=1e-5)
  m.fit(x, y)
  assert (m.logits(x).argmax(-1) == y).mean() == 1.0
  assert m.info["n_components"] == 4
  with pytest.raises(ValueError, match="method"):
    pca_nmf.LinearEmbeddingClassifier("ica")


def test_corners_protocol_rejected(tiny_data_dir):
  c = _config("pca", tiny_data_dir)
  c.evals.test_whole.protocol = "corners"
  with pytest.raises(ValueError, match="whole"):
    pca_nmf.fit_and_evaluate(c, None)


def test_nmf_transform_matches_sklearn():
  import warnings

  from sklearn.decomposition import NMF

  rng = np.random.default_rng(1)
  # Non-negative data of rank ~6 plus noise; 300 rows span two blocks of 256.
  x = np.abs(rng.normal(size=(300, 6)) @ rng.random((6, 40)) + 0.05 * rng.random((300, 40)))
  nmf = NMF(n_components=8, init="nndsvda", max_iter=500, random_state=0).fit(x[:200])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = nmf.transform(x)
  got = pca_nmf.nmf_transform(x, nmf.components_, max_iter=500, tol=nmf.tol)
  assert got.shape == want.shape and (got >= 0).all()
  np.testing.assert_allclose(
    np.linalg.norm(x - got @ nmf.components_), np.linalg.norm(x - want @ nmf.components_), rtol=1e-3
  )
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
