"""VICReg (Bardes, Ponce & LeCun, ICLR 2022): variance-invariance-covariance regularisation.

Two views of each tile (``augment.make_view``) go through the encoder (train mode) and
an expander MLP (Linear-BN-ReLU, Linear-BN-ReLU, Linear without bias, as the official
code). On the two embeddings Z, Z' [B, D]:

  invariance  s(Z, Z') = mean((Z - Z')^2)                         (MSE over B x D)
  variance    v(Z) = mean_j max(0, gamma - sqrt(Var(Z[:, j]) + eps))  (unbiased Var)
  covariance  c(Z) = sum_{i != j} Cov(Z)[i, j]^2 / D              (Cov with 1 / (B - 1))
  loss = sim_coeff * s + std_coeff * (v(Z) + v(Z')) + cov_coeff * (c(Z) + c(Z'))

with the paper's gamma 1, eps 1e-4 and coefficients 25, 25, 1 (its Eq. 6 and
Algorithm 1; the official repository halves the variance term, i.e. std_coeff 12.5 here).
The paper's ImageNet expander is 8192-8192-8192; the default here is 512-512-512 so it
runs on CPU (``config.expander``; configs/task1_vicreg.py's 'paper' uses 2048 x 3).
An online linear probe on stop-gradient view-1 features reports ``probe/acc``; it adds
its cross-entropy to the loss but, through the stop-gradient, trains only itself.

Config (``config.objective``): ``num_classes``, ``expander`` (layer sizes), ``sim_coeff``,
``std_coeff``, ``cov_coeff``, ``gamma``, ``eps``, ``views`` (``augment.ViewConfig``).
Own params: 'expander', 'probe'; aux: the expander's BatchNorm statistics (unused by
``predict``). Train batches are full (no padding rows). ``predict`` -> {'features', 'logits'}.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mtneuro_jax.data import augment
from mtneuro_jax.models.heads import LinearHead, torch_linear_init
from mtneuro_jax.objectives.base import Objective, apply_model, keep_aux, weighted_mean

OWN = ("expander", "probe")
DEFAULT_EXPANDER = (512, 512, 512)


class Expander(nn.Module):
  """[B, D] -> [B, sizes[-1]]: (Linear, BatchNorm, ReLU) per hidden size, then Linear (no bias)."""

  sizes: Sequence[int] = DEFAULT_EXPANDER

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i, size in enumerate(self.sizes):
      init = torch_linear_init(x.shape[-1])
      last = i == len(self.sizes) - 1
      x = nn.Dense(size, use_bias=not last, kernel_init=init, bias_init=init, name=f"fc{i + 1}")(x)
      if not last:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i + 1}")(x)
        x = nn.relu(x)
    return x


def vicreg_terms(za: jax.Array, zb: jax.Array, *, gamma: float = 1.0, eps: float = 1e-4):
  """{'invariance', 'variance', 'covariance'} of embeddings za, zb [B, D] (both branches summed)."""
  n, d = za.shape

  def var_cov(z):
    z = z - z.mean(axis=0)
    cov = jnp.matmul(z.T, z, precision=jax.lax.Precision.HIGHEST) / (n - 1)  # [D, D]
    std = jnp.sqrt(jnp.diagonal(cov) + eps)
    off_diagonal = cov - jnp.diag(jnp.diagonal(cov))
    return jnp.mean(jax.nn.relu(gamma - std)), jnp.sum(off_diagonal**2) / d

  (va, ca), (vb, cb) = var_cov(za), var_cov(zb)
  return {"invariance": jnp.mean((za - zb) ** 2), "variance": va + vb, "covariance": ca + cb}


def vicreg_loss(za, zb, *, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, gamma=1.0, eps=1e-4):
  """(scalar loss, terms) of embeddings za, zb [B, D] (module docstring)."""
  t = vicreg_terms(za.astype(jnp.float32), zb.astype(jnp.float32), gamma=gamma, eps=eps)
  return sim_coeff * t["invariance"] + std_coeff * t["variance"] + cov_coeff * t["covariance"], t


def _expander(config) -> Expander:
  return Expander(tuple(int(s) for s in config.get("expander", DEFAULT_EXPANDER)))


def init(rng, *, model, variables, example_image, config):
  feats = model.apply(variables, example_image, train=False)["features"]  # [1, D]
  k_exp, k_probe = jax.random.split(rng)
  expander = _expander(config).init(k_exp, feats, train=False)
  probe = LinearHead(int(config.num_classes)).init(k_probe, feats)["params"]
  return {"expander": expander["params"], "probe": probe}, {
    "expander_stats": expander["batch_stats"]
  }


def loss(params, model_state, aux, batch, rng, *, ctx, model, config):
  del ctx  # no schedule
  views = augment.ViewConfig.from_config(config.get("views", None))
  k1, k2, kd1, kd2 = jax.random.split(rng, 4)
  state, stats, feats, embeddings = model_state, aux["expander_stats"], [], []
  for k_view, k_drop in ((k1, kd1), (k2, kd2)):  # each view its own BatchNorm batch
    view = augment.make_view(batch["image"], k_view, views)
    out, state = apply_model(model, params, state, view, train=True, rng=k_drop, own=OWN)
    z, new = _expander(config).apply(
      {"params": params["expander"], "batch_stats": stats},
      out["features"],
      train=True,
      mutable=["batch_stats"],
    )
    stats = new["batch_stats"]
    feats.append(out["features"])
    embeddings.append(z)
  value, terms = vicreg_loss(
    *embeddings,
    sim_coeff=float(config.get("sim_coeff", 25.0)),
    std_coeff=float(config.get("std_coeff", 25.0)),
    cov_coeff=float(config.get("cov_coeff", 1.0)),
    gamma=float(config.get("gamma", 1.0)),
    eps=float(config.get("eps", 1e-4)),
  )
  # Online probe: on stop-gradient features, so it never shapes the representation.
  logits = LinearHead(int(config.num_classes)).apply(
    {"params": params["probe"]}, jax.lax.stop_gradient(feats[0])
  )
  labels = batch["label"]
  valid = batch.get("valid", jnp.ones(labels.shape, bool))
  probe_loss = weighted_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), valid)
  probe_acc = weighted_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), valid)
  metrics = {
    "train/loss": value,
    **{f"train/{k}": v for k, v in terms.items()},
    "probe/loss": probe_loss,
    "probe/acc": probe_acc,
  }
  return value + probe_loss, (metrics, state, {**aux, "expander_stats": stats})


def predict(params, model_state, aux, batch, *, model, config):
  """Eval mode: {'features': [B, D] encoder features, 'logits': [B, C] of the online probe}."""
  del aux
  out, _ = apply_model(model, params, model_state, batch["image"], train=False, own=OWN)
  logits = LinearHead(int(config.num_classes)).apply({"params": params["probe"]}, out["features"])
  return {"features": out["features"], "logits": logits}


VICREG = Objective("vicreg", init=init, loss=loss, update=keep_aux, predict=predict)
