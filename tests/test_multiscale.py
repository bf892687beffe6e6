"""ICIP multi-scale models, objectives and evaluator (no training loop: fast)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import f1_score

from mtneuro_jax import sharding
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.eval.multiscale import evaluate_multiscale, macro_metrics, parse_scores
from mtneuro_jax.models import MODELS
from mtneuro_jax.models.multiscale import max_pool_with_argmax, max_unpool
from mtneuro_jax.objectives import OBJECTIVES
from mtneuro_jax.objectives.multiscale import reconstruction_mse
from mtneuro_jax.train.optim import param_labels

# 16x16 inputs and 2 blocks (an 8x8 latent, the P-block's minimum) keep eager tracing fast.
TINY = {"num_classes": 4, "width_multiplier": 1 / 16, "n_blocks": 2}
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 1)), jnp.float32)


def _init(name, **kw):
  model = MODELS[name](**{**TINY, **kw})
  return model, model.init(jax.random.key(0), X, train=False)


@pytest.mark.parametrize(
  "name, keys",
  [
    (
      "double_unet",
      {"logits": (2, 16, 16, 4), "region_logits": (2, 4), "reconstruction": (2, 16, 16, 1)},
    ),
    ("res_unet", {"logits": (2, 16, 16, 4)}),
    ("mt_unet", {"logits": (2, 16, 16, 4), "region_logits": (2, 4)}),
    ("segnet", {"logits": (2, 16, 16, 4)}),
    ("unet_encoder", {"logits": (2, 4), "region_logits": (2, 4)}),
  ],
)
def test_output_contract(name, keys):
  model, variables = _init(name)
  out = model.apply(variables, X, train=False)
  assert {k: tuple(v.shape) for k, v in out.items()} == keys
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert "batch_stats" in variables


def test_double_unet_params_split_and_freeze_regex():
  _, variables = _init("double_unet")
  params = variables["params"]
  assert set(params) == {"class_branch", "encoder", "decoder", "head", "recon_head"}
  assert set(params["class_branch"]) == {"encoder", "head"}
  assert set(variables["batch_stats"]) == {"class_branch", "encoder", "decoder"}
  labels = param_labels(params, ["^class_branch/"])
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  for path, label in flat:
    top = path[0].key
    assert (label == "frozen") == (top == "class_branch"), (path, label)


def test_frozen_branch_runs_in_inference_mode():
  """freeze_class_branch: train=True leaves the branch's BatchNorm stats alone and its outputs
  equal the eval-mode ones; the U-Net branch's stats still move."""
  model, variables = _init("double_unet", freeze_class_branch=True)
  out, new = model.apply(variables, X, train=True, mutable=["batch_stats"])
  for a, b in zip(
    jax.tree.leaves(variables["batch_stats"]["class_branch"]),
    jax.tree.leaves(new["batch_stats"]["class_branch"]),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves(variables["batch_stats"]["encoder"]),
      jax.tree.leaves(new["batch_stats"]["encoder"]),
      strict=True,
    )
  )
  eval_out = model.apply(variables, X, train=False)
  np.testing.assert_allclose(out["region_logits"], eval_out["region_logits"], rtol=1e-6)
  # No gradient reaches the branch.
  grads = jax.grad(
    lambda p: model.apply({**variables, "params": p}, X, train=True, mutable=["batch_stats"])[0][
      "logits"
    ].sum()
  )(variables["params"])
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["class_branch"]))


def test_bad_input_sizes():
  with pytest.raises(ConfigError, match="P-block"):
    _init("double_unet", n_blocks=3)  # 16 / 4 = 4x4 latent < 8x8
  with pytest.raises(ConfigError, match="not divisible"):
    MODELS["segnet"](**TINY).init(jax.random.key(0), X[:, :14, :14], train=False)
  with pytest.raises(ConfigError, match="dims"):
    MODELS["double_unet"](**{**TINY, "dims": 3}).init(jax.random.key(0), X, train=False)


def test_max_unpool_puts_maxima_back():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 6, 3)), jnp.float32)
  pooled, where = max_pool_with_argmax(x)
  np.testing.assert_array_equal(
    pooled, jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  )
  up = np.asarray(max_unpool(pooled, where))
  assert (up != 0).sum() == pooled.size  # one value per window
  np.testing.assert_array_equal(up[up != 0], np.asarray(x)[up != 0])


# ---------------------------------------------------------------------------
# Objectives.
def _batch(num_classes=4):
  rng = np.random.default_rng(2)
  return {
    "image": X,
    "mask": jnp.asarray(rng.integers(0, num_classes, (2, 16, 16)), jnp.int32),
    "region": jnp.asarray([1, 3], jnp.int32),
    "valid": jnp.asarray([True, True]),
  }


def _loss(objective, model, variables, cfg, batch=None):
  obj = OBJECTIVES[objective]
  state = {"batch_stats": variables["batch_stats"]}
  value, (metrics, _, _) = obj.loss(
    variables["params"], state, {}, batch or _batch(), jax.random.key(3), model=model, config=cfg
  )
  return float(value), metrics


NO_AUG = {"flip": False, "rot90": False, "flip_z": False}


def test_region_recon_values():
  model, variables = _init("double_unet")
  out, _ = model.apply(variables, X, train=True, mutable=["batch_stats"])
  ce = float(
    optax.softmax_cross_entropy_with_integer_labels(out["region_logits"], _batch()["region"]).mean()
  )
  mse = float(jnp.mean((out["reconstruction"] - X) ** 2))
  v0, m0 = _loss("region_recon", model, variables, {"recon_weight": 0.0, "augment": NO_AUG})
  assert v0 == pytest.approx(ce, rel=1e-5) and "train/recon_mse" not in m0
  v2, m2 = _loss("region_recon", model, variables, {"recon_weight": 2.0, "augment": NO_AUG})
  assert v2 == pytest.approx(ce + 2.0 * mse, rel=1e-5)
  assert float(m2["train/recon_mse"]) == pytest.approx(mse, rel=1e-5)


def test_reconstruction_mse_perfect_and_padding():
  valid = jnp.asarray([True, False])
  assert float(reconstruction_mse(X, X, valid)) == 0.0
  wrong_on_padding = X.at[1].add(5.0)
  assert float(reconstruction_mse(X, wrong_on_padding, valid)) == 0.0
  assert float(reconstruction_mse(X, X + 1.0, valid)) == pytest.approx(1.0)


def test_multitask_and_pixel_ce_values():
  model, variables = _init("mt_unet")
  seg = OBJECTIVES["segmentation"]
  state = {"batch_stats": variables["batch_stats"]}
  cfg = {"loss": "ce", "augment": NO_AUG}
  ref, _ = seg.loss(
    variables["params"], state, {}, _batch(), jax.random.key(3), model=model, config=cfg
  )
  v_pix, _ = _loss("pixel_ce", model, variables, {"augment": NO_AUG})
  v_mt0, _ = _loss("multitask", model, variables, {"region_weight": 0.0, "augment": NO_AUG})
  assert v_pix == pytest.approx(float(ref), rel=1e-6) and v_mt0 == pytest.approx(v_pix, rel=1e-6)
  out, _ = model.apply(variables, X, train=True, mutable=["batch_stats"])
  ce = float(
    optax.softmax_cross_entropy_with_integer_labels(out["region_logits"], _batch()["region"]).mean()
  )
  v_mt, m = _loss("multitask", model, variables, {"region_weight": 0.5, "augment": NO_AUG})
  assert v_mt == pytest.approx(v_pix + 0.5 * ce, rel=1e-5)
  assert float(m["train/region_ce"]) == pytest.approx(ce, rel=1e-5)
  # predict passes the region logits through (segmentation.predict would drop them).
  pred = OBJECTIVES["pixel_ce"].predict(
    variables["params"], state, {}, _batch(), model=model, config=None
  )
  assert set(pred) == {"logits", "region_logits"}


def test_region_objective_needs_region_branch():
  model, variables = _init("res_unet")
  with pytest.raises(ConfigError, match="region_logits"):
    _loss("multitask", model, variables, {"region_weight": 1.0, "augment": NO_AUG})


# ---------------------------------------------------------------------------
# Evaluator.
def test_macro_metrics_match_sklearn():
  rng = np.random.default_rng(4)
  truth, pred = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
  m = macro_metrics(truth, pred)
  ref = f1_score(truth, pred, labels=range(4), average=None)
  np.testing.assert_allclose([m[f"f1/{r}"] for r in ("CTX", "STR", "VP", "ZI")], ref)
  assert m["f1/mean"] == pytest.approx(f1_score(truth, pred, average="macro"))
  assert m["accuracy"] == pytest.approx((truth == pred).mean()) and m["n"] == 300
  # A region in neither truth nor prediction has no score and stays out of the mean.
  m3 = macro_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]))
  assert np.isnan(m3["f1/ZI"]) and m3["f1/mean"] == pytest.approx(
    f1_score([0, 1, 2, 2], [0, 1, 2, 1], average="macro")
  )


def test_evaluator_sharded_on_8_devices_matches_sklearn():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(5)
  batches, truth_px, pred_px, truth_r, pred_r = [], [], [], [], []
  for b in range(3):
    n_valid = 16 if b < 2 else 11  # the last batch is padded
    logits = rng.normal(size=(16, 8, 8, 4)).astype(np.float32)
    region_logits = rng.normal(size=(16, 4)).astype(np.float32)
    mask = rng.integers(0, 4, (16, 8, 8)).astype(np.int32)
    region = rng.integers(0, 4, 16).astype(np.int32)
    valid = np.arange(16) < n_valid
    batches.append(
      sharding.shard_batch(
        {
          "image": np.zeros((16, 8, 8, 1), np.float32),
          "mask": mask,
          "region": region,
          "valid": valid,
          "logits": logits,
          "region_logits": region_logits,
        },
        mesh,
      )
    )
    truth_px.append(mask[valid].ravel())
    pred_px.append(logits.argmax(-1)[valid].ravel())
    truth_r.append(region[valid])
    pred_r.append(region_logits.argmax(-1)[valid])

  def predict_fn(batch):
    return {"logits": batch["logits"], "region_logits": batch["region_logits"]}

  names = ["background", "vessel", "cell", "axon"]
  out = evaluate_multiscale(
    predict_fn, batches, scores=("micro", "macro"), num_classes=4, class_names=names
  )
  t, p = np.concatenate(truth_px), np.concatenate(pred_px)
  np.testing.assert_allclose(
    [out[f"micro/f1_dataset/{n}"] for n in names], f1_score(t, p, labels=range(4), average=None)
  )
  tr, pr = np.concatenate(truth_r), np.concatenate(pred_r)
  np.testing.assert_allclose(
    [out[f"macro/f1/{r}"] for r in ("CTX", "STR", "VP", "ZI")],
    f1_score(tr, pr, labels=range(4), average=None),
  )
  assert out["macro/n"] == 43 and out["micro/num_images"] == 43
  with pytest.raises(ConfigError, match="region_logits"):
    evaluate_multiscale(
      lambda b: {"logits": b["logits"]},
      batches,
      scores=("macro",),
      num_classes=4,
      class_names=names,
    )


def test_parse_scores():
  assert parse_scores("micro,macro") == ("micro", "macro")
  with pytest.raises(ConfigError, match="scores"):
    parse_scores("pixel")
