"""Classification metrics against sklearn, and the 'whole'/'corners' evaluator end to end."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from mtneuro_jax.eval import classification as cls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  n, c = 97, 4
  labels = rng.integers(0, c, n)
  # Mostly right with some noise, so no metric is trivially 0 or 1.
  preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, c, n))
  groups = rng.integers(0, c, n)
  out = cls.classification_metrics(
    labels, preds, num_classes=c, class_names=list("ABCD"), groups=groups
  )
  np.testing.assert_array_equal(
    out["confusion"], skm.confusion_matrix(labels, preds, labels=range(c))
  )
  assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
  assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
  recalls = skm.recall_score(labels, preds, average=None, labels=range(c))
  for name, r in zip("ABCD", recalls, strict=True):
    assert out[f"recall/{name}"] == pytest.approx(r)
  for g, name in enumerate("ABCD"):
    m = groups == g
    assert out[f"acc_region/{name}"] == pytest.approx(skm.accuracy_score(labels[m], preds[m]))
  assert out["n"] == n
  json.dumps(out)  # JSON-able


def test_balanced_accuracy_with_absent_class_matches_sklearn():
  # Class 3 never occurs as a true label but is predicted: sklearn averages the present classes only.
  labels = np.array([0, 0, 1, 1, 2, 2, 2])
  preds = np.array([0, 3, 1, 1, 2, 0, 3])
  with pytest.warns(UserWarning):
    want = skm.balanced_accuracy_score(labels, preds)
  out = cls.classification_metrics(labels, preds, num_classes=4)
  assert out["balanced_accuracy"] == pytest.approx(want)
  assert np.isnan(out["recall/class3"])


def test_out_of_range_prediction_raises():
  with pytest.raises(ValueError, match="outside"):
    cls.confusion_matrix(np.array([0, 1]), np.array([0, 4]), 4)


def test_corner_views_order():
  img = jnp.arange(2 * 4 * 6).reshape(2, 4, 6, 1)
  tl, tr, bl, br = cls.corner_views(img)
  assert tl.shape == (2, 2, 3, 1)
  np.testing.assert_array_equal(tl, img[:, :2, :3])
  np.testing.assert_array_equal(tr, img[:, :2, 3:])
  np.testing.assert_array_equal(bl, img[:, 2:, :3])
  np.testing.assert_array_equal(br, img[:, 2:, 3:])


def _fake_batches(images, labels, regions, batch_size):
  """Eval batches like pipeline.eval_batches: last batch padded with valid=False rows."""
  n = len(labels)
  for s in range(0, n, batch_size):
    idx = np.arange(s, s + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, 0)  # padding rows repeat row 0; they must not count
    yield {
      "image": jnp.asarray(images[idx]),
      "label": jnp.asarray(labels[idx]),
      "region": jnp.asarray(regions[idx]),
      "valid": jnp.asarray(valid),
    }


def _predict(batch):
  # The class is the (rounded) mean intensity of the view: a deterministic "model".
  m = jnp.round(batch["image"].mean(axis=(1, 2, 3))).astype(jnp.int32)
  return {"logits": 5.0 * jnp.eye(4)[jnp.clip(m, 0, 3)]}


def test_evaluator_whole_and_corners(tmp_path):
  rng = np.random.default_rng(0)
  n, s = 11, 8
  labels = rng.integers(0, 4, n)
  regions = labels.copy()
  regions[0] = (labels[0] + 1) % 4  # one tile whose cube region differs from its class
  # Corner values per tile (TL, TR, BL, BR): which class the "model" sees in each corner.
  corner_cls = rng.integers(0, 4, (n, 4))
  images = np.zeros((n, s, s, 1), np.float32)
  h = s // 2
  for i in range(n):
    for k, (ys, xs) in enumerate(
      [
        (slice(0, h), slice(0, h)),
        (slice(0, h), slice(h, s)),
        (slice(h, s), slice(0, h)),
        (slice(h, s), slice(h, s)),
      ]
    ):
      images[i, ys, xs] = corner_cls[i, k]
  whole_pred = np.clip(np.round(images.mean(axis=(1, 2, 3))), 0, 3).astype(int)

  fn = cls.evaluate_classification
  out = fn(
    _predict,
    _fake_batches(images, labels, regions, 4),
    eval_cfg={"protocol": "whole", "split": "test"},
    workdir=str(tmp_path),
    step=7,
  )
  assert out["n"] == n  # the padding row of the last batch is not counted
  assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, whole_pred))
  assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, whole_pred))
  np.testing.assert_array_equal(
    out["confusion"], skm.confusion_matrix(labels, whole_pred, labels=range(4))
  )
  for r, name in enumerate(("CTX", "STR", "VP", "ZI")):
    m = regions == r
    if m.any():
      assert out[f"acc_region/{name}"] == pytest.approx((labels[m] == whole_pred[m]).mean())
  assert os.path.exists(tmp_path / "eval" / "test_whole_step7_confusion.png")
  saved = json.loads((tmp_path / "eval" / "test_whole_step7_confusion.json").read_text())
  assert saved["accuracy"] == out["accuracy"]

  out = fn(
    _predict,
    _fake_batches(images, labels, regions, 4),
    eval_cfg={"protocol": "corners", "name": "c"},
    workdir=str(tmp_path),
    step=3,
  )
  y4, p4 = np.repeat(labels, 4), corner_cls.reshape(-1)
  assert out["n"] == 4 * n and out["n_tiles"] == n
  assert out["accuracy"] == pytest.approx(skm.accuracy_score(y4, p4))
  assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y4, p4))
  np.testing.assert_array_equal(out["confusion"], skm.confusion_matrix(y4, p4, labels=range(4)))
  # Vote: mean softmax of one-hot*5 logits -> the most frequent corner class (ties -> smallest id).
  votes = np.array([np.bincount(r, minlength=4).argmax() for r in corner_cls])
  assert out["tile_vote_accuracy"] == pytest.approx((votes == labels).mean())
  assert os.path.exists(tmp_path / "eval" / "c_step3_confusion.png")


def test_unknown_protocol():
  with pytest.raises(ValueError, match="protocol"):
    cls.collect_predictions(_predict, iter([]), "quadrants")


def test_corners_on_sharded_pipeline_batches(tiny_data_dir, tmp_path):
  """Real eval batches (sharded over the 8 test devices, padded) through a jitted model, both protocols."""
  import jax

  from mtneuro_jax.data import pipeline
  from mtneuro_jax.models import MODELS
  from mtneuro_jax import sharding

  cfg = {
    "data_dir": tiny_data_dir,
    "task": "task1_roi_c1",
    "downsample": 4,
    "image_mean": 0.4894,
    "image_std": 0.1238,
    "random_crop": 0,
    "batch_size": 8,
    "eval_batch_size": 24,
  }
  mesh = sharding.make_mesh()
  n = pipeline.dataset_info(cfg)["num_examples"]["test"]
  model = MODELS["resnet18_xray"](num_classes=4, width_multiplier=1 / 16)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)), train=False)
  predict = jax.jit(lambda b: model.apply(variables, b["image"], train=False))
  fn = cls.evaluate_classification
  whole = fn(
    predict,
    pipeline.eval_batches(cfg, "test", mesh=mesh, global_batch_size=24),
    eval_cfg={"protocol": "whole"},
    workdir=None,
    step=0,
  )
  corners = fn(
    predict,
    pipeline.eval_batches(cfg, "test", mesh=mesh, global_batch_size=24),
    eval_cfg={"protocol": "corners"},
    workdir=None,
    step=0,
  )
  assert whole["n"] == n and corners["n"] == 4 * n and corners["n_tiles"] == n
  assert (
    np.sum(corners["confusion"], axis=1).tolist()
    == (4 * np.sum(whole["confusion"], axis=1)).tolist()
  )
