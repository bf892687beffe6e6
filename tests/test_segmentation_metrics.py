"""Segmentation metrics against sklearn (both reductions), the evaluator end to end, overlays."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from mtneuro_jax import sharding
from mtneuro_jax.eval import segmentation as seg
from mtneuro_jax.eval.common import EvalContext
from mtneuro_jax.eval.registry import EVALUATORS

C = 5
NAMES = ("background", "vessel", "cell", "axon", "extra")


def _label_maps(seed, n=7, shape=(12, 10)):
  """Random truth/pred [N, *shape] over C classes.

  Class 4 never occurs (absent from truth and prediction in the whole set); class 3
  occurs only in images 0..2 (absent from both elsewhere); image 3 holds class 0 only
  in truth and prediction (no foreground class scored); predictions are noisy truth.
  """
  rng = np.random.default_rng(seed)
  truth = rng.integers(0, 4, (n,) + shape)
  truth[3:] = np.where(truth[3:] == 3, 0, truth[3:])
  pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, 3, truth.shape))
  pred[:3] = np.where(rng.random(pred[:3].shape) < 0.1, 3, pred[:3])
  truth[3], pred[3] = 0, 0
  return truth, pred


def _present(t, p):
  return sorted(set(np.unique(t)) | set(np.unique(p)))


@pytest.mark.parametrize("seed", [0, 1])
def test_dataset_reduction_matches_sklearn(seed):
  truth, pred = _label_maps(seed)
  tp, fp, fn = seg.per_image_stats(truth, pred, C)
  assert tp.shape == (len(truth), C)
  got = seg.dataset_scores(tp, fp, fn)
  t, p = truth.ravel(), pred.ravel()
  present = _present(t, p)
  assert 4 not in present
  f1 = skm.f1_score(t, p, labels=range(C), average=None, zero_division=0)
  iou = skm.jaccard_score(t, p, labels=range(C), average=None, zero_division=0)
  np.testing.assert_allclose(got["f1"][present], f1[present])
  np.testing.assert_allclose(got["iou"][present], iou[present])
  assert np.isnan(got["f1"][4]) and np.isnan(got["iou"][4])  # absent everywhere: no score
  np.testing.assert_allclose(got["f1"], 2 * got["iou"] / (1 + got["iou"]))  # one reduction

  m = seg.segmentation_metrics(
    tp, fp, fn, class_names=NAMES, confusion=seg.confusion_from_labels(truth, pred, C)
  )
  fg = [c for c in present if c != 0]
  for key, fn_ in (("f1", skm.f1_score), ("iou", skm.jaccard_score)):
    assert m[f"{key}_dataset/mean"] == pytest.approx(fn_(t, p, labels=present, average="macro"))
    assert m[f"{key}_dataset/mean_fg"] == pytest.approx(fn_(t, p, labels=fg, average="macro"))
    for c in present:
      assert m[f"{key}_dataset/{NAMES[c]}"] == pytest.approx(fn_(t, p, labels=[c], average="macro"))
  assert m["pixel_accuracy"] == pytest.approx(skm.accuracy_score(t, p))
  np.testing.assert_array_equal(m["confusion"], skm.confusion_matrix(t, p, labels=range(C)))
  assert m["num_images"] == len(truth)


@pytest.mark.parametrize("seed", [0, 1])
def test_image_reduction_matches_sklearn(seed):
  truth, pred = _label_maps(seed)
  n = len(truth)
  tp, fp, fn = seg.per_image_stats(truth, pred, C)
  got = seg.per_image_scores(tp, fp, fn)
  m = seg.segmentation_metrics(tp, fp, fn, class_names=NAMES)
  for key, fn_ in (("f1", skm.f1_score), ("iou", skm.jaccard_score)):
    want = np.full((n, C), np.nan)
    image_mean, image_mean_fg = [], []
    for i in range(n):
      t, p = truth[i].ravel(), pred[i].ravel()
      present = _present(t, p)  # classes absent from both are excluded, not scored 1
      want[i, present] = fn_(t, p, labels=present, average=None)
      image_mean.append(fn_(t, p, labels=present, average="macro"))
      fg = [c for c in present if c != 0]
      if fg:  # image 3 has no foreground class in truth or prediction: left out
        image_mean_fg.append(fn_(t, p, labels=fg, average="macro"))
    np.testing.assert_allclose(got[f"{key}_per_image"], want)
    class_mean = np.array(
      [np.mean(w[~np.isnan(w)]) if np.any(~np.isnan(w)) else np.nan for w in want.T]
    )
    np.testing.assert_allclose(got[key], class_mean)
    assert np.isnan(class_mean[4])
    assert len(image_mean_fg) == n - 1
    assert m[f"{key}_image/mean"] == pytest.approx(np.mean(image_mean))
    assert m[f"{key}_image/mean_fg"] == pytest.approx(np.mean(image_mean_fg))
    for c in range(4):
      assert m[f"{key}_image/{NAMES[c]}"] == pytest.approx(class_mean[c])
    assert np.isnan(m[f"{key}_image/extra"])


def test_absent_class_excluded_not_scored_one():
  # Class 1 occurs in image 0 only (F1 there 2*1/(2*1+1+0) = 2/3); image 1 has neither
  # truth nor prediction of class 1. The reference (zero_division=1) would report (2/3 + 1)/2.
  truth = np.array([[0, 1, 0, 0], [0, 0, 0, 0]])
  pred = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
  m = seg.segmentation_metrics(*seg.per_image_stats(truth, pred, 2), class_names=("bg", "x"))
  assert m["f1_image/x"] == pytest.approx(2 / 3)
  assert m["iou_image/x"] == pytest.approx(1 / 2)
  assert m["f1_image/mean_fg"] == pytest.approx(2 / 3)
  # Image 0: bg F1 = 2*2/(2*2+0+1) = 0.8; image 1: bg only, F1 1.
  assert m["f1_image/mean"] == pytest.approx(((0.8 + 2 / 3) / 2 + 1.0) / 2)


def test_perfect_prediction_scores_one():
  truth, _ = _label_maps(3)
  m = seg.segmentation_metrics(
    *seg.per_image_stats(truth, truth, C),
    class_names=NAMES,
    confusion=seg.confusion_from_labels(truth, truth, C),
  )
  for key, v in m.items():
    if key.endswith("/extra"):
      assert np.isnan(v)
    elif "_dataset/" in key or "_image/" in key or key == "pixel_accuracy":
      assert v == pytest.approx(1.0), key


def test_accumulator_streams_like_one_shot():
  truth, pred = _label_maps(4, n=9)
  acc = seg.SegmentationAccumulator(C)
  valid = np.ones(9, bool)
  valid[[2, 7]] = False
  for s in range(0, 9, 4):
    acc.add(truth[s : s + 4], pred[s : s + 4], valid[s : s + 4])
  tp, fp, fn = acc.stats()
  want = seg.per_image_stats(truth[valid], pred[valid], C)
  for a, b in zip((tp, fp, fn), want, strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
    acc.confusion, skm.confusion_matrix(truth[valid].ravel(), pred[valid].ravel(), labels=range(C))
  )


def test_bad_input_raises():
  with pytest.raises(ValueError, match="outside"):
    seg.per_image_stats(np.zeros((1, 2, 2), int), np.full((1, 2, 2), 3), 3)
  with pytest.raises(ValueError, match="shape"):
    seg.per_image_stats(np.zeros((1, 2, 2), int), np.zeros((1, 2, 3), int), 3)


# ---------------------------------------------------------------------------
# The evaluator through a fake EvalContext.
def _context(masks, batch_size, predict, names, mesh=None):
  """Batches like pipeline.eval_batches (padded with valid=False rows), optionally sharded."""
  n = len(masks)

  def open_batches(split, task=None):
    assert split == "val" and task is None
    for s in range(0, n, batch_size):
      idx = np.arange(s, s + batch_size)
      valid = idx < n
      idx = np.where(valid, idx, 0)  # padding repeats row 0 (with a wrong mask): must not count
      mask = masks[idx].copy()
      mask[~valid] = len(names) - 1
      batch = {
        "image": np.zeros(mask.shape + (1,), np.float32),
        "mask": mask.astype(np.int32),
        "valid": valid,
      }
      yield sharding.shard_batch(batch, mesh) if mesh is not None else batch

  def dataset_info(task=None):
    return {"class_names": tuple(names), "num_classes": len(names), "target_key": "mask"}

  return EvalContext(predict_fn=predict, open_batches=open_batches, dataset_info=dataset_info)


def test_evaluator_end_to_end(tmp_path):
  names = ("other", "vessel", "cell")
  rng = np.random.default_rng(0)
  masks = rng.integers(0, 3, (11, 4, 6, 6))  # 3D windows [N, Z, Y, X]
  masks[:, 0, 0, 0] = 1  # every class present somewhere in every image
  masks[:, 0, 0, 1] = 2
  mesh = sharding.make_mesh()
  fn = EVALUATORS["segmentation"]

  def oracle(batch):
    return {"logits": 5.0 * jax.nn.one_hot(batch["mask"], 3)}

  ctx = _context(masks, 8, jax.jit(oracle), names, mesh)
  out = fn(
    ctx,
    eval_cfg={"kind": "segmentation", "split": "val", "name": "v"},
    workdir=str(tmp_path),
    step=5,
  )
  metric_keys = {
    f"{m}_{r}/{s}"
    for m in ("f1", "iou")
    for r in ("dataset", "image")
    for s in names + ("mean", "mean_fg")
  }
  assert set(out) == metric_keys | {"pixel_accuracy", "confusion", "num_images"}
  assert out["num_images"] == 11  # padding rows not counted
  for k in metric_keys | {"pixel_accuracy"}:
    assert out[k] == pytest.approx(1.0), k
  counts = np.bincount(masks.ravel(), minlength=3)
  np.testing.assert_array_equal(out["confusion"], np.diag(counts))
  saved = json.loads((tmp_path / "eval" / "v_step5_confusion.json").read_text())
  assert saved["class_names"] == list(names) and saved["iou_dataset/mean_fg"] == 1.0
  assert os.path.getsize(tmp_path / "eval" / "v_step5_confusion.png") > 0

  def constant(batch):  # always class 0: a majority-class predictor
    return {"logits": jnp.zeros(batch["mask"].shape + (3,)).at[..., 0].set(1.0)}

  out = fn(_context(masks, 4, constant, names), eval_cfg={"split": "val"}, workdir=None, step=0)
  total = counts.sum()
  assert out["pixel_accuracy"] == pytest.approx(counts[0] / total)
  assert out["f1_dataset/other"] == pytest.approx(
    2 * counts[0] / (2 * counts[0] + total - counts[0])
  )
  assert out["iou_dataset/other"] == pytest.approx(counts[0] / total)
  assert out["iou_dataset/mean_fg"] == 0.0 and out["f1_image/mean_fg"] == 0.0
  assert out["iou_dataset/mean"] == pytest.approx(counts[0] / total / 3)
  np.testing.assert_array_equal(np.asarray(out["confusion"])[:, 1:], 0)
  json.dumps(out)


def test_evaluator_class_count_mismatch():
  masks = np.zeros((2, 4, 4), int)
  ctx = _context(masks, 2, lambda b: {"logits": jnp.zeros(b["mask"].shape + (4,))}, ("a", "b", "c"))
  with pytest.raises(ValueError, match="num_classes"):
    EVALUATORS["segmentation"](ctx, eval_cfg={"split": "val"}, workdir=None, step=0)


# ---------------------------------------------------------------------------
# Overlays.
def test_overlay_png_2d_and_3d(tmp_path):
  import matplotlib.image as mimage

  rng = np.random.default_rng(0)
  names4 = ("background", "vessel", "cell", "axon")
  p2 = seg.overlay_png(
    str(tmp_path / "a" / "2d.png"),
    rng.normal(size=(32, 32, 1)),
    rng.integers(0, 4, (32, 32)),
    rng.integers(0, 4, (32, 32)),
    class_names=names4,
    title="2D",
  )
  p3 = seg.overlay_png(
    str(tmp_path / "3d.png"),
    rng.normal(size=(8, 32, 32)),
    rng.integers(0, 3, (8, 32, 32)),
    rng.integers(0, 3, (8, 32, 32)),
    class_names=("other", "vessel", "cell"),
    colors={"cell": "magenta"},
  )
  im2, im3 = mimage.imread(p2), mimage.imread(p3)
  assert os.path.getsize(p2) > 0 and os.path.getsize(p3) > 0
  assert im3.shape[0] > 2 * im2.shape[0]  # three z-slices, one row each
  assert seg.class_colors(names4) == [None, (1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0)]
  with pytest.raises(ValueError, match="shape"):
    seg.overlay_png(
      str(tmp_path / "x.png"),
      np.zeros((4, 4)),
      np.zeros((4, 5)),
      np.zeros((4, 5)),
      class_names=names4,
    )
