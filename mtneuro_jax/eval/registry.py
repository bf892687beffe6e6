"""Evaluators by ``kind`` and the one function that runs a config's evals.

Every evaluator follows the contract in ``common.py``:
``fn(ctx: EvalContext, *, eval_cfg, workdir, step) -> dict``.
``config.evals.<name>.kind`` picks one; add an evaluator by adding one line.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from absl import logging

from mtneuro_jax.eval.classification import classification
from mtneuro_jax.eval.common import EvalContext, as_dict
from mtneuro_jax.eval.knn import knn
from mtneuro_jax.eval.multiscale import multiscale
from mtneuro_jax.eval.segmentation import segmentation
from mtneuro_jax.registry import Registry

EVALUATORS = Registry(
  "evaluator kind",
  {
    "classification": classification,
    "knn": knn,
    "segmentation": segmentation,
    "multiscale": multiscale,
  },
)


def check_kinds(evals: Mapping[str, Any]) -> None:
  """Fails before any training if an eval names an unknown kind (UnknownNameError, one line)."""
  for ecfg in evals.values():
    EVALUATORS[ecfg.get("kind", "classification")]  # an unknown kind raises, listing the known ones


def run_evals(
  evals: Mapping[str, Any], ctx: EvalContext, *, workdir: str | None, step: int
) -> dict[str, Any]:
  """Runs every eval in ``evals`` ({name: eval_cfg}); returns {'<name>/<metric>': value}."""
  out = {}
  for name, ecfg in evals.items():
    fn = EVALUATORS[ecfg.get("kind", "classification")]
    ecfg = _named(ecfg, name)
    t0 = time.perf_counter()
    result = fn(ctx, eval_cfg=ecfg, workdir=workdir, step=step)
    logging.info(
      "eval %s at step %d (%.1fs): %s",
      name,
      step,
      time.perf_counter() - t0,
      {k: v for k, v in result.items() if not isinstance(v, (list, dict))},
    )
    out.update({f"{name}/{k}": v for k, v in result.items()})
  return out


def _named(ecfg, name: str) -> dict:
  """The eval's config as a dict, with ``name`` = its key unless the config gives one."""
  d = as_dict(ecfg)
  d["name"] = d.get("name") or name
  return d
