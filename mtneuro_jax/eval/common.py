"""What every evaluator shares: the evaluator contract (``EvalContext``) and host-side helpers.

Evaluator contract (v2). An evaluator is a plain function registered by ``kind``
in ``registry.EVALUATORS``::

  fn(ctx: EvalContext, *, eval_cfg, workdir: str | None, step: int) -> dict[str, Any]

It sees eval-mode predictions only (never the optimizer or the train state):

* ``ctx.predict_fn(batch) -> dict`` (e.g. 'logits' [B, C], 'features' [B, D]); a
  jitted ``objective.predict`` bound to the current state; outputs stay
  batch-sharded, so gather with ``to_host``.
* ``ctx.open_batches(split, task=None)`` -> one pass over a split of the run's
  task (or of another ``task`` exported in the same data_dir), padded at the
  end with ``valid=False`` rows. A readout that fits on one split and scores
  another (linear probe, kNN bank, Task 3 regression) opens both.
* ``ctx.dataset_info(task=None)`` -> dict with at least ``class_names``,
  ``num_classes``, ``target_key`` ('label' | 'mask' | 'pixel_labels'),
  ``num_examples`` per split (see ``mtneuro_jax.data.pipeline.dataset_info``).

``eval_cfg`` is the eval's config entry (``config.evals.<name>``; ``name`` set to
its key unless given), ``workdir`` is where files go (``<workdir>/eval/``;
None = write nothing; write from process 0 only) and ``step`` is the training
step, used in file names. The returned dict holds metrics (JSON-able values);
the loop prefixes them with ``<name>/``.

The helpers below (gathering sharded outputs to host, confusion matrices and
their plots, file-name stems) are the only implementations in the project:
classification, segmentation and probe evaluators all call them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluator may use (see the module docstring)."""

  predict_fn: Callable[[Mapping[str, Any]], Mapping[str, Any]]
  open_batches: Callable[..., Iterator[Mapping[str, Any]]]
  dataset_info: Callable[..., dict]


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts [C, C] int64; rows = true class, columns = predicted class (sklearn's layout).

  Args:
    labels: int [N] true classes in [0, C).
    preds: int [N] predicted classes in [0, C).
    num_classes: C.
  """
  labels = np.asarray(labels, np.int64).reshape(-1)
  preds = np.asarray(preds, np.int64).reshape(-1)
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in length")
  for name, v in (("labels", labels), ("preds", preds)):
    if v.size and (v.min() < 0 or v.max() >= num_classes):
      raise ValueError(f"{name} outside [0, {num_classes}): min {v.min()}, max {v.max()}")
  return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(
    num_classes, num_classes
  )


def save_confusion_png(
  cm: np.ndarray, class_names: Sequence[str], path: str, title: str = ""
) -> str:
  """Writes a confusion-matrix heat map (rows true, columns predicted; counts in cells)."""
  import matplotlib

  matplotlib.use("Agg")  # no display on workers; must precede pyplot
  import matplotlib.pyplot as plt

  cm = np.asarray(cm)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=120)
  rows = cm.sum(axis=1, keepdims=True)
  frac = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
  ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
  for i in range(cm.shape[0]):
    for j in range(cm.shape[1]):
      ax.text(
        j,
        i,
        str(int(cm[i, j])),
        ha="center",
        va="center",
        color="white" if frac[i, j] > 0.5 else "black",
        fontsize=8,
      )
  ax.set_xticks(range(len(class_names)), class_names)
  ax.set_yticks(range(len(class_names)), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if title:
    ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def write_confusion(
  workdir: str | None,
  name: str,
  step: int,
  class_names: Sequence[str],
  metrics: dict,
  title: str,
  **extra,
) -> None:
  """``<workdir>/eval/<name>_step<step>_confusion.{png,json}`` from a metrics dict with 'confusion'.

  Process 0 only; nothing without a workdir. The JSON holds the class names, the step, ``extra``
  (e.g. the protocol) and every metric.
  """
  if not workdir or jax.process_index() != 0:
    return
  stem = os.path.join(workdir, "eval", f"{name}_step{int(step)}_confusion")
  save_confusion_png(np.asarray(metrics["confusion"]), class_names, stem + ".png", title=title)
  with open(stem + ".json", "w") as f:
    json.dump(
      {"class_names": list(class_names), **extra, "step": int(step), **metrics}, f, indent=1
    )


def to_host(x) -> np.ndarray:
  """A (possibly multi-process sharded) array -> full numpy array on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def as_dict(cfg) -> dict:
  """An eval config (ConfigDict or mapping) as a plain dict."""
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def eval_name(eval_cfg, *, default_protocol: str = "whole") -> str:
  """The file-name stem of an evaluation: ``eval_cfg.name`` or ``[<task>_]<split>_<protocol>``
  (``protocol`` defaults to ``default_protocol``, the evaluator's own)."""
  name = eval_cfg.get("name", None)
  if name:
    return str(name)
  task = eval_cfg.get("task", None)
  protocol = eval_cfg.get("protocol", default_protocol)
  return "_".join(s for s in (task, eval_cfg.get("split", "test"), protocol) if s)
