"""2D zoo (U-Net++, MA-Net, FPN, PAN, PSPNet): output shapes, variables layout, errors, resampling.

Shapes are checked with ``jax.eval_shape`` (tracing only) for every model x a ResNet and an
EfficientNet encoder at 1/8 width; one small model runs for real in train and eval mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtneuro_jax.errors import ConfigError, UserError
from mtneuro_jax.models import MODELS, seg2d
from mtneuro_jax.models.seg_encoders import ENCODERS
from mtneuro_jax.train.state import param_count

ZOO = ("unet_plusplus", "manet", "fpn", "pan", "pspnet")


def _init_and_train_shapes(model, image):
  def f(im):
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    v = model.init(rngs, im, train=False)
    out, state = model.apply(
      v, im, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
    )
    return v, out, state

  return jax.eval_shape(f, image)


@pytest.mark.parametrize("encoder", ["resnet18", "efficientnet-b0"])
@pytest.mark.parametrize("name", ZOO)
def test_logits_keep_input_size(name, encoder):
  num_classes = 4 if encoder == "resnet18" else 3
  model = MODELS[name](
    num_classes=num_classes, dims=2, encoder_name=encoder, width_multiplier=0.125
  )
  image = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)  # the :quick/:tiny tile size
  v, out, state = _init_and_train_shapes(model, image)
  assert out["logits"].shape == (2, 64, 64, num_classes)
  assert out["logits"].dtype == jnp.float32
  assert set(v["params"]) == {"encoder", "decoder", "head"}
  assert "encoder" in v["batch_stats"] and set(state) == {"batch_stats"}
  assert v["params"]["head"]["conv"]["kernel"].shape[-1] == num_classes


@pytest.mark.parametrize("name", ["unet_plusplus", "fpn", "pan"])
def test_other_depths_and_sizes(name):
  model = MODELS[name](
    num_classes=3, encoder_name="resnet18", width_multiplier=0.125, encoder_depth=4
  )
  _, out, _ = _init_and_train_shapes(model, jax.ShapeDtypeStruct((1, 96, 160, 1), jnp.float32))
  assert out["logits"].shape == (1, 96, 160, 3)


def test_pspnet_runs_and_updates_batch_stats():
  model = MODELS["pspnet"](num_classes=3, encoder_name="resnet18", width_multiplier=0.125)
  image = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  v = jax.jit(lambda im: model.init(jax.random.key(1), im, train=False))(image)

  @jax.jit
  def run(v, im):
    ev = model.apply(v, im, train=False)["logits"]
    tr, state = model.apply(
      v, im, train=True, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"]
    )
    return ev, tr["logits"], state

  ev, tr, state = run(v, image)
  assert ev.shape == tr.shape == (2, 32, 32, 3)
  assert np.isfinite(ev).all() and np.isfinite(tr).all()
  old = v["batch_stats"]["encoder"]["bn1"]["mean"]
  assert not np.allclose(state["batch_stats"]["encoder"]["bn1"]["mean"], old)


@pytest.mark.parametrize("name", ZOO)
def test_dims_3_is_a_config_error(name):
  with pytest.raises(ConfigError, match="dims=3.*2") as e:
    MODELS[name](num_classes=3, dims=3)
  assert "\n" not in str(e.value)


def test_bad_sizes_and_names_are_one_line_errors():
  model = MODELS["unet_plusplus"](num_classes=3, width_multiplier=0.125)
  with pytest.raises(ConfigError, match="divisible by 32, got 48x64") as e:
    _init_and_train_shapes(model, jax.ShapeDtypeStruct((1, 48, 64, 1), jnp.float32))
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="unknown encoder 'resnet99'.*efficientnet-b7"):
    MODELS["fpn"](num_classes=3, encoder_name="resnet99")
  with pytest.raises(ConfigError, match="'fpn' has no argument 'decoder_chanels'; known: num_"):
    MODELS["fpn"](num_classes=3, decoder_chanels=(8, 4))
  with pytest.raises(ConfigError, match="decoder_channels has 2 entries"):
    _init_and_train_shapes(
      MODELS["manet"](num_classes=3, width_multiplier=0.125, decoder_channels=(8, 4)),
      jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32),
    )


def test_encoders_feature_pyramid():
  image = jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32)
  for name, channels in (
    ("resnet18", (1, 64, 64, 128, 256, 512)),
    ("resnet50", (1, 64, 256, 512, 1024, 2048)),
    ("efficientnet-b0", (1, 32, 24, 40, 112, 320)),
    ("efficientnet-b7", (1, 64, 48, 80, 224, 640)),
  ):
    enc = ENCODERS[name]()
    feats = jax.eval_shape(
      lambda im, enc=enc: enc.apply(enc.init(jax.random.key(0), im, train=False), im, train=False),
      image,
    )
    assert [f.shape[-1] for f in feats] == list(channels), name
    assert [f.shape[1] for f in feats] == [64, 32, 16, 8, 4, 2], name


def test_resampling_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2))
  for size in ((10, 14), (5, 7), (1, 1), (13, 4)):
    ref = torch.nn.functional.interpolate(tx, size=size, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(
      seg2d.resize_bilinear(jnp.asarray(x), size), ref.numpy().transpose(0, 2, 3, 1), atol=1e-5
    )
  for s in (1, 2, 3, 6):
    ref = torch.nn.functional.adaptive_avg_pool2d(tx, s)
    np.testing.assert_allclose(
      seg2d.adaptive_avg_pool(jnp.asarray(x), s), ref.numpy().transpose(0, 2, 3, 1), atol=1e-5
    )


def test_pab_block_matches_smp_semantics():
  """MA-Net's PAB: one softmax over the whole hw x hw map, result reshaped (not transposed)."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  b, h, w, c, p = 2, 3, 4, 5, 6
  x = rng.normal(size=(b, h, w, c)).astype(np.float32)
  block = seg2d.PABBlock(p)
  v = block.init(jax.random.key(0), jnp.asarray(x))
  ours = np.asarray(block.apply(v, jnp.asarray(x)))

  def conv(t, name, pad):
    k = torch.from_numpy(np.asarray(v["params"][name]["kernel"]).transpose(3, 2, 0, 1).copy())
    return F.conv2d(t, k, torch.from_numpy(np.array(v["params"][name]["bias"])), padding=pad)

  # smp PABBlock.forward, transcribed.
  t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  x_top = conv(t, "top_conv", 0).flatten(2)
  x_center = conv(t, "center_conv", 0).flatten(2).transpose(1, 2)
  x_bottom = conv(t, "bottom_conv", 1).flatten(2).transpose(1, 2)
  sp_map = torch.softmax(torch.matmul(x_center, x_top).view(b, -1), dim=1).view(b, h * w, h * w)
  sp_map = torch.matmul(sp_map, x_bottom).reshape(b, c, h, w)
  ref = conv(t + sp_map, "out_conv", 1).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


# Full width, resnet18, 3 classes: equal to smp 0.3.3's models (experiments/check_smp_parity.py
# builds them from smp's own decoders and compares counts and logits).
SMP_COUNTS_RESNET18 = {
  "unet_plusplus": 15_964_467,
  "manet": 21_669_491,
  "fpn": 13_041_219,
  "pan": 11_361_962,
  "pspnet": 839_331,
}


@pytest.mark.parametrize("name", ZOO)
def test_full_width_parameter_counts(name):
  model = MODELS[name](num_classes=3, encoder_name="resnet18")
  image = jax.ShapeDtypeStruct((1, 128, 128, 1), jnp.float32)
  v = jax.eval_shape(lambda im: model.init(jax.random.key(0), im, train=False), image)
  assert param_count(v["params"]) == SMP_COUNTS_RESNET18[name]
