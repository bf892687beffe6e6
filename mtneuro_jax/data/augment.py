"""On-device augmentation for self-supervised views: pure JAX functions of (images, rng).

Everything here runs inside the jitted train step on batches that are already
normalised by the host pipeline ((x - image_mean) / image_std), so a crop of a
normalised tile equals the normalised crop (the reference normalises after
cropping). Randomness comes only from the explicit ``rng``; per-sample draws
use ``jax.random.split(rng, B)``, so the result does not depend on how the batch
is sharded.

Images are [B, Y, X, C] (2D) float32.

Paired geometric augmentation for segmentation (``PairedAugmentConfig``,
``paired_augment``): random flips, in-plane rot90 and, for 3D, a z-flip, drawn
once per sample and applied identically to the image and its mask (the reference
draws them separately for image and mask, which misaligns the pair).

Views of the MTNeuro SSL recipe: two random crops of half the tile's height and
width (the reference: 128x128 of 256x256), independently placed per sample by
default (``per_sample=False`` reproduces the reference's one offset shared by
the whole batch). Intensity augmentations suited to X-ray microtomography
(brightness, contrast, gamma, Gaussian blur, Gaussian noise) are options, all
off by default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from mtneuro_jax.errors import ConfigError


def _known_options(cls, cfg: Any, what: str, hint: str = "") -> dict:
  """``cfg`` (ConfigDict or mapping) as a dict, refusing keys that are not fields of ``cls``."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  known = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(d) - set(known))
  if unknown:
    raise ConfigError(f"unknown {what} option(s) {unknown}; known: {known}{hint}")
  return d


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """How one view is drawn (``ViewConfig.from_config(config.objective.views)``).

  crop_fraction: crop side as a fraction of the tile's side (0.5 = the reference's 128 of 256).
  per_sample: independent crop offsets per sample (False = one offset for the whole batch).
  brightness: max |additive shift| in normalised units (0 = off).
  contrast: max relative contrast change, factor in [1 - c, 1 + c] about the view's mean (0 = off).
  gamma: max |log gamma|; applied to the [0, 1] intensities recovered with image_mean/std (0 = off).
  blur_sigma: max Gaussian blur sigma in pixels, drawn in [0, blur_sigma] (0 = off).
  noise_std: Gaussian noise std in normalised units (0 = off).
  image_mean, image_std: the host normalisation (only gamma needs them).
  """

  crop_fraction: float = 0.5
  per_sample: bool = True
  brightness: float = 0.0
  contrast: float = 0.0
  gamma: float = 0.0
  blur_sigma: float = 0.0
  noise_std: float = 0.0
  image_mean: float = 0.4894
  image_std: float = 0.1238

  @classmethod
  def from_config(cls, cfg: Any | None) -> ViewConfig:
    if cfg is None:
      return cls()
    out = cls(**_known_options(cls, cfg, "view"))
    if not 0.0 < out.crop_fraction <= 1.0:
      raise ConfigError(f"views.crop_fraction={out.crop_fraction} must be in (0, 1]")
    return out


def crop_size(image_shape: tuple[int, ...], fraction: float) -> tuple[int, int]:
  """(h, w) of a crop of ``fraction`` of the [.., Y, X, C] tile's sides (at least 1 pixel)."""
  y, x = image_shape[-3], image_shape[-2]
  return max(1, int(round(y * fraction))), max(1, int(round(x * fraction)))


def random_crops(
  images: jax.Array, rng: jax.Array, size: tuple[int, int], *, per_sample: bool = True
) -> jax.Array:
  """Random crops: [B, Y, X, C] -> [B, h, w, C], offsets uniform over every valid position."""
  b, y, x, c = images.shape
  h, w = size
  if h > y or w > x:
    raise ConfigError(f"crop {h}x{w} is larger than the {y}x{x} tile")
  if per_sample:
    keys = jax.random.split(rng, b)
    oy = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, y - h + 1))(keys)
    ox = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, x - w + 1))(keys)
  else:
    oy = jnp.broadcast_to(jax.random.randint(jax.random.fold_in(rng, 0), (), 0, y - h + 1), (b,))
    ox = jnp.broadcast_to(jax.random.randint(jax.random.fold_in(rng, 1), (), 0, x - w + 1), (b,))
  crop = lambda img, a, o: jax.lax.dynamic_slice(img, (a, o, 0), (h, w, c))  # noqa: E731
  return jax.vmap(crop)(images, oy, ox)


def _gaussian_blur(images: jax.Array, sigma: jax.Array, max_sigma: float) -> jax.Array:
  """Separable Gaussian blur per sample: images [B, Y, X, C], sigma [B] (>= 0)."""
  radius = max(1, math.ceil(3 * max_sigma))
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  s = jnp.maximum(sigma, 1e-3)[:, None]
  k = jnp.exp(-0.5 * (t[None] / s) ** 2)
  k = k / k.sum(-1, keepdims=True)  # [B, K]

  def blur_one(img, kern):  # img [Y, X, C]
    pad = jnp.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = jax.vmap(lambda col: jnp.convolve(col, kern, mode="valid"), in_axes=1, out_axes=1)
    cols = jax.vmap(lambda row: jnp.convolve(row, kern, mode="valid"), in_axes=0, out_axes=0)
    out = jax.vmap(lambda ch: cols(rows(ch)), in_axes=-1, out_axes=-1)(pad)
    return out

  return jax.vmap(blur_one)(images, k)


def intensity_augment(images: jax.Array, rng: jax.Array, cfg: ViewConfig) -> jax.Array:
  """Brightness, contrast, gamma, blur and noise per sample, each only if its option is > 0."""
  b = images.shape[0]
  kb, kc, kg, ks, kn = jax.random.split(rng, 5)
  bshape = (b,) + (1,) * (images.ndim - 1)
  if cfg.gamma > 0:
    unit = jnp.clip(images * cfg.image_std + cfg.image_mean, 0.0, 1.0)
    g = jnp.exp(jax.random.uniform(kg, bshape, minval=-cfg.gamma, maxval=cfg.gamma))
    images = (unit**g - cfg.image_mean) / cfg.image_std
  if cfg.contrast > 0:
    f = jax.random.uniform(kc, bshape, minval=1 - cfg.contrast, maxval=1 + cfg.contrast)
    mean = images.mean(axis=tuple(range(1, images.ndim)), keepdims=True)
    images = (images - mean) * f + mean
  if cfg.brightness > 0:
    images = images + jax.random.uniform(kb, bshape, minval=-cfg.brightness, maxval=cfg.brightness)
  if cfg.blur_sigma > 0:
    sigma = jax.random.uniform(ks, (b,), minval=0.0, maxval=cfg.blur_sigma)
    images = _gaussian_blur(images, sigma, cfg.blur_sigma)
  if cfg.noise_std > 0:
    images = images + cfg.noise_std * jax.random.normal(kn, images.shape, images.dtype)
  return images


def make_view(images: jax.Array, rng: jax.Array, cfg: ViewConfig) -> jax.Array:
  """One augmented view of a batch: crop (per ``cfg``), then the intensity options."""
  k_crop, k_int = jax.random.split(rng)
  view = random_crops(
    images, k_crop, crop_size(images.shape, cfg.crop_fraction), per_sample=cfg.per_sample
  )
  return intensity_augment(view, k_int, cfg)


# ---------------------------------------------------------------------------
# Paired (image, mask) augmentation for segmentation.
@dataclasses.dataclass(frozen=True)
class PairedAugmentConfig:
  """Which geometric augmentations ``paired_augment`` draws (``from_config(config.objective.augment)``).

  flip: random flips of y and x, each with probability 1/2.
  rot90: a random multiple of 90 degrees in the (y, x) plane (needs square tiles).
  flip_z: for 3D, a random flip along z with probability 1/2 (ignored for 2D).
  All False = no augmentation (the reference's shipped configs).
  """

  flip: bool = True
  rot90: bool = True
  flip_z: bool = True

  @classmethod
  def from_config(cls, cfg: Any | None) -> PairedAugmentConfig:
    if cfg is None:
      return cls(flip=False, rot90=False, flip_z=False)
    d = _known_options(cls, cfg, "augment", hint=" (e.g. --config.objective.augment.flip=False)")
    return cls(**{k: bool(v) for k, v in d.items()})

  @property
  def any(self) -> bool:
    return self.flip or self.rot90 or self.flip_z


def _dihedral(
  x: jax.Array, flips: jax.Array, k: jax.Array, spatial: int, rotate: bool = True
) -> jax.Array:
  """One sample's transform; ``x``'s leading ``spatial`` axes are ([Z,] Y, X).

  flips bool [3] = (z, y, x) flips; k int32 [] rot90 count in the (y, x) plane. Applied as
  flips, then rot90, to any array whose leading axes are the spatial ones (image [.., C]
  and mask alike), so one draw moves both the same way. ``rotate`` False skips the rot90
  (non-square tiles).
  """
  ya, xa = spatial - 2, spatial - 1
  if spatial == 3:
    x = jnp.where(flips[0], jnp.flip(x, 0), x)
  x = jnp.where(flips[1], jnp.flip(x, ya), x)
  x = jnp.where(flips[2], jnp.flip(x, xa), x)
  if not rotate:
    return x
  rots = [functools.partial(jnp.rot90, k=i, axes=(ya, xa)) for i in range(4)]
  return jax.lax.switch(k, rots, x)


def draw_paired_params(
  rng: jax.Array, batch: int, cfg: PairedAugmentConfig, *, dims: int
) -> tuple[jax.Array, jax.Array]:
  """Per-sample draws: (flips bool [B, 3] = z, y, x; k int32 [B] in 0..3).

  One key per sample (``split(rng, B)``), so a sample's draw does not depend on the sharding.
  """
  keys = jax.random.split(rng, batch)

  def one(key):
    kf, kr = jax.random.split(key)
    f = jax.random.bernoulli(kf, 0.5, (3,))
    f = f & jnp.asarray([cfg.flip_z and dims == 3, cfg.flip, cfg.flip])
    k = jax.random.randint(kr, (), 0, 4) if cfg.rot90 else jnp.zeros((), jnp.int32)
    return f, k.astype(jnp.int32)

  return jax.vmap(one)(keys)


def paired_augment(
  image: jax.Array, mask: jax.Array, rng: jax.Array, cfg: PairedAugmentConfig
) -> tuple[jax.Array, jax.Array]:
  """The same random flips / rot90 / z-flip for an image batch and its mask batch.

  Args:
    image: float [B, Y, X, C] (2D) or [B, Z, Y, X, C] (3D).
    mask: int [B, Y, X] or [B, Z, Y, X] (the image's spatial shape).
    rng: the only source of randomness.
    cfg: which transforms to draw.

  Returns:
    (image, mask) of the input shapes; sample i of both moved by the same transform.
  """
  spatial = mask.ndim - 1
  if (
    spatial not in (2, 3) or image.shape[: spatial + 1] != mask.shape or image.ndim != mask.ndim + 1
  ):
    raise ConfigError(
      f"paired_augment needs image [B, (Z,) Y, X, C] and mask [B, (Z,) Y, X] of one spatial "
      f"shape, got {image.shape} and {mask.shape}; pass the batch's 'image' and 'mask'"
    )
  if not cfg.any:
    return image, mask
  if cfg.rot90 and mask.shape[-1] != mask.shape[-2]:
    raise ConfigError(
      f"rot90 needs square tiles, got {mask.shape[-2]}x{mask.shape[-1]}; "
      "set --config.objective.augment.rot90=False"
    )
  flips, k = draw_paired_params(rng, mask.shape[0], cfg, dims=spatial)
  move = jax.vmap(functools.partial(_dihedral, spatial=spatial, rotate=cfg.rot90))
  return move(image, flips, k), move(mask, flips, k)
