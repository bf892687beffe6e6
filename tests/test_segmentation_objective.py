"""Segmentation objective: CE vs numpy, Dice, valid rows, paired augmentation keeps image and mask aligned."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtneuro_jax.data import augment
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.objectives import OBJECTIVES, segmentation
from mtneuro_jax.objectives.base import StepContext


class PixelLinear(nn.Module):
  """A 1x1 'segmentation model': logits = image * w + b per class (any spatial rank)."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    return {"logits": nn.Dense(self.num_classes)(x)}


def _np_ce(logits, mask, valid):
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  ls = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(ls, mask[..., None], -1)[..., 0]
  return nll[valid].mean()


def _cfg(**kw):
  base = {
    "loss": "ce",
    "dice_weight": 1.0,
    "augment": {"flip": False, "rot90": False, "flip_z": False},
  }
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _run_loss(model, image, mask, valid, config, rng=0):
  variables = model.init(jax.random.key(0), image)
  batch = {"image": image, "mask": mask, "valid": valid}
  ctx = StepContext(step=jnp.zeros((), jnp.int32), total_steps=1)
  value, (metrics, _, _) = segmentation.loss(
    variables["params"], {}, {}, batch, jax.random.key(rng), model=model, config=config, ctx=ctx
  )
  logits = model.apply(variables, image)["logits"]
  return value, metrics, np.asarray(logits)


@pytest.mark.parametrize("shape", [(4, 6, 6), (3, 2, 4, 4)])
def test_ce_matches_numpy_and_ignores_padding_rows(shape):
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=shape + (1,)), jnp.float32)
  mask = jnp.asarray(rng.integers(0, 3, shape), jnp.int32)
  valid = jnp.asarray([True] * (shape[0] - 1) + [False])
  value, metrics, logits = _run_loss(PixelLinear(), image, mask, valid, _cfg())
  v = np.asarray(valid)
  np.testing.assert_allclose(value, _np_ce(logits[v], np.asarray(mask)[v], slice(None)), rtol=1e-5)
  acc = (logits.argmax(-1) == np.asarray(mask))[v].mean()
  np.testing.assert_allclose(metrics["train/pixel_accuracy"], acc, rtol=1e-6)
  # Changing the padding row's mask changes nothing.
  mask2 = mask.at[-1].set((mask[-1] + 1) % 3)
  value2, _, _ = _run_loss(PixelLinear(), image, mask2, valid, _cfg())
  assert float(value2) == float(value)


def test_dice_ce_adds_soft_dice():
  rng = np.random.default_rng(1)
  image = jnp.asarray(rng.normal(size=(3, 5, 5, 1)), jnp.float32)
  mask = jnp.asarray(rng.integers(0, 3, (3, 5, 5)), jnp.int32)
  valid = jnp.asarray([True, True, False])
  value, metrics, logits = _run_loss(
    PixelLinear(), image, mask, valid, _cfg(loss="dice_ce", dice_weight=0.5)
  )
  v = np.asarray(valid)
  z = logits[v] - logits[v].max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  t = np.eye(3)[np.asarray(mask)[v]]
  inter, denom = (p * t).sum((0, 1, 2)), p.sum((0, 1, 2)) + t.sum((0, 1, 2))
  dice = 1 - np.mean((2 * inter + 1) / (denom + 1))
  np.testing.assert_allclose(metrics["train/dice_loss"], dice, rtol=1e-5)
  ce = _np_ce(logits[v], np.asarray(mask)[v], slice(None))
  np.testing.assert_allclose(value, ce + 0.5 * dice, rtol=1e-5)


def test_unknown_loss_and_augment_option_raise():
  image, mask = jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 4), jnp.int32)
  with pytest.raises(ConfigError, match="objective.loss"):
    _run_loss(PixelLinear(), image, mask, jnp.ones(1, bool), _cfg(loss="focal"))
  with pytest.raises(ConfigError, match="unknown augment option"):
    augment.PairedAugmentConfig.from_config({"flip": True, "shear": True})


def _label_of(image):
  """A mask that is a pixelwise function of the image: alignment survives iff image and mask
  moved together."""
  return (image[..., 0] > 0).astype(jnp.int32) + (image[..., 0] > 1).astype(jnp.int32)


@pytest.mark.parametrize("shape", [(16, 8, 8), (16, 4, 6, 6)])
def test_paired_augment_keeps_image_and_mask_aligned(shape):
  image = jax.random.normal(jax.random.key(0), shape + (1,)) * 2
  mask = _label_of(image)
  cfg = augment.PairedAugmentConfig()
  aug_image, aug_mask = augment.paired_augment(image, mask, jax.random.key(3), cfg)
  assert aug_image.shape == image.shape and aug_mask.shape == mask.shape
  np.testing.assert_array_equal(aug_mask, _label_of(aug_image))
  # Something moved, and each sample is a dihedral (and z-flip) copy of itself.
  assert not np.array_equal(np.asarray(aug_image), np.asarray(image))
  for a, b in zip(np.asarray(image), np.asarray(aug_image), strict=True):
    spatial = len(shape) - 1
    ya, xa = spatial - 2, spatial - 1
    cands = []
    for zf in (False, True) if spatial == 3 else (False,):
      x0 = np.flip(a, 0) if zf else a
      for f in (False, True):
        x1 = np.flip(x0, ya) if f else x0
        cands += [np.rot90(x1, k, axes=(ya, xa)) for k in range(4)]
    assert any(np.array_equal(b, c) for c in cands)
  # Same rng -> same result; off -> identity.
  again = augment.paired_augment(image, mask, jax.random.key(3), cfg)
  np.testing.assert_array_equal(again[0], aug_image)
  off = augment.PairedAugmentConfig(flip=False, rot90=False, flip_z=False)
  np.testing.assert_array_equal(
    augment.paired_augment(image, mask, jax.random.key(3), off)[1], mask
  )


def test_z_flip_only_3d():
  # Only the z-flip on: every sample is either itself or its z-mirror, and both occur.
  image = jax.random.normal(jax.random.key(1), (32, 4, 3, 5, 1))
  mask = _label_of(image)
  cfg = augment.PairedAugmentConfig(flip=False, rot90=False, flip_z=True)
  aug_image, aug_mask = augment.paired_augment(image, mask, jax.random.key(5), cfg)
  img, out = np.asarray(image), np.asarray(aug_image)
  flipped = [np.array_equal(o, np.flip(i, 0)) for i, o in zip(img, out, strict=True)]
  same = [np.array_equal(o, i) for i, o in zip(img, out, strict=True)]
  assert all(f or s for f, s in zip(flipped, same, strict=True)) and any(flipped) and any(same)
  np.testing.assert_array_equal(aug_mask, _label_of(aug_image))
  # In 2D the z-flip is ignored.
  im2 = image[:, 0]
  out2 = augment.paired_augment(im2, _label_of(im2), jax.random.key(5), cfg)[0]
  np.testing.assert_array_equal(out2, im2)


def test_rot90_needs_square_tiles():
  with pytest.raises(ConfigError, match="rot90"):
    augment.paired_augment(
      jnp.zeros((2, 4, 6, 1)),
      jnp.zeros((2, 4, 6), jnp.int32),
      jax.random.key(0),
      augment.PairedAugmentConfig(),
    )


def test_training_with_augmentation_lowers_the_loss():
  # A pixelwise task stays learnable under paired augmentation (it would not if misaligned).
  image = jax.random.normal(jax.random.key(2), (8, 8, 8, 1)) * 2
  mask = _label_of(image)
  model = PixelLinear()
  params = model.init(jax.random.key(0), image)["params"]
  config = _cfg(augment={"flip": True, "rot90": True, "flip_z": True})
  batch = {"image": image, "mask": mask, "valid": jnp.ones(8, bool)}
  obj = OBJECTIVES["segmentation"]
  ctx = StepContext(step=jnp.zeros((), jnp.int32), total_steps=1)

  @jax.jit
  def step(p, k):
    (value, (m, _, _)), g = jax.value_and_grad(
      lambda q: obj.loss(q, {}, {}, batch, k, model=model, config=config, ctx=ctx), has_aux=True
    )(p)
    return jax.tree.map(lambda a, b: a - 0.5 * b, p, g), value, m

  first = None
  for i in range(60):
    params, value, metrics = step(params, jax.random.key(i))
    first = float(value) if first is None else first
  assert float(value) < 0.5 * first
  assert float(metrics["train/pixel_accuracy"]) > 0.9
  out = obj.predict(params, {}, {}, batch, model=model, config=config)
  assert out["logits"].shape == (8, 8, 8, 3)
