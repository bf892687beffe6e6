"""Host-side (numpy) transforms of one decoded record, before batching.

A record from the TFDS shards holds uint8 ``image`` ``[Y, X]`` or ``[Z, Y, X]`` and
one target: ``label`` (Task 1, scalar), ``mask`` (Task 2, uint8 like the image) or
``pixel_labels`` (Task 3, BossDB ids). ``RecordTransform`` turns it into model input:

  decode to float32 -> xy area-downsampling by 1/2/4 (targets: per-block majority)
  -> optional random crop (same window for image and target) -> (x/255 - mean)/std
  -> channel axis: image float32 ``[Y, X, 1]`` / ``[Z, Y, X, 1]``, targets int32.

Randomness comes only from the ``np.random.Generator`` the caller passes; the
pipeline derives it from (seed, epoch, record index), so a crop never depends on
worker count, batch size or the order records were read in.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mtneuro_jax.errors import ConfigError
from mtneuro_jax.volumes import spec

# Which record key holds the target, and how many classes it has, per task kind.
TARGET_KEYS = {"task1": "label", "task2": "mask", "task3": "pixel_labels"}


def area_downsample(x: np.ndarray, factor: int) -> np.ndarray:
  """Mean over ``factor x factor`` blocks of the last two (Y, X) axes; float32 out.

  x: ``[..., Y, X]`` with Y and X divisible by ``factor``.
  """
  x = np.asarray(x, np.float32)
  if factor == 1:
    return x
  *lead, h, w = x.shape
  if h % factor or w % factor:
    raise ValueError(f"image {h}x{w} is not divisible by the downsampling factor {factor}")
  return x.reshape(*lead, h // factor, factor, w // factor, factor).mean(
    axis=(-3, -1), dtype=np.float32
  )


def majority_downsample(labels: np.ndarray, factor: int, num_classes: int) -> np.ndarray:
  """Most frequent class in each ``factor x factor`` block of the last two axes (ties -> smaller id).

  labels: integer ``[..., Y, X]`` with values in ``[0, num_classes)``; int32 out.
  Area-averaging ids would invent classes; striding would drop thin structures
  (vessels) more often than majority voting does.
  """
  labels = np.asarray(labels)
  if factor == 1:
    return labels.astype(np.int32)
  *lead, h, w = labels.shape
  if h % factor or w % factor:
    raise ValueError(f"mask {h}x{w} is not divisible by the downsampling factor {factor}")
  blocks = labels.reshape(*lead, h // factor, factor, w // factor, factor)
  counts = np.stack([(blocks == c).sum(axis=(-3, -1)) for c in range(num_classes)], axis=-1)
  return counts.argmax(axis=-1).astype(np.int32)


def normalize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
  """``(x / 255 - mean) / std`` in float32 (x holds raw 0..255 intensities)."""
  return (
    (np.asarray(x, np.float32) / np.float32(255.0) - np.float32(mean)) / np.float32(std)
  ).astype(np.float32)


def crop_window(rng: np.random.Generator, shape_yx: tuple[int, int], size: int) -> tuple[int, int]:
  """Top-left corner of a uniformly placed ``size x size`` window inside ``shape_yx``."""
  h, w = shape_yx
  if size > h or size > w:
    raise ConfigError(f"random_crop {size} is larger than the (downsampled) image {h}x{w}")
  return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def num_target_classes(kind: str, label_set: str | None = None) -> int:
  if kind == "task1":
    return len(spec.REGIONS)
  if kind == "task2":
    return len(spec.PIXEL_CLASS_NAMES[label_set])
  if kind == "task3":
    return len(spec.PIXEL_IDS)
  raise ValueError(f"unknown task kind {kind!r}")


@dataclasses.dataclass(frozen=True)
class RecordTransform:
  """Decoded TFDS record -> model-ready example (see module docstring).

  Output keys: ``image`` float32 ``[(Z,) Y', X', 1]``; the target (``label`` int32
  scalar, ``mask`` int32 ``[(Z,) Y', X']`` or ``pixel_labels`` int32 ``[Y', X']``);
  ``region``, ``cube_set``, ``z`` int32 (``quadrant`` for Task 3); ``valid`` bool.
  """

  kind: str  # "task1" | "task2" | "task3"
  label_set: str | None = None  # task2 only
  downsample: int = 1
  mean: float = 0.0
  std: float = 1.0
  random_crop: int = 0  # crop size in output (downsampled) pixels; 0 = off

  def __post_init__(self):
    if self.downsample not in spec.DOWNSAMPLE_FACTORS:
      raise ConfigError(
        f"downsample must be one of {spec.DOWNSAMPLE_FACTORS}, got {self.downsample}"
      )
    if self.std <= 0:
      raise ConfigError(f"image_std must be > 0, got {self.std}")
    if self.random_crop < 0:
      raise ConfigError(f"random_crop must be >= 0 (0 = off), got {self.random_crop}")

  def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
    tkey = TARGET_KEYS[self.kind]
    image = area_downsample(record["image"], self.downsample)
    target = np.asarray(record[tkey])
    if self.kind != "task1":
      target = majority_downsample(
        target, self.downsample, num_target_classes(self.kind, self.label_set)
      )
    if self.random_crop:
      if rng is None:
        raise ValueError("random_crop needs an rng")
      y0, x0 = crop_window(rng, image.shape[-2:], self.random_crop)
      win = (slice(y0, y0 + self.random_crop), slice(x0, x0 + self.random_crop))
      image = image[(..., *win)]
      if self.kind != "task1":
        target = target[(..., *win)]
    out = {
      "image": normalize(image, self.mean, self.std)[..., None],
      tkey: np.asarray(target, np.int32),
      "region": np.int32(record["region"]),
      "cube_set": np.int32(record["cube_set"]),
      "z": np.int32(record["z"]),
      "valid": np.bool_(True),
    }
    if self.kind == "task3":
      out["quadrant"] = np.int32(record["quadrant"])
    return out
