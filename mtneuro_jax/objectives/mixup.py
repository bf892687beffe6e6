"""Supervised classification with mixup ("Sup w/ Mixup" of the MTNeuro paper).

The paper reports mixup with p in {0.01, 0.1, 0.3, 0.5, 0.7} (best reported)
but the reference code has no supervised mixup; the only mixup it ships is
kornia ``RandomMixUp(lambda_val=(0, 0.5), p=p)`` in its (unused) SSL
augmentation list. We follow that augmentation:

* Every sample i of the batch is, independently with probability ``p``, mixed
  with a partner j = perm(i) from one random permutation of the batch:
  ``x~_i = (1 - lam_i) x_i + lam_i x_j``.
* ``lam_i ~ Uniform(lambda_min, lambda_max)``, default (0, 0.5) as kornia's
  ``lambda_val``; ``lam_i = 0`` for samples that are not mixed. With
  ``lambda_max <= 0.5`` the sample's own label always dominates.
* ``loss_i = (1 - lam_i) CE(f(x~_i), y_i) + lam_i CE(f(x~_i), y_j)``, averaged
  over valid rows. A padding row (``valid`` False) neither counts in the mean
  nor is used as a partner (such a pair is left unmixed). A sample may draw
  itself as partner (j = i); that leaves it unchanged, as in kornia.

Config (``config.objective``): ``p`` (required), ``lambda_min`` (default 0),
``lambda_max`` (default 0.5). Prediction is the supervised one (eval mode, no
mixing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtneuro_jax.objectives import supervised
from mtneuro_jax.objectives.base import (
  Objective,
  apply_model,
  keep_aux,
  no_params_no_aux,
  weighted_mean,
)


def mix_batch(
  image: jax.Array,
  valid: jax.Array,
  rng: jax.Array,
  *,
  p: float,
  lambda_min: float = 0.0,
  lambda_max: float = 0.5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws the mixing of one batch.

  Args:
    image: [B, ...] float (any trailing axes, e.g. Y, X, 1).
    valid: bool [B].
    rng: key.
    p: per-sample probability of being mixed.
    lambda_min, lambda_max: range of the partner's weight.

  Returns:
    (mixed image [B, ...], perm int32 [B] (partner index), lam float32 [B] (partner weight;
    0 for unmixed samples)).
  """
  b = image.shape[0]
  k_perm, k_mix, k_lam = jax.random.split(rng, 3)
  perm = jax.random.permutation(k_perm, b).astype(jnp.int32)
  mixed = jax.random.bernoulli(k_mix, p, (b,)) & valid & valid[perm]
  lam = jax.random.uniform(k_lam, (b,), jnp.float32, lambda_min, lambda_max)
  lam = jnp.where(mixed, lam, 0.0)
  lam_x = lam.reshape((b,) + (1,) * (image.ndim - 1)).astype(image.dtype)
  return (1 - lam_x) * image + lam_x * image[perm], perm, lam


def mixup_cross_entropy(
  logits: jax.Array, labels: jax.Array, perm: jax.Array, lam: jax.Array
) -> jax.Array:
  """Per-sample ``(1 - lam) CE(logits, y) + lam CE(logits, y[perm])``: logits [B, C] -> [B]."""
  ce_own = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  ce_partner = optax.softmax_cross_entropy_with_integer_labels(logits, labels[perm])
  return (1 - lam) * ce_own + lam * ce_partner


def loss(params, model_state, aux, batch, rng, *, model, config, ctx=None):
  del ctx  # no schedule in this objective
  labels = batch["label"]
  valid = batch.get("valid", jnp.ones(labels.shape, bool))
  k_mix, k_drop = jax.random.split(rng)
  image, perm, lam = mix_batch(
    batch["image"],
    valid,
    k_mix,
    p=float(config.p),
    lambda_min=float(config.get("lambda_min", 0.0)),
    lambda_max=float(config.get("lambda_max", 0.5)),
  )
  out, new_state = apply_model(model, params, model_state, image, train=True, rng=k_drop)
  logits = out["logits"].astype(jnp.float32)
  value = weighted_mean(mixup_cross_entropy(logits, labels, perm, lam), valid)
  # Accuracy against the sample's own label, which dominates the mix (lam <= 0.5 by default).
  accuracy = weighted_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), valid)
  mixed_fraction = weighted_mean((lam > 0).astype(jnp.float32), valid)
  metrics = {
    "train/loss": value,
    "train/accuracy": accuracy,
    "train/mixed_fraction": mixed_fraction,
  }
  return value, (metrics, new_state, aux)


MIXUP = Objective(
  name="mixup", init=no_params_no_aux, loss=loss, update=keep_aux, predict=supervised.predict
)
