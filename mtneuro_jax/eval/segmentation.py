"""Task 2 segmentation evaluation: metrics named by their reduction, the evaluator, overlays.

Everything here is plain numpy on integer label maps (the evaluator only runs
``predict_fn`` and an argmax on device). An *image* is one sample as the
pipeline yields it: a 2D slice ``[Y, X]`` or a 3D window ``[Z, Y, X]``.

Per class ``c`` and image ``n`` the counts are ``tp[n, c]`` (truth c, predicted
c), ``fp[n, c]`` (predicted c, truth not c) and ``fn[n, c]`` (truth c, predicted
not c). The two reductions (docs/task2_metrics.md has the formulas and why):

* **dataset** (``f1_dataset/*``, ``iou_dataset/*``): sum tp/fp/fn over every
  image of the split, then ``F1 = 2tp / (2tp + fp + fn)`` and
  ``IoU = tp / (tp + fp + fn)``. A class absent from truth and prediction in the
  whole split is NaN and left out of the means.
* **image** (``f1_image/*``, ``iou_image/*``): the score of each image and class;
  a class absent from both truth and prediction in an image has no score there
  (NaN), so it neither helps nor hurts that image (the reference scores it 1).
  ``<class>`` = mean over the images where the class has a score;
  ``mean`` / ``mean_fg`` = mean over images of each image's mean over its scored
  classes (all classes / classes 1.. only; an image with no scored class is
  left out).

``mean`` includes the background (class 0: 'background' in 4-class, 'other' in
3-class), ``mean_fg`` does not. Under the dataset reduction F1 = 2 IoU / (1 + IoU)
per class; under the image reduction that holds per image only.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from mtneuro_jax.eval.common import (
  EvalContext,
  confusion_matrix,
  eval_name,
  to_host,
  write_confusion,
)

# The paper's Fig. 3 colours, by class name so the 3- and 4-class label sets both work.
# Classes not listed (background, 'other') are transparent over the grey image.
DEFAULT_COLORS: Mapping[str, tuple[float, float, float]] = {
  "axon": (0.0, 1.0, 1.0),  # cyan
  "vessel": (1.0, 0.0, 0.0),  # red
  "cell": (1.0, 1.0, 0.0),  # yellow
}
OVERLAY_ALPHA = 0.55  # label colour weight over the grey image; the tissue stays visible


# ---------------------------------------------------------------------------
# Counts.
def confusion_from_labels(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """Pixel confusion matrix [C, C] int64 (rows = truth) of label maps of any equal shape."""
  return confusion_matrix(np.asarray(truth).reshape(-1), np.asarray(pred).reshape(-1), num_classes)


def per_image_confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """Confusion matrix of each image: int64 [N, C, C] (rows = truth).

  Args:
    truth: int [N, ...] true classes in [0, C) (``[N, Y, X]`` or ``[N, Z, Y, X]``).
    pred: int [N, ...] predicted classes, same shape.
    num_classes: C.
  """
  truth = np.asarray(truth, np.int64)
  pred = np.asarray(pred, np.int64)
  if truth.shape != pred.shape:
    raise ValueError(f"truth {truth.shape} and pred {pred.shape} differ in shape")
  if truth.ndim < 1:
    raise ValueError("truth and pred need a leading image axis [N, ...]")
  n, c = truth.shape[0], int(num_classes)
  for name, v in (("truth", truth), ("pred", pred)):
    if v.size and (v.min() < 0 or v.max() >= c):
      raise ValueError(f"{name} outside [0, {c}): min {v.min()}, max {v.max()}")
  # One bincount over (image, true, predicted) triples: no per-image Python loop.
  flat = (np.arange(n, dtype=np.int64).reshape((n,) + (1,) * (truth.ndim - 1)) * c + truth) * c
  flat = flat + pred
  return np.bincount(flat.reshape(-1), minlength=n * c * c).reshape(n, c, c)


def stats_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """tp, fp, fn ([..., C]) from confusion matrices [..., C, C] (rows = truth)."""
  cm = np.asarray(cm, np.int64)
  tp = np.diagonal(cm, axis1=-2, axis2=-1)
  return tp, cm.sum(axis=-2) - tp, cm.sum(axis=-1) - tp


def per_image_stats(
  truth: np.ndarray, pred: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """tp, fp, fn per image and class: three int64 [N, C] (see ``per_image_confusion``)."""
  return stats_from_confusion(per_image_confusion(truth, pred, num_classes))


# ---------------------------------------------------------------------------
# Scores.
def _f1_iou(tp, fp, fn) -> tuple[np.ndarray, np.ndarray]:
  """F1 and IoU elementwise; NaN where tp + fp + fn == 0 (class in neither truth nor prediction)."""
  tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
  with np.errstate(invalid="ignore", divide="ignore"):
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def dataset_scores(tp, fp, fn) -> dict[str, np.ndarray]:
  """Dataset reduction: counts summed over images, then per-class F1 and IoU.

  Args:
    tp, fp, fn: [N, C] per-image counts (or [C] already summed).
  Returns:
    {'f1': [C], 'iou': [C]} float64; NaN for a class absent from truth and prediction
    in every image.
  """
  tp, fp, fn = (np.asarray(v).reshape(-1, np.shape(v)[-1]).sum(axis=0) for v in (tp, fp, fn))
  f1, iou = _f1_iou(tp, fp, fn)
  return {"f1": f1, "iou": iou}


def per_image_scores(tp, fp, fn) -> dict[str, np.ndarray]:
  """Image reduction: F1 and IoU of each image and class, then reduced over images (nan-aware).

  Args:
    tp, fp, fn: [N, C] per-image counts.
  Returns:
    float64 arrays: 'f1', 'iou' [C] (mean over the images where the class occurs in
    truth or prediction; NaN if it never does); 'f1_mean', 'iou_mean' and
    'f1_mean_fg', 'iou_mean_fg' (scalars: mean over images of the image's mean over
    its scored classes, all classes / without class 0); 'f1_per_image',
    'iou_per_image' [N, C] (NaN where unscored).
  """
  f1, iou = _f1_iou(tp, fp, fn)
  out = {"f1_per_image": f1, "iou_per_image": iou}
  for key, s in (("f1", f1), ("iou", iou)):
    out[key] = _nanmean(s, axis=0)
    out[f"{key}_mean"] = _nanmean(_nanmean(s, axis=1), axis=0)
    out[f"{key}_mean_fg"] = _nanmean(_nanmean(s[:, 1:], axis=1), axis=0)
  return out


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
  """np.nanmean without the all-NaN warning (all NaN -> NaN, as intended)."""
  x = np.asarray(x, np.float64)
  count = np.sum(~np.isnan(x), axis=axis)
  total = np.nansum(x, axis=axis)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def segmentation_metrics(
  tp: np.ndarray,
  fp: np.ndarray,
  fn: np.ndarray,
  *,
  class_names: Sequence[str],
  confusion: np.ndarray | None = None,
) -> dict[str, Any]:
  """The evaluator's flat metric dict from per-image counts.

  Args:
    tp, fp, fn: int [N, C] per-image counts.
    class_names: C names; class 0 is the background left out of ``mean_fg``.
    confusion: optional pixel confusion [C, C] (rows = truth); without it only the
      diagonal and the totals are known, so it is required for ``confusion``.

  Returns:
    JSON-able dict: ``{f1,iou}_{dataset,image}/<class>``, ``.../mean``, ``.../mean_fg``,
    ``pixel_accuracy``, ``confusion`` ([C][C] list), ``num_images``.
  """
  tp, fp, fn = (np.asarray(v, np.int64) for v in (tp, fp, fn))
  if tp.ndim != 2 or tp.shape != fp.shape or tp.shape != fn.shape:
    raise ValueError(f"tp, fp, fn must be equal [N, C], got {tp.shape}, {fp.shape}, {fn.shape}")
  c = tp.shape[1]
  names = list(class_names)
  if len(names) != c:
    raise ValueError(f"{len(names)} class names for {c} classes")
  ds = dataset_scores(tp, fp, fn)
  im = per_image_scores(tp, fp, fn)
  out: dict[str, Any] = {}
  for metric in ("f1", "iou"):
    for i, name in enumerate(names):
      out[f"{metric}_dataset/{name}"] = float(ds[metric][i])
    out[f"{metric}_dataset/mean"] = float(_nanmean(ds[metric], axis=0))
    out[f"{metric}_dataset/mean_fg"] = float(_nanmean(ds[metric][1:], axis=0))
    for i, name in enumerate(names):
      out[f"{metric}_image/{name}"] = float(im[metric][i])
    out[f"{metric}_image/mean"] = float(im[f"{metric}_mean"])
    out[f"{metric}_image/mean_fg"] = float(im[f"{metric}_mean_fg"])
  # Every pixel is counted once as tp or fn of its true class.
  pixels = int(tp.sum() + fn.sum())
  out["pixel_accuracy"] = float(tp.sum() / pixels) if pixels else float("nan")
  if confusion is not None:
    out["confusion"] = np.asarray(confusion, np.int64).tolist()
  out["num_images"] = int(tp.shape[0])
  return out


# ---------------------------------------------------------------------------
# The evaluator.
class SegmentationAccumulator:
  """Streams batches into per-image tp/fp/fn [N, C] and a pixel confusion matrix [C, C].

  Only the counts are kept, so a split never sits in memory as logits or label maps.
  """

  def __init__(self, num_classes: int):
    self.num_classes = int(num_classes)
    self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
    self._tp: list[np.ndarray] = []
    self._fp: list[np.ndarray] = []
    self._fn: list[np.ndarray] = []

  def add(self, truth: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Adds a batch: truth, pred int [B, ...]; rows with ``valid`` False are dropped."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if valid is not None:
      valid = np.asarray(valid, bool).reshape(-1)
      truth, pred = truth[valid], pred[valid]
    cm = per_image_confusion(truth, pred, self.num_classes)
    self.confusion += cm.sum(axis=0)
    tp, fp, fn = stats_from_confusion(cm)
    self._tp.append(tp)
    self._fp.append(fp)
    self._fn.append(fn)

  def stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tp, fp, fn int64 [N, C] over everything added."""
    empty = np.zeros((0, self.num_classes), np.int64)
    return tuple(np.concatenate(v) if v else empty for v in (self._tp, self._fp, self._fn))

  def metrics(self, class_names: Sequence[str]) -> dict[str, Any]:
    tp, fp, fn = self.stats()
    return segmentation_metrics(tp, fp, fn, class_names=class_names, confusion=self.confusion)


def evaluate_segmentation(
  predict_fn,
  batches: Iterable[Mapping[str, Any]],
  *,
  num_classes: int,
  class_names: Sequence[str],
) -> dict[str, Any]:
  """One pass of ``batches`` through ``predict_fn``, scored by ``segmentation_metrics``.

  Args:
    predict_fn: batch -> {'logits': [B, (Z,) Y, X, C]}; eval mode. Outputs may be
      batch-sharded over devices and processes.
    batches: dicts with 'image', 'mask' int [B, (Z,) Y, X], 'valid' bool [B].
    num_classes: C (must equal the logits' last axis).
    class_names: C names, class 0 = background.
  """
  acc = SegmentationAccumulator(num_classes)
  pending = None

  def _consume(p):
    pred, mask, valid = (to_host(v) for v in p)
    acc.add(mask, pred, valid)

  for batch in batches:
    logits = predict_fn(batch)["logits"]
    if logits.shape[-1] != num_classes:
      raise ValueError(
        f"the model predicts {logits.shape[-1]} classes but the dataset has {num_classes}; "
        "set model.num_classes to the dataset's"
      )
    # argmax on device (keeps the batch sharding) so only int labels travel to the host.
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    valid = batch.get("valid", np.ones(np.shape(batch["mask"])[:1], bool))
    # Pull the previous batch to host only after this one is dispatched (jax is async).
    if pending is not None:
      _consume(pending)
    pending = (pred, batch["mask"], valid)
  if pending is None:
    raise ValueError("the evaluation received no batches")
  _consume(pending)
  return acc.metrics(class_names)


def segmentation(ctx: EvalContext, *, eval_cfg, workdir: str | None, step: int) -> dict[str, Any]:
  """The registered 'segmentation' evaluator (contract v2, see ``common.py``).

  Scores ``eval_cfg.split`` (default 'test') of ``eval_cfg.task`` (default: the
  run's task): ``f1_dataset/<class>``, ``iou_dataset/<class>``, ``.../mean``,
  ``.../mean_fg``, the same under ``f1_image/`` and ``iou_image/``,
  ``pixel_accuracy``, ``confusion`` ([C][C], rows truth) and ``num_images``
  (module docstring: the reductions). Writes
  ``<workdir>/eval/<name>_step<step>_confusion.{png,json}`` (process 0 only).
  """
  task = eval_cfg.get("task", None)
  info = ctx.dataset_info(task)
  class_names = list(eval_cfg.get("class_names", None) or info["class_names"])
  num_classes = int(info.get("num_classes", len(class_names)))
  batches = ctx.open_batches(eval_cfg.get("split", "test"), task)
  out = evaluate_segmentation(
    ctx.predict_fn, batches, num_classes=num_classes, class_names=class_names
  )
  name = eval_name(eval_cfg, default_protocol="segmentation")
  title = (
    f"{name} step {int(step)}: IoU fg {out['iou_dataset/mean_fg']:.3f} (dataset), "
    f"{out['iou_image/mean_fg']:.3f} (image)"
  )
  write_confusion(workdir, name, step, class_names, out, title, reduction="pixels")
  return out


# ---------------------------------------------------------------------------
# Overlays.
def _rgb(c) -> tuple[float, float, float]:
  import matplotlib.colors as mcolors

  return tuple(float(v) for v in mcolors.to_rgb(c))


def class_colors(
  class_names: Sequence[str], colors: Mapping[str, Any] | None = None
) -> list[tuple[float, float, float] | None]:
  """RGB (0..1) per class, None = transparent; ``colors`` (name -> colour or None) overrides."""
  table = {**DEFAULT_COLORS, **(dict(colors) if colors else {})}
  return [None if table.get(n) is None else _rgb(table[n]) for n in class_names]


def _grey(image: np.ndarray) -> np.ndarray:
  """Image -> [..., 3] grey RGB in [0, 1], stretched between its 1st and 99th percentiles."""
  image = np.asarray(image, np.float64)
  lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
  g = np.clip((image - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(image)
  return np.repeat(g[..., None], 3, axis=-1)


def _paint(grey: np.ndarray, labels: np.ndarray, rgb: Sequence) -> np.ndarray:
  out = grey.copy()
  for k, col in enumerate(rgb):
    if col is None:
      continue
    m = labels == k
    out[m] = (1 - OVERLAY_ALPHA) * out[m] + OVERLAY_ALPHA * np.asarray(col)
  return out


def overlay_png(
  path: str,
  image: np.ndarray,
  truth: np.ndarray,
  pred: np.ndarray,
  *,
  class_names: Sequence[str],
  colors: Mapping[str, Any] | None = None,
  title: str = "",
  num_slices: int = 3,
) -> str:
  """Writes a PNG with panels image | truth | prediction, labels coloured over the grey image.

  Args:
    path: output file (folders are created).
    image: float [Y, X] or [Z, Y, X] (a trailing channel axis of size 1 is allowed).
    truth: int [Y, X] or [Z, Y, X] class ids; pred: same shape.
    class_names: the C names (``dataset_info``'s); colours are looked up by name:
      axon cyan, vessel red, cell yellow (the paper's Fig. 3), anything else
      (background, 'other') transparent.
    colors: optional {class name: matplotlib colour or None} overriding the defaults.
    title: figure title.
    num_slices: for 3D input, how many evenly spaced z-slices to show, one row each.

  Returns:
    ``path``. The figure has a legend of the coloured classes.
  """
  import matplotlib

  matplotlib.use("Agg")  # no display on workers; must precede pyplot
  import matplotlib.patches as mpatches
  import matplotlib.pyplot as plt

  truth = np.asarray(truth)
  pred = np.asarray(pred)
  image = np.asarray(image)
  if image.ndim == truth.ndim + 1 and image.shape[-1] == 1:
    image = image[..., 0]
  if truth.ndim not in (2, 3) or image.shape != truth.shape or pred.shape != truth.shape:
    raise ValueError(
      f"overlay_png needs image, truth, pred of one shape [Y, X] or [Z, Y, X]; got "
      f"{image.shape}, {truth.shape}, {pred.shape}"
    )
  if truth.ndim == 2:
    image, truth, pred = image[None], truth[None], pred[None]
    zs = [None]
  else:
    zs = sorted(set(np.linspace(0, truth.shape[0] - 1, max(1, num_slices)).round().astype(int)))
    image, truth, pred = image[zs], truth[zs], pred[zs]
  rgb = class_colors(class_names, colors)
  grey = _grey(image)
  rows = len(zs)
  fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows + 0.6), dpi=110, squeeze=False)
  for r, z in enumerate(zs):
    panels = (grey[r], _paint(grey[r], truth[r], rgb), _paint(grey[r], pred[r], rgb))
    for col, (ax, panel, label) in enumerate(
      zip(axes[r], panels, ("image", "truth", "prediction"), strict=True)
    ):
      ax.imshow(panel, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(label, fontsize=9)
      if col == 0 and z is not None:
        ax.set_ylabel(f"z = {z}", fontsize=8)
  handles = [
    mpatches.Patch(color=c, label=n) for n, c in zip(class_names, rgb, strict=True) if c is not None
  ]
  if handles:
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=9)
  # Keep ~0.35 inch at the bottom for the legend, whatever the number of rows.
  fig.tight_layout(rect=(0, 0.35 / fig.get_figheight() if handles else 0, 1, 1))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path
