"""The MTNeuro reference U-Net (2D or 3D by ``dims``) in Flax, channel-last.

Reference: ``MTNeuro/models/unet.py``, adapted from johschmidt42's
PyTorch-2D-3D-UNet-Tutorial (MIT). Architecture, with the reference's defaults
(``n_blocks=4``, ``start_filters=32`` -> encoder widths 32/64/128/256):

* encoder block i: conv3 -> act -> norm -> conv3 -> act -> norm (activation *before*
  normalisation, as the reference), then 2x max-pool except in the last block
  (3 pools for 4 blocks);
* decoder block: transposed conv (k2 s2, halves the channels) -> act -> norm,
  centre-crop of the encoder skip to the up-sampled size, concat [up, skip],
  conv3 -> act -> norm -> conv3 -> act -> norm;
* head: 1x1 conv to ``num_classes`` logits;
* init: xavier-uniform weights, zero biases for every conv and transposed conv.

Parameter counts (``params`` only, as PyTorch's ``parameters()``; BN scale+bias
count, running stats live in ``batch_stats``): 2D 1,971,620 (4 classes) /
1,971,587 (3); 3D 5,646,308 (4) / 5,646,275 (3). These include the decoder's
1x1 ``conv0`` that the reference creates in every up-block but only *uses* when
``up_mode != 'transposed'``; we keep its parameters (created at init, never
applied, so they get zero gradients) so counts and state_dicts match the reference.

Input size: with ``conv_mode='same'`` every spatial size must be divisible by
``2 ** (n_blocks - 1)`` (8 for the defaults), otherwise a ConfigError is raised
(the reference would silently return a smaller, centre-cropped map). A 3D
8-slice window is pooled to depth 1 at the bottom, which works (3x3x3 convs pad
it). ``conv_mode='valid'`` (unpadded convs) returns the reference's smaller
centre output, NOT the input's size; it is there for fidelity only.

Fidelity notes: BatchNorm eps 1e-5, PyTorch momentum 0.1 (Flax 0.9); PyTorch
updates ``running_var`` with the unbiased batch variance, Flax with the biased
one (factor n/(n-1), n = B * voxels >= 65536 here). Non-transposed ``up_mode``
uses ``jax.image.resize`` (half-pixel centres == PyTorch ``align_corners=False``;
'bicubic' uses Keys a=-0.5 where PyTorch uses a=-0.75).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtneuro_jax.errors import ConfigError
from mtneuro_jax.models import seg_blocks as sb

UP_MODES = ("transposed", "nearest", "linear", "bilinear", "bicubic", "trilinear")
CONV_MODES = ("same", "valid")


class DownBlock(nn.Module):
  """conv3 -> act -> norm, twice; then 2x max-pool if ``pooling``.

  ``__call__(x [B, *spatial, C_in], *, train) -> (y, before_pool)`` with
  ``before_pool [B, *spatial', features]`` (the skip) and ``y`` its pooled version.
  """

  features: int
  dims: int
  pooling: bool = True
  activation: str = "relu"
  normalization: str | None = "batch"
  conv_mode: str = "same"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    act = sb.activation(self.activation)
    for i in (1, 2):
      x = sb.conv(
        self.features, 3, dims=self.dims, padding=self.conv_mode, dtype=self.dtype, name=f"conv{i}"
      )(x)
      x = sb.Norm(self.normalization, dtype=self.dtype, name=f"norm{i}")(act(x), train=train)
    skip = x
    if self.pooling:
      x = sb.pool(x, dims=self.dims, kind="max")
    return x, skip


class UpBlock(nn.Module):
  """Up-sample x2 -> act -> norm, crop the skip, concat [up, skip], (conv3 -> act -> norm) x 2.

  ``__call__(skip [B, *s_skip, features], x [B, *s, C_in], *, train)
  -> [B, *(2 * s), features]`` (the skip is centre-cropped to ``2 * s``).
  """

  features: int
  dims: int
  activation: str = "relu"
  normalization: str | None = "batch"
  conv_mode: str = "same"
  up_mode: str = "transposed"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, skip: jax.Array, x: jax.Array, *, train: bool) -> jax.Array:
    act = sb.activation(self.activation)
    conv0 = sb.conv(self.features, 1, dims=self.dims, dtype=self.dtype, name="conv0")
    if self.up_mode == "transposed":
      up = sb.up_conv(self.features, dims=self.dims, dtype=self.dtype, name="up")(x)
      if self.is_initializing():
        # The reference builds conv0 in every block and uses it only for interpolation
        # up-sampling; create its parameters so counts and state_dicts match it.
        conv0(jnp.zeros((1,) + (1,) * self.dims + (x.shape[-1],), x.dtype))
    else:
      method = {"bilinear": "linear", "trilinear": "linear"}.get(self.up_mode, self.up_mode)
      shape = (x.shape[0], *(2 * s for s in x.shape[1:-1]), x.shape[-1])
      up = conv0(jax.image.resize(x, shape, method=method))
    skip = sb.center_crop(skip, up.shape[1:-1])
    up = sb.Norm(self.normalization, dtype=self.dtype, name="norm0")(act(up), train=train)
    y = jnp.concatenate([up, skip.astype(up.dtype)], axis=-1)
    for i in (1, 2):
      y = sb.conv(
        self.features, 3, dims=self.dims, padding=self.conv_mode, dtype=self.dtype, name=f"conv{i}"
      )(y)
      y = sb.Norm(self.normalization, dtype=self.dtype, name=f"norm{i}")(act(y), train=train)
    return y


class UNetEncoder(nn.Module):
  """``n_blocks`` DownBlocks of widths ``filters[i]``; returns the skips, deepest last."""

  filters: Sequence[int]
  dims: int
  activation: str = "relu"
  normalization: str | None = "batch"
  conv_mode: str = "same"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    skips = []
    n = len(self.filters)
    for i, f in enumerate(self.filters):
      x, skip = DownBlock(
        f,
        self.dims,
        pooling=i < n - 1,
        activation=self.activation,
        normalization=self.normalization,
        conv_mode=self.conv_mode,
        dtype=self.dtype,
        name=f"block{i}",
      )(x, train=train)
      skips.append(skip)
    return skips


class UNetDecoder(nn.Module):
  """``len(filters) - 1`` UpBlocks, widths ``filters[-2], ..., filters[0]``."""

  filters: Sequence[int]
  dims: int
  activation: str = "relu"
  normalization: str | None = "batch"
  conv_mode: str = "same"
  up_mode: str = "transposed"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, skips: Sequence[jax.Array], *, train: bool) -> jax.Array:
    x = skips[-1]
    for i in range(len(self.filters) - 1):
      x = UpBlock(
        self.filters[-(i + 2)],
        self.dims,
        activation=self.activation,
        normalization=self.normalization,
        conv_mode=self.conv_mode,
        up_mode=self.up_mode,
        dtype=self.dtype,
        name=f"block{i}",
      )(skips[-(i + 2)], x, train=train)
    return x


class UNet(nn.Module):
  """U-Net: ``__call__(image, *, train) -> {'logits': [B, *spatial, num_classes]}`` float32.

  ``image``: ``[B, Y, X, C_in]`` (dims=2) or ``[B, Z, Y, X, C_in]`` (dims=3), any C_in.
  Each spatial size must be divisible by ``2 ** (n_blocks - 1)`` in 'same' mode (module
  doc); the logits then have the input's spatial size.
  Variables: params {'encoder': {'block<i>': ...}, 'decoder': {'block<i>': ...}, 'head'},
  batch_stats {'encoder', 'decoder'} (BatchNorm running stats, used when not ``train``).
  Options as the reference: ``activation`` relu|leaky|elu, ``normalization``
  batch|instance|group<N>|none, ``conv_mode`` same|valid, ``up_mode`` transposed|nearest|
  linear|bilinear|bicubic|trilinear. ``width_multiplier`` scales ``start_filters``.
  """

  num_classes: int
  dims: int = 2
  width_multiplier: float = 1.0
  n_blocks: int = 4
  start_filters: int = 32
  activation: str = "relu"
  normalization: str | None = "batch"
  conv_mode: str = "same"
  up_mode: str = "transposed"
  dtype: Any = jnp.float32

  @property
  def filters(self) -> tuple[int, ...]:
    f0 = sb.scaled(self.start_filters, self.width_multiplier)
    return tuple(f0 * 2**i for i in range(self.n_blocks))

  def _check(self, image: jax.Array) -> None:
    sb.check_dims(self.dims, (2, 3), "unet")
    if self.n_blocks < 1:
      raise ConfigError(f"unet n_blocks={self.n_blocks}; use n_blocks >= 1 (reference: 4)")
    if self.conv_mode not in CONV_MODES:
      raise ConfigError(f"unknown unet conv_mode {self.conv_mode!r}; use one of {CONV_MODES}")
    if self.up_mode not in UP_MODES:
      raise ConfigError(f"unknown unet up_mode {self.up_mode!r}; use one of {UP_MODES}")
    sb.activation(self.activation)  # raises on an unknown name
    if image.ndim != self.dims + 2:
      raise ConfigError(
        f"unet with dims={self.dims} needs images [B, {'Z, ' if self.dims == 3 else ''}Y, X, C]; "
        f"got shape {tuple(image.shape)}: set config.model.dims to match the data"
      )
    k = 2 ** (self.n_blocks - 1)
    if self.conv_mode == "same" and any(s % k for s in image.shape[1:-1]):
      raise ConfigError(
        f"unet input spatial size {tuple(image.shape[1:-1])} is not divisible by {k} "
        f"(2**(n_blocks-1), n_blocks={self.n_blocks}); crop or pad the tiles to a multiple of {k}"
      )

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    self._check(image)
    kw = dict(
      dims=self.dims,
      activation=self.activation,
      normalization=self.normalization,
      conv_mode=self.conv_mode,
      dtype=self.dtype,
    )
    skips = UNetEncoder(self.filters, name="encoder", **kw)(image.astype(self.dtype), train=train)
    x = UNetDecoder(self.filters, up_mode=self.up_mode, name="decoder", **kw)(skips, train=train)
    logits = sb.conv(self.num_classes, 1, dims=self.dims, dtype=self.dtype, name="head")(x)
    return {"logits": logits.astype(jnp.float32)}


def unet(**kwargs) -> UNet:
  """``UNet(**kwargs)``: num_classes, dims (2|3), width_multiplier, n_blocks, start_filters,
  activation, normalization, conv_mode, up_mode, dtype (see ``UNet``).

  Raises ConfigError at construction for a dims other than 2 or 3."""
  sb.check_dims(kwargs.get("dims", 2), (2, 3), "unet")
  return UNet(**kwargs)
