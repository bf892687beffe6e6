"""U-Net (2D/3D) and the shared seg blocks: parameter counts, shapes, options, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtneuro_jax.errors import ConfigError
from mtneuro_jax.models import MODELS
from mtneuro_jax.models import seg_blocks as sb
from mtneuro_jax.train.state import param_count


def _shapes(model, shape):
  """Variables' shapes via eval_shape (no compile, no compute)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


@pytest.mark.parametrize(
  "dims,num_classes,expected",
  [(2, 4, 1_971_620), (2, 3, 1_971_587), (3, 3, 5_646_275), (3, 4, 5_646_308)],
)
def test_reference_parameter_counts(dims, num_classes, expected):
  # 'params' only, as PyTorch's parameters(): BN scale+bias count, running stats don't.
  model = MODELS["unet"](num_classes=num_classes, dims=dims)
  shape = (1, 64, 64, 1) if dims == 2 else (1, 8, 64, 64, 1)
  variables = _shapes(model, shape)
  assert param_count(variables["params"]) == expected
  assert sorted(variables["params"]) == ["decoder", "encoder", "head"]
  assert sorted(variables["batch_stats"]) == ["decoder", "encoder"]


def test_width_multiplier_scales_start_filters():
  model = MODELS["unet"](num_classes=3, dims=2, width_multiplier=0.25)
  assert model.filters == (8, 16, 32, 64)
  p = _shapes(model, (1, 32, 32, 1))["params"]
  assert p["encoder"]["block0"]["conv1"]["kernel"].shape == (3, 3, 1, 8)
  assert p["head"]["kernel"].shape == (1, 1, 8, 3)


@pytest.mark.parametrize("dims,shape", [(2, (2, 32, 24, 1)), (3, (2, 8, 16, 24, 1))])
@pytest.mark.parametrize("train", [False, True])
def test_same_spatial_size(dims, shape, train):
  # 3D depth 8 with 3 pools reaches depth 1 at the bottom.
  model = MODELS["unet"](num_classes=4, dims=dims, width_multiplier=0.125)
  x = jnp.zeros(shape)
  v = _shapes(model, shape)
  out = jax.eval_shape(lambda v: model.apply(v, x, train=train, mutable=["batch_stats"])[0], v)
  assert out["logits"].shape == shape[:-1] + (4,)
  assert out["logits"].dtype == jnp.float32


def test_train_then_eval_runs_and_updates_running_stats():
  shape = (2, 16, 16, 1)
  # n_blocks=2 keeps the compile short; the running-stat plumbing is the same at any depth.
  model = MODELS["unet"](num_classes=3, dims=2, width_multiplier=0.125, n_blocks=2)
  x = jax.random.normal(jax.random.key(1), shape)
  # Random variables of the right shapes: a jitted init compiles one threefry kernel per
  # parameter (slow on a busy CPU); the initialisers are tested below.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda s: (0.1 * rng.standard_normal(s.shape) + 1).astype(np.float32), _shapes(model, shape)
  )

  @jax.jit
  def run(variables, x):
    out, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return out, new, model.apply({**variables, **new}, x, train=False)

  out, new, out_eval = run(variables, x)
  assert out["logits"].shape == out_eval["logits"].shape == (2, 16, 16, 3)
  assert np.all(np.isfinite(out_eval["logits"]))
  before = variables["batch_stats"]["encoder"]["block0"]["norm1"]["bn"]["mean"]
  after = new["batch_stats"]["encoder"]["block0"]["norm1"]["bn"]["mean"]
  assert not np.allclose(before, after)


@pytest.mark.parametrize(
  "kw",
  [
    {"normalization": "group4"},
    {"normalization": "instance", "activation": "elu"},
    {"activation": "leaky", "up_mode": "bilinear"},
    {"up_mode": "nearest", "n_blocks": 3},
  ],
)
def test_options_keep_the_size(kw):
  model = MODELS["unet"](num_classes=3, dims=2, width_multiplier=0.25, **kw)
  x = jnp.zeros((1, 16, 16, 1))
  v = _shapes(model, x.shape)
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), v)
  assert out["logits"].shape == (1, 16, 16, 3)
  if kw.get("normalization", "batch") != "batch":
    assert "batch_stats" not in v
  if kw.get("up_mode", "transposed") != "transposed":
    assert "up" not in v["params"]["decoder"]["block0"]


def test_valid_conv_mode_returns_the_smaller_centre():
  model = MODELS["unet"](
    num_classes=2, dims=2, width_multiplier=0.25, n_blocks=2, conv_mode="valid"
  )
  x = jnp.zeros((1, 20, 20, 1))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), _shapes(model, x.shape))
  # 20 -conv-> 18 -conv-> 16 -pool-> 8 -> 6 -> 4 -up-> 8 -> 6 -> 4.
  assert out["logits"].shape == (1, 4, 4, 2)


def test_bad_dims_and_sizes_raise_config_error():
  with pytest.raises(ConfigError, match="dims"):
    MODELS["unet"](num_classes=3, dims=1)
  model = MODELS["unet"](num_classes=3, dims=2, width_multiplier=0.25)
  with pytest.raises(ConfigError, match="divisible by 8"):
    _shapes(model, (1, 36, 32, 1))
  with pytest.raises(ConfigError, match="dims=2"):
    _shapes(model, (1, 8, 32, 32, 1))
  with pytest.raises(ConfigError, match="up_mode"):
    _shapes(MODELS["unet"](num_classes=3, up_mode="cubic"), (1, 8, 8, 1))
  with pytest.raises(ConfigError, match="normalization"):
    _shapes(MODELS["unet"](num_classes=3, normalization="layer"), (1, 8, 8, 1))


def test_center_crop_matches_reference_slices():
  x = jnp.arange(7 * 6).reshape(1, 7, 6, 1)
  y = sb.center_crop(x, (4, 3))
  # autocrop: [(d - e) // 2 : (d + e) // 2] per axis -> rows 1:5, cols 1:4.
  np.testing.assert_array_equal(y[0, :, :, 0], np.asarray(x)[0, 1:5, 1:4, 0])
  np.testing.assert_array_equal(sb.center_crop(x, (7, 6)), x)
  with pytest.raises(ValueError, match="larger"):
    sb.center_crop(x, (8, 6))


def test_xavier_uniform_bounds():
  # The U-Net's convs and transposed convs use these initialisers (xavier weights, zero bias).
  for layer, fans in [
    (sb.conv(64, 3, dims=2), 9 * 64 + 9 * 64),
    (sb.up_conv(32, dims=3), 8 * 64 + 8 * 32),
  ]:
    x = jnp.zeros((1,) + (4,) * (len(layer.kernel_size)) + (64,))
    p = layer.init(jax.random.key(0), x)["params"]
    k = np.asarray(p["kernel"])
    bound = np.sqrt(6.0 / fans)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    assert not np.any(np.asarray(p["bias"]))
