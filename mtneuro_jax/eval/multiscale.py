"""The ICIP 2021 scores: micro F1 (per microstructure class) and macro F1 (per brain region).

* **micro**: the pixel logits' argmax against the 'mask', through
  ``segmentation.SegmentationAccumulator`` (the Task 2 metrics; the paper's per-class F1 is
  our ``f1_dataset/<class>``: tp, fp, fn summed over the split; ``f1_dataset/mean`` is the
  paper's 'avg' over all classes, background included).
* **macro**: the 'region_logits' argmax against the sample's 'region' (``spec.REGIONS``
  order): ``f1/<region>`` = 2tp / (2tp + fp + fn) per region (NaN for a region absent
  from truth and prediction; sklearn's ``f1_score(average=None)`` elsewhere),
  ``f1/mean`` over the regions that have a score (the paper's 'avg'), ``accuracy``,
  ``confusion`` ([R][R], rows true), ``n``.

Evaluator kind ``multiscale``: ``eval_cfg.scores`` = 'micro' | 'macro' | 'micro,macro'
(default: both, whatever the predictions allow: micro needs pixel 'logits' [B, Y, X, C] and a
'mask', macro needs 'region_logits'); ``split`` (default 'test'), ``task`` (default the
run's: the macro scores read a task with all four regions, e.g. task2_2d_3class, while the
micro ones read task2_2d_4class). Keys: ``micro/<segmentation metric>`` and
``macro/<metric>``; writes ``<workdir>/eval/<name>_{micro,macro}_step<step>_confusion.*``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from mtneuro_jax.errors import ConfigError
from mtneuro_jax.eval.common import (
  EvalContext,
  confusion_matrix,
  eval_name,
  to_host,
  write_confusion,
)
from mtneuro_jax.eval.segmentation import SegmentationAccumulator
from mtneuro_jax.volumes import spec

SCORES = ("micro", "macro")


def region_f1(cm: np.ndarray) -> np.ndarray:
  """Per-class F1 [C] from a confusion matrix [C, C] (rows true); NaN where tp + fp + fn == 0."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  fp = cm.sum(axis=0) - tp
  fn = cm.sum(axis=1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return 2 * tp / (2 * tp + fp + fn)


def macro_metrics(
  truth: np.ndarray, pred: np.ndarray, region_names: Sequence[str] = spec.REGIONS
) -> dict[str, Any]:
  """Region scores of int ``truth``, ``pred`` [N] (module docstring)."""
  r = len(region_names)
  cm = confusion_matrix(truth, pred, r)
  f1 = region_f1(cm)
  n = int(cm.sum())
  out: dict[str, Any] = {f"f1/{name}": float(v) for name, v in zip(region_names, f1, strict=True)}
  scored = f1[~np.isnan(f1)]
  out["f1/mean"] = float(scored.mean()) if scored.size else float("nan")
  out["accuracy"] = float(np.trace(cm) / n) if n else float("nan")
  out["confusion"] = cm.tolist()
  out["n"] = n
  return out


def evaluate_multiscale(
  predict_fn,
  batches: Iterable[Mapping[str, Any]],
  *,
  scores: Sequence[str],
  num_classes: int,
  class_names: Sequence[str],
  region_names: Sequence[str] = spec.REGIONS,
) -> dict[str, Any]:
  """One pass of ``batches`` through ``predict_fn`` (eval mode; outputs may be batch-sharded).

  Args:
    predict_fn: batch -> {'logits': [B, Y, X, C], 'region_logits': [B, R]} (as needed).
    batches: dicts with 'mask' int [B, Y, X] (micro), 'region' int [B] (macro), 'valid' [B].
    scores: subset of ('micro', 'macro').
    num_classes, class_names: the pixel classes (micro).
  Returns:
    {'micro/<metric>': ..., 'macro/<metric>': ...}.
  """
  acc = SegmentationAccumulator(num_classes) if "micro" in scores else None
  truths, preds = [], []
  pending = None

  def consume(p):
    valid = to_host(p["valid"]).astype(bool).reshape(-1)
    if acc is not None:
      acc.add(to_host(p["mask"]), to_host(p["pixel"]), valid)
    if "region" in p:
      truths.append(to_host(p["region"]).reshape(-1)[valid])
      preds.append(to_host(p["region_pred"]).reshape(-1)[valid])

  seen = False
  for batch in batches:
    seen = True
    out = predict_fn(batch)
    valid = batch.get("valid", np.ones(np.shape(batch["image"])[:1], bool))
    item = {"valid": valid}
    if acc is not None:
      logits = out["logits"]
      if logits.ndim != 4 or logits.shape[-1] != num_classes:
        raise ConfigError(
          f"micro scores need pixel logits [B, Y, X, {num_classes}], got {logits.shape}; "
          "use a segmentation model with model.num_classes = the dataset's, or scores='macro'"
        )
      # argmax on device (keeps the batch sharding): only int labels travel to the host.
      item.update({"pixel": jnp.argmax(logits, -1).astype(jnp.int32), "mask": batch["mask"]})
    if "macro" in scores:
      if "region_logits" not in out:
        raise ConfigError(
          f"macro scores need 'region_logits', but the predictions hold {sorted(out)}; "
          "use scores='micro' for a model without a region branch"
        )
      item.update(
        {
          "region_pred": jnp.argmax(out["region_logits"], -1).astype(jnp.int32),
          "region": batch["region"],
        }
      )
    # Pull the previous batch to the host only after this one is dispatched (jax is async).
    if pending is not None:
      consume(pending)
    pending = item
  if not seen:
    raise ValueError("the evaluation received no batches")
  consume(pending)
  result: dict[str, Any] = {}
  if acc is not None:
    result.update({f"micro/{k}": v for k, v in acc.metrics(class_names).items()})
  if "macro" in scores:
    truth = np.concatenate(truths).astype(np.int64)
    pred = np.concatenate(preds).astype(np.int64)
    result.update({f"macro/{k}": v for k, v in macro_metrics(truth, pred, region_names).items()})
  return result


def parse_scores(value) -> tuple[str, ...]:
  words = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
  words = tuple(w.strip() for w in words if w and w.strip())
  bad = [w for w in words if w not in SCORES]
  if bad or not words:
    raise ConfigError(f"multiscale eval scores={value!r}; use 'micro', 'macro' or 'micro,macro'")
  return words


def multiscale(ctx: EvalContext, *, eval_cfg, workdir: str | None, step: int) -> dict[str, Any]:
  """The registered 'multiscale' evaluator (contract v2, see ``common.py``; module docstring)."""
  task = eval_cfg.get("task", None)
  info = ctx.dataset_info(task)
  scores = parse_scores(eval_cfg.get("scores", "micro,macro"))
  class_names = list(eval_cfg.get("class_names", None) or info["class_names"])
  out = evaluate_multiscale(
    ctx.predict_fn,
    ctx.open_batches(eval_cfg.get("split", "test"), task),
    scores=scores,
    num_classes=int(info.get("num_classes", len(class_names))),
    class_names=class_names,
  )
  name = eval_name(eval_cfg, default_protocol="multiscale")
  for part, names, key in (
    ("micro", class_names, "f1_dataset/mean"),
    ("macro", spec.REGIONS, "f1/mean"),
  ):
    if part not in scores:
      continue
    sub = {k[len(part) + 1 :]: v for k, v in out.items() if k.startswith(part + "/")}
    title = f"{name} {part} step {int(step)}: F1 avg {sub[key]:.3f}"
    write_confusion(workdir, f"{name}_{part}", step, list(names), sub, title)
  return out
