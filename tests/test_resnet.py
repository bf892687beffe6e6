"""ResNet-18 xray: parameter counts, shapes, stride, BN and dropout behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtneuro_jax.models import MODELS, resnet
from mtneuro_jax.train.state import param_count


def _abstract_init(model, size=32):
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)), train=False)
  )


def test_param_counts_match_reference():
  # torchvision resnet18 with a 1-channel 3x3 stem and no fc: 11,167,680 (reference facts 2.1).
  enc = _abstract_init(MODELS["resnet18_xray"](num_classes=0))
  assert param_count(enc["params"]) == 11_167_680
  clf = _abstract_init(MODELS["resnet18_xray"](num_classes=4))
  assert param_count(clf["params"]) == 11_169_732  # + Linear(512, 4)
  assert clf["params"]["head"]["kernel"].shape == (512, 4)
  # BN running mean + var of every BN layer (PyTorch buffers minus num_batches_tracked).
  assert param_count(clf["batch_stats"]) == 2 * 4800


@pytest.mark.parametrize("wm,dim", [(1.0, 512), (0.25, 128), (1 / 16, 32)])
def test_width_multiplier_feature_dim(wm, dim):
  v = _abstract_init(resnet.resnet18_xray(num_classes=4, width_multiplier=wm))
  assert v["params"]["head"]["kernel"].shape == (dim, 4)
  assert v["params"]["encoder"]["conv1"]["kernel"].shape == (3, 3, 1, dim // 8)


def test_total_stride_8_and_no_maxpool():
  """256x256 -> 32x32 at layer4 (stride 8: three stride-2 stages, no stem stride/max-pool)."""
  model = resnet.ResNetXrayEncoder(width_multiplier=1 / 16)
  x = jnp.zeros((1, 256, 256, 1))
  _, state = jax.eval_shape(
    lambda: model.init_with_output(jax.random.key(0), x, train=False, capture_intermediates=True)
  )
  inter = state["intermediates"]
  assert inter["conv1"]["__call__"][0].shape == (1, 256, 256, 4)
  assert inter["layer1_1"]["__call__"][0].shape == (1, 256, 256, 4)
  assert inter["layer4_1"]["__call__"][0].shape == (1, 32, 32, 32)
  # Downsample shortcut exactly in the first block of layers 2-4.
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]
  with_ds = sorted(k for k, v in params.items() if "downsample_conv" in v)
  assert with_ds == ["layer2_0", "layer3_0", "layer4_0"]
  assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 4, 8)


def test_outputs_batchnorm_and_dropout():
  # Two stages keep the CPU compile short; the block/BN/dropout code is the same.
  model = resnet.ResNetXray(num_classes=4, width_multiplier=1 / 16, dropout=0.5, stage_sizes=(1, 1))
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
  v = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
  apply_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))
  apply_train = jax.jit(
    lambda v, x, k: model.apply(v, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"])
  )
  out = apply_eval(v, x)
  assert out["features"].shape == (4, 8) and out["logits"].shape == (4, 4)
  assert out["features"].dtype == jnp.float32
  # Eval mode is deterministic and needs nothing mutable.
  np.testing.assert_array_equal(out["logits"], apply_eval(v, x)["logits"])
  # Train mode: dropout depends on the rng; BN running stats move with PyTorch momentum 0.1.
  o1, s1 = apply_train(v, x, jax.random.key(1))
  o2, _ = apply_train(v, x, jax.random.key(2))
  assert not np.allclose(o1["logits"], o2["logits"])
  np.testing.assert_array_equal(o1["features"], o2["features"])  # dropout is on the head only
  stem = jax.lax.conv_general_dilated(
    x,
    v["params"]["encoder"]["conv1"]["kernel"],
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  want_mean = 0.9 * 0.0 + 0.1 * stem.mean(axis=(0, 1, 2))  # running mean starts at 0
  np.testing.assert_allclose(
    s1["batch_stats"]["encoder"]["bn1"]["mean"], want_mean, rtol=1e-4, atol=1e-6
  )


def test_model_has_no_loss_knowledge():
  """Models return dicts of arrays; the head can be dropped for pure encoders."""
  model = resnet.resnet18_xray(num_classes=0, width_multiplier=1 / 16)
  x = jnp.ones((2, 8, 8, 1))
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), v)
  assert set(out) == {"features"} and "head" not in v["params"]
