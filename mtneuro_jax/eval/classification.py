"""Task 1 classification evaluation: metrics, the 'whole' and 'corners' protocols, plots.

The metric functions (``confusion_matrix``, ``classification_metrics``) are
plain numpy on integer labels and are the project's only implementation: the
evaluator below and the PCA/NMF baselines both call them.

Protocols (``eval_cfg.protocol``):

* ``'whole'``: each (downsampled) tile is one sample. This is what the
  reference's supervised script scores (200 test tiles).
* ``'corners'``: the four corners of each tile, each half the tile's height
  and width (one quarter of its area), are classified separately and scored as
  four samples that all carry the tile's label. The reference's SSL linear
  evaluation does this with the 128x128 corners of full-resolution 256x256
  tiles (800 predictions from 200 tiles); we cut the corners from the tile the
  model actually sees, so at 2x downsampling (tiles 128x128) a corner is 64x64
  and at 4x it is 32x32. The same pixels of tissue as in the reference,
  at the model's resolution. We also report ``tile_vote_accuracy``: the tile's
  class as the argmax of its four corners' mean softmax.

Padding rows (``valid == False``) never enter any metric. Per-class recall is
reported under ``recall/<class>``; ``acc_region/<region>`` is the accuracy
over the tiles cut from that region's cube (``batch['region']``), which can
differ from the class when a cube's modal ROI label is a neighbouring
structure.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtneuro_jax.eval.common import (
  EvalContext,
  as_dict,
  confusion_matrix,
  eval_name,
  to_host,
  write_confusion,
)
from mtneuro_jax.volumes import spec

PROTOCOLS = ("whole", "corners")


# ---------------------------------------------------------------------------
# Metrics (numpy; shared with the PCA/NMF baselines; the confusion matrix is in common.py).
def classification_metrics(
  labels: np.ndarray,
  preds: np.ndarray,
  *,
  num_classes: int,
  class_names: Sequence[str] | None = None,
  groups: np.ndarray | None = None,
  group_names: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Accuracy, balanced accuracy, per-class recall, per-group accuracy, confusion matrix.

  Args:
    labels: int [N] true classes.
    preds: int [N] predicted classes.
    num_classes: C.
    class_names: C names (default ``class0``...).
    groups: optional int [N] group id per sample (Task 1: the cube's region), for
      ``acc_region/<group>``.
    group_names: names indexed by group id (default: ``class_names``).

  Returns:
    JSON-able dict: ``accuracy``, ``balanced_accuracy`` (mean recall over the
    classes present in ``labels``, as ``sklearn.metrics.balanced_accuracy_score``),
    ``recall/<class>`` (NaN for a class absent from ``labels``),
    ``acc_region/<group>`` (groups present only), ``confusion`` ([C][C] list,
    rows true), ``n``.
  """
  names = (
    list(class_names) if class_names is not None else [f"class{i}" for i in range(num_classes)]
  )
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {num_classes} classes")
  labels = np.asarray(labels, np.int64).reshape(-1)
  preds = np.asarray(preds, np.int64).reshape(-1)
  cm = confusion_matrix(labels, preds, num_classes)
  n = int(cm.sum())
  support = cm.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = np.diag(cm) / support  # NaN where a class has no true samples
  out: dict[str, Any] = {
    "accuracy": float(np.trace(cm) / n) if n else float("nan"),
    "balanced_accuracy": float(np.nanmean(recall)) if np.any(support) else float("nan"),
    "n": n,
  }
  for name, r in zip(names, recall, strict=True):
    out[f"recall/{name}"] = float(r)
  if groups is not None:
    groups = np.asarray(groups, np.int64).reshape(-1)
    gnames = list(group_names) if group_names is not None else names
    correct = labels == preds
    for g in np.unique(groups):
      gname = gnames[g] if 0 <= g < len(gnames) else f"group{g}"
      out[f"acc_region/{gname}"] = float(correct[groups == g].mean())
  out["confusion"] = cm.tolist()
  return out


# ---------------------------------------------------------------------------
# Protocols.
def corner_views(images: jax.Array) -> list[jax.Array]:
  """The four half-height, half-width corners of each image: TL, TR, BL, BR.

  Args:
    images: [B, Y, X, C] (Y, X even).
  Returns:
    4 arrays [B, Y/2, X/2, C] in the reference's order TL, TR, BL, BR. Slicing
    keeps a batch-sharded array sharded on B.
  """
  y, x = images.shape[1], images.shape[2]
  if y % 2 or x % 2:
    raise ValueError(f"corners need even tile sides, got {y}x{x}")
  hy, hx = y // 2, x // 2
  return [images[:, :hy, :hx], images[:, :hy, hx:], images[:, hy:, :hx], images[:, hy:, hx:]]


def collect_predictions(
  predict_fn: Callable[[dict], Mapping[str, jax.Array]],
  batches: Iterable[Mapping[str, Any]],
  protocol: str,
) -> dict[str, np.ndarray]:
  """Runs ``predict_fn`` over one pass of ``batches``; returns the valid rows only.

  Returns numpy dict: ``logits`` float [N, C] ('whole') or [N, 4, C] ('corners',
  corner axis TL, TR, BL, BR), ``label`` [N], ``region`` [N].
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
  logits, labels, regions, valids = [], [], [], []
  for batch in batches:
    if protocol == "whole":
      out = predict_fn(batch)["logits"]
    else:
      outs = [predict_fn({**batch, "image": v})["logits"] for v in corner_views(batch["image"])]
      out = jnp.stack(outs, axis=1)  # [B, 4, C]
    # Dispatch the next batch before pulling this one to host; jax is async.
    logits.append(out)
    labels.append(batch["label"])
    regions.append(batch.get("region", batch["label"]))
    valids.append(batch.get("valid", np.ones(np.shape(batch["label"]), bool)))
  if not logits:
    raise ValueError("the evaluation received no batches")
  valid = np.concatenate([to_host(v).astype(bool) for v in valids])
  return {
    "logits": np.concatenate([to_host(v) for v in logits]).astype(np.float32)[valid],
    "label": np.concatenate([to_host(v) for v in labels]).astype(np.int64)[valid],
    "region": np.concatenate([to_host(v) for v in regions]).astype(np.int64)[valid],
  }


def _softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def metrics_from_predictions(
  pred: Mapping[str, np.ndarray],
  protocol: str,
  class_names: Sequence[str],
  region_names: Sequence[str] = spec.REGIONS,
) -> dict[str, Any]:
  """Metrics of ``collect_predictions``'s output under a protocol (see module doc)."""
  logits, labels, regions = pred["logits"], pred["label"], pred["region"]
  num_classes = logits.shape[-1]
  if protocol == "whole":
    return classification_metrics(
      labels,
      logits.argmax(-1),
      num_classes=num_classes,
      class_names=class_names,
      groups=regions,
      group_names=region_names,
    )
  k = logits.shape[1]  # 4 corners per tile, each scored with the tile's label
  out = classification_metrics(
    np.repeat(labels, k),
    logits.argmax(-1).reshape(-1),
    num_classes=num_classes,
    class_names=class_names,
    groups=np.repeat(regions, k),
    group_names=region_names,
  )
  vote = _softmax(logits).mean(axis=1).argmax(-1)
  out["tile_vote_accuracy"] = float((vote == labels).mean()) if labels.size else float("nan")
  out["n_tiles"] = int(labels.size)
  return out


def evaluate_classification(
  predict_fn: Callable[[dict], Mapping[str, jax.Array]],
  batches: Iterable[Mapping[str, Any]],
  *,
  eval_cfg,
  workdir: str | None,
  step: int,
) -> dict[str, Any]:
  """The 'classification' evaluator.

  Args:
    predict_fn: batch -> {'logits': [B, C], ...}; eval mode.
    batches: one pass of dicts with 'image' [B, Y, X, 1], 'label' [B], 'region' [B],
      'valid' [B] (padding rows False).
    eval_cfg: ConfigDict/dict with 'protocol' ('whole' | 'corners', default 'whole'),
      optional 'class_names' (default Task 1 regions), 'name', 'split', 'task'.
    workdir: if given, writes ``<workdir>/eval/<name>_step<step>_confusion.{png,json}``
      (process 0 only).
    step: training step, used in file names.

  Returns:
    ``metrics_from_predictions``'s dict (accuracy, balanced_accuracy, recall/*,
    acc_region/*, confusion, n; 'corners' adds tile_vote_accuracy, n_tiles).
  """
  protocol = eval_cfg.get("protocol", "whole")
  pred = collect_predictions(predict_fn, batches, protocol)
  num_classes = pred["logits"].shape[-1]
  class_names = eval_cfg.get("class_names", None)
  class_names = (
    list(class_names)
    if class_names
    else (
      list(spec.REGIONS)
      if num_classes == len(spec.REGIONS)
      else [f"class{i}" for i in range(num_classes)]
    )
  )
  out = metrics_from_predictions(pred, protocol, class_names)
  name = eval_name(eval_cfg)
  title = f"{name} step {int(step)}: acc {out['accuracy']:.3f}"
  write_confusion(workdir, name, step, class_names, out, title, protocol=protocol)
  return out


def classification(ctx: EvalContext, *, eval_cfg, workdir: str | None, step: int) -> dict[str, Any]:
  """The registered 'classification' evaluator (contract v2, see ``common.py``).

  Scores ``eval_cfg.split`` (default 'test') of ``eval_cfg.task`` (default: the
  run's task) with ``evaluate_classification``; class names come from the
  eval config or the dataset.
  """
  task = eval_cfg.get("task", None)
  class_names = eval_cfg.get("class_names", None) or ctx.dataset_info(task).get("class_names")
  batches = ctx.open_batches(eval_cfg.get("split", "test"), task)
  cfg = {**as_dict(eval_cfg), "class_names": list(class_names) if class_names else None}
  return evaluate_classification(ctx.predict_fn, batches, eval_cfg=cfg, workdir=workdir, step=step)
