"""2D segmentation zoo: U-Net++, MA-Net, FPN, PAN, PSPNet as segmentation_models.pytorch (smp) builds them.

Every model is ``Model(num_classes, dims=2, width_multiplier=1.0, encoder_name='resnet18',
encoder_weights='', encoder_depth=..., <decoder kwargs with smp's defaults>)`` and
``__call__(image [B, Y, X, C_in], *, train) -> {'logits': [B, Y, X, num_classes]}``
(float32, the input's spatial size). Variables: ``params`` / ``batch_stats`` with top-level
``encoder`` (``seg_encoders.ENCODERS[encoder_name]``), ``decoder`` and ``head`` (smp's
SegmentationHead conv: 3x3 for U-Net++, MA-Net, PAN, PSPNet; 1x1 for FPN).

What follows smp (decoder blocks, channel defaults, init: decoder convs kaiming-uniform
fan_in with zero bias, head xavier-uniform with zero bias; BatchNorm eps 1e-5, PyTorch
momentum 0.1; nearest x2 up-sampling in U-Net++/MA-Net/FPN top-down; bilinear
``align_corners=True`` elsewhere) and what differs:

* Input size: Y and X must be divisible by ``2**encoder_depth`` (smp's requirement);
  otherwise ``ConfigError`` (one line). Nothing is padded, except PAN: its pyramid
  attention max-pools the stride-16 map three times, which smp cannot do below 128x128
  inputs (it crashes); here PAN zero-pads the input symmetrically up to the smallest size
  that works (``8 * output stride``, e.g. 64x64 -> 128x128) and crops the logits back.
* The final up-sampling (smp: fixed ``upsampling=4`` for FPN/PAN, 8 for PSPNet) is the
  factor from the decoder output to the input size (bilinear, align_corners=True): the
  same at smp's default depths, and still the input size at other depths.
* ``width_multiplier`` scales every channel count (encoder and decoder); FPN's GroupNorm
  uses the largest group count <= 32 dividing its channels (32 at full width).
* Dropout2d (FPN, PSPNet, p=0.2) and EfficientNet drop-connect (0.2) need a 'dropout' rng
  when ``train`` is True.
* ``encoder_weights``: '' = random init (smp ``encoder_weights=None``), else a path to an
  ``.npz`` written by ``experiments/convert_encoder_weights.py``; it replaces the encoder's
  params and BatchNorm stats when the model is initialised (``encoder_weights.py``).
* ``dims`` must be 2 (these are 2D architectures); 3 raises ConfigError.

Parameter counts at full width, 3 classes (measured with ``jax.eval_shape``; every one equals
the smp 0.3.3 model's count for the stages it runs, see ``experiments/check_smp_parity.py``,
which also reproduces smp's logits within 1e-5 for all five models with resnet18,
efficientnet-b0 and efficientnet-b7). Encoders have a 1-channel stem; they equal torchvision's / lukemelas'
published ImageNet sizes (resnet18 11,689,512; efficientnet-b7 66,347,960) minus the
classifier (fc; EfficientNet's unused conv_head/bn1 too) and the two dropped RGB stem
channels. PSPNet (encoder_depth 3) builds only the stages it runs.

  ==============  ===========  ===============
  model           resnet18     efficientnet-b7
  ==============  ===========  ===============
  encoder only    11,170,240   62,142,288
  unet_plusplus   15,964,467   66,519,171
  manet           21,669,491   76,354,039
  fpn             13,041,219   64,021,459
  pan             11,361,962   62,320,826
  pspnet             839,331    1,084,427
  ==============  ===========  ===============
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtneuro_jax.errors import ConfigError
from mtneuro_jax.models import encoder_weights as ew
from mtneuro_jax.models.seg_blocks import check_dims, scaled
from mtneuro_jax.models.seg_encoders import ENCODERS

# smp initialize_decoder: kaiming_uniform_(fan_in, relu), bias 0; initialize_head: xavier, 0.
_decoder_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
_head_init = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


# ----------------------------------------------------------------------------------------------
# Resampling helpers ([B, Y, X, C])


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """PyTorch ``F.interpolate(scale_factor=factor, mode='nearest')`` for integer factors."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def _align_corners_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] linear-interpolation weights with align_corners=True."""
  m = np.zeros((n_out, n_in), np.float32)
  if n_in == 1 or n_out == 1:
    m[:, 0] = 1.0
    return m
  src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.minimum(np.floor(src).astype(int), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).astype(np.float32)
  m[np.arange(n_out), lo] += 1.0 - frac
  m[np.arange(n_out), hi] += frac
  return m


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """PyTorch ``F.interpolate(size=size, mode='bilinear', align_corners=True)`` of [B, Y, X, C]."""
  (h, w), (oh, ow) = x.shape[1:3], tuple(size)
  if (h, w) == (oh, ow):
    return x
  my = jnp.asarray(_align_corners_matrix(oh, h), x.dtype)
  mx = jnp.asarray(_align_corners_matrix(ow, w), x.dtype)
  return jnp.einsum("oy,byxc,px->bopc", my, x, mx, precision=jax.lax.Precision.HIGHEST)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """PyTorch ``AdaptiveAvgPool2d(size)``: bin i spans [floor(i*n/s), ceil((i+1)*n/s))."""
  h, w = x.shape[1:3]

  def matrix(n):
    m = np.zeros((size, n), np.float32)
    for i in range(size):
      a, b = (i * n) // size, -((-(i + 1) * n) // size)
      m[i, a:b] = 1.0 / (b - a)
    return m

  my, mx = jnp.asarray(matrix(h), x.dtype), jnp.asarray(matrix(w), x.dtype)
  return jnp.einsum("oy,byxc,px->bopc", my, x, mx, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------
# Shared decoder pieces


def _bn(train: bool, name: str | None = None) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv(features, k, *, name, bias=True, padding=None):
  p = k // 2 if padding is None else padding
  return nn.Conv(
    features,
    (k, k),
    padding=((p, p), (p, p)),
    use_bias=bias,
    kernel_init=_decoder_init,
    bias_init=_zeros,
    name=name,
  )


class Conv2dReLU(nn.Module):
  """smp ``Conv2dReLU``: conv (bias only without BN), [BatchNorm], ReLU. [B, Y, X, C] -> [.., F]."""

  features: int
  kernel_size: int = 3
  use_batchnorm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = _conv(self.features, self.kernel_size, bias=not self.use_batchnorm, name="conv")(x)
    if self.use_batchnorm:
      x = _bn(train, "bn")(x)
    return nn.relu(x)


class SegmentationHead(nn.Module):
  """smp ``SegmentationHead``: conv k x k (xavier, zero bias), then bilinear up to ``size``."""

  num_classes: int
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, size: Sequence[int]) -> jax.Array:
    p = self.kernel_size // 2
    x = nn.Conv(
      self.num_classes,
      (self.kernel_size,) * 2,
      padding=((p, p), (p, p)),
      kernel_init=_head_init,
      bias_init=_zeros,
      name="conv",
    )(x)
    return resize_bilinear(x, size)


def _dropout2d(rate: float, train: bool):
  """PyTorch ``Dropout2d``: zeroes whole channels per sample ([B, Y, X, C] -> mask [B, 1, 1, C])."""
  return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)


# ----------------------------------------------------------------------------------------------
# U-Net++


class UnetPlusPlusDecoder(nn.Module):
  """smp ``UnetPlusPlusDecoder``: nested dense skip nodes x_{depth}_{layer}; full-resolution out."""

  decoder_channels: Sequence[int]

  @nn.compact
  def __call__(self, features: list[jax.Array], *, train: bool) -> jax.Array:
    features = features[1:][::-1]  # drop the input, start from the deepest map
    n = len(features)  # = encoder depth = number of decoder columns
    out_ch = list(self.decoder_channels)
    skip_ch = [f.shape[-1] for f in features[1:]] + [0]

    def block(x, skip, out, name):
      x = upsample_nearest(x)
      if skip is not None:
        x = jnp.concatenate([x, skip], axis=-1)
      x = Conv2dReLU(out, name=f"{name}_conv1")(x, train=train)
      return Conv2dReLU(out, name=f"{name}_conv2")(x, train=train)

    depth = n - 1
    dense: dict[str, jax.Array] = {}
    for layer_idx in range(n - 1):
      for depth_idx in range(depth - layer_idx):
        if layer_idx == 0:
          name = f"x_{depth_idx}_{depth_idx}"
          out = out_ch[depth_idx] if depth_idx == 0 else skip_ch[depth_idx]
          dense[name] = block(features[depth_idx], features[depth_idx + 1], out, name)
        else:
          dl = depth_idx + layer_idx
          name = f"x_{depth_idx}_{dl}"
          cat = [dense[f"x_{i}_{dl}"] for i in range(depth_idx + 1, dl + 1)]
          cat = jnp.concatenate(cat + [features[dl + 1]], axis=-1)
          out = out_ch[dl] if depth_idx == 0 else skip_ch[dl]
          dense[name] = block(dense[f"x_{depth_idx}_{dl - 1}"], cat, out, name)
    name = f"x_0_{depth}"
    return block(dense[f"x_0_{depth - 1}"], None, out_ch[-1], name)


# ----------------------------------------------------------------------------------------------
# MA-Net


class PABBlock(nn.Module):
  """smp ``PABBlock`` (position-wise attention) on the deepest map; [B, h, w, C] -> same.

  As smp: one softmax over the whole (hw x hw) map per sample, and the attended
  [B, hw, C] result reinterpreted as [B, C, h, w] (a reshape, not a transpose).
  """

  pab_channels: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    top = _conv(self.pab_channels, 1, name="top_conv")(x).reshape(b, h * w, -1)
    center = _conv(self.pab_channels, 1, name="center_conv")(x).reshape(b, h * w, -1)
    bottom = _conv(c, 3, name="bottom_conv")(x).reshape(b, h * w, c)
    sp = jnp.einsum("bip,bjp->bij", center, top)  # [B, hw, hw]
    sp = jax.nn.softmax(sp.reshape(b, -1), axis=-1).reshape(b, h * w, h * w)
    sp = jnp.einsum("bij,bjc->bic", sp, bottom)  # [B, hw, C] (torch memory order)
    sp = sp.reshape(b, c, h, w).transpose(0, 2, 3, 1)
    return _conv(c, 3, name="out_conv")(x + sp)


class _SE(nn.Module):
  """AdaptiveAvgPool(1), 1x1 conv, ReLU, 1x1 conv, sigmoid -> [B, 1, 1, C]."""

  channels: int
  reduced: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    z = jnp.mean(x, axis=(1, 2), keepdims=True)
    z = nn.relu(_conv(self.reduced, 1, name="conv1")(z))
    return nn.sigmoid(_conv(self.channels, 1, name="conv2")(z))


class MFABBlock(nn.Module):
  """smp ``MFABBlock`` (multi-scale fusion attention): high-level x (upsampled) gated by SE."""

  skip_channels: int
  out_channels: int
  reduction: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, *, train: bool) -> jax.Array:
    c = x.shape[-1]
    x = Conv2dReLU(c, 3, name="hl_conv_0")(x, train=train)
    x = Conv2dReLU(self.skip_channels, 1, name="hl_conv_1")(x, train=train)
    x = upsample_nearest(x)
    reduced = max(1, self.skip_channels // self.reduction)
    att = _SE(self.skip_channels, reduced, name="SE_hl")(x)
    att = att + _SE(self.skip_channels, reduced, name="SE_ll")(skip)
    x = jnp.concatenate([x * att, skip], axis=-1)
    x = Conv2dReLU(self.out_channels, name="conv1")(x, train=train)
    return Conv2dReLU(self.out_channels, name="conv2")(x, train=train)


class MAnetDecoder(nn.Module):
  """smp ``MAnetDecoder``: PAB on the deepest map, MFAB per skip, a plain block at the end."""

  decoder_channels: Sequence[int]
  pab_channels: int = 64
  reduction: int = 16

  @nn.compact
  def __call__(self, features: list[jax.Array], *, train: bool) -> jax.Array:
    features = features[1:][::-1]
    head, skips = features[0], features[1:]
    x = PABBlock(self.pab_channels, name="center")(head)
    for i, out in enumerate(self.decoder_channels):
      if i < len(skips):
        x = MFABBlock(skips[i].shape[-1], out, self.reduction, name=f"blocks_{i}")(
          x, skips[i], train=train
        )
      else:
        x = upsample_nearest(x)
        x = Conv2dReLU(out, name=f"blocks_{i}_conv1")(x, train=train)
        x = Conv2dReLU(out, name=f"blocks_{i}_conv2")(x, train=train)
    return x


# ----------------------------------------------------------------------------------------------
# FPN


def _groups(channels: int, max_groups: int = 32) -> int:
  return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class FPNDecoder(nn.Module):
  """smp ``FPNDecoder``: top-down pyramid (1x1 lateral + nearest x2), 3x3 GN ReLU seg blocks.

  Output [B, Y/4, X/4, S] at depth 5 (S = segmentation channels, 'add') or 4S ('cat').
  """

  pyramid_channels: int = 256
  segmentation_channels: int = 128
  dropout: float = 0.2
  merge_policy: str = "add"

  @nn.compact
  def __call__(self, features: list[jax.Array], *, train: bool) -> jax.Array:
    c2, c3, c4, c5 = features[-4:]
    p5 = _conv(self.pyramid_channels, 1, name="p5")(c5)
    p4 = upsample_nearest(p5) + _conv(self.pyramid_channels, 1, name="p4_skip_conv")(c4)
    p3 = upsample_nearest(p4) + _conv(self.pyramid_channels, 1, name="p3_skip_conv")(c3)
    p2 = upsample_nearest(p3) + _conv(self.pyramid_channels, 1, name="p2_skip_conv")(c2)
    s = self.segmentation_channels
    outs = []
    for i, (p, n_up) in enumerate(zip((p5, p4, p3, p2), (3, 2, 1, 0), strict=True)):
      y = p
      for j in range(max(1, n_up)):
        y = _conv(s, 3, bias=False, name=f"seg_blocks_{i}_{j}_conv")(y)
        y = nn.GroupNorm(num_groups=_groups(s), epsilon=1e-5, name=f"seg_blocks_{i}_{j}_gn")(y)
        y = nn.relu(y)
        if n_up:
          y = resize_bilinear(y, (2 * y.shape[1], 2 * y.shape[2]))
      outs.append(y)
    if self.merge_policy == "add":
      x = sum(outs[1:], outs[0])
    elif self.merge_policy == "cat":
      x = jnp.concatenate(outs, axis=-1)
    else:
      raise ConfigError(f"unknown decoder_merge_policy {self.merge_policy!r}; use 'add' or 'cat'")
    return _dropout2d(self.dropout, train)(x)


# ----------------------------------------------------------------------------------------------
# PAN


class ConvBnRelu(nn.Module):
  """smp PAN ``ConvBnRelu``: conv (with bias), BatchNorm, [ReLU]."""

  features: int
  kernel_size: int
  add_relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = _conv(self.features, self.kernel_size, name="conv")(x)
    x = _bn(train, "bn")(x)
    return nn.relu(x) if self.add_relu else x


def _maxpool2(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class FPABlock(nn.Module):
  """smp ``FPABlock`` (feature pyramid attention) on the deepest map; [B, h, w, C] -> [.., F]."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h, w = x.shape[1:3]
    b1 = ConvBnRelu(self.features, 1, name="branch1")(
      jnp.mean(x, axis=(1, 2), keepdims=True), train=train
    )
    b1 = resize_bilinear(b1, (h, w))
    mid = ConvBnRelu(self.features, 1, name="mid")(x, train=train)
    x1 = ConvBnRelu(1, 7, name="down1")(_maxpool2(x), train=train)
    x2 = ConvBnRelu(1, 5, name="down2")(_maxpool2(x1), train=train)
    x3 = ConvBnRelu(1, 3, name="down3_0")(_maxpool2(x2), train=train)
    x3 = ConvBnRelu(1, 3, name="down3_1")(x3, train=train)
    x3 = resize_bilinear(x3, (h // 4, w // 4))
    x2 = ConvBnRelu(1, 5, name="conv2")(x2, train=train)
    y = resize_bilinear(x2 + x3, (h // 2, w // 2))
    x1 = ConvBnRelu(1, 7, name="conv1")(x1, train=train)
    y = resize_bilinear(y + x1, (h, w))
    return y * mid + b1


class GAUBlock(nn.Module):
  """smp ``GAUBlock`` (global attention upsample): low-level x gated by high-level y."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, *, train: bool) -> jax.Array:
    y_up = resize_bilinear(y, x.shape[1:3])
    x = ConvBnRelu(self.features, 3, name="conv2")(x, train=train)
    g = jnp.mean(y, axis=(1, 2), keepdims=True)
    g = nn.sigmoid(ConvBnRelu(self.features, 1, add_relu=False, name="conv1")(g, train=train))
    return y_up + x * g


class PANDecoder(nn.Module):
  """smp ``PANDecoder``: FPA on the deepest map, then GAU blocks down to stride 4."""

  decoder_channels: int = 32

  @nn.compact
  def __call__(self, features: list[jax.Array], *, train: bool) -> jax.Array:
    features = features[2:]
    depth = len(features) + 1
    out = FPABlock(self.decoder_channels, name="fpa")(features[-1], train=train)
    if depth == 5:
      out = GAUBlock(self.decoder_channels, name="gau3")(features[2], out, train=train)
    if depth >= 4:
      out = GAUBlock(self.decoder_channels, name="gau2")(features[1], out, train=train)
    return GAUBlock(self.decoder_channels, name="gau1")(features[0], out, train=train)


# ----------------------------------------------------------------------------------------------
# PSPNet


class PSPDecoder(nn.Module):
  """smp ``PSPDecoder``: pyramid pooling (1, 2, 3, 6) on the deepest map, 1x1 conv, Dropout2d."""

  out_channels: int = 512
  dropout: float = 0.2
  sizes: Sequence[int] = (1, 2, 3, 6)

  @nn.compact
  def __call__(self, features: list[jax.Array], *, train: bool) -> jax.Array:
    x = features[-1]
    h, w, c = x.shape[1:]
    xs = []
    for i, s in enumerate(self.sizes):
      # smp: no BatchNorm on the 1x1 pooled map (BN of one value per channel).
      y = Conv2dReLU(max(1, c // len(self.sizes)), 1, use_batchnorm=s != 1, name=f"psp_blocks_{i}")(
        adaptive_avg_pool(x, s), train=train
      )
      xs.append(resize_bilinear(y, (h, w)))
    x = jnp.concatenate(xs + [x], axis=-1)
    x = Conv2dReLU(self.out_channels, 1, name="conv")(x, train=train)
    return _dropout2d(self.dropout, train)(x)


# ----------------------------------------------------------------------------------------------
# Models


class _SegModel(nn.Module):
  """Encoder -> decoder -> head; subclasses set ``_decoder`` and the head kernel size."""

  num_classes: int = 3
  dims: int = 2
  width_multiplier: float = 1.0
  encoder_name: str = "resnet18"
  encoder_weights: str = ""
  encoder_depth: int = 5
  encoder_drop_connect_rate: float = 0.2
  dtype: Any = jnp.float32

  model_name = "seg2d"
  head_kernel = 3
  output_stride = 32
  min_depth = 1

  def _decoder(self) -> nn.Module:
    raise NotImplementedError

  def _check(self, image: jax.Array) -> None:
    check_dims(self.dims, (2,), self.model_name)
    if not self.min_depth <= self.encoder_depth <= 5:
      raise ConfigError(
        f"model {self.model_name!r}: encoder_depth={self.encoder_depth} is not supported; "
        f"use {self.min_depth}..5"
      )
    if image.ndim != 4:
      raise ConfigError(
        f"model {self.model_name!r} takes 2D images [B, Y, X, C], got shape {image.shape}; "
        "use a 2D task (task2_2d_*)"
      )
    k = 2**self.encoder_depth
    if image.shape[1] % k or image.shape[2] % k:
      raise ConfigError(
        f"model {self.model_name!r} with encoder_depth={self.encoder_depth} needs Y and X "
        f"divisible by {k}, got {image.shape[1]}x{image.shape[2]}; use tiles of a multiple "
        f"of {k} pixels"
      )

  def _encoder(self) -> nn.Module:
    make = functools.partial(
      ENCODERS[self.encoder_name],
      depth=self.encoder_depth,
      width_multiplier=self.width_multiplier,
      output_stride=self.output_stride,
      drop_connect_rate=self.encoder_drop_connect_rate,
      dtype=self.dtype,
    )
    if self.encoder_weights and self.is_initializing():
      cls = type(make())
      loader = ew.init_loader(self.encoder_weights, self.encoder_name, self.encoder_depth)
      cls = nn.map_variables(
        cls, ("params", "batch_stats"), trans_out_fn=loader, init=True, mutable=True
      )
      enc = make()
      fields = {f: getattr(enc, f) for f in enc.__dataclass_fields__ if f not in ("parent", "name")}
      return cls(**fields, name="encoder")
    return make(name="encoder")

  def _features(self, image: jax.Array, train: bool) -> list[jax.Array]:
    return self._encoder()(image.astype(self.dtype), train=train)

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    self._check(image)
    feats = self._features(image, train)
    x = self._decoder()(feats, train=train)
    logits = SegmentationHead(self.num_classes, self.head_kernel, name="head")(x, image.shape[1:3])
    return {"logits": logits.astype(jnp.float32)}


def _decoder_channels(channels: Sequence[int] | None, depth: int, wm: float, model: str):
  channels = (256, 128, 64, 32, 16)[:depth] if channels is None else tuple(channels)
  if len(channels) != depth:
    raise ConfigError(
      f"model {model!r}: decoder_channels has {len(channels)} entries but encoder_depth="
      f"{depth}; give one per encoder stage"
    )
  return tuple(scaled(c, wm) for c in channels)


class UnetPlusPlus(_SegModel):
  """smp ``UnetPlusPlus``: dense nested skips; ``decoder_channels`` default (256, 128, 64, 32, 16)."""

  decoder_channels: Sequence[int] | None = None
  model_name = "unet_plusplus"

  def _decoder(self):
    ch = _decoder_channels(
      self.decoder_channels, self.encoder_depth, self.width_multiplier, self.model_name
    )
    return UnetPlusPlusDecoder(ch, name="decoder")


class MAnet(_SegModel):
  """smp ``MAnet``: PAB centre + MFAB blocks; decoder (256, 128, 64, 32, 16), PAB 64 channels."""

  decoder_channels: Sequence[int] | None = None
  decoder_pab_channels: int = 64
  model_name = "manet"

  def _decoder(self):
    ch = _decoder_channels(
      self.decoder_channels, self.encoder_depth, self.width_multiplier, self.model_name
    )
    return MAnetDecoder(
      ch, scaled(self.decoder_pab_channels, self.width_multiplier), name="decoder"
    )


class FPN(_SegModel):
  """smp ``FPN``: pyramid 256, segmentation 128 channels, 'add' merge, Dropout2d 0.2, 1x1 head."""

  decoder_pyramid_channels: int = 256
  decoder_segmentation_channels: int = 128
  decoder_merge_policy: str = "add"
  decoder_dropout: float = 0.2
  model_name = "fpn"
  head_kernel = 1
  min_depth = 3

  def _decoder(self):
    wm = self.width_multiplier
    return FPNDecoder(
      scaled(self.decoder_pyramid_channels, wm),
      scaled(self.decoder_segmentation_channels, wm),
      self.decoder_dropout,
      self.decoder_merge_policy,
      name="decoder",
    )


class PAN(_SegModel):
  """smp ``PAN``: encoder output stride 16 (dilated last stage), FPA + GAU, 32 decoder channels.

  Inputs smaller than ``8 * 16`` (depth >= 4) are zero-padded symmetrically to that size and
  the logits cropped back (smp cannot run them).
  """

  decoder_channels: int = 32
  encoder_output_stride: int = 16
  model_name = "pan"
  min_depth = 3

  @property
  def output_stride(self) -> int:  # type: ignore[override]
    if self.encoder_output_stride not in (16, 32):
      raise ConfigError(
        f"model 'pan': encoder_output_stride={self.encoder_output_stride}; use 16 or 32"
      )
    return self.encoder_output_stride

  def _decoder(self):
    return PANDecoder(scaled(self.decoder_channels, self.width_multiplier), name="decoder")

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    self._check(image)
    y, x = image.shape[1:3]
    deepest = min(self.output_stride, 2**self.encoder_depth)
    need = 8 * deepest  # the FPA block max-pools the deepest map three times
    py, px = max(0, need - y), max(0, need - x)
    padded = jnp.pad(image, ((0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2), (0, 0)))
    feats = self._features(padded, train)
    h = self._decoder()(feats, train=train)
    logits = SegmentationHead(self.num_classes, self.head_kernel, name="head")(h, padded.shape[1:3])
    logits = logits[:, py // 2 : py // 2 + y, px // 2 : px // 2 + x]
    return {"logits": logits.astype(jnp.float32)}


class PSPNet(_SegModel):
  """smp ``PSPNet``: encoder_depth 3, pyramid pooling (1, 2, 3, 6), 512 channels, Dropout2d 0.2."""

  encoder_depth: int = 3
  psp_out_channels: int = 512
  psp_dropout: float = 0.2
  model_name = "pspnet"

  def _decoder(self):
    return PSPDecoder(
      scaled(self.psp_out_channels, self.width_multiplier), self.psp_dropout, name="decoder"
    )


def _factory(cls):
  def make(**kwargs):
    """Builds the model; ConfigError for dims != 2 or an unknown kwarg, UnknownNameError for an
    unknown encoder."""
    check_dims(kwargs.get("dims", 2), (2,), cls.model_name)
    ENCODERS[kwargs.get("encoder_name", "resnet18")]
    known = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
      raise ConfigError(
        f"model {cls.model_name!r} has no argument {unknown[0]!r}; known: {', '.join(known)}"
      )
    return cls(**kwargs)

  make.__name__ = cls.model_name
  make.__doc__ = f"``MODELS[{cls.model_name!r}]``: {cls.__name__}(**kwargs) (module docstring)."
  return make


unet_plusplus = _factory(UnetPlusPlus)
manet = _factory(MAnet)
fpn = _factory(FPN)
pan = _factory(PAN)
pspnet = _factory(PSPNet)
