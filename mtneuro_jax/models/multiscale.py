"""The ICIP 2021 multi-scale models: Double U-Net and its baselines (U-Net, MT U-Net, SegNet).

Paper: "Multi-scale modeling of neural structure in X-ray imagery" (ICIP 2021). All models
here are 2D, channel-last: input ``[B, Y, X, 1]``; outputs follow the deployment contract
(docs/CONTRACTS.md): ``'logits'`` ``[B, Y, X, C]`` pixel logits, ``'region_logits'`` ``[B, R]``
(R = 4 regions, ``spec.REGIONS`` order CTX, STR, VP, ZI) where the model has a region branch,
``'reconstruction'`` ``[B, Y, X, 1]`` (Double U-Net only). Models know nothing of losses.

Blocks (the paper's facts; docs/icip.md lists what it leaves open and what we chose):

* ``ResBlock``: conv 3x3 -> BatchNorm -> leaky ReLU (0.01) -> conv 1x1 -> BatchNorm, plus
  the input (a 1x1 projection when the width changes), then leaky ReLU.
* encoder: ``n_blocks`` ResBlocks of widths ``f0 * 2**i``, 2x **average** pooling between
  them (``n_blocks - 1`` pools); decoder: transposed conv k2 s2, concat the skip, ResBlock.
* ``PBlock`` (the projection head of the classification branch): conv 5x5 (valid) -> leaky
  -> conv 4x4 (valid) -> leaky -> conv 1x1 to R logits, then the mean over the positions
  left (an 8x8 latent leaves exactly one, the paper's 128x128 input with 4 poolings).

Models (``MODELS`` names):

* ``res_unet``: the Double U-Net's U-Net alone (the paper's "U-Net" baseline):
  params ``encoder``, ``decoder``, ``head``.
* ``double_unet``: that U-Net plus a second encoder (the classification branch,
  params ``class_branch/{encoder, head}``) whose deepest feature map is concatenated to
  the U-Net's bottleneck before the decoder; ``region_logits`` come from the branch's
  P-block, ``reconstruction`` from a 1x1 ``recon_head`` beside the pixel ``head``.
  ``freeze_class_branch=True`` (step 2) runs the branch in inference mode (BatchNorm
  running statistics, nothing mutated) behind a stop-gradient, so ``optim.freeze =
  ('^class_branch/',)`` leaves it bitwise unchanged.
* ``mt_unet``: hard sharing (Y-Net style): the U-Net plus a P-block ``region_head`` on its
  own bottleneck.
* ``unet_encoder``: the classification branch alone (the paper's "U-Net encoder" macro
  baseline): params ``class_branch/{encoder, head}``; ``{'logits': [B, R], 'region_logits'}``.
* ``segnet``: encoder of (conv 3x3 -> BN -> ReLU) x ``convs_per_block`` stages with 2x max
  pooling that remembers the argmax; decoder unpools to those positions (SegNet's
  index unpooling), then the same convs; params ``encoder``, ``decoder``, ``head``.

Sizes: ``start_filters`` (32) x ``width_multiplier``; the U-Net models need every spatial
size divisible by ``2 ** (n_blocks - 1)`` and a bottleneck of at least 8x8 where a P-block
reads it (128x128 with n_blocks 5, 64x64 with n_blocks 4); SegNet needs divisibility by
``2 ** n_blocks``. A misfit raises ``ConfigError``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtneuro_jax.errors import ConfigError
from mtneuro_jax.models import seg_blocks as sb

LEAKY_SLOPE = 0.01  # the paper's leaky ReLU
NUM_REGIONS = 4  # spec.REGIONS: CTX, STR, VP, ZI
P_BLOCK_MIN = 8  # 5x5 valid then 4x4 valid need an 8x8 latent at least


def _leaky(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


def _conv(features: int, k: int, *, padding="same", dtype=jnp.float32, name=None) -> nn.Conv:
  return sb.conv(features, k, dims=2, padding=padding, dtype=dtype, name=name)


def _bn(train: bool, name: str, dtype=jnp.float32) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
  )


class ResBlock(nn.Module):
  """``x [B, Y, X, C_in] -> [B, Y, X, features]``: conv3 -> BN -> leaky -> conv1 -> BN, + skip."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    h = _conv(self.features, 3, dtype=self.dtype, name="conv3")(x)
    h = _leaky(_bn(train, "norm3", self.dtype)(h))
    h = _conv(self.features, 1, dtype=self.dtype, name="conv1")(h)
    h = _bn(train, "norm1", self.dtype)(h)
    skip = x
    if x.shape[-1] != self.features:
      skip = _conv(self.features, 1, dtype=self.dtype, name="proj")(x)
    return _leaky(h + skip)


class ResEncoder(nn.Module):
  """ResBlocks of widths ``filters`` with 2x average pooling between them; returns the
  feature map of every block ``[B, Y / 2**i, X / 2**i, filters[i]]``, deepest last."""

  filters: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    skips = []
    for i, f in enumerate(self.filters):
      if i:
        x = sb.pool(x, dims=2, kind="avg")
      x = ResBlock(f, dtype=self.dtype, name=f"block{i}")(x, train=train)
      skips.append(x)
    return skips


class ResDecoder(nn.Module):
  """From ``bottleneck`` up: per level a transposed conv (k2 s2), concat the skip, a ResBlock.

  ``skips`` are the encoder's maps (deepest last, unused here: ``bottleneck`` replaces it,
  e.g. with the class latent concatenated); returns ``[B, Y, X, filters[0]]``."""

  filters: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bottleneck: jax.Array, skips: Sequence[jax.Array], *, train: bool):
    x = bottleneck
    for i in range(len(self.filters) - 1):
      f = self.filters[-(i + 2)]
      up = sb.up_conv(f, dims=2, dtype=self.dtype, name=f"up{i}")(x)
      x = jnp.concatenate([up, skips[-(i + 2)].astype(up.dtype)], axis=-1)
      x = ResBlock(f, dtype=self.dtype, name=f"block{i}")(x, train=train)
    return x


class PBlock(nn.Module):
  """The projection head: ``latent [B, h, w, C]`` (h, w >= 8) -> logits ``[B, num_outputs]``."""

  features: int
  num_outputs: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _leaky(_conv(self.features, 5, padding="valid", dtype=self.dtype, name="conv5")(x))
    x = _leaky(_conv(self.features, 4, padding="valid", dtype=self.dtype, name="conv4")(x))
    x = _conv(self.num_outputs, 1, dtype=self.dtype, name="conv1")(x)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


class ClassBranch(nn.Module):
  """The classification encoder + P-block: ``image -> (latent [B, h, w, C], logits [B, R])``."""

  filters: Sequence[int]
  num_regions: int = NUM_REGIONS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool):
    latent = ResEncoder(self.filters, dtype=self.dtype, name="encoder")(image, train=train)[-1]
    logits = PBlock(self.filters[-1], self.num_regions, dtype=self.dtype, name="head")(latent)
    return latent, logits


def _check_input(image: jax.Array, n_pools: int, model: str, p_block: bool) -> None:
  if image.ndim != 4:
    raise ConfigError(
      f"{model} is 2D and needs images [B, Y, X, C]; got shape {tuple(image.shape)}: "
      "use a 2D task (task2_2d_*)"
    )
  k = 2**n_pools
  if any(s % k for s in image.shape[1:3]):
    raise ConfigError(
      f"{model} input size {tuple(image.shape[1:3])} is not divisible by {k} ({n_pools} "
      f"poolings); use tiles that are a multiple of {k} or fewer n_blocks"
    )
  if p_block and min(image.shape[1:3]) // k < P_BLOCK_MIN:
    raise ConfigError(
      f"{model}: a {tuple(image.shape[1:3])} input leaves a "
      f"{min(image.shape[1:3]) // k}x{min(image.shape[1:3]) // k} latent after {n_pools} "
      f"poolings, but the P-block (5x5 then 4x4 valid convs) needs at least "
      f"{P_BLOCK_MIN}x{P_BLOCK_MIN}; use fewer n_blocks (128x128: 5, 64x64: 4)"
    )


def _filters(start_filters: int, width_multiplier: float, n_blocks: int) -> tuple[int, ...]:
  if n_blocks < 2:
    raise ConfigError(f"n_blocks={n_blocks}; use n_blocks >= 2")
  f0 = sb.scaled(start_filters, width_multiplier)
  return tuple(f0 * 2**i for i in range(n_blocks))


class ResUNet(nn.Module):
  """Residual U-Net (``res_unet``), optionally with a region P-block on its bottleneck
  (``region_head=True``: the MT U-Net, ``mt_unet``).

  ``__call__(image [B, Y, X, 1], *, train) -> {'logits': [B, Y, X, num_classes]}`` float32,
  plus ``'region_logits': [B, num_regions]`` with the region head.
  """

  num_classes: int
  dims: int = 2
  width_multiplier: float = 1.0
  n_blocks: int = 5
  start_filters: int = 32
  region_head: bool = False
  num_regions: int = NUM_REGIONS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    name = "mt_unet" if self.region_head else "res_unet"
    sb.check_dims(self.dims, (2,), name)
    filters = _filters(self.start_filters, self.width_multiplier, self.n_blocks)
    _check_input(image, self.n_blocks - 1, name, self.region_head)
    x = image.astype(self.dtype)
    skips = ResEncoder(filters, dtype=self.dtype, name="encoder")(x, train=train)
    y = ResDecoder(filters, dtype=self.dtype, name="decoder")(skips[-1], skips, train=train)
    out = {"logits": _conv(self.num_classes, 1, dtype=self.dtype, name="head")(y)}
    out["logits"] = out["logits"].astype(jnp.float32)
    if self.region_head:
      out["region_logits"] = PBlock(
        filters[-1], self.num_regions, dtype=self.dtype, name="region_head"
      )(skips[-1])
    return out


class DoubleUNet(nn.Module):
  """Double U-Net (``double_unet``): the residual U-Net + a classification branch whose latent
  joins the U-Net's bottleneck.

  ``__call__(image [B, Y, X, 1], *, train) -> {'logits': [B, Y, X, num_classes],
  'region_logits': [B, num_regions], 'reconstruction': [B, Y, X, 1]}`` float32.
  Params: ``encoder``, ``decoder``, ``head``, ``recon_head`` (the U-Net branch) and
  ``class_branch/{encoder, head}``; batch_stats likewise. ``freeze_class_branch`` (step 2):
  the branch runs with ``train=False`` (running statistics, nothing updated) and its outputs
  are stop-gradient, whatever ``train`` is.
  """

  num_classes: int
  dims: int = 2
  width_multiplier: float = 1.0
  n_blocks: int = 5
  start_filters: int = 32
  num_regions: int = NUM_REGIONS
  freeze_class_branch: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    sb.check_dims(self.dims, (2,), "double_unet")
    filters = _filters(self.start_filters, self.width_multiplier, self.n_blocks)
    _check_input(image, self.n_blocks - 1, "double_unet", True)
    x = image.astype(self.dtype)
    branch = ClassBranch(filters, self.num_regions, dtype=self.dtype, name="class_branch")
    latent, region_logits = branch(x, train=train and not self.freeze_class_branch)
    if self.freeze_class_branch:
      latent, region_logits = jax.lax.stop_gradient((latent, region_logits))
    skips = ResEncoder(filters, dtype=self.dtype, name="encoder")(x, train=train)
    bottleneck = jnp.concatenate([skips[-1], latent.astype(skips[-1].dtype)], axis=-1)
    y = ResDecoder(filters, dtype=self.dtype, name="decoder")(bottleneck, skips, train=train)
    logits = _conv(self.num_classes, 1, dtype=self.dtype, name="head")(y)
    recon = _conv(1, 1, dtype=self.dtype, name="recon_head")(y)
    return {
      "logits": logits.astype(jnp.float32),
      "region_logits": region_logits,
      "reconstruction": recon.astype(jnp.float32),
    }


class UNetEncoderClassifier(nn.Module):
  """The classification branch alone (``unet_encoder``): ``image [B, Y, X, 1] ->
  {'logits': [B, R], 'region_logits': [B, R]}`` (the same array: a classifier by the
  deployment contract, and the region output the macro evaluator reads)."""

  num_classes: int = NUM_REGIONS
  dims: int = 2
  width_multiplier: float = 1.0
  n_blocks: int = 5
  start_filters: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    sb.check_dims(self.dims, (2,), "unet_encoder")
    filters = _filters(self.start_filters, self.width_multiplier, self.n_blocks)
    _check_input(image, self.n_blocks - 1, "unet_encoder", True)
    branch = ClassBranch(filters, self.num_classes, dtype=self.dtype, name="class_branch")
    _, logits = branch(image.astype(self.dtype), train=train)
    return {"logits": logits, "region_logits": logits}


# ---------------------------------------------------------------------------
# SegNet.
def max_pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2x2 max pooling of ``x [B, Y, X, C]`` (Y, X even) -> (pooled [B, Y/2, X/2, C], where
  [B, Y/2, X/2, C, 4] one-hot float of the window position that won, row-major, first max)."""
  b, y, x_, c = x.shape
  w = (
    x.reshape(b, y // 2, 2, x_ // 2, 2, c)
    .transpose(0, 1, 3, 5, 2, 4)
    .reshape(b, y // 2, x_ // 2, c, 4)
  )
  idx = jnp.argmax(w, axis=-1)
  where = jax.nn.one_hot(idx, 4, dtype=x.dtype)
  return jnp.max(w, axis=-1), jax.lax.stop_gradient(where)


def max_unpool(x: jax.Array, where: jax.Array) -> jax.Array:
  """Puts ``x [B, h, w, C]`` back at the positions ``where [B, h, w, C, 4]`` recorded;
  zeros elsewhere -> ``[B, 2h, 2w, C]`` (SegNet's index unpooling)."""
  b, h, w, c = x.shape
  y = x[..., None] * where.astype(x.dtype)
  return y.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c)


class _ConvBNReLU(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = _conv(self.features, 3, dtype=self.dtype, name="conv")(x)
    return nn.relu(_bn(train, "norm", self.dtype)(x))


class SegNet(nn.Module):
  """SegNet (``segnet``): ``image [B, Y, X, 1] -> {'logits': [B, Y, X, num_classes]}``.

  ``n_blocks`` encoder stages of widths ``f0 * 2**i`` (each ``convs_per_block`` conv-BN-ReLU,
  then 2x2 max pooling with remembered argmax), the mirrored decoder (unpool to the
  remembered positions, convs; a stage's last conv narrows to the next stage's width), a
  1x1 ``head``. Params ``encoder``, ``decoder``, ``head``.
  """

  num_classes: int
  dims: int = 2
  width_multiplier: float = 1.0
  n_blocks: int = 4
  start_filters: int = 32
  convs_per_block: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    sb.check_dims(self.dims, (2,), "segnet")
    filters = _filters(self.start_filters, self.width_multiplier, self.n_blocks)
    _check_input(image, self.n_blocks, "segnet", False)
    x = image.astype(self.dtype)
    enc = _SegNetEncoder(filters, self.convs_per_block, dtype=self.dtype, name="encoder")
    x, wheres = enc(x, train=train)
    dec = _SegNetDecoder(filters, self.convs_per_block, dtype=self.dtype, name="decoder")
    x = dec(x, wheres, train=train)
    logits = _conv(self.num_classes, 1, dtype=self.dtype, name="head")(x)
    return {"logits": logits.astype(jnp.float32)}


class _SegNetEncoder(nn.Module):
  filters: Sequence[int]
  convs_per_block: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    wheres = []
    for i, f in enumerate(self.filters):
      for j in range(self.convs_per_block):
        x = _ConvBNReLU(f, dtype=self.dtype, name=f"block{i}_{j}")(x, train=train)
      x, where = max_pool_with_argmax(x)
      wheres.append(where)
    return x, wheres


class _SegNetDecoder(nn.Module):
  filters: Sequence[int]
  convs_per_block: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, wheres, *, train: bool):
    n = len(self.filters)
    for i in range(n):
      level = n - 1 - i
      x = max_unpool(x, wheres[level])
      for j in range(self.convs_per_block):
        last = j == self.convs_per_block - 1
        f = self.filters[max(level - 1, 0)] if last else self.filters[level]
        x = _ConvBNReLU(f, dtype=self.dtype, name=f"block{i}_{j}")(x, train=train)
    return x


# ---------------------------------------------------------------------------
# Registry factories: MODELS[name](**config.model).
def res_unet(**kwargs) -> ResUNet:
  """The Double U-Net's residual U-Net alone (``ResUNet``; the paper's "U-Net")."""
  return ResUNet(**{**kwargs, "region_head": False})


def mt_unet(**kwargs) -> ResUNet:
  """MT U-Net: the residual U-Net + a region P-block on the shared bottleneck."""
  return ResUNet(**{**kwargs, "region_head": True})


def double_unet(**kwargs) -> DoubleUNet:
  """``DoubleUNet(**kwargs)``: num_classes, dims (2), width_multiplier, n_blocks,
  start_filters, num_regions, freeze_class_branch, dtype."""
  return DoubleUNet(**kwargs)


def unet_encoder(**kwargs) -> UNetEncoderClassifier:
  """The classification branch alone as a region classifier (``num_classes`` regions)."""
  return UNetEncoderClassifier(**kwargs)


def segnet(**kwargs) -> SegNet:
  """``SegNet(**kwargs)``: num_classes, dims (2), width_multiplier, n_blocks, start_filters,
  convs_per_block, dtype."""
  return SegNet(**kwargs)
