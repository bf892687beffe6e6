"""Tests of the SYNTHETIC phantom volume (mtneuro_jax.volumes.phantom) and morphology stats."""

import numpy as np
import pytest

from mtneuro_jax.volumes import morphology, phantom, spec
from mtneuro_jax.volumes.sources import make_source

CHANNELS = tuple(spec.CHANNELS)

# Crosses the render-chunk grid in z (320) and x (4608) inside the CTX set-A cube.
BOX_CTX = spec.Box(300, 340, 1000, 1060, 4580, 4650)
# Straddles the STR | internal capsule | TRN boundaries (several regions, fibres of
# three kinds) and the ROI annotation edge at z 460.
BOX_MIXED = spec.Box(446, 470, 600, 660, 3230, 3330)
# Tissue edge: z 15 and the top edge of the slab (y ~ 130).
BOX_EDGE = spec.Box(5, 30, 60, 200, 2500, 2550)


@pytest.fixture(scope="module")
def vol():
  return phantom.PhantomVolume(seed=0)


def _render_whole_and_parts(box, parts):
  """render() of the whole box vs of each part (fresh instance, so no cache is shared)."""
  whole = phantom.PhantomVolume(seed=0).render(box)
  split = phantom.PhantomVolume(seed=0)
  for part in parts:
    got = split.render(part)
    sl = tuple(
      slice(a - b0, b - b0)
      for a, b, b0 in zip(
        (part.z0, part.y0, part.x0),
        (part.z1, part.y1, part.x1),
        (box.z0, box.y0, box.x0),
        strict=True,
      )
    )
    for ch in CHANNELS:
      np.testing.assert_array_equal(got[ch], whole[ch][sl], err_msg=f"{ch} differs in part {part}")
  return whole


@pytest.mark.parametrize("box", [BOX_CTX, BOX_MIXED, BOX_EDGE], ids=["ctx", "mixed", "edge"])
def test_render_is_pointwise_eight_parts(box):
  whole = _render_whole_and_parts(box, box.split((2, 2, 2)))
  assert whole["image"].std() > 1.0  # not a constant image


def test_render_is_pointwise_unaligned_split():
  b = BOX_MIXED
  cuts_z, cuts_y, cuts_x = (b.z0, 451, 452, b.z1), (b.y0, 617, b.y1), (b.x0, 3231, 3299, b.x1)
  parts = [
    spec.Box(z0, z1, y0, y1, x0, x1)
    for z0, z1 in zip(cuts_z[:-1], cuts_z[1:], strict=True)
    for y0, y1 in zip(cuts_y[:-1], cuts_y[1:], strict=True)
    for x0, x1 in zip(cuts_x[:-1], cuts_x[1:], strict=True)
  ]
  whole = _render_whole_and_parts(b, parts)
  # The box really is mixed: several regions and all four pixel classes.
  assert len(np.unique(whole["roi_labels"])) >= 3
  assert set(np.unique(whole["pixel_labels"])) == {0, 1, 2, 3}


def test_cutout_one_box_equals_sub_boxes():
  box = BOX_CTX
  whole = {ch: phantom.PhantomVolume(seed=0).cutout(ch, box) for ch in CHANNELS}
  fresh = phantom.PhantomVolume(seed=0)
  for sub in box.split((2, 2, 2)) + box.split((3, 1, 2)):
    sl = tuple(
      slice(a - b0, b_ - b0)
      for a, b_, b0 in zip(
        (sub.z0, sub.y0, sub.x0), (sub.z1, sub.y1, sub.x1), (box.z0, box.y0, box.x0), strict=True
      )
    )
    for ch in CHANNELS:
      np.testing.assert_array_equal(fresh.cutout(ch, sub), whole[ch][sl])


def test_dtypes_shapes_and_errors(vol):
  box = spec.Box(200, 203, 700, 717, 1600, 1629)
  for ch in CHANNELS:
    a = vol.cutout(ch, box)
    assert a.shape == box.shape
    assert a.dtype == np.dtype(spec.CHANNELS[ch].dtype)
  assert vol.cutout("pixel_labels", box).max() <= 3
  with pytest.raises(ValueError, match="outside the volume"):
    vol.cutout("image", spec.Box(0, 2, 0, 2, 5800, 5810))
  with pytest.raises(ValueError, match="unknown channel"):
    vol.cutout("labels", box)


def test_deterministic_and_seeded():
  box = spec.Box(250, 256, 900, 964, 3100, 3164)
  a = {ch: phantom.PhantomVolume(seed=0).cutout(ch, box) for ch in CHANNELS}
  b = {ch: phantom.PhantomVolume(seed=0).cutout(ch, box) for ch in CHANNELS}
  c = {ch: phantom.PhantomVolume(seed=1).cutout(ch, box) for ch in CHANNELS}
  for ch in CHANNELS:
    np.testing.assert_array_equal(a[ch], b[ch])
  assert np.mean(a["image"] == c["image"]) < 0.2
  assert np.mean(a["pixel_labels"] == c["pixel_labels"]) < 0.9
  np.testing.assert_array_equal(
    a["roi_labels"], c["roi_labels"]
  )  # the layout is fixed (cube geometry)


def test_every_cube_inside_its_region(vol):
  z = np.arange(spec.ROI_ANNOTATED_Z[0], spec.ROI_ANNOTATED_Z[1], 6)
  for s, regions in spec.CUBE_SETS.items():
    for r, (x0, x1, y0, y1) in regions.items():
      # Cube edges and a sub-grid of its interior, on annotated slices.
      ys = np.unique(np.r_[np.arange(y0, y1, 15), y1 - 1])
      xs = np.unique(np.r_[np.arange(x0, x1, 15), x1 - 1])
      a = vol.anatomy(z[:, None, None], ys[None, :, None], xs[None, None, :])
      assert np.all(a == spec.ROI_IDS[r]), f"cube {s}-{r} leaves its region"


def test_roi_labels_mode_and_annotation_range(vol):
  for s, regions in spec.CUBE_SETS.items():
    for r, (x0, x1, y0, y1) in regions.items():
      yc, xc = (y0 + y1) // 2, (x0 + x1) // 2
      inside = vol.cutout("roi_labels", spec.Box(430, 431, yc - 8, yc + 8, xc - 8, xc + 8))
      assert spec.task1_label(inside) == spec.REGION_INDEX[r]
      outside = vol.cutout(
        "roi_labels", spec.Box(spec.ROI_ANNOTATED_Z[1], 470, yc, yc + 4, xc, xc + 4)
      )
      assert not outside.any(), f"{s}-{r}: roi labels outside ROI_ANNOTATED_Z"
  # roi_labels equals the anatomy on annotated slices and 0 on the others.
  box = spec.Box(spec.ROI_ANNOTATED_Z[0] - 3, spec.ROI_ANNOTATED_Z[0] + 3, 600, 640, 3150, 3330)
  roi = vol.cutout("roi_labels", box)
  z = np.arange(box.z0, box.z1)
  anat = vol.anatomy(
    z[:, None, None],
    np.arange(box.y0, box.y1)[None, :, None],
    np.arange(box.x0, box.x1)[None, None, :],
  )
  annotated = (z >= spec.ROI_ANNOTATED_Z[0])[:, None, None]
  np.testing.assert_array_equal(roi, np.where(annotated, anat, 0))
  # VP, TRN, internal capsule and STR meet here.
  assert set(np.unique(roi[annotated[:, 0, 0]]).tolist()) == {
    spec.ROI_IDS[k] for k in ("VP", "TRN", "internal_capsule", "STR")
  }


def test_other_regions_exist(vol):
  y, x = np.arange(0, 1420, 10), np.arange(0, 5805, 10)
  ids = set(np.unique(vol.anatomy(300, y[:, None], x[None, :])).tolist())
  assert ids == set(spec.ROI_IDS.values())  # all 8 regions + outside (0)


def test_tissue_bounds(vol):
  box = BOX_EDGE
  img = vol.cutout("image", box)
  pix = vol.cutout("pixel_labels", box)
  roi = vol.cutout("roi_labels", box)
  z = np.arange(box.z0, box.z1)
  out = z < spec.TISSUE_Z[0]
  far = z < spec.TISSUE_Z[0] - phantom._HALO  # beyond the reach of the blur
  assert not pix[out].any() and not roi.any()
  assert img[far].max() <= 20  # the empty scan: ~0 plus noise
  assert img[~out][:, -10:].mean() > 60 and pix[~out][:, -10:].any()  # tissue below the top edge
  assert (
    not pix[:, :20].any() and img[far | ~out][:, :20].max() <= 20
  )  # y < ~90 lies above the slab
  top = phantom.PhantomVolume(seed=0).cutout("image", spec.Box(676, 686, 500, 520, 2500, 2520))
  assert top[:3].mean() > 60 and top[-3:].max() <= 20  # tissue ends at z 680


@pytest.fixture(scope="module")
def set_a_slices():
  """Label and image slices of every set-A cube: 8 slices spread over spec.Z_FULL."""
  vol = phantom.PhantomVolume(seed=0, workers=1)
  zs = np.linspace(spec.Z_FULL[0], spec.Z_FULL[1] - 1, 8).astype(int)
  out = {}
  for r in spec.REGIONS:
    x0, x1, y0, y1 = spec.CUBE_SETS["A"][r]
    parts = [vol.render(spec.Box(int(z), int(z) + 1, y0, y1, x0, x1)) for z in zs]
    out[r] = {ch: np.concatenate([p[ch] for p in parts]) for ch in ("image", "pixel_labels")}
  return out


def test_calibration_against_real_masks(set_a_slices):
  """Per-tile morphology of every set-A cube near the real masks' (issue 12's targets).

  Eight slices are a small sample (a large vessel in one slice moves the vessel density),
  so the band is wider here than the acceptance's (+-25%, x2), measured on 120 slices
  by ``mtneuro fidelity``.
  """
  real = morphology.real_calibration_stats()
  for r in spec.REGIONS:
    st = morphology.calibration_stats(morphology.quadrants(set_a_slices[r]["pixel_labels"]))
    ok = morphology.calibration_check(st, real[r], rel_tol=0.4, sd_factor=3.0)
    assert all(ok.values()), (r, ok, {k: v["mean"] for k, v in st.items()})


def test_region_identity_is_not_global_grey(set_a_slices):
  """Tile means vary more within a region (scan shading, contrast) than between regions."""
  means = {
    r: set_a_slices[r]["image"].reshape(len(set_a_slices[r]["image"]), -1).mean(1)
    for r in spec.REGIONS
  }
  within = np.mean([m.std() for m in means.values()])
  between = np.std([m.mean() for m in means.values()])
  assert within > 4.0 and within > 0.5 * between, (within, between)


def test_large_vessel_lumens(set_a_slices):
  """Some slices show a large round lumen (>= 15 px across), as the real Task 1 tiles do."""
  largest = 0
  for r in spec.REGIONS:
    for t in set_a_slices[r]["pixel_labels"]:
      lab, n = morphology.components(t == spec.PIXEL_IDS["vessel"])
      if n:
        largest = max(largest, int(np.bincount(lab.ravel())[1:].max()))
  assert largest >= np.pi * 7.5**2


def test_zi_axon_labels_option():
  """ZI fibres show in the image either way; only the option labels them as axons."""
  box = spec.Box(300, 303, 700, 800, 1600, 1700)  # inside the ZI set-A cube
  plain, labelled = (
    phantom.PhantomVolume(seed=0, workers=1, zi_axon_labels=z) for z in (False, True)
  )
  np.testing.assert_array_equal(plain.cutout("image", box), labelled.cutout("image", box))
  ax = spec.PIXEL_IDS["axon"]
  assert not (plain.cutout("pixel_labels", box) == ax).any()
  assert (labelled.cutout("pixel_labels", box) == ax).mean() > 0.2
  src = make_source("phantom:zi_axons=1,workers=1")
  assert src.describe()["zi_axon_labels"] is True
  assert make_source("phantom").describe()["zi_axon_labels"] is False
  np.testing.assert_array_equal(src.read("pixel_labels", box), labelled.cutout("pixel_labels", box))


@pytest.mark.parametrize("bad", ["phantom:zi_axons=2", "phantom:workers=0", "phantom:workers=x"])
def test_source_options_refused(bad):
  from mtneuro_jax.volumes.sources import SourceError

  with pytest.raises(SourceError, match="phantom"):
    make_source(bad)


def test_workers_bitwise_identical():
  """Exporter-shaped box: 1, 2 and 3 worker processes and a split request give equal bytes."""
  box = spec.Box(224, 256, 500, 628, 3700, 3956)  # 32 x 128 x 256 in the STR set-A cube
  ref = {ch: phantom.PhantomVolume(seed=0, workers=1).cutout(ch, box) for ch in CHANNELS}
  for w in (2, 3):
    vol = phantom.PhantomVolume(seed=0, workers=w)
    for ch in CHANNELS:
      np.testing.assert_array_equal(vol.cutout(ch, box), ref[ch], err_msg=f"workers={w} {ch}")
  vol = phantom.PhantomVolume(seed=0, workers=2)
  for sub in box.split((1, 2, 1)):
    got = vol.cutout("image", sub)
    np.testing.assert_array_equal(got, ref["image"][:, sub.y0 - box.y0 : sub.y1 - box.y0])


def test_read_through_intern(vol):
  source = make_source("phantom")
  assert source.describe()["generator_version"] == phantom.GENERATOR_VERSION == "phantom-2.1"
  box = spec.Box(300, 304, 500, 540, 3700, 3760)
  for ch in CHANNELS:
    got = source.read(ch, box)
    assert got.dtype == np.dtype(spec.CHANNELS[ch].dtype) and got.shape == box.shape
    np.testing.assert_array_equal(got, vol.cutout(ch, box))
  one = source.read(
    "image", spec.Box(300, 301, 500, 516, 3700, 3716)
  )  # intern squeezes; read restores
  assert one.shape == (1, 16, 16)
  np.testing.assert_array_equal(one, vol.cutout("image", spec.Box(300, 301, 500, 516, 3700, 3716)))
  other = make_source("phantom:seed=3").read("image", box)
  assert not np.array_equal(other, source.read("image", box))


def test_morphology_components_and_fractions():
  t = np.zeros((1, 16, 16), np.uint8)
  t[0, 1:4, 1:4] = 2  # 9-pixel cell
  t[0, 4, 4] = 2  # touches diagonally: same 8-connected component
  t[0, 10:12, 10:15] = 1  # 2x5 vessel: elongated
  t[0, 14, 0:16] = 3
  st = morphology.tile_stats(t)
  assert st["cell"]["components_per_tile"] == 1 and st["cell"]["median_area"] == 10
  assert st["vessel"]["components_per_tile"] == 1 and st["vessel"]["median_elongation"] > 2
  assert st["axon"]["largest_component_share"] == 1.0
  np.testing.assert_allclose(sum(st["fractions"].values()), 1.0, atol=1e-4)
  np.testing.assert_allclose(
    morphology.class_fractions(t), [(256 - 10 - 10 - 16) / 256, 10 / 256, 10 / 256, 16 / 256]
  )
  q = morphology.quadrants(np.arange(2 * 256 * 256).reshape(2, 256, 256))
  assert q.shape == (8, 128, 128) and q[1, 0, 0] == 128 and q[2, 0, 0] == 128 * 256


def test_region_histograms_coincide_without_the_scan(monkeypatch):
  """With the scan's global intensity switched off, the four regions' 4x tile statistics
  (what issue 12's histogram probe sees) nearly coincide: the regions are told apart by
  their structures, and the scan's shading/contrast/curve then blur what is left."""
  for name, (sp, _) in list(phantom._SCAN.items()):
    monkeypatch.setitem(phantom._SCAN, name, (sp, 0.0))
  monkeypatch.setattr(phantom, "_SLICE_DRIFT", (phantom._SLICE_DRIFT[0], 0.0))
  vol = phantom.PhantomVolume(seed=0, workers=1)
  stats = {}
  for r in spec.REGIONS:
    x0, x1, y0, y1 = spec.CUBE_SETS["A"][r]
    tiles = np.concatenate(
      [vol.render(spec.Box(z, z + 1, y0, y1, x0, x1))["image"] for z in range(130, 370, 60)]
    ).astype(np.float64)
    t4 = tiles.reshape(len(tiles), 64, 4, 64, 4).mean((2, 4)).reshape(len(tiles), -1)
    stats[r] = (t4.mean(), t4.std(1).mean())
  means = [m for m, _ in stats.values()]
  sds = [s for _, s in stats.values()]
  assert max(means) - min(means) < 6.0, stats
  assert max(sds) / min(sds) < 1.35, stats
