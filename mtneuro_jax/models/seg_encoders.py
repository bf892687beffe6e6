"""Multi-scale 2D encoders for the segmentation zoo, as segmentation_models.pytorch (smp) builds them.

An encoder maps ``image [B, Y, X, C_in]`` (channel-last) to a list of ``depth + 1``
feature maps ``[f0, f1, ..., f_depth]``: ``f0`` is the input itself and ``f_i`` has
stride ``2**i`` (``[B, Y / 2**i, X / 2**i, C_i]``), except where ``output_stride=16``
dilates the last stage (PAN): then ``f5`` keeps stride 16.

Families (``ENCODERS[name](**kwargs)`` builds one):

* ResNet (``resnet18``, ``resnet34``, ``resnet50``): torchvision's ResNet (7x7/2 stem
  conv, BN, ReLU -> ``f1``; 3x3/2 max-pool + layer1 -> ``f2``; layer2..4 -> ``f3..f5``),
  BasicBlock or Bottleneck (stride on the 3x3 conv, "v1.5"), fc and avgpool removed as
  smp does. C_i at width 1: (C_in, 64, 64, 128, 256, 512) for 18/34 and (C_in, 64, 256,
  512, 1024, 2048) for 50. Init as smp gets it: torchvision's kaiming-normal (fan_out)
  for convs, but the stem conv that smp re-creates for ``in_channels != 3`` keeps
  PyTorch's default U(+-1/sqrt(fan_in)).
* EfficientNet (``efficientnet-b0`` ... ``efficientnet-b7``): smp's ``efficientnet-bN`` =
  lukemelas/EfficientNet-PyTorch 0.7.1 (MBConv blocks with squeeze-excitation, swish,
  compound width/depth scaling, BN eps 1e-3 / PyTorch momentum 0.01, TensorFlow "same"
  padding computed statically for the model's nominal image size (224 ... 600) exactly
  as ``Conv2dStaticSamePadding`` does, drop-connect rate 0.2 scaled by block index).
  Features are taken after smp's ``stage_idxs`` blocks (b0: 3, 5, 9, 16, one of them
  inside a stage, as smp has it). C_i at width 1, b0: (C_in, 32, 24, 40, 112, 320),
  b7: (C_in, 64, 48, 80, 224, 640). The classifier's ``_conv_head``/``_bn1``, which smp
  keeps but never runs, are not built.

``width_multiplier`` scales every channel count after the family's own rounding
(``max(1, round(c * wm))``; EfficientNet's SE width follows the scaled block input).
``output_stride=16`` is smp's ``make_dilated``: every conv of the last stage gets stride 1,
dilation 2 and symmetric padding ``(k // 2) * 2`` (EfficientNet's static padding dropped).

Parameter names follow the PyTorch state_dict names so ``encoder_weights`` can map them
(``layer1_0/conv1`` <- ``layer1.0.conv1.weight``; ``blocks_3/depthwise_conv`` <-
``_blocks.3._depthwise_conv.weight``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtneuro_jax.models.seg_blocks import scaled
from mtneuro_jax.registry import Registry

# torchvision ResNet init of convs: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d init: kaiming_uniform_(a=sqrt(5)) -> U(+-1/sqrt(fan_in)).
_torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_default_bias(key, shape, dtype=jnp.float32, *, fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _pad_sym(k: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  p = (k // 2) * dilation
  return ((p, p), (p, p))


def _check_output_stride(output_stride: int) -> None:
  if output_stride not in (16, 32):
    raise ValueError(f"encoder output_stride must be 16 or 32, got {output_stride}")


# ----------------------------------------------------------------------------------------------
# ResNet


class _ResBlock(nn.Module):
  """torchvision BasicBlock (``bottleneck=False``) or Bottleneck; input/output [B, Y, X, C]."""

  planes: int
  out_features: int
  strides: int = 1
  dilation: int = 1
  bottleneck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    def conv(f, k, s, name):
      return nn.Conv(
        f,
        (k, k),
        (s, s),
        padding=_pad_sym(k, self.dilation),
        kernel_dilation=(self.dilation, self.dilation),
        use_bias=False,
        kernel_init=_kaiming_fan_out,
        dtype=self.dtype,
        name=name,
      )

    def bn(name):
      return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=name
      )

    s = self.strides
    if self.bottleneck:
      y = nn.relu(bn("bn1")(conv(self.planes, 1, 1, "conv1")(x)))
      y = nn.relu(bn("bn2")(conv(self.planes, 3, s, "conv2")(y)))
      y = bn("bn3")(conv(self.out_features, 1, 1, "conv3")(y))
    else:
      y = nn.relu(bn("bn1")(conv(self.planes, 3, s, "conv1")(x)))
      y = bn("bn2")(conv(self.planes, 3, 1, "conv2")(y))
    if s != 1 or x.shape[-1] != self.out_features:
      x = nn.Conv(
        self.out_features,
        (1, 1),
        (s, s),
        padding="VALID",
        use_bias=False,
        kernel_init=_kaiming_fan_out,
        dtype=self.dtype,
        name="downsample_0",
      )(x)
      x = bn("downsample_1")(x)
    return nn.relu(y + x)


class ResNetEncoder(nn.Module):
  """smp ``ResNetEncoder``: ``__call__(image [B, Y, X, C_in], *, train) -> [f0, ..., f_depth]``."""

  layers: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  depth: int = 5
  width_multiplier: float = 1.0
  output_stride: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    _check_output_stride(self.output_stride)
    feats = [x]
    if self.depth < 1:
      return feats
    stem = scaled(64, self.width_multiplier)
    y = nn.Conv(
      stem,
      (7, 7),
      (2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      kernel_init=_torch_default,
      dtype=self.dtype,
      name="conv1",
    )(x.astype(self.dtype))
    y = nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn1"
    )(y)
    y = nn.relu(y)
    feats.append(y)
    expansion = 4 if self.bottleneck else 1
    for i, n in enumerate(self.layers):
      stage = i + 2  # smp stage index: layer1 is stage 2 (after the max-pool)
      if stage > self.depth:
        break
      if stage == 2:
        y = nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
      # smp make_dilated(16): stage 5 runs at stride 1, dilation 2 (every conv).
      dilated = self.output_stride == 16 and stage == 5
      planes = scaled(64 * 2**i, self.width_multiplier)
      out = scaled(64 * 2**i * expansion, self.width_multiplier)
      for j in range(n):
        s = 2 if (j == 0 and i > 0 and not dilated) else 1
        y = _ResBlock(
          planes,
          out,
          strides=s,
          dilation=2 if dilated else 1,
          bottleneck=self.bottleneck,
          dtype=self.dtype,
          name=f"layer{i + 1}_{j}",
        )(y, train=train)
      feats.append(y)
    return feats


# ----------------------------------------------------------------------------------------------
# EfficientNet (lukemelas/EfficientNet-PyTorch 0.7.1, as smp uses it)

# (kernel, repeats, in, out, expand, stride, se_ratio) of EfficientNet-B0's seven stages.
_EFFNET_BLOCKS = (
  (3, 1, 32, 16, 1, 1, 0.25),
  (3, 2, 16, 24, 6, 2, 0.25),
  (5, 2, 24, 40, 6, 2, 0.25),
  (3, 3, 40, 80, 6, 2, 0.25),
  (5, 3, 80, 112, 6, 1, 0.25),
  (5, 4, 112, 192, 6, 2, 0.25),
  (3, 1, 192, 320, 6, 1, 0.25),
)
# name -> (width coefficient, depth coefficient, nominal image size, smp stage_idxs).
EFFNET_PARAMS = {
  "efficientnet-b0": (1.0, 1.0, 224, (3, 5, 9)),
  "efficientnet-b1": (1.0, 1.1, 240, (5, 8, 16)),
  "efficientnet-b2": (1.1, 1.2, 260, (5, 8, 16)),
  "efficientnet-b3": (1.2, 1.4, 300, (5, 8, 18)),
  "efficientnet-b4": (1.4, 1.8, 380, (6, 10, 22)),
  "efficientnet-b5": (1.6, 2.2, 456, (8, 13, 27)),
  "efficientnet-b6": (1.8, 2.6, 528, (9, 15, 31)),
  "efficientnet-b7": (2.0, 3.1, 600, (11, 18, 38)),
}


def round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
  """lukemelas ``round_filters``: scale, round to a multiple of 8, never more than 10 % down."""
  f = filters * width_coefficient
  new = max(divisor, int(f + divisor / 2) // divisor * divisor)
  if new < 0.9 * f:
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  return int(math.ceil(depth_coefficient * repeats))


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
  """TensorFlow 'same' padding (before, after) for one axis of nominal size ``size``."""
  out = math.ceil(size / s)
  pad = max((out - 1) * s + (k - 1) + 1 - size, 0)
  return (pad // 2, pad - pad // 2)


def efficientnet_block_args(name: str) -> list[dict]:
  """One dict per MBConv block of ``name``: kernel, stride, in/out filters, expand, se, pad.

  ``pad`` is the static (before, after) padding of the depthwise conv for the nominal
  image size, per axis (square), as lukemelas computes it.
  """
  w, d, size, _ = EFFNET_PARAMS[name]
  size = math.ceil(size / 2)  # after the stem
  out = []
  for k, r, cin, cout, e, s, se in _EFFNET_BLOCKS:
    cin, cout, r = round_filters(cin, w), round_filters(cout, w), round_repeats(r, d)
    for j in range(r):
      stride = s if j == 0 else 1
      out.append(
        dict(
          kernel=k,
          stride=stride,
          cin=cin if j == 0 else cout,
          cout=cout,
          expand=e,
          se=se,
          pad=_same_pad(size, k, stride),
          skip=j > 0,
        )
      )
      size = math.ceil(size / stride)
  return out


class MBConvBlock(nn.Module):
  """lukemelas ``MBConvBlock``: [expand 1x1, BN, swish], depthwise kxk, BN, swish, SE, project 1x1, BN.

  Identity skip (with drop-connect in training) when stride 1 and in == out channels.
  Input/output [B, Y, X, C]. ``pad`` is the static (before, after) padding of the depthwise
  conv; ``dilation`` > 1 (smp make_dilated) pads ``(k // 2) * dilation`` on both sides.
  """

  cin: int
  cout: int
  kernel: int
  stride: int
  expand: int
  se_ratio: float
  pad: tuple[int, int]
  skip: bool = True
  dilation: int = 1
  drop_connect_rate: float = 0.0
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    wm = self.width_multiplier
    cin, cout = scaled(self.cin, wm), scaled(self.cout, wm)
    oup = cin * self.expand

    def bn(name):
      return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.99,
        epsilon=1e-3,
        dtype=self.dtype,
        name=name,
      )

    def conv1x1(f, name):
      return nn.Conv(
        f, (1, 1), use_bias=False, kernel_init=_torch_default, dtype=self.dtype, name=name
      )

    x = inputs
    if self.expand != 1:
      x = nn.swish(bn("bn0")(conv1x1(oup, "expand_conv")(x)))
    k, d = self.kernel, self.dilation
    if d > 1:
      pad = ((k // 2) * d, (k // 2) * d)
      s = 1
    else:
      pad, s = self.pad, self.stride
    x = nn.Conv(
      oup,
      (k, k),
      (s, s),
      padding=(pad, pad),
      kernel_dilation=(d, d),
      feature_group_count=oup,
      use_bias=False,
      kernel_init=_torch_default,
      dtype=self.dtype,
      name="depthwise_conv",
    )(x)
    x = nn.swish(bn("bn1")(x))
    if self.se_ratio and 0 < self.se_ratio <= 1:
      squeezed = max(1, int(cin * self.se_ratio))
      z = jnp.mean(x, axis=(1, 2), keepdims=True)
      z = nn.Conv(
        squeezed,
        (1, 1),
        kernel_init=_torch_default,
        bias_init=lambda key, shape, dtype=jnp.float32: _torch_default_bias(
          key, shape, dtype, fan_in=oup
        ),
        dtype=self.dtype,
        name="se_reduce",
      )(z)
      z = nn.swish(z)
      z = nn.Conv(
        oup,
        (1, 1),
        kernel_init=_torch_default,
        bias_init=lambda key, shape, dtype=jnp.float32: _torch_default_bias(
          key, shape, dtype, fan_in=squeezed
        ),
        dtype=self.dtype,
        name="se_expand",
      )(z)
      x = nn.sigmoid(z) * x
    x = bn("bn2")(conv1x1(cout, "project_conv")(x))
    # lukemelas skips only in repeated blocks (a first block's stride is a list, never == 1).
    if self.skip and self.stride == 1 and cin == cout:
      if train and self.drop_connect_rate:
        keep = 1.0 - self.drop_connect_rate
        u = jax.random.uniform(self.make_rng("dropout"), (x.shape[0],) + (1,) * (x.ndim - 1))
        x = x / keep * jnp.floor(keep + u).astype(x.dtype)
      x = x + inputs
    return x


class EfficientNetEncoder(nn.Module):
  """smp ``EfficientNetEncoder``: ``__call__(image [B, Y, X, C_in], *, train) -> [f0, ..., f_depth]``.

  ``drop_connect_rate`` (lukemelas/smp default 0.2) is scaled by ``block_index / num_blocks``
  and needs a 'dropout' rng in training; 0 turns it off.
  """

  model_name: str = "efficientnet-b0"
  depth: int = 5
  width_multiplier: float = 1.0
  output_stride: int = 32
  drop_connect_rate: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    _check_output_stride(self.output_stride)
    w, _, size, stage_idxs = EFFNET_PARAMS[self.model_name]
    feats = [x]
    if self.depth < 1:
      return feats
    stem = scaled(round_filters(32, w), self.width_multiplier)
    p = _same_pad(size, 3, 2)
    y = nn.Conv(
      stem,
      (3, 3),
      (2, 2),
      padding=(p, p),
      use_bias=False,
      kernel_init=_torch_default,
      dtype=self.dtype,
      name="conv_stem",
    )(x.astype(self.dtype))
    y = nn.BatchNorm(
      use_running_average=not train, momentum=0.99, epsilon=1e-3, dtype=self.dtype, name="bn0"
    )(y)
    y = nn.swish(y)
    feats.append(y)
    blocks = efficientnet_block_args(self.model_name)
    ends = list(stage_idxs) + [len(blocks)]  # feature i + 2 is taken after block ends[i] - 1
    for idx, a in enumerate(blocks):
      stage = 2 + sum(idx >= e for e in ends[:-1])  # smp stage (2..5) this block belongs to
      if stage > self.depth:
        break
      dilated = self.output_stride == 16 and stage == 5
      y = MBConvBlock(
        a["cin"],
        a["cout"],
        a["kernel"],
        a["stride"],
        a["expand"],
        a["se"],
        a["pad"],
        skip=a["skip"],
        dilation=2 if dilated else 1,
        drop_connect_rate=self.drop_connect_rate * idx / len(blocks),
        width_multiplier=self.width_multiplier,
        dtype=self.dtype,
        name=f"blocks_{idx}",
      )(y, train=train)
      if idx + 1 in ends:
        feats.append(y)
    return feats


# ----------------------------------------------------------------------------------------------
# Registry

EncoderFactory = Callable[..., nn.Module]


def _resnet(layers, bottleneck) -> EncoderFactory:
  def make(
    *,
    depth: int = 5,
    width_multiplier: float = 1.0,
    output_stride: int = 32,
    drop_connect_rate: float = 0.0,
    dtype: Any = jnp.float32,
    name: str | None = None,
  ) -> ResNetEncoder:
    del drop_connect_rate  # EfficientNet only
    return ResNetEncoder(
      layers, bottleneck, depth, width_multiplier, output_stride, dtype=dtype, name=name
    )

  return make


def _effnet(model_name: str) -> EncoderFactory:
  def make(
    *,
    depth: int = 5,
    width_multiplier: float = 1.0,
    output_stride: int = 32,
    drop_connect_rate: float = 0.2,
    dtype: Any = jnp.float32,
    name: str | None = None,
  ) -> EfficientNetEncoder:
    return EfficientNetEncoder(
      model_name,
      depth,
      width_multiplier,
      output_stride,
      drop_connect_rate,
      dtype=dtype,
      name=name,
    )

  return make


# name -> factory(depth, width_multiplier, output_stride, drop_connect_rate, dtype, name).
ENCODERS = Registry(
  "encoder",
  {
    "resnet18": _resnet((2, 2, 2, 2), False),
    "resnet34": _resnet((3, 4, 6, 3), False),
    "resnet50": _resnet((3, 4, 6, 3), True),
    **{name: _effnet(name) for name in EFFNET_PARAMS},
  },
)


def encoder_family(name: str) -> str:
  """'resnet' or 'efficientnet' (raises UnknownNameError for an unknown encoder)."""
  ENCODERS[name]
  return "efficientnet" if name.startswith("efficientnet") else "resnet"
