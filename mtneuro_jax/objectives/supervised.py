"""Supervised classification: softmax cross-entropy on 'label', weighted by 'valid'.

Config (``config.objective``): ``label_smoothing`` (float, default 0).
The model must return {'logits': [B, C], 'features': [B, D]}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtneuro_jax.objectives.base import Objective, keep_aux, no_aux


def apply_model(model, params, model_state, image, *, train: bool, rng=None):
  """Runs ``model`` and returns (outputs, new_model_state).

  In train mode every non-param collection (e.g. 'batch_stats') is mutable so
  BatchNorm running stats update; in eval mode nothing is.
  """
  variables = {"params": params, **model_state}
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


def loss(params, model_state, aux, batch, rng, *, model, config):
  del aux
  out, new_state = apply_model(model, params, model_state, batch["image"], train=True, rng=rng)
  logits = out["logits"].astype(jnp.float32)
  labels = batch["label"]
  smoothing = float(config.get("label_smoothing", 0.0)) if config is not None else 0.0
  if smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    ce = optax.softmax_cross_entropy(logits, targets)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  valid = batch.get("valid", jnp.ones(labels.shape, bool))
  value = weighted_mean(ce, valid)
  accuracy = weighted_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), valid)
  return value, ({"train/loss": value, "train/accuracy": accuracy}, new_state)


def predict(params, model_state, aux, batch, *, model, config):
  """Eval mode: {'logits': [B, C], 'features': [B, D]}."""
  del aux, config
  out, _ = apply_model(model, params, model_state, batch["image"], train=False)
  return {"logits": out["logits"], "features": out["features"]}


SUPERVISED = Objective(name="supervised", init_aux=no_aux, loss=loss, update_aux=keep_aux, predict=predict)
