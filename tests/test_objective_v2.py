"""The seams for new methods, through the real loop on the tiny exported dataset:

* objective interface v2: an objective that owns a head ('probe'), carries aux updated from
  ``loss`` and an EMA whose momentum follows ``ctx.step / ctx.total_steps``; trains with an
  encoder-only model, checkpoints and resumes bitwise;
* ``optim.param_groups`` (own learning rate per group, global clipping) and ``freeze``;
* evaluator contract v2: an evaluator that fits on 'train' and scores 'test';
* ``init_from``: an encoder from another workdir; a shape mismatch fails with one line.
"""

from __future__ import annotations

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mtneuro_jax.eval.common import to_host
from mtneuro_jax.eval.registry import EVALUATORS
from mtneuro_jax.models import MODELS, resnet
from mtneuro_jax.objectives import OBJECTIVES
from mtneuro_jax.objectives.base import Objective, apply_model, weighted_mean
from mtneuro_jax.train import checkpoint, loop, optim

EMA_START = 0.9
OWN = ("probe",)


def _probe_init(rng, *, model, variables, example_image, config):
  feats = model.apply(variables, example_image, train=False)["features"]  # [1, D]
  probe = {"kernel": 0.01 * jax.random.normal(rng, (feats.shape[-1], 4)), "bias": jnp.zeros((4,))}
  aux = {
    "ema_probe": probe,
    "loss_avg": jnp.zeros(()),
    "n_seen": jnp.zeros((), jnp.int32),
    "momentum": jnp.zeros(()),
  }
  return {"probe": probe}, aux


def _probe_logits(params, features):
  return features @ params["kernel"] + params["bias"]


def _probe_loss(params, model_state, aux, batch, rng, *, ctx, model, config):
  out, new_state = apply_model(
    model, params, model_state, batch["image"], train=True, rng=rng, own=OWN
  )
  logits = _probe_logits(params["probe"], out["features"])
  value = weighted_mean(
    optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), batch["valid"]
  )
  new_aux = {
    **aux,
    "loss_avg": 0.5 * aux["loss_avg"] + 0.5 * value,
    "n_seen": aux["n_seen"] + jnp.sum(batch["valid"]).astype(jnp.int32),
  }
  return value, ({"train/loss": value}, new_state, new_aux)


def _probe_update(aux, params, *, ctx, config):
  m = 1.0 - (1.0 - EMA_START) * (1.0 - ctx.progress)  # EMA_START -> 1 along the run
  ema = jax.tree.map(lambda e, p: m * e + (1 - m) * p, aux["ema_probe"], params["probe"])
  return {**aux, "ema_probe": ema, "momentum": m}


def _probe_predict(params, model_state, aux, batch, *, model, config):
  out, _ = apply_model(model, params, model_state, batch["image"], train=False, own=OWN)
  return {"features": out["features"], "logits": _probe_logits(aux["ema_probe"], out["features"])}


PROBE_EMA = Objective(
  "probe_ema", init=_probe_init, loss=_probe_loss, update=_probe_update, predict=_probe_predict
)


def nearest_centroid(ctx, *, eval_cfg, workdir, step):
  """Fits class centroids of the features on 'train', scores 'test' (contract v2)."""
  info = ctx.dataset_info()
  key = info["target_key"]

  def features(split):
    feats, labels = [], []
    for batch in ctx.open_batches(split):
      valid = to_host(batch["valid"]).astype(bool)
      feats.append(to_host(ctx.predict_fn(batch)["features"])[valid])
      labels.append(to_host(batch[key])[valid])
    return np.concatenate(feats), np.concatenate(labels)

  xtr, ytr = features("train")
  xte, yte = features("test")
  centroids = np.stack(
    [
      xtr[ytr == c].mean(0) if np.any(ytr == c) else np.full(xtr.shape[1], np.inf)
      for c in range(info["num_classes"])
    ]
  )
  pred = np.argmin(((xte[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  return {
    "accuracy": float((pred == yte).mean()),
    "n_train": int(len(ytr)),
    "n_test": int(len(yte)),
    "classes": len(info["class_names"]),
  }


@pytest.fixture
def registered(monkeypatch):
  monkeypatch.setitem(OBJECTIVES, "probe_ema", PROBE_EMA)
  monkeypatch.setitem(EVALUATORS, "nearest_centroid", nearest_centroid)
  monkeypatch.setitem(
    MODELS, "small_xray", functools.partial(resnet.ResNetXray, stage_sizes=(1, 1))
  )


def _config(data_dir, cache_dir, *, total_steps=4, objective="probe_ema", width=1 / 16, **extra):
  from configs.task1_supervised import get_config

  c = get_config("tiny")
  c.unlock()
  c.data.data_dir = data_dir
  c.total_steps = total_steps
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 3
  c.compilation_cache_dir = cache_dir
  c.log_every_steps = 1
  c.model_name = "small_xray"
  c.model.width_multiplier = width
  c.objective_name = objective
  if objective == "probe_ema":
    c.model.num_classes = 0  # encoder only: the objective owns the head
    c.optim.param_groups = ml_collections.ConfigDict(
      {"probe": {"pattern": "^probe/", "learning_rate": 0.2, "weight_decay": 0.0}}
    )
    c.evals = ml_collections.ConfigDict({"centroid": {"kind": "nearest_centroid"}})
  for k, v in extra.items():
    c[k] = v
  c.lock()
  return c


def _state(workdir):
  return jax.tree.map(
    np.asarray, checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).read_state()
  )


def test_objective_with_own_head_aux_and_ema_resumes_bitwise(tmp_path, tiny_data_dir, registered):
  cache = str(tmp_path / "cache")
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  res = loop.train_and_evaluate(_config(tiny_data_dir, cache), full)
  s = _state(full)
  assert int(s["step"]) == 4 and "probe" in s["params"] and "head" not in s["params"]
  # aux updated from loss (batch 8 per step) and the EMA momentum of the last step (ctx.step = 3 of 4).
  assert int(s["aux"]["n_seen"]) == 4 * 8
  np.testing.assert_allclose(s["aux"]["momentum"], 1 - (1 - EMA_START) * (1 - 3 / 4), rtol=1e-6)
  assert not np.array_equal(s["aux"]["ema_probe"]["kernel"], s["params"]["probe"]["kernel"])
  # The evaluator fitted on train and scored test through the loop.
  from mtneuro_jax.data import pipeline

  info = pipeline.dataset_info(_config(tiny_data_dir, cache).data)
  assert res["centroid/n_train"] == info["num_examples"]["train"]
  assert res["centroid/n_test"] == info["num_examples"]["test"] and res["centroid/classes"] == 4
  assert 0.0 <= res["centroid/accuracy"] <= 1.0

  # Interrupted after the step-2 checkpoint, then resumed: bitwise the same run.
  loop.train_and_evaluate(_config(tiny_data_dir, cache), cut)
  shutil.rmtree(os.path.join(cut, "checkpoints", "4"))
  os.remove(os.path.join(cut, "results.json"))
  res2 = loop.train_and_evaluate(_config(tiny_data_dir, cache), cut)
  jax.tree.map(np.testing.assert_array_equal, _state(cut), s)
  assert res2 == res


def test_param_groups_own_learning_rate_and_global_clip():
  params = {
    "encoder": {"w": jnp.ones((2, 2))},
    "probe": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))},
  }
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 2.0), params)
  cfg = ml_collections.ConfigDict(
    {
      "name": "sgd",
      "learning_rate": 0.1,
      "momentum": 0.0,
      "weight_decay": 0.01,
      "param_groups": {"probe": {"pattern": "^probe/", "learning_rate": 1.0, "weight_decay": 0.0}},
    }
  )
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch=1, total_steps=1, batch_size=1)
  up, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(
    up["encoder"]["w"], -0.1 * (2.0 + 0.01 * 1.0)
  )  # coupled decay, base LR
  np.testing.assert_allclose(up["probe"]["kernel"], -1.0 * 2.0)  # own LR, no decay
  # Global clipping: one norm over every trained leaf (frozen ones excluded).
  cfg2 = ml_collections.ConfigDict(
    {
      "name": "sgd",
      "learning_rate": 1.0,
      "momentum": 0.0,
      "grad_clip_norm": 1.0,
      "freeze": ("^encoder/",),
      "param_groups": {"probe": {"pattern": "^probe/", "learning_rate": 2.0}},
    }
  )
  tx, _ = optim.make_optimizer(cfg2, steps_per_epoch=1, total_steps=1, batch_size=1)
  up, _ = tx.update(grads, tx.init(params), params)
  norm = np.sqrt(4.0 * 9)  # the probe's 9 gradient entries of 2.0
  np.testing.assert_array_equal(up["encoder"]["w"], 0.0)
  np.testing.assert_allclose(up["probe"]["bias"], -2.0 * 2.0 / norm, rtol=1e-6)
  with pytest.raises(ValueError, match="pattern"):
    optim.make_optimizer(
      ml_collections.ConfigDict({"param_groups": {"x": {"learning_rate": 1.0}}}),
      steps_per_epoch=1,
      total_steps=1,
      batch_size=1,
    )


def test_init_from_loads_the_encoder_and_refuses_a_mismatch(tmp_path, tiny_data_dir, registered):
  cache = str(tmp_path / "cache")
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  loop.train_and_evaluate(_config(tiny_data_dir, cache, objective="supervised", total_steps=2), src)
  pre = _state(src)
  init = ml_collections.ConfigDict(
    {"workdir": src, "step": 0, "subtree": "encoder", "model_state": True}
  )
  frozen = ml_collections.ConfigDict(_config(tiny_data_dir, cache).optim.to_dict())
  frozen.freeze = ("^encoder/",)
  loop.train_and_evaluate(
    _config(tiny_data_dir, cache, total_steps=2, init_from=init, optim=frozen), dst
  )
  post = _state(dst)
  # Frozen encoder: exactly the other run's weights; the objective's own probe trained from scratch.
  jax.tree.map(np.testing.assert_array_equal, post["params"]["encoder"], pre["params"]["encoder"])
  assert "head" in pre["params"] and "head" not in post["params"] and "probe" in post["params"]

  wide = str(tmp_path / "wide")
  with pytest.raises(checkpoint.InitFromError) as e:
    loop.train_and_evaluate(
      _config(tiny_data_dir, cache, total_steps=2, init_from=init, width=1 / 8), wide
    )
  msg = str(e.value)
  assert "\n" not in msg and "params/encoder/" in msg and "in this model" in msg
  assert not os.path.exists(os.path.join(wide, "checkpoints", "1"))
  missing = ml_collections.ConfigDict({**init.to_dict(), "workdir": str(tmp_path / "nowhere")})
  with pytest.raises(checkpoint.InitFromError, match="holds no checkpoints"):
    loop.train_and_evaluate(_config(tiny_data_dir, cache, total_steps=2, init_from=missing), wide)
  bad_sub = ml_collections.ConfigDict({**init.to_dict(), "subtree": "decoder"})
  with pytest.raises(checkpoint.InitFromError, match="no params/decoder"):
    loop.train_and_evaluate(_config(tiny_data_dir, cache, total_steps=2, init_from=bad_sub), wide)
