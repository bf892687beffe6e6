"""The train step's speed options: ``compute_dtype`` (bf16 compute, float32 master weights)
and ``conv_dw_groups`` (weight gradients over batch slices). The default path is unchanged."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_steps  # tests/tiny_steps.py

from mtneuro_jax import configlib
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.models.unet import UNet
from mtneuro_jax.train import step as step_lib


def _setup(**step_kw):
  return tiny_steps.resnet_step(**step_kw)


def _leaves_equal(a, b) -> bool:
  return all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


@pytest.fixture(scope="module")
def fp32_result():
  state, step, batch = _setup()
  return jax.device_get(step(state, batch))


def test_default_path_is_float32_and_unchanged(fp32_result):
  model = UNet(num_classes=3, dims=2)
  assert step_lib.with_compute_dtype(model, "float32") is model
  assert step_lib.with_compute_dtype(model) is model
  state, step, batch = _setup(compute_dtype="float32", conv_dw_groups=1)
  new, metrics = jax.device_get(step(state, batch))
  assert _leaves_equal(new, fp32_result[0])
  assert _leaves_equal(metrics, fp32_result[1])


def test_bf16_step_keeps_float32_state_and_close_loss(fp32_result):
  state, step, batch = _setup(compute_dtype="bfloat16")
  new, metrics = jax.device_get(step(state, batch))
  for leaf in jax.tree.leaves((new.params, new.opt_state, new.model_state)):
    if np.issubdtype(leaf.dtype, np.floating):
      assert leaf.dtype == np.float32
  loss32, loss16 = float(fp32_result[1]["train/loss"]), float(metrics["train/loss"])
  assert np.isfinite(loss16) and abs(loss16 - loss32) <= 0.02 * abs(loss32) + 1e-3
  assert np.isfinite(float(metrics["train/grad_norm"]))
  # bf16 compute really happened: the update differs from float32's, but only a little.
  p32, p16 = jax.tree.leaves(fp32_result[0].params), jax.tree.leaves(new.params)
  assert not all(np.array_equal(a, b) for a, b in zip(p32, p16, strict=True))
  for a, b in zip(p32, p16, strict=True):
    np.testing.assert_allclose(a, b, atol=5e-3)


def test_mixed_precision_model_casts_inputs_and_outputs():
  model = UNet(num_classes=3, dims=2, start_filters=4, n_blocks=2)
  x = jnp.ones((1, 8, 8, 1), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  mp = step_lib.with_compute_dtype(model, "bfloat16")
  assert mp.num_classes == 3  # attributes are the wrapped model's

  @jax.jit
  def run(variables, x):
    out, new = mp.apply(variables, x, train=True, mutable=["batch_stats"])
    return out, new, mp.apply(variables, x, train=False), model.apply(variables, x, train=False)

  out, new, bf16_eval, ref = run(variables, x)
  assert out["logits"].dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(new))
  np.testing.assert_allclose(bf16_eval["logits"], ref["logits"], atol=0.1)


def test_conv_dw_groups_same_gradients(fp32_result):
  state, step, batch = _setup(conv_dw_groups=2)
  new, metrics = jax.device_get(step(state, batch))
  np.testing.assert_allclose(metrics["train/loss"], fp32_result[1]["train/loss"], rtol=1e-6)
  np.testing.assert_allclose(
    metrics["train/grad_norm"], fp32_result[1]["train/grad_norm"], rtol=1e-4
  )
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(fp32_result[0].params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_split_conv_3d_and_fallback():
  conv = step_lib.split_weight_grad_conv(2)
  x = jax.random.normal(jax.random.key(0), (4, 3, 6, 6, 2))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 5))
  dn = ("NDHWC", "DHWIO", "NDHWC")

  def loss(f, x, w):
    return jnp.sum(f(x, w, (1, 1, 1), "SAME", dimension_numbers=dn) ** 2)

  ref = jax.grad(lambda x, w: loss(jax.lax.conv_general_dilated, x, w), (0, 1))(x, w)
  got = jax.grad(lambda x, w: loss(conv, x, w), (0, 1))(x, w)
  for a, b in zip(ref, got, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Odd batch: falls back to lax (same result).
  np.testing.assert_allclose(
    conv(x[:3], w, (1, 1, 1), "SAME", dimension_numbers=dn),
    jax.lax.conv_general_dilated(x[:3], w, (1, 1, 1), "SAME", dimension_numbers=dn),
  )


def test_bad_options_are_config_errors():
  with pytest.raises(ConfigError, match="compute_dtype"):
    step_lib.check_compute_dtype("float16")
  with pytest.raises(ConfigError, match="conv_dw_groups"):
    step_lib.check_conv_dw_groups(0)
  c = configlib.loop_defaults(ml_collections.ConfigDict(), num_epochs=1)
  assert c.compute_dtype == "float32" and c.conv_dw_groups == 1
