"""Metric logging (JSON lines in the workdir) and the NaN/Inf guard."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


class NonFiniteLossError(FloatingPointError):
  """Raised when the loss or gradient norm becomes NaN/Inf."""


def to_jsonable(x: Any) -> Any:
  """numpy/jax scalars and arrays -> Python floats/ints/lists (NaN stays NaN)."""
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (str, bool, int, float)) or x is None:
    return x
  a = np.asarray(x)
  if a.ndim == 0:
    return a.item()
  return a.tolist()


def scalar_items(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The scalar (number) entries of ``metrics``, as floats."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, (bool, str)) or v is None:
      continue
    a = np.asarray(v)
    if a.ndim == 0 and np.issubdtype(a.dtype, np.number):
      out[k] = float(a)
  return out


def check_finite(
  metrics: Mapping[str, float],
  step: int,
  *,
  keys=("train/loss", "train/grad_norm"),
  last_good: str = "",
) -> None:
  """Raises NonFiniteLossError if any of ``keys`` in ``metrics`` is NaN or Inf."""
  bad = {k: metrics[k] for k in keys if k in metrics and not math.isfinite(metrics[k])}
  if bad:
    raise NonFiniteLossError(
      f"non-finite training values at step {step}: {bad}. Stopping the run; the checkpoint "
      f"written before this step is kept ({last_good or 'none written yet'}). Lower the "
      "learning rate, check the input normalisation, or resume from that checkpoint."
    )


class MetricWriter:
  """Appends one JSON object per line to ``<workdir>/metrics.jsonl`` (process 0 only)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after ``step`` (a resumed run re-does those steps)."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if int(json.loads(line).get("step", 0)) <= step:
          keep.append(line)
      except (ValueError, AttributeError):
        continue  # a line cut short by a kill
    with open(self.path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **to_jsonable(metrics)}) + "\n")


class MeanAccumulator:
  """Host-side running means of scalar metrics between two log steps."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.count = 0

  def add(self, metrics: Mapping[str, float]) -> None:
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + v
    self.count += 1

  def pop(self) -> dict[str, float]:
    out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    self.sums, self.count = {}, 0
    return out
