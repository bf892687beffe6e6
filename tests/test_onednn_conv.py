"""The optional oneDNN convolution (``conv_backend='onednn'``, mtneuro_jax/kernels/onednn.py):
parity with XLA's conv (forward, input and weight gradients), the XLA fallback, a sharded
train step, and the config error when the kernel is unavailable."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_steps  # tests/tiny_steps.py
from jax.sharding import NamedSharding, PartitionSpec

from mtneuro_jax import configlib, sharding
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.kernels import onednn
from mtneuro_jax.train import step as step_lib

needs_onednn = pytest.mark.skipif(
  not onednn.available(),
  reason=f"oneDNN conv kernel unavailable ({onednn.why_unavailable()}); "
  "apt-get install libdnnl-dev g++ to run these",
)


DN2 = ("NHWC", "HWIO", "NHWC")
DN3 = ("NDHWC", "DHWIO", "NDHWC")

# (x shape, w shape, strides, padding, dimension numbers)
CASES = [
  ((2, 9, 9, 3), (3, 3, 3, 5), (1, 1), "SAME", DN2),
  ((2, 10, 11, 4), (3, 3, 4, 6), (2, 2), ((1, 0), (2, 1)), DN2),  # stride 2, odd padding
  ((3, 16, 16, 1), (7, 7, 1, 8), (2, 2), ((3, 3), (3, 3)), DN2),  # the ResNet stem
  ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), "VALID", DN2),  # 1x1 stride-2 shortcut
  # The width-1/8 ResNet's 8->16 shortcut: oneDNN 2.6's own strided 1x1 weight gradient
  # corrupted the heap on it (oneDNN#6035); odd sides and 3D take the same subsampling path.
  ((8, 64, 64, 8), (1, 1, 8, 16), (2, 2), "VALID", DN2),
  ((2, 9, 7, 5), (1, 1, 5, 16), (2, 3), "VALID", DN2),
  ((2, 6, 9, 9, 4), (1, 1, 1, 4, 8), (1, 2, 2), "VALID", DN3),
  ((2, 4, 7, 7, 3), (3, 3, 3, 3, 4), (1, 2, 2), "SAME", DN3),
]


def _vjp_all(conv, x, w, strides, padding, dn, dy_seed=1):
  y, vjp = jax.vjp(lambda a, b: conv(a, b, strides, padding, dimension_numbers=dn), x, w)
  dy = jax.random.normal(jax.random.key(dy_seed), y.shape)
  return (y, *vjp(dy))


def _assert_close(ref, got, rtol=1e-4):
  for a, b in zip(ref, got, strict=True):
    assert a.shape == b.shape
    scale = float(jnp.max(jnp.abs(a)))
    np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * scale)


@needs_onednn
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-{c[3]}")
def test_parity_with_xla(case):
  xs, ws, strides, padding, dn = case
  x = jax.random.normal(jax.random.key(0), xs)
  w = jax.random.normal(jax.random.key(2), ws)
  conv = onednn.make_conv_general_dilated()
  assert onednn.supported(x, w, strides, padding, dimension_numbers=dn) is not None
  run = jax.jit(lambda f, x, w: _vjp_all(f, x, w, strides, padding, dn), static_argnums=0)
  ref = run(jax.lax.conv_general_dilated, x, w)
  got = run(conv, x, w)
  _assert_close(ref, got)
  # The oneDNN path really ran: its custom calls are in the lowered step.
  text = jax.jit(lambda x, w: _vjp_all(conv, x, w, strides, padding, dn)).lower(x, w).as_text()
  for name, _ in onednn.TARGETS.values():
    assert name in text


@needs_onednn
def test_strided_1x1_conv_reaches_onednn_with_unit_stride(monkeypatch):
  """Strided 1x1 convs are subsampled in JAX first: oneDNN's own strided 1x1 path (rtus)
  writes past its workspace for input channels below its channel block (oneDNN#6035)."""
  seen = []
  call = onednn._call
  monkeypatch.setattr(
    onednn, "_call", lambda *a: seen.append((a[0], a[-1]["strides"].tolist())) or call(*a)
  )
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (1, 1, 4, 8))
  _vjp_all(onednn.make_conv_general_dilated(), x, w, (2, 2), "VALID", DN2)
  assert sorted(seen) == [("bwd_data", [1, 1]), ("bwd_weights", [1, 1]), ("fwd", [1, 1])]


@needs_onednn
def test_unsupported_cases_fall_back_to_xla():
  conv = onednn.make_conv_general_dilated()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 6))
  kw = dict(dimension_numbers=DN2, feature_group_count=2)  # grouped conv
  assert onednn.supported(x, w, (1, 1), "SAME", **kw) is None
  np.testing.assert_allclose(
    conv(x, w, (1, 1), "SAME", **kw), jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", **kw)
  )
  w4 = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
  w_oihw = jnp.transpose(w4, (3, 2, 0, 1))
  x_nchw = jnp.transpose(x, (0, 3, 1, 2))
  for xx, ww, args in (  # dilation; NCHW / OIHW layouts
    (x, w4, dict(rhs_dilation=(2, 2), dimension_numbers=DN2)),
    (x_nchw, w_oihw, dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))),
  ):
    text = jax.jit(lambda x, w, args=args: conv(x, w, (1, 1), "SAME", **args)).lower(xx, ww)
    assert "mtneuro_onednn" not in text.as_text()
  xb, wb = x.astype(jnp.bfloat16), w4.astype(jnp.bfloat16)
  assert onednn.supported(xb, wb, (1, 1), "SAME", dimension_numbers=DN2) is None


def _resnet_step(conv_backend, mesh, batch_size=8):
  state, step, batch = tiny_steps.resnet_step(mesh, batch_size, conv_backend=conv_backend)
  return jax.device_get(step(state, batch))


@needs_onednn
def test_resnet_train_step_matches_xla_on_8_devices():
  # The batch is split over 8 (fake) devices: XLA gathers the custom calls' operands
  # (no sharding rule), which must not change the result.
  mesh = sharding.make_mesh(8)
  assert len(mesh.devices.flat) == 8
  ref_state, ref_metrics = _resnet_step("xla", mesh)
  state, metrics = _resnet_step("onednn", mesh)
  np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["train/grad_norm"], ref_metrics["train/grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(
    jax.tree.leaves(state.model_state), jax.tree.leaves(ref_state.model_state), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@needs_onednn
def test_sharded_conv_matches_xla():
  mesh = sharding.make_mesh(8)
  spec = NamedSharding(mesh, PartitionSpec("data"))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (8, 12, 12, 3)), spec)
  w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))
  conv = onednn.make_conv_general_dilated()
  run = jax.jit(lambda f, x, w: _vjp_all(f, x, w, (2, 2), "SAME", DN2), static_argnums=0)
  _assert_close(run(jax.lax.conv_general_dilated, x, w), run(conv, x, w))


def test_onednn_backend_unavailable_is_one_config_error(monkeypatch):
  monkeypatch.setattr(onednn, "available", lambda: False)
  monkeypatch.setattr(onednn, "why_unavailable", lambda: "libdnnl.so not found")
  with pytest.raises(ConfigError, match="apt-get install libdnnl-dev g\\+\\+") as err:
    step_lib.check_conv_backend("onednn")
  assert "libdnnl.so not found" in str(err.value) and "\n" not in str(err.value)
  with pytest.raises(ConfigError, match="conv_backend"):
    step_lib.check_conv_backend("cudnn")
  assert step_lib.check_conv_backend("xla") == "xla"
  c = configlib.loop_defaults(ml_collections.ConfigDict(), num_epochs=1)
  assert c.conv_backend == "xla"
