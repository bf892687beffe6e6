"""VNet-light and HighResNet (3D, MedicalZooPytorch): counts, same-size outputs, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtneuro_jax.errors import ConfigError
from mtneuro_jax.models import MODELS
from mtneuro_jax.train.state import param_count


def _shapes(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


# parameters() of MedicalZooPytorch's VNetLight / HighResNet3D (in_channels=1), counted
# with a PyTorch transcription of lib/medzoo/Vnet.py and HighResNet3D.py.
@pytest.mark.parametrize(
  "name,num_classes,expected",
  [
    ("vnet_light", 3, 12_242_277),
    ("vnet_light", 4, 12_246_288),
    ("highresnet", 3, 809_795),
    ("highresnet", 4, 809_876),
  ],
)
def test_parameter_counts_match_medicalzoo(name, num_classes, expected):
  v = _shapes(MODELS[name](num_classes=num_classes), (1, 8, 16, 16, 1))
  assert param_count(v["params"]) == expected
  assert "head" in v["params"] and "encoder" in v["params"]


@pytest.mark.parametrize("name", ["vnet_light", "highresnet"])
@pytest.mark.parametrize("train", [False, True])
def test_same_spatial_size(name, train):
  model = MODELS[name](num_classes=4, dims=3, width_multiplier=0.25)
  shape = (2, 8, 16, 24, 1)  # an 8-slice window: VNet-light's bottom has depth 1
  v = _shapes(model, shape)
  out = jax.eval_shape(
    lambda v: model.apply(
      v,
      jnp.zeros(shape),
      train=train,
      rngs={"dropout": jax.random.key(1)},
      mutable=["batch_stats"],
    )[0],
    v,
  )
  assert out["logits"].shape == shape[:-1] + (4,)
  assert out["logits"].dtype == jnp.float32


def _random_variables(model, shape):
  """Variables of the right shapes filled from numpy (a jitted init compiles one threefry
  kernel per parameter: tens of seconds on a busy CPU; the forward pass is what we test)."""
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      return np.ones(s.shape, np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, _shapes(model, shape))


@pytest.mark.parametrize("name", ["vnet_light", "highresnet"])
def test_forward_runs_train_and_eval(name):
  model = MODELS[name](num_classes=3, width_multiplier=0.25)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 1))
  v = _random_variables(model, x.shape)

  @jax.jit
  def run(v, x):
    out, new = model.apply(
      v, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
    )
    return out["logits"], model.apply({**v, **new}, x, train=False)["logits"]

  train_logits, eval_logits = run(v, x)
  assert train_logits.shape == eval_logits.shape == (1, 8, 8, 8, 3)
  assert np.all(np.isfinite(train_logits)) and np.all(np.isfinite(eval_logits))


def test_bad_input_raises_config_error():
  for name in ("vnet_light", "highresnet"):
    with pytest.raises(ConfigError, match="dims=2.*3"):
      MODELS[name](num_classes=3, dims=2)
    with pytest.raises(ConfigError, match="3D"):
      _shapes(MODELS[name](num_classes=3, width_multiplier=0.25), (1, 16, 16, 1))
  with pytest.raises(ConfigError, match="divisible by 8"):
    _shapes(MODELS["vnet_light"](num_classes=3, width_multiplier=0.25), (1, 6, 16, 16, 1))
