"""Semantic segmentation: per-pixel softmax cross-entropy (optionally + soft Dice) on 'mask'.

Config (``config.objective``):
  loss: 'ce' (per-pixel softmax cross-entropy, the reference's nn.CrossEntropyLoss) or
    'dice_ce' (cross-entropy + ``dice_weight`` x soft Dice loss).
  dice_weight: float, the Dice term's weight in 'dice_ce' (default 1).
  augment: {flip, rot90, flip_z} (``data.augment.PairedAugmentConfig``): random flips, in-plane
    rot90 and (3D) z-flip, drawn per sample and applied identically to image and mask on device.

Batch: 'image' float32 [B, Y, X, 1] or [B, Z, Y, X, 1], 'mask' int32 [B, Y, X] or
[B, Z, Y, X] (class ids), 'valid' bool [B] (padding rows count for nothing).
The model returns {'logits': [B, (Z,) Y, X, C]} of the input's spatial size.

Reductions: the cross-entropy is the mean over every pixel of the valid samples; the soft
Dice is computed per class over all valid pixels of the batch (sums over batch and space,
so a class absent from a sample does not make that sample's Dice undefined), then
averaged over classes (background included): 1 - mean_c (2 sum(p t) + eps) / (sum p + sum t + eps).
Metrics: 'train/loss', 'train/pixel_accuracy' (valid pixels), and for 'dice_ce' also
'train/ce' and 'train/dice_loss'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtneuro_jax.data.augment import PairedAugmentConfig, paired_augment
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.objectives.base import Objective, apply_model, keep_aux, no_params_no_aux

LOSSES = ("ce", "dice_ce")
DICE_EPS = 1.0  # smooths classes absent from a batch: their Dice is ~1 instead of 0/0


def _opt(config, key, default):
  return config.get(key, default) if config is not None else default


def pixel_weights(valid: jax.Array, mask: jax.Array) -> jax.Array:
  """float32 weights of mask's shape: 1 on pixels of valid samples, 0 on padding rows."""
  return jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (mask.ndim - 1)), mask.shape).astype(
    jnp.float32
  )


def cross_entropy(logits: jax.Array, mask: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean per-pixel softmax CE over pixels with weight > 0; logits [..., C], mask/weights [...]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, mask)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def soft_dice_loss(logits: jax.Array, mask: jax.Array, weights: jax.Array) -> jax.Array:
  """1 - mean over classes of the soft Dice of softmax(logits) vs one-hot(mask), summed over
  every weighted pixel of the batch (see the module docstring)."""
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1) * weights[..., None]
  onehot = jax.nn.one_hot(mask, num_classes, dtype=jnp.float32) * weights[..., None]
  axes = tuple(range(logits.ndim - 1))
  inter = jnp.sum(probs * onehot, axis=axes)
  denom = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  return 1.0 - jnp.mean((2.0 * inter + DICE_EPS) / (denom + DICE_EPS))


def augmented_pixel_logits(params, model_state, batch, rng, *, model, config, fix: str):
  """The training forward pass shared by the pixel objectives (this one and ``multiscale``).

  Paired augmentation of ``batch['image']`` / ``batch['mask']`` (``config.augment``), the
  model in train mode, and the check that its logits match the mask (``fix`` ends the error
  message). Returns ``(out, logits float32 [B, (Z,) Y, X, C], mask [B, (Z,) Y, X],
  valid bool [B], new_model_state)``.
  """
  aug_rng, model_rng = jax.random.split(rng)
  image, mask = batch["image"], batch["mask"]
  augment = PairedAugmentConfig.from_config(_opt(config, "augment", None))
  image, mask = paired_augment(image, mask, aug_rng, augment)
  out, new_state = apply_model(model, params, model_state, image, train=True, rng=model_rng)
  logits = out["logits"].astype(jnp.float32)
  if logits.shape[:-1] != mask.shape:
    raise ConfigError(f"the model's logits {logits.shape} do not match the mask {mask.shape}{fix}")
  valid = batch.get("valid", jnp.ones(mask.shape[:1], bool))
  return out, logits, mask, valid, new_state


def pixel_accuracy(logits, mask, weights) -> jax.Array:
  """Weighted fraction of pixels whose argmax class is the mask's."""
  correct = (jnp.argmax(logits, -1) == mask).astype(jnp.float32)
  return jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def loss(params, model_state, aux, batch, rng, *, model, config, ctx=None):
  del ctx  # no schedule in this objective
  kind = _opt(config, "loss", "ce")
  if kind not in LOSSES:
    raise ConfigError(f"objective.loss={kind!r} is unknown; use one of {LOSSES}")
  out, logits, mask, valid, new_state = augmented_pixel_logits(
    params,
    model_state,
    batch,
    rng,
    model=model,
    config=config,
    fix=" (the model must keep the input's spatial size); pick a tile size the model supports",
  )
  weights = pixel_weights(valid, mask)
  ce = cross_entropy(logits, mask, weights)
  metrics = {}
  if kind == "dice_ce":
    dice = soft_dice_loss(logits, mask, weights)
    value = ce + float(_opt(config, "dice_weight", 1.0)) * dice
    metrics.update({"train/ce": ce, "train/dice_loss": dice})
  else:
    value = ce
  metrics.update(
    {"train/loss": value, "train/pixel_accuracy": pixel_accuracy(logits, mask, weights)}
  )
  return value, (metrics, new_state, aux)


def predict(params, model_state, aux, batch, *, model, config):
  """Eval mode (no augmentation): {'logits': [B, (Z,) Y, X, C]}."""
  del aux, config
  out, _ = apply_model(model, params, model_state, batch["image"], train=False)
  return {"logits": out["logits"]}


SEGMENTATION = Objective(
  name="segmentation", init=no_params_no_aux, loss=loss, update=keep_aux, predict=predict
)
