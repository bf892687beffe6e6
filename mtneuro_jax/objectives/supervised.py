"""Supervised classification: softmax cross-entropy on 'label', weighted by 'valid'.

Config (``config.objective``): ``label_smoothing`` (float, default 0).
The model must return {'logits': [B, C], 'features': [B, D]}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtneuro_jax.objectives.base import (
  Objective,
  apply_model,
  keep_aux,
  no_params_no_aux,
  weighted_mean,
)


def loss(params, model_state, aux, batch, rng, *, model, config, ctx=None):
  del ctx  # no schedule in this objective
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
  return value, ({"train/loss": value, "train/accuracy": accuracy}, new_state, aux)


def predict(params, model_state, aux, batch, *, model, config):
  """Eval mode: {'logits': [B, C], 'features': [B, D]}."""
  del aux, config
  out, _ = apply_model(model, params, model_state, batch["image"], train=False)
  return {"logits": out["logits"], "features": out["features"]}


SUPERVISED = Objective(
  name="supervised", init=no_params_no_aux, loss=loss, update=keep_aux, predict=predict
)
