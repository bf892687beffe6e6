"""BYOL, MYOW and MYOW-merged: the pure pieces against closed forms, mining sharded ==
single-device, one real train step per objective (finite loss, online params move, the target
moves by exactly the EMA formula), and LARS's treatment of 1-D params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mtneuro_jax import sharding
from mtneuro_jax.models import resnet
from mtneuro_jax.objectives import OBJECTIVES
from mtneuro_jax.objectives.byol import cosine_loss, ema_momentum, ema_update
from mtneuro_jax.objectives.myow import mine_nearest, myow_weight, split_pool
from mtneuro_jax.train import optim
from mtneuro_jax.train import step as step_lib
from mtneuro_jax.train.state import create_train_state


def test_cosine_loss_closed_forms():
  rng = np.random.default_rng(0)
  p = rng.normal(size=(5, 7)).astype(np.float32)
  np.testing.assert_allclose(cosine_loss(p, 3.0 * p), 0.0, atol=1e-6)
  np.testing.assert_allclose(cosine_loss(p, -0.5 * p), 4.0, rtol=1e-6)
  # Orthogonal rows: 2; padding rows (weight 0) do not count.
  e = np.eye(4, dtype=np.float32)
  z = np.concatenate([e[1:2], -e[0:1]])  # both rows orthogonal to e[:2]'s
  np.testing.assert_allclose(cosine_loss(e[:2], z, jnp.array([True, False])), 2.0, rtol=1e-6)
  # No gradient flows into the target branch.
  g = jax.grad(lambda z: cosine_loss(p, z))(jnp.asarray(p + 1.0))
  np.testing.assert_array_equal(g, 0.0)


def test_ema_momentum_and_update():
  total = 1000
  assert ema_momentum(0, total, 0.996) == np.float32(0.996)  # exactly, in float32
  assert float(ema_momentum(total, total, 0.996)) == 1.0
  # The last update (step total - 1) is within (1 - base) * (pi / total)^2 / 4 of 1.
  last = float(ema_momentum(total - 1, total, 0.996))
  assert 1.0 - 0.004 * (np.pi / total) ** 2 / 4 - 1e-7 <= last <= 1.0
  np.testing.assert_allclose(
    ema_momentum(total // 2, total, 0.996), 1 - 0.004 / 2, rtol=1e-6
  )  # halfway: cos = 0
  t = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((2, 2))}}
  o = jax.tree.map(lambda x: x * 7.0 + 1.0, t)
  jax.tree.map(np.testing.assert_array_equal, ema_update(t, o, 1.0), t)  # identity
  jax.tree.map(np.testing.assert_array_equal, ema_update(t, o, 0.0), o)
  jax.tree.map(
    lambda r, a, b: np.testing.assert_allclose(r, 0.9 * a + 0.1 * b, rtol=1e-6),
    ema_update(t, o, 0.9),
    t,
    o,
  )


def _mining_case(q=16, p=16, d=8, seed=0):
  """Queries are scaled, slightly perturbed copies of known candidates: the answer is ``want``."""
  rng = np.random.default_rng(seed)
  cands = rng.normal(size=(p, d)).astype(np.float32)
  want = rng.integers(0, p, size=q).astype(np.int32)
  scale = rng.uniform(0.5, 3.0, size=(q, 1)).astype(np.float32)
  queries = cands[want] * scale + 1e-3 * rng.normal(size=(q, d)).astype(np.float32)
  return queries, cands, want


def test_mine_nearest_returns_the_true_nearest_neighbour():
  queries, cands, want = _mining_case()
  got = np.asarray(mine_nearest(queries, cands, 1, jax.random.key(0)))
  np.testing.assert_array_equal(got, want)
  # Brute force over cosine distances agrees.
  qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  cn = cands / np.linalg.norm(cands, axis=1, keepdims=True)
  np.testing.assert_array_equal(got, np.argmin(2 - 2 * qn @ cn.T, axis=1))
  # k = 3: always one of the 3 nearest; an invalid candidate is never picked.
  top3 = np.argsort(2 - 2 * qn @ cn.T, axis=1)[:, :3]
  got3 = np.asarray(mine_nearest(queries, cands, 3, jax.random.key(1)))
  assert all(g in row for g, row in zip(got3, top3, strict=True))
  valid = np.ones(len(cands), bool)
  valid[want[0]] = False
  assert int(mine_nearest(queries, cands, 1, jax.random.key(0), jnp.asarray(valid))[0]) != want[0]


@pytest.mark.parametrize("k", [1, 3])
def test_mine_nearest_sharded_equals_single_device(k):
  assert jax.device_count() == 8, "conftest should provide 8 fake CPU devices"
  queries, cands, _ = _mining_case(q=16, p=24, seed=1)
  mine = jax.jit(mine_nearest, static_argnums=2)
  single = np.asarray(mine(queries, cands, k, jax.random.key(5)))
  mesh = sharding.make_mesh(8)
  shard = NamedSharding(mesh, P("data"))
  got = mine(jax.device_put(queries, shard), jax.device_put(cands, shard), k, jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(got), single)


def test_myow_weight_schedule_and_pool_split():
  w = lambda s, **kw: float(  # noqa: E731
    myow_weight(s, steps_per_epoch=10, max_weight=0.1, rampup_epochs=2, **kw)
  )
  assert w(0) == 0.0 and w(10) == pytest.approx(0.05) and w(20) == pytest.approx(0.1)
  assert w(500) == pytest.approx(0.1)
  assert w(10, warmup_epochs=1) == 0.0 and w(20, warmup_epochs=1) == pytest.approx(0.05)
  # steps_per_epoch 0 (unknown): one step per epoch.
  assert float(myow_weight(1, steps_per_epoch=0, max_weight=0.1, rampup_epochs=2)) == (
    pytest.approx(0.05)
  )
  assert float(myow_weight(0, steps_per_epoch=5, max_weight=0.1, rampup_epochs=0)) == (
    pytest.approx(0.1)
  )
  batch = {"image": np.arange(10), "label": np.arange(10) + 100}
  q, pool = split_pool(batch, ml_collections.ConfigDict({"pool_size": 0}))
  np.testing.assert_array_equal(q["image"], np.arange(5))
  np.testing.assert_array_equal(pool["label"], np.arange(5, 10) + 100)
  q, pool = split_pool(batch, ml_collections.ConfigDict({"pool_size": 3}))
  assert len(q["image"]) == 7 and len(pool["image"]) == 3
  with pytest.raises(ValueError, match="pool_size"):
    split_pool(batch, ml_collections.ConfigDict({"pool_size": 10}))


def test_lars_leaves_1d_params_undecayed_and_unadapted():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  grads = {"w": jnp.zeros((2, 2)), "b": jnp.full((2,), 0.5)}
  cfg = ml_collections.ConfigDict(
    {"name": "lars", "learning_rate": 1.0, "momentum": 0.0, "weight_decay": 0.1}
  )
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch=1, total_steps=1, batch_size=1)
  up, _ = tx.update(grads, tx.init(params), params)
  # 1-D: the raw gradient times -lr (no decay, no trust ratio).
  np.testing.assert_allclose(up["b"], -0.5, rtol=1e-6)
  # Kernel: u = wd * w, scaled by eta * |w| / |u| = 0.001 * 2 / 0.2, times -lr.
  np.testing.assert_allclose(up["w"], -0.1 * 0.001 * 2.0 / 0.2, rtol=1e-5)
  with pytest.raises(ValueError, match="coupled"):
    optim.make_optimizer(
      ml_collections.ConfigDict({**cfg.to_dict(), "weight_decay_mode": "decoupled"}),
      steps_per_epoch=1,
      total_steps=1,
      batch_size=1,
    )


# ---------------------------------------------------------------------------
# One real train step per objective.
HEAD = {"hidden": 32, "out": 16}


def _objective_config(name):
  c = {
    "views": {"crop_fraction": 0.5},
    "ema_base": 0.996,
    "projector": HEAD,
    "predictor": HEAD,
    "num_classes": 4,
  }
  if name != "byol":
    # Ramp 0: w = max already at step 0, so the mined term (and projector_m) gets gradient.
    c.update(pool_size=0, knn_k=1, myow_max_weight=0.1, myow_rampup_epochs=0.0)
    c.update(byol_warmup_epochs=0.0, projector_m=HEAD, predictor_m=HEAD)
  return ml_collections.ConfigDict(c)


def leaves(*trees):
  """Matching leaves of trees of one structure."""
  return zip(*map(jax.tree.leaves, trees), strict=True)


def _batch(b=16, size=16, seed=0):
  rng = np.random.default_rng(seed)
  label = np.arange(b, dtype=np.int32) % 4
  image = rng.normal(size=(b, size, size, 1)).astype(np.float32) + label[:, None, None, None]
  return {"image": image, "label": label, "valid": np.ones(b, bool)}


@pytest.mark.parametrize("name", ["byol", "myow", "myow_merged"])
def test_one_train_step(name):
  mesh = sharding.make_mesh(8)
  model = resnet.ResNetXray(num_classes=0, width_multiplier=1 / 16, stage_sizes=(1, 1))
  objective, cfg = OBJECTIVES[name], _objective_config(name)
  total = 10
  tx, _ = optim.make_optimizer(
    ml_collections.ConfigDict(
      {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    ),
    steps_per_epoch=1,
    total_steps=total,
    batch_size=16,
  )
  example = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
  state = jax.jit(
    lambda: create_train_state(model, objective, tx, example, seed=0, objective_config=cfg),
    out_shardings=sharding.replicated_sharding(mesh),
  )()
  init = jax.device_get(state)
  step = step_lib.jit_train_step(
    mesh, model=model, objective=objective, optimizer=tx, config=cfg, total_steps=total
  )
  state, metrics = step(state, sharding.shard_batch(_batch(), mesh))  # the old state is donated
  new, metrics = jax.device_get(state), jax.device_get(metrics)

  assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/byol_loss"])
  assert 0.0 <= metrics["probe/acc"] <= 1.0 and np.isfinite(metrics["probe/loss"])
  heads = ["projector", "predictor", "probe"] + (["projector_m", "predictor_m"] * (name == "myow"))
  assert set(new.params) == {"encoder", *heads}
  if name != "byol":
    assert metrics["train/myow_weight"] == pytest.approx(0.1)
    assert np.isfinite(metrics["train/myow_loss"])
  # Every online sub-tree moved (the mined term reaches MYOW's second heads).
  for k in new.params:
    moved = [not np.array_equal(a, b) for a, b in leaves(init.params[k], new.params[k])]
    assert all(moved), k

  # Target: it started as a copy of the online encoder + projector(s); after the step it is
  # m * old + (1 - m) * new online with m = ema_momentum(0, total) = 0.996.
  t0, t1 = init.aux["target"], new.aux["target"]
  target_keys = {"encoder", "projector"} | ({"projector_m"} if name == "myow" else set())
  assert set(t1["params"]) == target_keys
  m = float(ema_momentum(0, total, 0.996))
  for k in target_keys:
    jax.tree.map(np.testing.assert_array_equal, t0["params"][k], init.params[k])
    jax.tree.map(
      lambda t, old, on: np.testing.assert_allclose(
        t, m * old + (1 - m) * on, rtol=1e-6, atol=1e-7
      ),
      t1["params"][k],
      t0["params"][k],
      new.params[k],
    )
  # BN buffers: carried, not averaged. The target's moved through its own train-mode passes;
  # for BYOL's first step they equal the online encoder's (same weights, same two views).
  for a, b in leaves(t0["model_state"], t1["model_state"]):
    assert not np.array_equal(a, b)
  if name == "byol":
    jax.tree.map(np.testing.assert_array_equal, t1["model_state"], new.model_state)
  for a, b in leaves(init.aux["heads"], new.aux["heads"]):
    assert not np.array_equal(a, b)

  # predict: encoder features and the probe's logits, in eval mode.
  out = step_lib.jit_predict(model=model, objective=objective, config=cfg)(
    state, {"image": _batch(b=8, size=8)["image"]}
  )
  assert out["features"].shape == (8, 8) and out["logits"].shape == (8, 4)
