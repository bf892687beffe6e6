"""The ICIP 2021 multi-scale objectives: region + reconstruction (Double U-Net step 1), pixel CE
with an optional region CE (step 2, U-Net, SegNet, MT U-Net).

Batch (Task 2 2D pipeline): 'image' float32 [B, Y, X, 1], 'mask' int32 [B, Y, X],
'region' int32 [B] (``spec.REGIONS`` order), 'valid' bool [B] (padding rows count for
nothing). Models return (models/multiscale.py) 'logits' [B, Y, X, C], and where they have
them 'region_logits' [B, R] and 'reconstruction' [B, Y, X, 1].

Objectives (``config.objective`` keys):

* ``region_recon`` (step 1): ``CE(region_logits, region) + recon_weight * MSE(image,
  reconstruction)``; CE is the mean over valid rows, MSE the mean over every pixel of the
  valid rows (of the augmented, normalised image). ``recon_weight`` (the paper's lambda,
  default 1); with 0, or a model without 'reconstruction', it is the region CE alone.
  ``augment`` {flip, rot90} (``PairedAugmentConfig``; the image is moved, nothing else).
  Metrics: train/loss, train/region_ce, train/recon_mse, train/region_accuracy.
* ``multitask`` (MT U-Net): ``pixel CE + region_weight * CE(region_logits, region)``;
  the pixel CE is ``segmentation.cross_entropy`` (mean over the valid pixels);
  ``region_weight`` default 1; ``augment`` {flip, rot90} moves image and mask together.
  Metrics: train/loss, train/pixel_ce, train/pixel_accuracy (+ train/region_ce,
  train/region_accuracy with a region term).
* ``pixel_ce`` (Double U-Net step 2, U-Net, SegNet): ``multitask`` with no region term
  (``region_weight`` is ignored). It equals the ``segmentation`` objective's 'ce' loss;
  it exists because ``segmentation.predict`` keeps only 'logits', and the macro
  evaluator needs the frozen branch's 'region_logits'.

``predict`` of all three (eval mode, no augmentation): the model's 'logits' and, where it
has them, 'region_logits' (the reconstruction is left out: evaluators never read it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtneuro_jax.data.augment import PairedAugmentConfig, paired_augment
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.objectives.base import (
  Objective,
  apply_model,
  keep_aux,
  no_params_no_aux,
  weighted_mean,
)
from mtneuro_jax.objectives.segmentation import (
  augmented_pixel_logits,
  cross_entropy,
  pixel_accuracy,
  pixel_weights,
)


def _opt(config, key, default):
  return config.get(key, default) if config is not None else default


def _valid(batch) -> jax.Array:
  lead = batch["image"].shape[:1]
  return batch.get("valid", jnp.ones(lead, bool))


def region_terms(region_logits: jax.Array, region: jax.Array, valid: jax.Array):
  """(CE, accuracy) of ``region_logits [B, R]`` vs ``region [B]`` over the valid rows."""
  logits = region_logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, region)
  correct = (jnp.argmax(logits, -1) == region).astype(jnp.float32)
  return weighted_mean(ce, valid), weighted_mean(correct, valid)


def reconstruction_mse(image: jax.Array, recon: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean squared error over every pixel of the valid rows; image, recon [B, Y, X, 1]."""
  per_sample = jnp.mean(
    (recon.astype(jnp.float32) - image.astype(jnp.float32)) ** 2, axis=tuple(range(1, image.ndim))
  )
  return weighted_mean(per_sample, valid)


def _need(out: dict, key: str, objective: str) -> jax.Array:
  if key not in out:
    raise ConfigError(
      f"objective {objective!r} needs the model output {key!r}, but the model returns "
      f"{sorted(out)}; use a model with a region branch (double_unet, mt_unet, unet_encoder)"
    )
  return out[key]


def region_recon_loss(params, model_state, aux, batch, rng, *, model, config, ctx=None):
  del ctx
  aug_rng, model_rng = jax.random.split(rng)
  image = batch["image"]
  augment = PairedAugmentConfig.from_config(_opt(config, "augment", None))
  dummy = jnp.zeros(image.shape[:-1], jnp.int32)  # paired_augment wants a mask; none is used
  image, _ = paired_augment(image, dummy, aug_rng, augment)
  out, new_state = apply_model(model, params, model_state, image, train=True, rng=model_rng)
  valid = _valid(batch)
  ce, acc = region_terms(_need(out, "region_logits", "region_recon"), batch["region"], valid)
  weight = float(_opt(config, "recon_weight", 1.0))
  metrics = {"train/region_ce": ce, "train/region_accuracy": acc}
  value = ce
  if weight and "reconstruction" in out:
    mse = reconstruction_mse(image, out["reconstruction"], valid)
    metrics["train/recon_mse"] = mse
    value = ce + weight * mse
  metrics["train/loss"] = value
  return value, (metrics, new_state, aux)


def _pixel_and_region(params, model_state, aux, batch, rng, *, model, config, region_weight):
  out, logits, mask, valid, new_state = augmented_pixel_logits(
    params,
    model_state,
    batch,
    rng,
    model=model,
    config=config,
    fix="; use a segmentation model (double_unet, res_unet, mt_unet, segnet)",
  )
  weights = pixel_weights(valid, mask)
  pixel_ce = cross_entropy(logits, mask, weights)
  metrics = {
    "train/pixel_ce": pixel_ce,
    "train/pixel_accuracy": pixel_accuracy(logits, mask, weights),
  }
  value = pixel_ce
  if region_weight:
    ce, acc = region_terms(_need(out, "region_logits", "multitask"), batch["region"], valid)
    metrics.update({"train/region_ce": ce, "train/region_accuracy": acc})
    value = pixel_ce + region_weight * ce
  metrics["train/loss"] = value
  return value, (metrics, new_state, aux)


def multitask_loss(params, model_state, aux, batch, rng, *, model, config, ctx=None):
  del ctx
  w = float(_opt(config, "region_weight", 1.0))
  return _pixel_and_region(
    params, model_state, aux, batch, rng, model=model, config=config, region_weight=w
  )


def pixel_ce_loss(params, model_state, aux, batch, rng, *, model, config, ctx=None):
  del ctx
  return _pixel_and_region(
    params, model_state, aux, batch, rng, model=model, config=config, region_weight=0.0
  )


def predict(params, model_state, aux, batch, *, model, config):
  """Eval mode: {'logits', and 'region_logits' if the model has it}."""
  del aux, config
  out, _ = apply_model(model, params, model_state, batch["image"], train=False)
  return {k: out[k] for k in ("logits", "region_logits") if k in out}


REGION_RECON = Objective(
  "region_recon", init=no_params_no_aux, loss=region_recon_loss, update=keep_aux, predict=predict
)
MULTITASK = Objective(
  "multitask", init=no_params_no_aux, loss=multitask_loss, update=keep_aux, predict=predict
)
PIXEL_CE = Objective(
  "pixel_ce", init=no_params_no_aux, loss=pixel_ce_loss, update=keep_aux, predict=predict
)
