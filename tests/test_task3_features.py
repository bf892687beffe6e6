"""Task 3 semantic features on constructed masks with known answers, and on the real masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtneuro_jax.errors import UserError
from mtneuro_jax.readout import features as F
from mtneuro_jax.volumes import spec

BG, VESSEL, CELL, AXON = (spec.PIXEL_IDS[k] for k in ("background", "vessel", "cell", "axon"))
TL, TR, BL, BR = 0, 1, 2, 3


def _slice() -> np.ndarray:
  return np.zeros((256, 256), np.uint8)


def _row(feats: dict, i: int) -> dict:
  return {k: float(v[i]) for k, v in feats.items()}


def test_known_counts_areas_densities_and_true_nn_distance():
  s = _slice()
  s[9:12, 9:12] = CELL  # area 9, centroid (10, 10)
  s[9:12, 29:32] = CELL  # area 9, centroid (10, 30)
  s[50:52, 10:12] = CELL  # area 4, centroid (50.5, 10.5)
  s[0:16, 140:156] = VESSEL  # 256 vessel pixels in TR
  s[128:, :128] = AXON  # BL all axon
  f = F.stack_features(s[None])
  tl = _row(f, TL)
  assert tl["cell_count"] == 3
  assert tl["cell_size"] == pytest.approx((9 + 9 + 4) / 3)
  d_c = math.hypot(40.5, 0.5)  # C's nearest is A
  # The true mean nearest-neighbour distance (the reference's is half of it: zeros averaged in).
  assert tl["nn_distance"] == pytest.approx((20 + 20 + d_c) / 3)
  assert tl["vessel_density"] == 0 and tl["axon_density"] == 0
  assert _row(f, TR)["vessel_density"] == pytest.approx(256 / 128**2)
  assert _row(f, BL)["axon_density"] == 1.0
  assert list(F.FEATURES) == list(f)


def test_empty_and_single_cell_quadrants_do_not_crash():
  s = _slice()
  s[200:205, 200:205] = CELL  # one cell in BR; TL, TR, BL are empty
  f = F.stack_features(s[None])
  for q in (TL, TR, BL):
    r = _row(f, q)
    assert r["vessel_density"] == 0 and r["axon_density"] == 0 and r["cell_count"] == 0
    assert math.isnan(r["cell_size"]) and math.isnan(r["nn_distance"])  # undefined, not 0 / 64
  br = _row(f, BR)
  assert br["cell_count"] == 1 and br["cell_size"] == 25
  assert math.isnan(br["nn_distance"])  # a nearest neighbour needs two cells
  # min_cells_for_size=2 reproduces the reference's "< 2 cells" rule (as NaN, not 0).
  f2 = F.stack_features(s[None], F.FeatureConfig(min_cells_for_size=2))
  assert math.isnan(f2["cell_size"][BR])


def test_border_cells_clip_or_exclude():
  s = _slice()
  s[60:64, 126:130] = CELL  # straddles the TL | TR border: 8 pixels on each side
  s[100:103, 0:3] = CELL  # touches the slice's outer edge (TL)
  s[30:33, 30:33] = CELL  # interior of TL
  clip = F.stack_features(s[None])
  assert clip["cell_count"][TL] == 3 and clip["cell_count"][TR] == 1
  assert clip["cell_size"][TR] == 8
  assert clip["cell_size"][TL] == pytest.approx((8 + 9 + 9) / 3)
  excl = F.stack_features(s[None], F.FeatureConfig(border="exclude"))
  assert excl["cell_count"][TL] == 1 and excl["cell_count"][TR] == 0
  assert excl["cell_size"][TL] == 9 and math.isnan(excl["cell_size"][TR])


def test_2d_and_3d_components():
  st = np.zeros((2, 256, 256), np.uint8)
  st[0, 10:13, 10:13] = CELL  # A
  st[0, 10:13, 40:43] = CELL  # B, apart from A in slice 0
  st[1, 11, 10:43] = CELL  # slice 1: a bar joining A and B in 3D
  f3 = F.stack_features(st, F.FeatureConfig(components="3d"))
  f2 = F.stack_features(st, F.FeatureConfig(components="2d"))
  assert f2["cell_count"][0] == 2 and f3["cell_count"][0] == 1
  # 3D: one cell whose two pieces in slice 0 pool their area (and centroid).
  assert f3["cell_size"][0] == 18 and math.isnan(f3["nn_distance"][0])
  assert f2["nn_distance"][0] == pytest.approx(30.0)
  assert f2["cell_count"][4] == f3["cell_count"][4] == 1  # slice 1's TL: the bar


def test_connectivity_face_vs_full():
  s = _slice()
  s[10, 10] = s[11, 11] = CELL  # diagonal neighbours
  assert F.stack_features(s[None], F.FeatureConfig(connectivity="face"))["cell_count"][0] == 2
  assert F.stack_features(s[None], F.FeatureConfig(connectivity="full"))["cell_count"][0] == 1


def test_rows_features_reassembles_shuffled_quadrants():
  rng = np.random.default_rng(0)
  stack = rng.choice([BG, VESSEL, CELL, AXON], size=(3, 256, 256), p=[0.7, 0.05, 0.15, 0.1])
  stack = stack.astype(np.uint8)
  want = F.stack_features(stack)
  quads = stack.reshape(3, 2, 128, 2, 128).transpose(0, 1, 3, 2, 4).reshape(12, 128, 128)
  z = np.repeat(np.arange(110, 113), 4)
  q = np.tile(np.arange(4), 3)
  perm = rng.permutation(12)
  got = F.rows_features(quads[perm], group=np.zeros(12, int), z=z[perm], quadrant=q[perm])
  for k in F.FEATURES:
    np.testing.assert_allclose(got[k], want[k][perm], equal_nan=True)
  # A missing slice breaks 3D connectivity: z 110 and 112 only -> as two separate slices.
  keep = z[perm] != 111
  got2 = F.rows_features(
    quads[perm][keep], group=np.zeros(keep.sum(), int), z=z[perm][keep], quadrant=q[perm][keep]
  )
  sep = {
    k: np.concatenate([F.stack_features(stack[i : i + 1])[k] for i in (0, 2)]) for k in F.FEATURES
  }
  idx = (z[perm][keep] - 110) // 2 * 4 + q[perm][keep]
  for k in F.FEATURES:
    np.testing.assert_allclose(got2[k], sep[k][idx], equal_nan=True)


def test_bad_input_raises_user_errors():
  with pytest.raises(UserError, match="components"):
    F.FeatureConfig(components="4d")
  with pytest.raises(UserError, match="quadrants"):
    F.stack_features(np.zeros((1, 100, 100), np.uint8))
  with pytest.raises(UserError, match="twice"):
    F.rows_features(np.zeros((2, 128, 128), np.uint8), group=[0, 0], z=[5, 5], quadrant=[1, 1])


def test_real_masks_sanity():
  real = F.real_mask_features(F.FeatureConfig(components="3d"))  # forced to 2D for tiles
  assert set(real) == set(spec.REGIONS)
  means = {r: {k: float(np.nanmean(v)) for k, v in f.items()} for r, f in real.items()}
  for r, m in means.items():
    assert len(real[r]["cell_count"]) == 16
    assert 0.005 < m["vessel_density"] < 0.1, r
    assert 5 <= m["cell_count"] <= 30, r
    assert 20 < m["cell_size"] < 120, r  # pixels: cells ~5-12 um across
    assert 10 < m["nn_distance"] < 40, r
  # The shipped CTX and ZI masks carry no axon label; VP is the most myelinated.
  assert means["CTX"]["axon_density"] == 0 and means["ZI"]["axon_density"] == 0
  assert means["VP"]["axon_density"] > means["STR"]["axon_density"] > 0.05
  # The mean of fractions over equal tiles equals the class fraction of the whole region.
  from mtneuro_jax.volumes import morphology

  frac = morphology.class_fractions(morphology.load_real_masks("VP"))
  assert means["VP"]["vessel_density"] == pytest.approx(frac[VESSEL])
