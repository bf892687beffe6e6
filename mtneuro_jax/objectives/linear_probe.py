"""Linear evaluation of a frozen encoder: a linear probe on stop-gradient features.

The objective owns one sub-tree, ``'probe'`` (``heads.LinearHead(num_classes)``), and
nothing else. The encoder's weights come from another run through ``init_from``
(``--config.init_from.workdir=<SSL run> --config.init_from.subtree=encoder``) and are
frozen by the config (``optim.freeze = ('^encoder/',)``: exactly zero update).

Protocols (``config.protocol``):

* ``'ssl'`` (default), linear evaluation done right: the encoder runs in inference mode
  (``train=False``: BatchNorm uses its running statistics and never updates them) under
  ``stop_gradient``. The probe trains on the views the encoder was pretrained on: random
  crops of ``views.crop_fraction`` (0.5) of the tile's side, normalised like pretraining
  (``augment.make_view``); it is scored on the four half-size corners (the classification
  evaluator's 'corners' protocol). Encoder params and BN statistics stay bitwise unchanged.
* ``'reference'``: reproduces, on purpose, the reference code's linear evaluation and its
  bugs (MTNeuro ``ssl_eval_trainer.py``): the probe trains on full tiles that are NOT
  normalised (``x * image_std + image_mean``, i.e. the [0, 1] ToTensor() intensities,
  whereas the encoder was pretrained on normalised crops), with the encoder in train mode,
  so its BatchNorm running statistics are re-estimated on those tiles; prediction is on
  un-normalised inputs as well. Use it only to reproduce the reference's numbers.

Config (``config.objective``): ``num_classes`` (required), ``protocol`` ('ssl' |
'reference'), ``views`` (``augment.ViewConfig`` keys; its ``image_mean``/``image_std``
must equal ``data.image_mean``/``data.image_std``, they undo the pipeline's normalisation
in the 'reference' protocol).

``predict`` returns {'features': [B, D], 'logits': [B, num_classes]}. Batches carry
'image' [B, Y, X, 1] (normalised), 'label' [B], 'valid' [B].

If the encoder's BatchNorm statistics are still at their initial values when the run is
built (no ``init_from``: a random encoder is probed), a warning is logged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mtneuro_jax.data import augment
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.models.heads import LinearHead
from mtneuro_jax.objectives.base import Objective, apply_model, keep_aux, weighted_mean

OWN = ("probe",)
PROTOCOLS = ("ssl", "reference")


def _protocol(config) -> str:
  protocol = config.get("protocol", "ssl")
  if protocol not in PROTOCOLS:
    raise ConfigError(f"objective.protocol={protocol!r}; known: {', '.join(PROTOCOLS)}")
  return protocol


def _unnormalise(images: jax.Array, views: augment.ViewConfig) -> jax.Array:
  """The pipeline's (x - mean) / std undone: the reference's [0, 1] ToTensor() intensities."""
  return images * views.image_std + views.image_mean


def _warn_if_untrained(untrained) -> None:
  if bool(np.asarray(untrained)):
    logging.warning(
      "linear_probe: the encoder's BatchNorm statistics are at their initial values: "
      "this probes an untrained (random) encoder; set --config.init_from.workdir=<SSL run> "
      "--config.init_from.subtree=encoder (a resumed run restores its own state after this)"
    )


def init(rng, *, model, variables, example_image, config):
  """{'probe': LinearHead params} and no aux; warns if the encoder looks untrained."""
  _protocol(config)
  stats = variables.get("batch_stats", {})
  if stats:  # fresh BatchNorm: every running mean 0 and variance 1
    fresh = [
      jnp.all(x == (1.0 if getattr(path[-1], "key", None) == "var" else 0.0))
      for path, x in jax.tree_util.tree_flatten_with_path(stats)[0]
    ]
    jax.debug.callback(_warn_if_untrained, jnp.all(jnp.stack(fresh)))
  feats = model.apply(variables, example_image, train=False)["features"]  # [1, D]
  probe = LinearHead(int(config.num_classes)).init(rng, feats)["params"]
  return {"probe": probe}, {}


def _features(params, model_state, image, rng, *, model, train: bool):
  out, new_state = apply_model(model, params, model_state, image, train=train, rng=rng, own=OWN)
  return jax.lax.stop_gradient(out["features"]), new_state


def loss(params, model_state, aux, batch, rng, *, ctx, model, config):
  del ctx  # no schedule
  views = augment.ViewConfig.from_config(config.get("views", None))
  k_view, k_model = jax.random.split(rng)
  if _protocol(config) == "ssl":
    image = augment.make_view(batch["image"], k_view, views)
    feats, new_state = _features(params, model_state, image, None, model=model, train=False)
  else:  # the reference's bug: full un-normalised tiles, encoder BN in train mode
    image = _unnormalise(batch["image"], views)
    feats, new_state = _features(params, model_state, image, k_model, model=model, train=True)
  logits = LinearHead(int(config.num_classes)).apply({"params": params["probe"]}, feats)
  labels = batch["label"]
  valid = batch.get("valid", jnp.ones(labels.shape, bool))
  value = weighted_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), valid)
  accuracy = weighted_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), valid)
  return value, ({"train/loss": value, "train/accuracy": accuracy}, new_state, aux)


def predict(params, model_state, aux, batch, *, model, config):
  """Eval mode: {'features': [B, D], 'logits': [B, C]} ('reference': on un-normalised input)."""
  del aux
  image = batch["image"]
  if _protocol(config) == "reference":
    image = _unnormalise(image, augment.ViewConfig.from_config(config.get("views", None)))
  out, _ = apply_model(model, params, model_state, image, train=False, own=OWN)
  logits = LinearHead(int(config.num_classes)).apply({"params": params["probe"]}, out["features"])
  return {"features": out["features"], "logits": logits}


LINEAR_PROBE = Objective("linear_probe", init=init, loss=loss, update=keep_aux, predict=predict)
