"""The objective interface: four pure functions, nothing about sharding or I/O.

An objective bundles how a model is trained and read out:

  init_aux(rng, variables, *, model, config) -> aux
      Extra state the objective carries between steps (EMA target params,
      a mining pool, ...). ``{}`` if none.
  loss(params, model_state, aux, batch, rng, *, model, config)
      -> (scalar loss, (metrics: dict[str, scalar], new_model_state))
      ``model_state`` holds non-trained collections (e.g. {'batch_stats': ...}).
  update_aux(aux, params, step, *, config) -> aux
      Called after each optimizer update (e.g. EMA).
  predict(params, model_state, aux, batch, *, model, config) -> dict[str, Array]
      Eval-mode outputs: 'logits' [B, C], 'features' [B, D], dense maps, ...

``batch`` is a dict of arrays: 'image' float32 [B, Y, X, 1] (2D) or
[B, Z, Y, X, 1] (3D), 'label' int32 [B] or 'mask' int32 [B, (Z,) Y, X],
'valid' bool [B] (False on padding rows of an eval batch).
``config`` is the objective's ConfigDict (``config.objective``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  init_aux: Callable[..., Any]
  loss: Callable[..., Any]
  update_aux: Callable[..., Any]
  predict: Callable[..., Any]


def no_aux(rng, variables, *, model, config):
  del rng, variables, model, config
  return {}


def keep_aux(aux, params, step, *, config):
  del params, step, config
  return aux
