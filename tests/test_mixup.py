"""Mixup objective: closed-form loss at known lambda, mixing statistics, padding rows, registry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtneuro_jax.objectives import OBJECTIVES, mixup, supervised


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_mixup_cross_entropy_closed_form():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 1])
  perm = np.array([2, 0, 1, 4, 3])
  lam = np.array([0.0, 0.25, 0.5, 0.1, 0.4], np.float32)
  ls = _log_softmax(logits.astype(np.float64))
  want = -(1 - lam) * ls[np.arange(5), labels] - lam * ls[np.arange(5), labels[perm]]
  got = mixup.mixup_cross_entropy(
    jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(perm), jnp.asarray(lam)
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mix_batch_p0_is_identity_and_p1_mixes_in_range():
  x = jax.random.normal(jax.random.key(0), (64, 4, 4, 1))
  valid = jnp.ones(64, bool)
  out, perm, lam = mixup.mix_batch(x, valid, jax.random.key(1), p=0.0)
  np.testing.assert_array_equal(out, x)
  assert float(jnp.abs(lam).max()) == 0.0
  out, perm, lam = mixup.mix_batch(x, valid, jax.random.key(1), p=1.0)
  lam_np = np.asarray(lam)
  assert (lam_np >= 0).all() and (lam_np <= 0.5).all() and lam_np.std() > 0.05
  assert sorted(np.asarray(perm).tolist()) == list(range(64))  # a permutation
  want = (1 - lam_np[:, None, None, None]) * np.asarray(x) + lam_np[
    :, None, None, None
  ] * np.asarray(x)[perm]
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_mix_probability_and_padding_rows():
  b = 4000
  valid = jnp.arange(b) < 3000  # the last 1000 rows are padding
  x = jnp.zeros((b, 2, 2, 1))
  _, perm, lam = mixup.mix_batch(x, valid, jax.random.key(2), p=0.3)
  lam, perm, valid = np.asarray(lam), np.asarray(perm), np.asarray(valid)
  mixed = lam > 0
  assert not mixed[~valid].any()  # padding is never mixed ...
  assert not mixed[~valid[perm]].any()  # ... nor used as a partner
  # Mixed fraction among valid rows = p * P(partner valid) = 0.3 * 0.75.
  assert mixed[valid].mean() == pytest.approx(0.3 * 0.75, abs=0.03)


class _Linear(nn.Module):
  """A tiny stand-in model with the models' output contract."""

  @nn.compact
  def __call__(self, image, *, train):
    f = image.reshape(image.shape[0], -1)
    return {"features": f, "logits": nn.Dense(3)(f)}


def _setup(b=16):
  model = _Linear()
  x = jax.random.normal(jax.random.key(3), (b, 4, 4, 1))
  y = jax.random.randint(jax.random.key(4), (b,), 0, 3)
  params = model.init(jax.random.key(5), x, train=False)["params"]
  return model, params, {"image": x, "label": y, "valid": jnp.ones(b, bool)}


def test_loss_equals_closed_form_with_the_drawn_lambda():
  model, params, batch = _setup()
  cfg = ml_collections.ConfigDict({"p": 1.0, "lambda_min": 0.2, "lambda_max": 0.4})
  rng = jax.random.key(6)
  value, (metrics, state, _) = mixup.MIXUP.loss(params, {}, {}, batch, rng, model=model, config=cfg)
  # Reproduce the draw (same key split as the objective), then the loss in numpy.
  k_mix, _ = jax.random.split(rng)
  xm, perm, lam = mixup.mix_batch(
    batch["image"], batch["valid"], k_mix, p=1.0, lambda_min=0.2, lambda_max=0.4
  )
  lam = np.asarray(lam)
  assert ((lam >= 0.2) & (lam <= 0.4)).all()
  logits = np.asarray(model.apply({"params": params}, xm, train=False)["logits"], np.float64)
  ls = _log_softmax(logits)
  y = np.asarray(batch["label"])
  i = np.arange(len(y))
  want = np.mean(-(1 - lam) * ls[i, y] - lam * ls[i, y[np.asarray(perm)]])
  assert float(value) == pytest.approx(want, rel=1e-5)
  assert float(metrics["train/mixed_fraction"]) == 1.0
  assert state == {}


def test_p0_equals_supervised_and_padding_is_ignored():
  model, params, batch = _setup()
  cfg = ml_collections.ConfigDict({"p": 0.0})
  rng = jax.random.key(7)
  got, _ = mixup.MIXUP.loss(params, {}, {}, batch, rng, model=model, config=cfg)
  want, _ = supervised.SUPERVISED.loss(params, {}, {}, batch, rng, model=model, config=cfg)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  # Garbage in padding rows changes nothing.
  valid = jnp.arange(16) < 10
  padded = {
    **batch,
    "valid": valid,
    "image": jnp.where(valid[:, None, None, None], batch["image"], 1e3),
  }
  clean = {k: v[:10] for k, v in batch.items()}
  cfg = ml_collections.ConfigDict({"p": 0.0})
  a, _ = mixup.MIXUP.loss(params, {}, {}, padded, rng, model=model, config=cfg)
  b, _ = mixup.MIXUP.loss(params, {}, {}, clean, rng, model=model, config=cfg)
  assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_registered_and_trains():
  assert OBJECTIVES["mixup"] is mixup.MIXUP
  model, params, batch = _setup(32)
  cfg = ml_collections.ConfigDict({"p": 0.5})
  grad_fn = jax.jit(
    jax.value_and_grad(
      lambda p, r: mixup.MIXUP.loss(p, {}, {}, batch, r, model=model, config=cfg)[0]
    )
  )
  losses = []
  for step in range(30):
    v, g = grad_fn(params, jax.random.fold_in(jax.random.key(8), step))
    params = jax.tree.map(lambda a, b: a - 0.1 * b, params, g)
    losses.append(float(v))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  pred = mixup.MIXUP.predict(params, {}, {}, batch, model=model, config=cfg)
  assert pred["logits"].shape == (32, 3)
