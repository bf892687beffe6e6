"""The objective interface (v2): four pure functions, nothing about sharding or I/O.

An objective says how a model is trained and read out. It may own trainable
parameters of its own (a probe head, a BYOL projector and predictor) and
non-trained state (``aux``: an EMA target network, its BatchNorm statistics, a
mining pool, running statistics). The one training loop calls:

  init(rng, *, model, variables, example_image, config) -> (own_params, aux)
      At the start of a run, after the model's variables exist (and after
      ``init_from`` loaded pretrained weights into them). ``own_params`` is a
      dict of parameter sub-trees under names of the objective's choosing
      (e.g. ``{'projector': ..., 'predictor': ...}``); they join the model's
      ``params`` (top-level names must not clash with the model's, e.g.
      'encoder' and 'head') and are trained by the same optimizer, so
      ``optim.freeze`` and ``optim.param_groups`` reach them by path
      (``'^probe/'``). ``aux`` is any pytree of arrays ({} if none).
  loss(params, model_state, aux, batch, rng, *, ctx, model, config)
      -> (scalar loss, (metrics, new_model_state, new_aux))
      ``params`` is the whole trained tree (model's + objective's);
      ``model_params(params, model)``-style filtering is the objective's job
      (``apply_model`` below takes the whole tree and passes the model its
      own). Differentiated w.r.t. ``params`` only.
  update(aux, params, *, ctx, config) -> aux
      After the optimizer applied this step's update (``params`` are the new
      ones): e.g. the EMA of the target network.
  predict(params, model_state, aux, batch, *, model, config) -> dict[str, Array]
      Eval mode: 'logits' [B, C], 'features' [B, D], dense maps, ...

``ctx`` is a ``StepContext``: ``ctx.step`` (int32 [] traced: updates applied
before this one, so 0 on the first step), ``ctx.total_steps`` and
``ctx.steps_per_epoch`` (Python ints, static under jit), enough for schedules
such as BYOL's cosine EMA momentum or MYOW's weight ramp over epochs.

``batch`` is a dict of arrays: 'image' float32 [B, Y, X, 1] (2D) or
[B, Z, Y, X, 1] (3D), 'label' int32 [B] or 'mask' int32 [B, (Z,) Y, X],
'valid' bool [B] (False on padding rows). ``config`` is the objective's
ConfigDict (``config.objective``).

Worked example: a linear probe on frozen-encoder features that also tracks an
EMA of its own weights, with the EMA momentum rising along the run::

  def init(rng, *, model, variables, example_image, config):
    feats = model.apply(variables, example_image, train=False)["features"]   # [1, D]
    probe = {"kernel": jnp.zeros((feats.shape[-1], config.num_classes)),
             "bias": jnp.zeros((config.num_classes,))}
    return {"probe": probe}, {"ema_probe": probe, "loss_avg": jnp.zeros(())}

  def loss(params, model_state, aux, batch, rng, *, ctx, model, config):
    out, new_state = apply_model(model, params, model_state, batch["image"], train=True, rng=rng,
                                 own=("probe",))
    z = jax.lax.stop_gradient(out["features"])
    logits = z @ params["probe"]["kernel"] + params["probe"]["bias"]
    value = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    new_aux = {**aux, "loss_avg": 0.9 * aux["loss_avg"] + 0.1 * value}     # updated from loss
    return value, ({"train/loss": value}, new_state, new_aux)

  def update(aux, params, *, ctx, config):
    m = 1 - (1 - 0.99) * (1 - ctx.step / ctx.total_steps)                  # 0.99 -> 1
    ema = jax.tree.map(lambda e, p: m * e + (1 - m) * p, aux["ema_probe"], params["probe"])
    return {**aux, "ema_probe": ema}

  PROBE = Objective("probe", init=init, loss=loss, update=update, predict=...)

and in the config ``optim.freeze = ('^encoder/',)`` trains the probe alone, or
``optim.param_groups.probe = {'pattern': '^probe/', 'learning_rate': 0.1,
'weight_decay': 0.0}`` gives it its own learning rate. (tests/test_objective_v2.py
runs this objective through the real loop.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp


class StepContext(flax.struct.PyTreeNode):
  """Where a step is in the run.

  ``step`` int32 [] (updates done before this one, traced); ``total_steps`` and
  ``steps_per_epoch`` (static ints; 0 = unknown) turn epoch-based schedules into steps.
  """

  step: jax.Array
  total_steps: int = flax.struct.field(pytree_node=False)
  steps_per_epoch: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def progress(self) -> jax.Array:
    """``step / total_steps`` as float32 [] in [0, 1)."""
    return self.step.astype("float32") / max(self.total_steps, 1)


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  init: Callable[..., tuple[dict, Any]]
  loss: Callable[..., Any]
  update: Callable[..., Any]
  predict: Callable[..., Any]


def no_params_no_aux(rng, *, model, variables, example_image, config):
  """``init`` of an objective that owns nothing: ({}, {})."""
  del rng, model, variables, example_image, config
  return {}, {}


def keep_aux(aux, params, *, ctx, config):
  """``update`` of an objective whose aux does not change after the optimizer step."""
  del params, ctx, config
  return aux


def model_params(params: dict, own: tuple[str, ...] | frozenset = ()) -> dict:
  """The model's share of the whole trained tree: ``params`` without the objective's sub-trees ``own``."""
  return {k: v for k, v in params.items() if k not in own} if own else params


def apply_model(model, params, model_state, image, *, train: bool, rng=None, own=()):
  """Runs ``model`` and returns (outputs, new_model_state).

  ``params`` may be the whole trained tree; ``own`` names the objective's
  sub-trees, which are not passed to the model. In train mode every non-param
  collection (e.g. 'batch_stats') is mutable so BatchNorm running stats update;
  in eval mode nothing is.
  """
  variables = {"params": model_params(params, own), **model_state}
  if not train:
    return model.apply(variables, image, train=False), model_state
  rngs = {"dropout": rng} if rng is not None else None
  mutable = list(model_state.keys())
  if not mutable:
    return model.apply(variables, image, train=True, rngs=rngs), model_state
  out, new_state = model.apply(variables, image, train=True, rngs=rngs, mutable=mutable)
  return out, dict(new_state)


def weighted_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of ``x`` [B] over rows with weight > 0 (0 if there are none)."""
  w = weights.astype(jnp.float32)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
