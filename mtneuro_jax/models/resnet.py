"""ResNet-18 "xray": the MTNeuro reference encoder (``resnet_xray``) in Flax, NHWC.

Reference (``MTNeuro/models/resnet_xray.py``): torchvision ``resnet18()`` with
random init, ``conv1`` replaced by a 3x3 stride-1 conv (no bias) on a 1-channel
input, the max-pool and ``fc`` dropped, then global average pooling -> 512-d.
Total stride 8 (256x256 input -> 32x32 layer4 map).

Fidelity choices (so ``torch_import`` reproduces PyTorch logits):
* BatchNorm epsilon 1e-5, PyTorch momentum 0.1 == Flax momentum 0.9. One known
  difference: PyTorch updates ``running_var`` with the unbiased batch variance,
  Flax with the biased one (a factor n/(n-1); n = B*H*W >= 8192 for Task 1).
* Explicit ((1, 1), (1, 1)) padding for every 3x3 conv. 'SAME' would pad
  stride-2 convs asymmetrically ((0, 1)) and shift the sampling grid.
* Init as the reference gets it: torchvision's kaiming-normal (fan_out, relu)
  for block convs; the *replaced* stem conv and the linear head keep PyTorch's
  default kaiming-uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).

The head (dropout + Linear(D, num_classes)) is what the paper's supervised
baseline uses (20 % dropout); the reference code has no dropout, which changes
nothing in eval mode.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision ResNet init of block convs: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_block_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d/Linear init: kaiming_uniform_(a=sqrt(5)) -> U(+-1/sqrt(fan_in)).
_torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

_PAD1 = ((1, 1), (1, 1))


def _torch_default_bias_init(fan_in: int):
  """PyTorch Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / (fan_in**0.5)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class BasicBlock(nn.Module):
  """torchvision BasicBlock: (3x3 conv, BN, ReLU, 3x3 conv, BN) + shortcut, ReLU.

  The shortcut is a 1x1 strided conv + BN when the shape changes (``downsample``).
  Input/output [B, Y, X, C] (NHWC).
  """

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(
      nn.Conv, use_bias=False, kernel_init=_block_conv_init, dtype=self.dtype
    )
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
    )
    s = (self.strides, self.strides)
    y = conv(self.features, (3, 3), s, padding=_PAD1, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.features, (3, 3), padding=_PAD1, name="conv2")(y)
    y = norm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), s, padding="VALID", name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class ResNetXrayEncoder(nn.Module):
  """Stem (3x3/1 conv, BN, ReLU; no max-pool) -> 4 stages of BasicBlocks -> GAP.

  Input [B, Y, X, C_in] float; output features [B, 8 * base_width].
  ``width_multiplier`` scales every stage width (64/128/256/512 at 1.0) for
  quick CPU runs.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @property
  def base_width(self) -> int:
    return max(1, int(round(64 * self.width_multiplier)))

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    w = self.base_width
    x = x.astype(self.dtype)
    x = nn.Conv(
      w,
      (3, 3),
      padding=_PAD1,
      use_bias=False,
      kernel_init=_torch_default_init,
      dtype=self.dtype,
      name="conv1",
    )(x)
    x = nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn1"
    )(x)
    x = nn.relu(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(w * 2**i, strides, dtype=self.dtype, name=f"layer{i + 1}_{j}")(
          x, train=train
        )
    # Global average pool over all spatial axes (works for 2D [B,Y,X,C] input).
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1))).astype(jnp.float32)


class ResNetXray(nn.Module):
  """Encoder + optional classification head (dropout, Linear(D, num_classes)).

  ``__call__(image [B, Y, X, C_in], *, train) -> {'features': [B, D], 'logits': [B, num_classes]}``
  with D = 8 * base width (512 at width_multiplier 1). ``num_classes=0`` builds the
  encoder only (no 'logits'). Dropout needs a 'dropout' rng when ``train``.
  Variables: {'params': {'encoder': ..., 'head': ...}, 'batch_stats': {'encoder': ...}}.
  """

  num_classes: int = 4
  width_multiplier: float = 1.0
  dropout: float = 0.0
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    encoder = ResNetXrayEncoder(self.stage_sizes, self.width_multiplier, self.dtype, name="encoder")
    features = encoder(image, train=train)
    out = {"features": features}
    if self.num_classes:
      d = features.shape[-1]
      x = nn.Dropout(self.dropout, deterministic=not train)(features) if self.dropout else features
      out["logits"] = nn.Dense(
        self.num_classes,
        kernel_init=_torch_default_init,
        bias_init=_torch_default_bias_init(d),
        name="head",
      )(x)
    return out


def resnet18_xray(**kwargs) -> ResNetXray:
  """ResNet-18 xray (stages [2, 2, 2, 2]); kwargs: num_classes, width_multiplier, dropout, dtype."""
  return ResNetXray(stage_sizes=(2, 2, 2, 2), **kwargs)
