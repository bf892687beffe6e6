"""Tests of the SYNTHETIC phantom volume (mtneuro_jax.volumes.phantom) and morphology stats."""

import itertools

import numpy as np
import pytest
import scipy.ndimage as ndi

from mtneuro_jax.volumes import morphology, phantom, phantom_pool, spec
from mtneuro_jax.volumes.sources import make_source

P = phantom  # the reference formulas below name module members P.*

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


# ---------------------------------------------------------------------------
# Reference formulas: the plain whole-grid implementation of the render (as of phantom-2.0,
# before the speed rewrite), kept here to check that the faster code (slice by slice,
# in place, chunked lattice gathers, per-object reach) gives the same bytes. Module
# constants and unchanged helpers come from the module (P.*), so re-tuned constants
# need no change here; a changed formula must be changed in both places.


def _ref_grid_noise(key: int, spacing, coords, grad: bool = False):
  """Separable value noise in [-1, 1] on the outer grid of 1D integer ``coords``.

  ``coords`` is one 1D array per axis (e.g. z, y, x), ``spacing`` the lattice
  spacing per axis in voxels. Returns float32 of shape ``(len(c) for c in coords)``
  and, with ``grad``, also the list of its partial derivatives (per voxel, same
  axis order). Each output value depends only on its own coordinates (lattice
  values are hashes of global lattice indices; the lerps run in a fixed order).
  """
  idx, ws, dws, lat = [], [], [], []
  for c, s in zip(coords, spacing, strict=True):
    t = np.asarray(c, np.float64) / float(s)
    i = np.floor(t)
    f = (t - i).astype(np.float32)
    ws.append(P._smoothstep(f))
    dws.append(np.float32(6.0 / s) * f * (np.float32(1.0) - f))
    i = i.astype(np.int64)
    lo = int(i.min())
    lat.append(np.arange(lo, int(i.max()) + 2))
    idx.append(i - lo)
  grids = np.meshgrid(*lat, indexing="ij", sparse=True)
  arrays = {(): P._unit(P._hash_nd(key, grids)) * np.float32(2.0) - np.float32(1.0)}
  for ax in reversed(range(len(coords))):
    shape = [1] * len(coords)
    shape[ax] = -1
    w, dw = ws[ax].reshape(shape), dws[ax].reshape(shape)
    new = {}
    for k, v in arrays.items():
      a = np.take(v, idx[ax], axis=ax)
      d = np.take(v, idx[ax] + 1, axis=ax) - a
      new[k] = a + d * w
      if grad and k == ():
        new[(ax,)] = d * dw
    arrays = new
  if grad:
    return arrays[()], [arrays[(ax,)] for ax in range(len(coords))]
  return arrays[()]


def _ref_voxel_hash(key: int, z, y, x) -> np.ndarray:
  """Per-voxel uint32 hash on the outer grid of 1D coordinates: shape (Z, Y, X)."""
  hz = P._mix32(P._u32(z) * np.uint32(P._PRIMES[0]) ^ P._u32(key))
  hy = P._mix32(P._u32(y) * np.uint32(P._PRIMES[1]) ^ P._u32(key * 7 + 1))
  hx = P._mix32(P._u32(x) * np.uint32(P._PRIMES[2]) ^ P._u32(key * 13 + 2))
  h = (hy[:, None] ^ (hx[None, :] * np.uint32(3)))[None] ^ hz[:, None, None]
  return P._mix32(h)


def _ref_lattice_noise(key: int, q, bounds=None) -> np.ndarray:
  """Value noise in [-1, 1] at float32 points ``q`` (3 same-shape arrays, lattice units).

  Lattice values are hashes of global lattice indices, gathered from a local
  table spanning ``bounds`` (per axis (lo, hi) lattice indices covering every
  point; computed from ``q`` if None), so each value depends only on its point.
  """
  shape = q[0].shape
  q = [c.reshape(-1) for c in q]
  fl = [np.floor(c) for c in q]
  w = [P._smoothstep(c - f) for c, f in zip(q, fl, strict=True)]
  if bounds is None:
    bounds = [(int(f.min()), int(f.max())) for f in fl]
  lo = [b[0] for b in bounds]
  n = [b[1] - b[0] + 3 for b in bounds]
  lat = np.meshgrid(
    *[np.arange(lo_, lo_ + m) for lo_, m in zip(lo, n, strict=True)], indexing="ij", sparse=True
  )
  v = P._unit(P._hash_nd(key, lat)) * np.float32(2.0) - np.float32(1.0)
  # Each row holds the 4 corners of a lattice cell's face: (i, j, k), (i, j, k+1),
  # (i, j+1, k), (i, j+1, k+1); two row gathers per point instead of eight.
  quad = np.stack([v[:, :-1, :-1], v[:, :-1, 1:], v[:, 1:, :-1], v[:, 1:, 1:]], -1).reshape(-1, 4)
  s1 = n[2] - 1
  s0 = (n[1] - 1) * s1
  idx_t = np.int32 if quad.shape[0] < 2**31 - s0 else np.int64
  base = (fl[0] - np.float32(lo[0])).astype(idx_t) * idx_t(s0)
  base += (fl[1] - np.float32(lo[1])).astype(idx_t) * idx_t(s1)
  base += (fl[2] - np.float32(lo[2])).astype(idx_t)
  del fl
  out = []
  for g in (np.take(quad, base, axis=0), np.take(quad, base + idx_t(s0), axis=0)):
    a = g[:, 0::2]  # (k) corners at j, j+1
    a = a + (g[:, 1::2] - a) * w[2][:, None]  # lerp along axis 2 -> [P, 2]
    out.append(a[:, 0] + (a[:, 1] - a[:, 0]) * w[1])  # lerp along axis 1
  return (out[0] + (out[1] - out[0]) * w[0]).reshape(shape)


def _ref_lattice_noise2(key: int, q, bounds) -> np.ndarray:
  """2D value noise in [-1, 1] at float32 points ``q`` (2 same-shape arrays); see ``_ref_lattice_noise``."""
  shape = q[0].shape
  q = [c.reshape(-1) for c in q]
  fl = [np.floor(c) for c in q]
  w = [P._smoothstep(c - f) for c, f in zip(q, fl, strict=True)]
  lo = [b[0] for b in bounds]
  n = [b[1] - b[0] + 3 for b in bounds]
  lat = np.meshgrid(
    *[np.arange(lo_, lo_ + m) for lo_, m in zip(lo, n, strict=True)], indexing="ij", sparse=True
  )
  v = P._unit(P._hash_nd(key, lat)) * np.float32(2.0) - np.float32(1.0)
  quad = np.stack([v[:-1, :-1], v[:-1, 1:], v[1:, :-1], v[1:, 1:]], -1).reshape(-1, 4)
  base = (fl[0] - np.float32(lo[0])).astype(np.int32) * np.int32(n[1] - 1)
  base += (fl[1] - np.float32(lo[1])).astype(np.int32)
  g = np.take(quad, base, axis=0)
  a = g[:, 0::2]
  a = a + (g[:, 1::2] - a) * w[1][:, None]
  return (a[:, 0] + (a[:, 1] - a[:, 0]) * w[0]).reshape(shape)


def _ref_point_noise(key: int, spacing, coords) -> np.ndarray:
  """Value noise in [-1, 1] at arbitrary (broadcastable) points; for small point sets."""
  coords = np.broadcast_arrays(*[np.asarray(c, np.float64) for c in coords])
  idx, ws = [], []
  for c, s in zip(coords, spacing, strict=True):
    t = c / float(s)
    i = np.floor(t)
    ws.append(P._smoothstep((t - i).astype(np.float32)))
    idx.append(i.astype(np.int64))
  out = np.zeros(coords[0].shape, np.float32)
  for corner in itertools.product((0, 1), repeat=len(coords)):
    v = P._unit(P._hash_nd(key, [i + c for i, c in zip(idx, corner, strict=True)])) * np.float32(
      2.0
    ) - np.float32(1.0)
    wt = np.ones_like(out)
    for w, c in zip(ws, corner, strict=True):
      wt = wt * (w if c else np.float32(1.0) - w)
    out = out + wt * v
  return out


class _ReferenceVolume(P.PhantomVolume):
  """``PhantomVolume`` rendering with the reference formulas (whole-grid arrays)."""

  def _trend_at(self, y, x, per_region):
    """The linear trend t of each voxel's region (0 at its set-A cube centre), broadcastable."""
    t = self._trend
    yy = y.astype(np.float32)[None, :, None]
    xx = x.astype(np.float32)[None, None, :]
    return per_region(t["gy"]) * (yy - per_region(t["y0"])) + per_region(t["gx"]) * (
      xx - per_region(t["x0"])
    )

  def _drift(self, name, z, y, x, per_region):
    """amplitude * (drift noise - its value at the region's set-A cube centre), on the grid."""
    sp, amp = P._DRIFT[name]
    off = per_region(self._anchors[name])
    return np.float32(amp) * (_ref_grid_noise(self.key("drift", name), sp, (z, y, x)) - off)

  def _scan(self, name, z, y, x):
    """amplitude * value noise of the scan's global intensity field ``name`` on the grid."""
    sp, amp = P._SCAN[name]
    return np.float32(amp) * _ref_grid_noise(self.key("scan", name), sp, (z, y, x))

  def render(self, box: spec.Box) -> dict[str, np.ndarray]:
    """All channels of ``box`` as uint8 ZYX arrays {"image", "roi_labels", "pixel_labels"}.

    Any box (also outside the volume) is allowed; values depend only on the
    voxel coordinates. Memory is roughly 100 bytes per voxel of box + halo, so
    callers render large boxes in chunks (``cutout`` does).
    """
    h = P._HALO
    z = np.arange(box.z0 - h, box.z1 + h)
    y = np.arange(box.y0 - h, box.y1 + h)
    x = np.arange(box.x0 - h, box.x1 + h)
    shape = (len(z), len(y), len(x))
    core = (slice(h, -h), slice(h, -h), slice(h, -h))
    anat = self._anatomy.grid(z, y, x)
    present = [int(r) for r in np.flatnonzero(np.bincount(anat.ravel(), minlength=P._N_ROI)) if r]
    tissue = anat > 0
    tissue_all = bool(tissue.all())

    single = present[0] if len(present) == 1 and tissue_all else None

    def per_region(t):  # a per-region table on the grid: a scalar when one region fills it
      return np.float32(t[single]) if single is not None else t[anat]

    pix = np.zeros(shape, np.uint8)
    if not present:  # outside tissue: the empty scan
      img = np.full(shape, P._OUTSIDE_GREY, np.float32)
    else:
      axon, ax_strength = self._axons(z, y, x, anat, present, per_region)
      pix[axon] = P._PIX["axon"]
      del axon
      cell, cell_profile = self._cells(z, y, x, shape)
      pix[cell] = P._PIX["cell"]
      del cell
      vessel, lumen, rim = self._vessels(z, y, x, shape)
      pix[vessel] = P._PIX["vessel"]
      del vessel
      if not tissue_all:
        pix[~tissue] = P._PIX["background"]
      img = self._image(
        z,
        y,
        x,
        pix,
        ax_strength,
        cell_profile,
        lumen,
        rim,
        per_region,
        None if tissue_all else tissue,
      )
    g1 = ndi.gaussian_filter(img, P._BLUR[0], mode="nearest", truncate=P._BLUR[1])
    g2 = ndi.gaussian_filter(img, P._FRINGE[0], mode="nearest", truncate=P._FRINGE[1])
    img = g1[core] + np.float32(P._FRINGE[2]) * (g1[core] - g2[core])
    del g1, g2
    zc, yc, xc = z[h:-h], y[h:-h], x[h:-h]
    noise_amp = np.float32(P._NOISE * 2.0)
    if not present:
      noise_amp = noise_amp * np.float32(P._EMPTY_NOISE)
    else:  # the scan's global intensity (see _SCAN), on tissue only
      mid = np.float32(P._SCAN_MID)
      offset = self._scan("offset", zc, yc, xc)
      zs, za = P._SLICE_DRIFT
      offset += np.float32(za) * _ref_grid_noise(self.key("slice"), (zs,), (zc,))[:, None, None]
      gain = np.maximum(
        np.float32(1.0) + self._scan("contrast", zc, yc, xc), np.float32(P._SCAN_MIN_CONTRAST)
      )
      dev = img - mid
      dev += (self._scan("curve", zc, yc, xc) * np.float32(1.0 / P._SCAN_CURVE_SCALE)) * (
        dev * np.clip(dev, -P._SCAN_CURVE_CAP, P._SCAN_CURVE_CAP)
      )
      scanned = mid + offset + gain * dev
      del offset, gain
      img = scanned if tissue_all else np.where(tissue[core], scanned, img)
      del scanned
      level = np.maximum(np.float32(1.0) + self._scan("noise", zc, yc, xc), np.float32(0.25))
      noise_amp = noise_amp * (
        level if tissue_all else np.where(tissue[core], level, np.float32(P._EMPTY_NOISE))
      )
    hn = _ref_voxel_hash(self.key("noise"), zc, yc, xc)
    tri = (
      (hn & np.uint32(0xFFFF)).astype(np.float32) + (hn >> 16).astype(np.float32)
    ) * np.float32(1.0 / 65536.0)
    img += (tri - np.float32(1.0)) * noise_amp
    img += np.float32(0.5)
    np.clip(img, 0.0, 255.0, out=img)
    roi = np.array(anat[core], np.uint8)
    roi[(zc < spec.ROI_ANNOTATED_Z[0]) | (zc >= spec.ROI_ANNOTATED_Z[1])] = P._ROI["clear"]
    return {
      "image": img.astype(np.uint8),
      "roi_labels": roi,
      "pixel_labels": np.ascontiguousarray(pix[core]),
    }

  def _axons(self, z, y, x, anat, present, per_region):
    """Axon label mask and visible fibre strength in [0, 1] (bright fibres) on the grid.

    "fascicle" regions (STR): the labels are the bundles, which are what the image shows.
    "fibre" regions (VP, ZI, ...): the labels are coarse masses (as the experts draw them)
    of a coarse + tile-scale field; the image shows fine, long fibres, dense inside the
    masses (``fibre_in``) and sparse outside (``fibre_out``). ZI's masses are labelled
    only with ``zi_axon_labels`` (the shipped real ZI masks carry no axon labels).
    """
    axon = strength = drift = None
    multi = len(present) > 1
    for rid in present:
      p = P.REGION_PARAMS[rid]
      if p.fibre == "none" or p.axon_frac <= 0:
        continue
      if drift is None:  # threshold shifts: location drift and trend + local variation
        drift = self._drift("fibre_density", z, y, x, per_region)
        drift = drift + np.float32(P._TREND["fibre_density"]) * self._trend_at(y, x, per_region)
        sp, amp = P._LOCAL["fibre_density"]
        local = np.float32(amp) * _ref_grid_noise(self.key("local-fibre-density"), sp, (z, y, x))
      shift = np.float32(p.axon_drift) * (drift + local)
      inside = (anat == rid) if multi else None
      if p.fibre == "fascicle":
        f, warp = self._fibre_field(rid, p.fibre, p.fibre_dir, z, y, x)
        m = f > P._noise_quantile(1.0 - p.axon_frac) - shift
        fine, _ = self._fibre_field(rid, "striation", p.fibre_dir, z, y, x, warp=warp)
        s = np.float32(0.55) + np.float32(0.45) * np.clip(
          fine * np.float32(1.6) + np.float32(0.4), 0.0, 1.0
        )
        lab = m
      else:
        mass = _ref_grid_noise(self.key("mass", rid), P._MASS_FINE, (z, y, x))
        mass += np.float32(p.axon_var) * _ref_grid_noise(
          self.key("mass-coarse", rid), P._MASS_COARSE, (z, y, x)
        )
        lab = mass > P._mass_quantile(1.0 - p.axon_frac, p.axon_var) - shift
        del mass
        f, _ = self._fibre_field(rid, p.fibre, p.fibre_dir, z, y, x)
        thr = np.where(
          lab, P._noise_quantile(1.0 - p.fibre_in), P._noise_quantile(1.0 - p.fibre_out)
        )
        m = f > thr
        s = np.clip((f - thr) * np.float32(3.0) + np.float32(0.35), 0.0, 1.0)
        if rid == P._ROI["ZI"] and not self.zi_axon_labels:
          lab = None
      if inside is not None:
        m &= inside
        if lab is not None:
          lab &= inside
      s = np.where(m, s, np.float32(0.0))
      if axon is None:
        axon = np.zeros(anat.shape, bool)
        strength = s
      else:
        strength = np.where(m, s, strength)
      if lab is not None:
        axon |= lab
    if axon is None:
      return np.zeros(anat.shape, bool), np.float32(0.0)
    return axon, strength

  def _fibre_field(self, rid, kind, direction, z, y, x, warp=None):
    """Domain-warped anisotropic value noise, long along ``direction``: fibres / fascicles.

    The two across-fibre coordinates are shifted by a smooth warp (voxels; made
    here from the region's warp noise unless ``warp`` is given), which bends the
    fibres. "striation" is 2D noise across the direction only (fine, long fibres).
    Returns (field float32 (Z, Y, X), warp) so a second field can bend along.
    """
    across, along, warp_amp, warp_sp = P._FIBRE_GEOM[kind]
    frame = P._fibre_frame(direction)
    corners = np.array(
      list(itertools.product((z[0], z[-1]), (y[0], y[-1]), (x[0], x[-1]))), np.float64
    )
    if warp is None:
      amp_vox = np.float32(warp_amp * across)
      warp = [
        amp_vox * _ref_grid_noise(self.key("warp", rid, kind, k), (warp_sp,) * 3, (z, y, x))
        for k in range(2)
      ]
      warp_max = float(amp_vox)
    else:
      warp_max = float(max(np.abs(w).max() for w in warp))
    dims = 2 if kind == "striation" else 3
    q, bounds = [], []
    for k in range(dims):
      e = frame[k] / (across if k < 2 else along)
      proj = (
        (e[0] * z).astype(np.float32)[:, None, None]
        + (e[1] * y).astype(np.float32)[None, :, None]
        + (e[2] * x).astype(np.float32)[None, None, :]
      )
      amp = warp_max / across if k < 2 else 0.0
      if k < 2:
        proj = proj + warp[k] * np.float32(1.0 / across)
      pc = corners @ e  # the projection is linear: its extremes are at the corners
      bounds.append((int(np.floor(pc.min() - amp)) - 1, int(np.floor(pc.max() + amp)) + 1))
      q.append(proj)
    if dims == 2:
      return _ref_lattice_noise2(self.key("fibre", rid, kind), q, bounds), warp
    return _ref_lattice_noise(self.key("fibre", rid, kind), q, bounds), warp

  def _image(self, z, y, x, pix, ax_strength, cell_profile, lumen, rim, per_region, tissue):
    """Pre-blur grey levels (float32, grid shape). ``tissue`` None means all tissue."""

    def table(name):
      return per_region(self._tables[name])

    grey = table("grey")
    contrast = np.float32(1.0) + self._drift("contrast", z, y, x, per_region)
    gain = table("axon_gain") * (
      np.float32(1.0)
      + self._drift("axon_gain", z, y, x, per_region)
      + np.float32(P._TREND["axon_gain"]) * self._trend_at(y, x, per_region)
    )
    sp, amp = P._MOTTLE
    tex = np.float32(amp) * _ref_grid_noise(self.key("mottle"), sp, (z, y, x))
    tex += (P._unit(_ref_voxel_hash(self.key("grain"), z, y, x)) - np.float32(0.5)) * np.float32(
      2.0 * P._GRAIN
    )
    tex = tex * table("texture")
    patch = table("patch")
    if np.any(patch):
      tex += patch * _ref_grid_noise(self.key("patch"), P._PATCH, (z, y, x))
    img = grey + contrast * (gain * ax_strength + tex)
    if rim is not None:  # the bright wall of large vessels
      img = np.where(rim, img + np.float32(P._LUMEN_RIM[1]), img)
    img = np.where(
      pix == P._PIX["cell"], grey - contrast * (table("cell_dark") * cell_profile - tex), img
    )
    # Capillaries (2-5 px across) look dark grey after the point spread; large lumens black.
    img = np.where(pix == P._PIX["vessel"], grey - contrast * (np.float32(P._CAP_DARK) - tex), img)
    if lumen is not None:
      img = np.where(
        lumen, np.float32(P._VESSEL_GREY) + np.float32(0.1) * (grey - 120.0) + tex * 0.3, img
      )
    if tissue is not None:
      img = np.where(tissue, img, np.float32(P._OUTSIDE_GREY))
    return img.astype(np.float32)

  def _lumens(self, z, y, x):
    """Large vessels: near-vertical capsules seeded per ``_LUMEN_OBJ`` block.

    Returns (lumen mask, rim mask) on the grid, or (None, None) when none is near.
    """
    rngs = [
      np.arange((a[0] - r) // o, (a[-1] + r) // o + 1)
      for a, r, o in zip((z, y, x), P._LUMEN_REACH, P._LUMEN_OBJ, strict=True)
    ]
    cz, cy, cx = (g.ravel() for g in np.meshgrid(*rngs, indexing="ij"))
    h = P._hash_nd(self.key("lumen"), [cz, cy, cx])
    u = [P._unit(P._mix32(h ^ np.uint32(k + 1))).astype(np.float64) for k in range(8)]
    keep = u[0] < P._LUMEN_PROB
    if not keep.any():
      return None, None
    oz, oy, ox = P._LUMEN_OBJ
    centre = np.stack([(cz + u[1]) * oz, (cy + u[2]) * oy, (cx + u[3]) * ox], 1)[keep]
    half = (P._LUMEN_HALF[0] + (P._LUMEN_HALF[1] - P._LUMEN_HALF[0]) * u[4])[keep]
    tilt = P._LUMEN_TILT
    slope = np.stack([np.ones_like(u[5]), tilt * (2 * u[5] - 1), tilt * (2 * u[6] - 1)], 1)[keep]
    # Radii skewed to the small end (many ~8-12 px lumens, a few up to 20).
    radius = (P._LUMEN_RADIUS[0] + (P._LUMEN_RADIUS[1] - P._LUMEN_RADIUS[0]) * u[7] * u[7])[keep]
    region = self._anatomy(centre[:, 0], centre[:, 1], centre[:, 2])
    width = P._LUMEN_RIM[0]
    mask = rim = None
    for c, hl, sl, r, reg in zip(centre, half, slope, radius, region, strict=True):
      if reg == 0:
        continue
      a, b = c - hl * sl, c + hl * sl
      ro = r + width
      lo, hi = np.minimum(a, b) - ro, np.maximum(a, b) + ro
      sel = [
        np.flatnonzero((g >= a_) & (g <= b_)) for g, a_, b_ in zip((z, y, x), lo, hi, strict=True)
      ]
      if any(len(s_) == 0 for s_ in sel):
        continue
      # The axis is near z: per slice the closest axis point is ~ the slice's own centre,
      # so the distance is evaluated in-plane from the axis point of each slice (exact
      # rounding: add/mul/div only), capped at the capsule's ends.
      d = b - a
      zz = z[sel[0]].astype(np.float64)
      t = np.clip((zz - a[0]) / d[0], 0.0, 1.0)
      pz = (a[0] + t * d[0] - zz)[:, None, None]
      py = (a[1] + t * d[1])[:, None, None]
      px = (a[2] + t * d[2])[:, None, None]
      gy = y[sel[1]].astype(np.float64)[None, :, None] - py
      gx = x[sel[2]].astype(np.float64)[None, None, :] - px
      d2 = gy * gy + gx * gx + pz * pz
      inside = d2 < r * r
      ring = d2 < ro * ro
      if not ring.any():
        continue
      if mask is None:
        mask = np.zeros((len(z), len(y), len(x)), bool)
        rim = np.zeros((len(z), len(y), len(x)), bool)
      ix = np.ix_(*sel)
      mask[ix] |= inside
      rim[ix] |= ring
    if mask is None:
      return None, None
    return mask, rim

  def _cells(self, z, y, x, shape):
    return super()._cells(z, y, x, shape, by_reach=False)


@pytest.mark.parametrize(
  "box,zi",
  [
    (spec.Box(300, 310, 860, 930, 3100, 3180), False),  # VP: fine fibres in masses
    (BOX_MIXED, False),  # STR fascicles | internal capsule | TRN, annotation edge
    (spec.Box(296, 304, 700, 760, 1600, 1660), True),  # ZI, labelled
    (BOX_EDGE, False),  # tissue edge (the empty scan beside tissue)
    (spec.Box(300, 306, 1000, 1050, 4600, 4660), False),  # CTX: cells, no fibres
    (spec.Box(100, 104, 10, 40, 100, 140), False),  # outside the tissue
    (spec.Box(262, 268, 600, 660, 1000, 1060), False),  # a large vessel's lumen and rim
  ],
  ids=["vp", "mixed", "zi", "edge", "ctx", "outside", "lumen"],
)
def test_render_matches_reference_formulas(box, zi):
  """The fast render (slice by slice, in place, chunked gathers, per-object reach) gives
  exactly the bytes of the plain whole-grid formulas."""
  fast = P.PhantomVolume(seed=0, workers=1, zi_axon_labels=zi).render(box)
  ref = _ReferenceVolume(seed=0, workers=1, zi_axon_labels=zi).render(box)
  if box.z0 == 262:  # the lumen box really holds one
    h = P._HALO
    grid = [
      np.arange(a - h, b + h) for a, b in ((box.z0, box.z1), (box.y0, box.y1), (box.x0, box.x1))
    ]
    assert _ReferenceVolume(seed=0)._lumens(*grid)[0].sum() > 500
  for ch in CHANNELS:
    np.testing.assert_array_equal(fast[ch], ref[ch], err_msg=ch)


def test_noise_fields_match_reference_formulas():
  rng = np.random.default_rng(0)
  coords = (np.arange(-7, 29), np.arange(-40, 93), np.arange(5000, 5061))
  for spacing in ((36.0, 300.0, 300.0), (2.5, 2.5, 2.5), (1000.0, 380.0, 380.0), (3.0, 7.0, 1.5)):
    ref = _ref_grid_noise(11, spacing, coords)
    np.testing.assert_array_equal(P._grid_noise(11, spacing, coords), ref)
    field = P._GridNoise(11, spacing, coords)
    np.testing.assert_array_equal(field.slice(5), ref[5])
    np.testing.assert_array_equal(field.full(np.float32(0.7)), ref * np.float32(0.7))
  z = np.arange(-3, 40)
  np.testing.assert_array_equal(P._grid_noise(5, (12.0,), (z,)), _ref_grid_noise(5, (12.0,), (z,)))
  # Point noise: a broadcast grid (hashed once per lattice point) and a sparse wide cloud.
  pts = (z[:, None] * 7.0, np.arange(-50, 400, 3)[None, :] * 1.5)
  np.testing.assert_array_equal(
    P._point_noise(6, (180.0, 220.0), pts), _ref_point_noise(6, (180.0, 220.0), pts)
  )
  for k, got in zip((6, 8), P._point_noise([6, 8], (180.0, 220.0), pts), strict=True):
    np.testing.assert_array_equal(got, _ref_point_noise(k, (180.0, 220.0), pts))
  cloud = [rng.random(50) * 1e6 - 5e5 for _ in range(3)]
  np.testing.assert_array_equal(
    P._point_noise(7, (40.0, 40.0, 40.0), cloud), _ref_point_noise(7, (40.0, 40.0, 40.0), cloud)
  )
  # Lattice noise at scattered points (negative too), 3D and 2D, int32 and int64 gathers.
  q = [(rng.random(5000) * 90.0 - 30.0).astype(np.float32) for _ in range(3)]
  np.testing.assert_array_equal(P._lattice_noise(3, q), _ref_lattice_noise(3, q))
  bounds = [(int(np.floor(c.min())) - 1, int(np.floor(c.max())) + 1) for c in q]
  for small in (True, False):
    lat = P._Lattice(3, bounds)
    lat.small = small
    np.testing.assert_array_equal(lat([c.copy() for c in q]), _ref_lattice_noise(3, q, bounds))
  lat2 = P._Lattice(4, bounds[:2])
  np.testing.assert_array_equal(
    lat2([c.copy() for c in q[:2]]), _ref_lattice_noise2(4, q[:2], bounds[:2])
  )


def test_splat_spheres_by_reach_equals_plain():
  rng = np.random.default_rng(1)
  centres = rng.random((3000, 3)) * np.array([30.0, 40.0, 40.0]) - 3.0
  radii = 1.2 + 1.4 * rng.random(3000)
  masks = []
  for by_reach in (True, False):
    mask = np.zeros((24, 34, 34), bool)
    P._splat_spheres(mask, (0.0, 0.0, 0.0), centres, radii, batch=500, by_reach=by_reach)
    masks.append(mask)
  assert masks[0].any() and not masks[0].all()
  np.testing.assert_array_equal(masks[0], masks[1])


def test_blur_core_equals_whole_grid_filter():
  img = (np.random.default_rng(2).random((14, 21, 19)) * 255.0).astype(np.float32)
  core = (slice(P._HALO, -P._HALO),) * 3
  for sigma, truncate in (P._BLUR, P._FRINGE[:2]):
    whole = ndi.gaussian_filter(img, sigma, mode="nearest", truncate=truncate)[core]
    np.testing.assert_array_equal(P._blur_core(img, sigma, truncate), whole)


def test_failed_worker_falls_back_to_local_rendering():
  """A dead worker process costs speed, not bytes: its part is rendered in this process."""
  box = spec.Box(224, 256, 500, 628, 3700, 3956)  # 2^20 voxels: rendered in parallel
  ref = P.PhantomVolume(seed=0, workers=1).cutout("image", box)
  phantom_pool.start(2, wait=True)
  child = phantom_pool._SETS[1].workers[0].proc
  child.kill()
  child.wait()
  got = P.PhantomVolume(seed=0, workers=2).cutout("image", box)
  np.testing.assert_array_equal(got, ref)


def test_workers_several_parts_bitwise_identical():
  """A request of 3 render parts (y 700 > 320), spread as 6 halves over 2 renderers."""
  box = spec.Box(288, 320, 500, 1200, 3700, 3956)
  one = P.PhantomVolume(seed=0, workers=1).cutout("pixel_labels", box)
  np.testing.assert_array_equal(P.PhantomVolume(seed=0, workers=2).cutout("pixel_labels", box), one)
