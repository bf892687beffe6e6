"""BYOL (Grill et al. 2020) as MTNeuro trains it, with an online linear probe.

Online network: the model's encoder (features y [B, D]) -> ``projector`` MLP (D -> 4096 -> 256,
no last bias) -> ``predictor`` MLP (256 -> 4096 -> 256). Target network: an EMA of the online
encoder + projector parameters. For two views v1, v2 of each tile the loss is

  0.5 * L(q(v1), stop_grad(z'(v2))) + 0.5 * L(q(v2), stop_grad(z'(v1))),  L = 2 - 2 cos,

averaged over valid rows. As the MTNeuro reference:

* each view goes through the networks in its own forward pass (BatchNorm statistics per view);
* the target runs in train mode (batch statistics). Its BatchNorm running statistics are its
  own, carried from step to step and never averaged with the online ones; the EMA covers
  parameters only;
* the EMA momentum rises from ``ema_base`` (0.996) to 1 on a cosine over the run,
  ``mm(step) = 1 - (1 - base) (1 + cos(pi step / total_steps)) / 2``, and is applied after the
  optimizer step with ``step`` = updates done before this one (0.996 on the first update;
  exactly 1 only at step = total_steps, just past the last update, as the reference).

Own parameters (``init``): {'projector', 'predictor', 'probe'}, trained by the run's optimizer
(so weight decay and LARS reach them). ``aux`` (objective-owned, not trained):
  {'heads': {'projector': BN stats, 'predictor': BN stats},       # online heads, train mode
   'target': {'params': {<model params>, 'projector'},             # the EMA
              'model_state': {'batch_stats': ...},                 # target encoder's BN stats
              'heads': {'projector': BN stats}}}

Online probe: a LinearHead(num_classes) on stop_gradient(online encoder features of view 1),
cross-entropy on batch['label'] (valid-weighted). Its loss is added to the SSL loss; thanks to
the stop-gradient it trains the probe alone. ``predict`` returns {'features': encoder features
in eval mode [B, D], 'logits': probe logits [B, C]}, so the 'classification' evaluator reports
the online probe's accuracy and feature-based evaluators (kNN, linear probe) see the encoder.

Config (``config.objective``):
  views:         ViewConfig keys (data/augment.py): crop_fraction (0.5), per_sample, intensity
                 options (off by default).
  ema_base:      0.996.
  projector:     {hidden: 4096, out: 256};  predictor: {hidden: 4096, out: 256}.
  num_classes:   classes of the online probe (Task 1: 4).

Pure pieces for tests and other objectives (myow.py reuses them): ``cosine_loss``,
``ema_momentum``, ``ema_update``, the head and target helpers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtneuro_jax.data.augment import ViewConfig, make_view
from mtneuro_jax.models.heads import MLP, LinearHead
from mtneuro_jax.objectives.base import Objective, apply_model, model_params, weighted_mean

# Every sub-tree an SSL objective may own; the model gets the rest of ``params``.
OWN = ("projector", "predictor", "projector_m", "predictor_m", "probe")
DEFAULT_EMA_BASE = 0.996
DEFAULT_HEAD = {"hidden": 4096, "out": 256}


# ---------------------------------------------------------------------------
# Pure pieces.
def cosine_loss(p: jax.Array, z: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean over rows of 2 - 2 cos(p_i, z_i): p, z [B, D]; weights [B] (rows with 0 do not count).

  0 for parallel rows, 4 for opposite ones. ``z`` is stop-gradiented (the target branch).
  """
  p = p.astype(jnp.float32)
  z = jax.lax.stop_gradient(z).astype(jnp.float32)
  # Normalise as torch.nn.functional.normalize (eps 1e-12 on the norm) so zero rows give 2, not NaN.
  pn = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
  zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  per_row = 2.0 - 2.0 * jnp.sum(pn * zn, axis=-1)
  if weights is None:
    return per_row.mean()
  return weighted_mean(per_row, weights)


def ema_momentum(step: jax.Array | int, total_steps: int, base: float) -> jax.Array:
  """BYOL's target momentum: float32 [], ``base`` at step 0 rising on a cosine to 1 at ``total_steps``."""
  t = jnp.asarray(step, jnp.float32) / max(int(total_steps), 1)
  return 1.0 - (1.0 - base) * (1.0 + jnp.cos(jnp.pi * t)) / 2.0


def ema_update(target: Any, online: Any, m: jax.Array | float) -> Any:
  """``m * target + (1 - m) * online`` leaf by leaf (same tree structure); m = 1 keeps ``target``."""
  return jax.tree.map(lambda t, o: m * t + (1.0 - m) * o.astype(t.dtype), target, online)


# ---------------------------------------------------------------------------
# Config and heads.
def cfg_get(config, key: str, default):
  """``config[key]`` if the objective config has it, else ``default`` (config may be None)."""
  if config is None:
    return default
  return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def view_config(config) -> ViewConfig:
  return ViewConfig.from_config(cfg_get(config, "views", None))


def head_module(config, name: str) -> MLP:
  """The MLP of head ``name`` ('projector', 'predictor', 'projector_m', 'predictor_m')."""
  spec = dict(cfg_get(config, name, None) or DEFAULT_HEAD)
  return MLP(hidden=int(spec.get("hidden", 4096)), out=int(spec.get("out", 256)), last_bias=False)


def probe_module(config) -> LinearHead:
  return LinearHead(int(cfg_get(config, "num_classes", 4)))


def init_head(rng, config, name: str, in_dim: int) -> tuple[dict, dict]:
  """(params, batch_stats) of head ``name`` for inputs [B, in_dim]."""
  v = head_module(config, name).init(rng, jnp.zeros((2, in_dim), jnp.float32), train=False)
  return v["params"], v["batch_stats"]


def apply_head(config, name: str, params, stats, x: jax.Array) -> tuple[jax.Array, dict]:
  """Runs head ``name`` in train mode on x [B, in]: (out [B, out], new BN stats)."""
  out, new = head_module(config, name).apply(
    {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
  )
  return out, new["batch_stats"]


def init_ssl(rng, *, model, variables, example_image, config, heads, target_heads):
  """Shared ``init``: online heads ``heads`` (chained: each feeds the next output width), a probe,
  and a target = copy of the model's variables plus the online ``target_heads``.

  Returns (own_params, aux) as described in the module docstring.
  """
  feats = model.apply(variables, example_image, train=False)["features"]  # [1, D]
  dim = feats.shape[-1]
  own, stats = {}, {}
  keys = jax.random.split(rng, len(heads) + 1)
  in_dims = {"projector": dim, "predictor": None, "projector_m": None, "predictor_m": None}
  for key, name in zip(keys[:-1], heads, strict=True):
    in_dim = in_dims[name] or _out_dim(config, _feeds(name))
    own[name], stats[name] = init_head(key, config, name, in_dim)
  own["probe"] = probe_module(config).init(keys[-1], jnp.zeros((2, dim), jnp.float32))["params"]
  variables = dict(variables)
  model_p = variables.pop("params")
  target = {
    "params": {**model_p, **{n: own[n] for n in target_heads}},
    "model_state": variables,
    "heads": {n: stats[n] for n in target_heads},
  }
  return own, {"heads": stats, "target": target}


def _feeds(name: str) -> str:
  """The head whose output is ``name``'s input (predictor <- projector; MYOW's chain)."""
  return {"predictor": "projector", "projector_m": "projector", "predictor_m": "projector_m"}[name]


def _out_dim(config, name: str) -> int:
  return int(dict(cfg_get(config, name, None) or DEFAULT_HEAD).get("out", 256))


# ---------------------------------------------------------------------------
# Forward passes. A Carry holds the non-trained state that a step threads through its passes.
class Carry(NamedTuple):
  model_state: Any  # online model's collections ({'batch_stats': ...})
  heads: dict  # online heads' BN stats
  target: dict  # aux['target']


def encode_online(model, params, carry: Carry, image, rng) -> tuple[jax.Array, Carry]:
  """Online encoder in train mode (with gradient): image [B, Y, X, 1] -> y [B, D]."""
  out, ms = apply_model(model, params, carry.model_state, image, train=True, rng=rng, own=OWN)
  return out["features"], carry._replace(model_state=ms)


def encode_target(model, carry: Carry, image, rng) -> tuple[jax.Array, Carry]:
  """Target encoder in train mode (batch statistics, as the reference), no gradient: y' [B, D]."""
  t = carry.target
  out, ms = apply_model(model, t["params"], t["model_state"], image, train=True, rng=rng, own=OWN)
  y = jax.lax.stop_gradient(out["features"])
  return y, carry._replace(target={**t, "model_state": ms})


def online_heads(config, params, carry: Carry, x, names) -> tuple[jax.Array, Carry]:
  """x through the online heads ``names`` in order (train mode)."""
  stats = dict(carry.heads)
  for name in names:
    x, stats[name] = apply_head(config, name, params[name], stats[name], x)
  return x, carry._replace(heads=stats)


def target_heads(config, carry: Carry, x, names) -> tuple[jax.Array, Carry]:
  """x through the target heads ``names`` in order (train mode), no gradient."""
  t = carry.target
  stats = dict(t["heads"])
  for name in names:
    x, stats[name] = apply_head(config, name, t["params"][name], stats[name], x)
  return jax.lax.stop_gradient(x), carry._replace(target={**t, "heads": stats})


def carry_from(model_state, aux) -> Carry:
  return Carry(model_state=model_state, heads=aux["heads"], target=aux["target"])


def aux_from(carry: Carry, aux) -> dict:
  return {**aux, "heads": carry.heads, "target": carry.target}


def byol_pair(config, model, params, carry: Carry, v1, v2, valid, rng):
  """The symmetric BYOL loss of views v1, v2 [B, h, w, 1].

  Returns (loss [], y1 = online features of v1 [B, D], carry).
  """
  r1, r2, r3, r4 = jax.random.split(rng, 4)
  y1, carry = encode_online(model, params, carry, v1, r1)
  q1, carry = online_heads(config, params, carry, y1, ("projector", "predictor"))
  y2, carry = encode_online(model, params, carry, v2, r2)
  q2, carry = online_heads(config, params, carry, y2, ("projector", "predictor"))
  t1, carry = encode_target(model, carry, v1, r3)
  z1, carry = target_heads(config, carry, t1, ("projector",))
  t2, carry = encode_target(model, carry, v2, r4)
  z2, carry = target_heads(config, carry, t2, ("projector",))
  value = 0.5 * cosine_loss(q1, z2, valid) + 0.5 * cosine_loss(q2, z1, valid)
  return value, y1, carry


def probe_loss(config, params, features, labels, valid) -> tuple[jax.Array, dict]:
  """Cross-entropy of the probe on stop_gradient(features [B, D]): (loss [], metrics)."""
  logits = probe_module(config).apply({"params": params["probe"]}, jax.lax.stop_gradient(features))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  value = weighted_mean(ce, valid)
  acc = weighted_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), valid)
  return value, {"probe/loss": value, "probe/acc": acc}


def feature_std(y: jax.Array) -> jax.Array:
  """Mean over dims of the batch std of L2-normalised features [B, D]: ~1/sqrt(D) when healthy,
  0 at collapse (a cheap BYOL health signal)."""
  yn = y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
  return jnp.std(yn, axis=0).mean()


# ---------------------------------------------------------------------------
# The objective.
def init(rng, *, model, variables, example_image, config):
  return init_ssl(
    rng,
    model=model,
    variables=variables,
    example_image=example_image,
    config=config,
    heads=("projector", "predictor"),
    target_heads=("projector",),
  )


def loss(params, model_state, aux, batch, rng, *, ctx, model, config):
  images = batch["image"]
  valid = batch.get("valid", jnp.ones(images.shape[:1], bool))
  vcfg = view_config(config)
  k1, k2, kf = jax.random.split(rng, 3)
  v1, v2 = make_view(images, k1, vcfg), make_view(images, k2, vcfg)
  byol, y1, carry = byol_pair(
    config, model, params, carry_from(model_state, aux), v1, v2, valid, kf
  )
  probe, metrics = probe_loss(config, params, y1, batch["label"], valid)
  total = byol + probe
  metrics.update(
    {
      "train/loss": total,
      "train/byol_loss": byol,
      "train/ema_momentum": ema_momentum(
        ctx.step, ctx.total_steps, cfg_get(config, "ema_base", DEFAULT_EMA_BASE)
      ),
      "train/feature_std": feature_std(y1),
    }
  )
  return total, (metrics, carry.model_state, aux_from(carry, aux))


def update(aux, params, *, ctx, config):
  """EMA of the target's parameters towards the new online ones (after the optimizer step)."""
  m = ema_momentum(ctx.step, ctx.total_steps, cfg_get(config, "ema_base", DEFAULT_EMA_BASE))
  target = aux["target"]
  online = {k: params[k] for k in target["params"]}
  return {**aux, "target": {**target, "params": ema_update(target["params"], online, m)}}


def predict(params, model_state, aux, batch, *, model, config):
  """Eval mode: {'features': online encoder [B, D], 'logits': online probe [B, num_classes]}."""
  del aux
  out, _ = apply_model(model, params, model_state, batch["image"], train=False, own=OWN)
  logits = probe_module(config).apply({"params": params["probe"]}, out["features"])
  return {"features": out["features"], "logits": logits}


def target_model_params(aux) -> dict:
  """The target network's model parameters (without its heads), e.g. to export its encoder."""
  return model_params(aux["target"]["params"], OWN)


BYOL = Objective(name="byol", init=init, loss=loss, update=update, predict=predict)
