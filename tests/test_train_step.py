"""train_step on a fixed batch: sharded == single device, loss goes down, frozen params
stay bitwise equal; optimizer, schedule and objective semantics."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tiny_steps  # tests/tiny_steps.py

from mtneuro_jax import sharding
from mtneuro_jax.models import resnet
from mtneuro_jax.objectives import OBJECTIVES
from mtneuro_jax.train import optim
from mtneuro_jax.train import step as step_lib
from mtneuro_jax.train.state import TrainState, create_train_state


def _batch(b=16, size=16, seed=0):
  """Learnable: the class sets the mean intensity; 'valid' marks the last two rows as padding."""
  rng = np.random.default_rng(seed)
  label = np.arange(b, dtype=np.int32) % 4
  image = rng.normal(size=(b, size, size, 1)).astype(np.float32) + label[:, None, None, None]
  valid = np.ones(b, bool)
  valid[-2:] = False
  return {"image": image, "label": label, "valid": valid}


def _small_model(dropout=0.1):
  # Two residual stages instead of four: same code paths (stem, blocks, downsample
  # shortcut, BN, dropout head) at a fraction of the CPU compile time.
  return resnet.ResNetXray(
    num_classes=4, width_multiplier=1 / 16, dropout=dropout, stage_sizes=(1, 1)
  )


def _setup(mesh, optim_cfg=None, dropout=0.1):
  model = _small_model(dropout)
  objective = OBJECTIVES["supervised"]
  obj_cfg = ml_collections.ConfigDict({"label_smoothing": 0.0})
  tx, _ = optim.make_optimizer(
    optim_cfg or tiny_steps.optim_cfg(), steps_per_epoch=10, total_steps=100, batch_size=16
  )
  example = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
  state = jax.jit(
    lambda: create_train_state(model, objective, tx, example, seed=0, objective_config=obj_cfg),
    out_shardings=sharding.replicated_sharding(mesh),
  )()
  step = step_lib.jit_train_step(
    mesh, model=model, objective=objective, optimizer=tx, config=obj_cfg, total_steps=100
  )
  return state, step


def _run(mesh, n, optim_cfg=None, batch=None):
  """(initial state on host, final state on host, per-step losses)."""
  state, step = _setup(mesh, optim_cfg)
  init = jax.device_get(state)
  batch = sharding.shard_batch(batch or _batch(), mesh)
  losses = []
  for _ in range(n):
    state, m = step(state, batch)
    losses.append(float(m["train/loss"]))
  return init, jax.device_get(state), losses


def test_sharded_step_equals_single_device():
  assert jax.device_count() == 8, "conftest should provide 8 fake CPU devices"
  init, s8, l8 = _run(sharding.make_mesh(8), 3)
  _, s1, l1 = _run(sharding.make_mesh(1), 3)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # BN batch statistics are over the global batch under jit, so params agree too.
  for a, b in zip(
    jax.tree.leaves((s8.params, s8.model_state)),
    jax.tree.leaves((s1.params, s1.model_state)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert int(s8.step) == int(s1.step) == 3
  # Unfrozen training moves every parameter tensor.
  for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(s8.params), strict=True):
    assert not np.array_equal(a, b)


def test_loss_decreases_and_frozen_params_bitwise_equal():
  mesh = sharding.make_mesh(8)
  state0, step = _setup(
    mesh, tiny_steps.optim_cfg(freeze=("^encoder/",), weight_decay=0.1, learning_rate=1.0)
  )
  init = jax.device_get(state0)
  batch = sharding.shard_batch(_batch(), mesh)
  state, losses = state0, []
  for _ in range(12):
    state, m = step(state, batch)  # state0 is donated: never touched again
    losses.append(float(m["train/loss"]))
  final = jax.device_get(state)
  assert losses[-1] < 0.7 * losses[0], losses
  # Frozen encoder: bitwise identical (no gradient step, no weight decay, no momentum).
  for a, b in zip(
    jax.tree.leaves(init.params["encoder"]), jax.tree.leaves(final.params["encoder"]), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(init.params["head"]["kernel"], final.params["head"]["kernel"])
  # BN running statistics are not parameters: train mode still updates them.
  assert not np.array_equal(
    init.model_state["batch_stats"]["encoder"]["bn1"]["mean"],
    final.model_state["batch_stats"]["encoder"]["bn1"]["mean"],
  )


def test_padding_rows_do_not_count_in_the_loss():
  model = _small_model(dropout=0.0)
  obj = OBJECTIVES["supervised"]
  b = _batch(b=8, size=8)
  v = jax.jit(lambda: model.init(jax.random.key(0), b["image"], train=False))()
  params, ms = v["params"], {"batch_stats": v["batch_stats"]}
  cfg = ml_collections.ConfigDict({"label_smoothing": 0.0})
  loss_fn = jax.jit(
    lambda batch: obj.loss(params, ms, {}, batch, jax.random.key(1), model=model, config=cfg)
  )
  l1, (m1, _, _) = loss_fn(b)
  b2 = dict(b, label=np.where(b["valid"], b["label"], (b["label"] + 1) % 4).astype(np.int32))
  l2, (m2, _, _) = loss_fn(b2)
  assert float(l1) == float(l2) and float(m1["train/accuracy"]) == float(m2["train/accuracy"])
  # And it is the mean CE over the valid rows (BN in train mode uses the whole batch's statistics).
  logits = jax.jit(lambda x: model.apply(v, x, train=True, mutable=["batch_stats"])[0]["logits"])(
    b["image"]
  )
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"])
  np.testing.assert_allclose(float(l1), float(ce[b["valid"]].mean()), rtol=1e-5)
  out = jax.jit(lambda batch: obj.predict(params, ms, {}, batch, model=model, config=cfg))(b)
  assert out["logits"].shape == (8, 4) and out["features"].shape == (8, 8)


def test_sgd_coupled_weight_decay_matches_pytorch_formula():
  """torch.optim.SGD(lr, momentum, weight_decay): g += wd*p; buf = m*buf + g; p -= lr*buf."""
  lr, m, wd = 0.1, 0.9, 0.01
  tx, _ = optim.make_optimizer(
    tiny_steps.optim_cfg(learning_rate=lr, momentum=m, weight_decay=wd),
    steps_per_epoch=1,
    total_steps=10,
    batch_size=1,
  )
  p = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
  s = tx.init(p)
  ref_p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  buf = {k: np.zeros_like(v) for k, v in ref_p.items()}
  for i in range(3):
    g = {"w": jnp.array([0.3, 0.1 * i]), "b": jnp.array([-0.2])}
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    for k in ref_p:
      gk = np.asarray(g[k], np.float64) + wd * ref_p[k]
      buf[k] = m * buf[k] + gk
      ref_p[k] = ref_p[k] - lr * buf[k]
  for k in ref_p:
    np.testing.assert_allclose(p[k], ref_p[k], rtol=1e-6)
  # Decoupled mode differs: the decay does not go through the momentum buffer.
  tx2, _ = optim.make_optimizer(
    tiny_steps.optim_cfg(
      learning_rate=lr, momentum=m, weight_decay=wd, weight_decay_mode="decoupled"
    ),
    steps_per_epoch=1,
    total_steps=10,
    batch_size=1,
  )
  p2 = {"w": jnp.array([1.0])}
  u, _ = tx2.update({"w": jnp.array([0.0])}, tx2.init(p2), p2)
  np.testing.assert_allclose(u["w"], [-lr * wd * 1.0], rtol=1e-6)


def test_schedule_warmup_then_cosine():
  cfg = tiny_steps.optim_cfg(
    learning_rate=0.4, schedule="cosine", warmup_epochs=1.0, lr_base_batch_size=256
  )
  sched = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=110, batch_size=128)
  peak = 0.2  # 0.4 * 128 / 256
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), peak / 2, rtol=1e-5)  # half-way through the cosine
  assert float(sched(110)) == pytest.approx(0.0, abs=1e-9)
  const = optim.make_schedule(
    tiny_steps.optim_cfg(learning_rate=0.1), steps_per_epoch=10, total_steps=50, batch_size=8
  )
  assert float(const(0)) == float(const(49)) == pytest.approx(0.1)


def test_step_rng_depends_only_on_step():
  state = TrainState(
    step=jnp.int32(5),
    params={},
    model_state={},
    opt_state=(),
    aux={},
    rng=jax.random.key_data(jax.random.key(0)),
  )
  k5 = jax.random.key_data(state.step_rng())
  k5b = jax.random.key_data(state.replace(rng=jnp.array(state.rng)).step_rng())
  k6 = jax.random.key_data(state.replace(step=jnp.int32(6)).step_rng())
  np.testing.assert_array_equal(k5, k5b)
  assert not np.array_equal(k5, k6)


def test_adam_variants_and_config_errors():
  p = {"w": jnp.array([1.0, -1.0])}
  g = {"w": jnp.array([0.5, 0.5])}
  for name, mode in (("adam", "coupled"), ("adamw", "decoupled")):
    tx, _ = optim.make_optimizer(
      tiny_steps.optim_cfg(name=name, learning_rate=0.1, weight_decay=0.01),
      steps_per_epoch=1,
      total_steps=10,
      batch_size=1,
    )
    u, _ = tx.update(g, tx.init(p), p)
    if mode == "decoupled":  # Adam's first step is -lr * sign(g); decay adds -lr * wd * p on top
      np.testing.assert_allclose(
        u["w"], -0.1 * (np.sign([0.5, 0.5]) + 0.01 * np.array([1.0, -1.0])), rtol=1e-4
      )
    else:  # coupled L2 enters the moments: the first step is still -lr * sign(g + wd * p)
      np.testing.assert_allclose(u["w"], [-0.1, -0.1], rtol=1e-4)
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.make_optimizer(
      tiny_steps.optim_cfg(name="lamb"), steps_per_epoch=1, total_steps=1, batch_size=1
    )
  with pytest.raises(ValueError, match="decoupled"):
    optim.make_optimizer(
      tiny_steps.optim_cfg(name="adamw", weight_decay_mode="coupled"),
      steps_per_epoch=1,
      total_steps=1,
      batch_size=1,
    )
