"""The embedded SYNTHETIC X-ray microCT volume ("phantom") with MTNeuro's three channels.

A stand-in for ``bossdb://prasad/...`` that needs no network: same extent
(``spec.VOLUME_SHAPE_ZYX``, ZYX, 1.17 um), same channels and dtypes, tissue only
in ``spec.TISSUE_Z``, region labels only on ``spec.ROI_ANNOTATED_Z``, and every
cube of ``spec.CUBE_SETS`` inside its region. Results on it are NOT comparable to
the paper's: it is a calibrated imitation (see
``experiments/results/phantom_fidelity/report.md`` for how close it is).

API (other modules rely on it):
  ``GENERATOR_VERSION: str`` -- bump whenever any voxel value changes.
  ``PhantomVolume(seed=0, *, workers=None, zi_axon_labels=False, cache_bytes=256 MiB)``;
  ``.cutout(channel, box) -> np.ndarray``: ZYX array of
  ``box.shape``; uint8 for "image", uint64 for "roi_labels" and "pixel_labels"
  (BossDB ids, ``spec.ROI_IDS`` / ``spec.PIXEL_IDS``).

How it is built
---------------
Every voxel is a pure function of (seed, global z, y, x), computed lazily for
any requested box (plus a halo for the blur); the volume never exists whole:

* anatomy: region boundaries are x (or y) positions that wobble smoothly with
  the other coordinates (2D value noise), with margins that keep every cube of
  sets A-D inside its region at all z (see ``_MARGIN_NOTES``);
* microstructure, in 3D, as pixel classes (vessel > cell > axon > background),
  calibrated per region to the shipped real masks (``REGION_PARAMS``). Objects are
  seeded per fixed object block from a hash of (seed, block, slot) and have a bounded
  reach, so a box only looks at nearby blocks: cell bodies are rotated ellipsoids;
  capillaries are short random-walk tubes; large vessels are near-vertical capsules
  (lumens 15-40 px across with a bright rim). STR has fascicles; VP, ZI and the fibre
  tracts have coarse axon masses (what the experts label) filled with fine, long fibres.
  ZI's masses are labelled only with ``zi_axon_labels`` (the real ZI masks have none);
* imaging: grey tissue, bright fibres, dark cells and capillaries, black lumens; grain
  and mottle; Gaussian blur plus phase-contrast-like fringes; then the scan's global
  intensity -- offset, contrast and noise level changing over tens of slices and
  hundreds of pixels, independent of the region (``_SCAN``) -- and per-voxel noise.
  Slow "drift" fields change structure contrast, axon brightness and fibre/cell
  density and size between cube locations (cube sets B-D differ from A: ROI-C2's
  domain shift) and are anchored at each set-A cube, where the calibration holds.

See docs/phantom.md. Parallel rendering: ``workers`` renderers (this process and
``workers - 1`` processes of ``phantom_pool``) render parts of large requests; values
never depend on the split.

Bitwise consistency: values are pointwise functions of global coordinates and
only use exactly-rounded float ops (add, mul, div, sqrt, floor: no exp/sin,
whose SIMD and scalar loops may differ), so a box rendered whole or in any
split gives identical bytes; randomness is hashing, never a sequential RNG.
Rendered boxes are kept in a small LRU cache because the exporter reads
image, roi_labels and pixel_labels of the same box in sequence.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import threading
import zlib

import numpy as np
import scipy.ndimage as ndi

from mtneuro_jax.volumes import spec

GENERATOR_VERSION = "phantom-2.1"

_ROI = spec.ROI_IDS
_PIX = spec.PIXEL_IDS
_N_ROI = max(_ROI.values()) + 1

# Render geometry. A request is rendered as it is (plus the blur halo), cut in z
# on the absolute grid of _CHUNK_Z (the exporter's chunks) and in y/x into equal
# parts no longer than _MAX_RENDER_XY (bounded memory). Thin requests are widened
# to the aligned _MIN_RENDER_ZYX block around them, so that slice-by-slice readers
# hit the cache. None of this changes a value (see "Bitwise consistency").
_CHUNK_Z = 32
_MAX_RENDER_XY = 320
_MIN_RENDER_ZYX = (32, 64, 64)
# Parallel rendering (PhantomVolume(workers=N)): the render parts of a request go to N
# renderers (this process and N - 1 worker processes); parts too few to go round are
# split along y (pieces of at least _PARALLEL_MIN_ROWS rows; boxes of at least
# _PARALLEL_MIN_VOXELS voxels: below that, the transfer costs more than it saves).
_PARALLEL_MIN_VOXELS = 1 << 20
_PARALLEL_MIN_ROWS = 32
# Imaging: Gaussian blur (point spread), then phase-contrast-like edge enhancement
# (bright fringes around dark objects, as in the real scans): out = g1 + k (g1 - g2).
_BLUR = (0.85, 2.0)  # sigma, truncate (kernel radius int(truncate * sigma + 0.5) = 2)
_FRINGE = (1.8, 1.7, 0.6)  # sigma, truncate (radius 3), gain k
_HALO = 3  # >= the largest kernel radius: the core never sees the grid's edge
_OUTSIDE_GREY = 3.0  # the scan's empty background (image "~0")


# ---------------------------------------------------------------------------
# Hashing (uint32 arithmetic wraps modulo 2**32 on arrays; never on scalars).
_PRIMES = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C)


def _u32(a) -> np.ndarray:
  return (np.asarray(a, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _mix32(h: np.ndarray) -> np.ndarray:
  """murmur3's 32-bit finaliser (an avalanche bijection) on a uint32 array."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _mix32_inplace(h: np.ndarray, tmp: np.ndarray) -> np.ndarray:
  """``_mix32`` in place on a uint32 array (``tmp``: a scratch array of its shape)."""
  np.right_shift(h, 16, out=tmp)
  h ^= tmp
  h *= np.uint32(0x85EBCA6B)
  np.right_shift(h, 13, out=tmp)
  h ^= tmp
  h *= np.uint32(0xC2B2AE35)
  np.right_shift(h, 16, out=tmp)
  h ^= tmp
  return h


def _key(*parts) -> int:
  """A 32-bit key from ints/strings, stable across processes (unlike ``hash``)."""
  return zlib.crc32(repr(parts).encode()) & 0xFFFFFFFF


def _hash_nd(key: int, coords) -> np.ndarray:
  """uint32 hash of broadcastable integer coordinate arrays under ``key``."""
  h = _mix32(np.atleast_1d(_u32(key)) ^ _u32(0x5BD1E995))  # 1-d: array ops wrap silently
  for k, c in enumerate(coords):
    h = _mix32(h ^ (_u32(c) * np.uint32(_PRIMES[k % len(_PRIMES)])))
  return h


def _unit(h: np.ndarray) -> np.ndarray:
  """uint32 hash -> float32 uniform in [0, 1) (24 bits, exactly representable)."""
  return (h >> 8).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _smoothstep(f: np.ndarray) -> np.ndarray:
  return f * f * (np.float32(3.0) - np.float32(2.0) * f)


# ---------------------------------------------------------------------------
# Noise fields. Speed (see docs/phantom.md, "Render speed"): the full-grid fields are
# computed slice by slice (z) with in-place float32 ops, so the temporaries stay in the
# CPU cache; every voxel still gets exactly the same sequence of float32 operations
# as the plain vectorised formula (tests/test_phantom.py keeps that formula as the
# reference and checks bitwise equality), so no byte depends on how the work is cut.
def _smooth_weights(c, s):
  """Lattice cell index (int64) and smoothstep weight (float32) of 1D integer coords ``c``."""
  t = np.asarray(c, np.float64) / float(s)
  i = np.floor(t)
  return i.astype(np.int64), _smoothstep((t - i).astype(np.float32))


def _lerp_axis(v: np.ndarray, idx: np.ndarray, w: np.ndarray, ax: int) -> np.ndarray:
  """``a + (b - a) * w`` along axis ``ax`` of the lattice array ``v``: a, b = v[idx], v[idx + 1].

  The differences are taken once per lattice pair (the same float32 subtraction as per
  voxel), then gathered; ``w`` is 1D along ``ax``.
  """
  lo = [slice(None)] * v.ndim
  hi = [slice(None)] * v.ndim
  lo[ax], hi[ax] = slice(None, -1), slice(1, None)
  d = np.take(v[tuple(hi)] - v[tuple(lo)], idx, axis=ax)
  shape = [1] * v.ndim
  shape[ax] = -1
  d *= w.reshape(shape)
  d += np.take(v, idx, axis=ax)  # a + d * w (float addition commutes exactly)
  return d


class _GridNoise:
  """Separable value noise in [-1, 1] on the outer grid of 1D integer ``coords`` (z, y, x),
  lattice ``spacing`` per axis in voxels, served one z slice at a time.

  Each value depends only on its own coordinates (lattice values are hashes of global
  lattice indices; the lerps run in a fixed order: x, then y, then z).
  """

  def __init__(self, key: int, spacing, coords):
    idx, ws, lat = [], [], []
    for c, s in zip(coords, spacing, strict=True):
      i, w = _smooth_weights(c, s)
      lo = int(i.min())
      lat.append(np.arange(lo, int(i.max()) + 2))
      idx.append(i - lo)
      ws.append(w)
    grids = np.meshgrid(*lat, indexing="ij", sparse=True)
    v = _unit(_hash_nd(key, grids)) * np.float32(2.0) - np.float32(1.0)
    for ax in reversed(range(1, len(coords))):
      v = _lerp_axis(v, idx[ax], ws[ax], ax)
    self._a = v  # lerped along every axis but z: (lattice z, Y, X)
    self._d = v[1:] - v[:-1]
    self._iz, self._wz = idx[0], ws[0]
    self.shape = tuple(len(c) for c in coords)

  def slice(self, k: int, out: np.ndarray | None = None) -> np.ndarray:
    """The field at z index ``k`` (float32 (Y, X)), into ``out`` when given."""
    j = self._iz[k]
    out = np.multiply(self._d[j], self._wz[k], out=out)
    out += self._a[j]
    return out

  def full(self, scale=None) -> np.ndarray:
    """The whole field (float32 (Z, Y, X)), times float32 ``scale`` when given."""
    out = np.empty(self.shape, np.float32)
    for k in range(self.shape[0]):
      self.slice(k, out[k])
      if scale is not None:
        out[k] *= scale
    return out


def _grid_noise(key: int, spacing, coords) -> np.ndarray:
  """Separable value noise in [-1, 1] on the outer grid of 1D integer ``coords``.

  ``coords`` is one 1D array per axis (e.g. z, y, x), ``spacing`` the lattice
  spacing per axis in voxels. Returns float32 of shape ``(len(c) for c in coords)``.
  Each output value depends only on its own coordinates (lattice values are hashes of
  global lattice indices; the lerps run in a fixed order, last axis first).
  """
  if len(coords) > 1:
    return _GridNoise(key, spacing, coords).full()
  i, w = _smooth_weights(coords[0], spacing[0])
  lo = int(i.min())
  v = _unit(_hash_nd(key, [np.arange(lo, int(i.max()) + 2)])) * np.float32(2.0) - np.float32(1.0)
  return _lerp_axis(v, i - lo, w, 0)


def _point_noise(key, spacing, coords):
  """Value noise in [-1, 1] at arbitrary (broadcastable) points; for small point sets.

  ``key``: one key, or a list of keys (then a list of fields: the weights are computed
  once for all). The lattice values are hashed once per lattice point of the points'
  range (a small table: the spacings are large) and gathered per corner; per point the
  same values and float32 operations as hashing every corner of every point."""
  keys = list(key) if isinstance(key, (list, tuple)) else [key]
  coords = np.broadcast_arrays(*[np.asarray(c, np.float64) for c in coords])
  idx, ws = [], []
  for c, s in zip(coords, spacing, strict=True):
    t = c / float(s)
    i = np.floor(t)
    ws.append(_smoothstep((t - i).astype(np.float32)))
    idx.append(i.astype(np.int64))
  outs = [np.zeros(coords[0].shape, np.float32) for _ in keys]
  if outs[0].size == 0:
    return outs if isinstance(key, (list, tuple)) else outs[0]
  lo = [int(i.min()) for i in idx]
  span = [int(i.max()) - lo_ + 2 for i, lo_ in zip(idx, lo, strict=True)]
  size = outs[0].size
  use_table = outs[0].ndim and np.prod(span, dtype=np.float64) <= 4 * size + 4096
  if use_table:  # hash each lattice point once
    lat = np.meshgrid(
      *[np.arange(lo_, lo_ + n) for lo_, n in zip(lo, span, strict=True)],
      indexing="ij",
      sparse=True,
    )
    tables = [_unit(_hash_nd(k, lat)) * np.float32(2.0) - np.float32(1.0) for k in keys]
    rel = [i - lo_ for i, lo_ in zip(idx, lo, strict=True)]
  one_minus = [np.float32(1.0) - w for w in ws]
  for corner in itertools.product((0, 1), repeat=len(coords)):
    wt = np.ones_like(outs[0])
    for w, w1, c in zip(ws, one_minus, corner, strict=True):
      wt = wt * (w if c else w1)
    if use_table:
      at = tuple(r + c for r, c in zip(rel, corner, strict=True))
    else:  # a sparse cloud over a wide range: hash the corners directly
      at = [i + c for i, c in zip(idx, corner, strict=True)]
    for n, k in enumerate(keys):
      if use_table:
        v = tables[n][at]
      else:
        v = _unit(_hash_nd(k, at)) * np.float32(2.0) - np.float32(1.0)
      outs[n] = outs[n] + wt * v
  return outs if isinstance(key, (list, tuple)) else outs[0]


def _lerp_into(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
  """``a + (b - a) * w``, computed in place in ``b`` (the same float32 ops, addition commutes)."""
  b -= a
  b *= w
  b += a
  return b


class _Lattice:
  """Value noise in [-1, 1] at float32 points (lattice units) of a 2D or 3D lattice.

  Lattice values are hashes of global lattice indices, held in a local table that spans
  ``bounds`` (per axis (lo, hi) lattice indices covering every point it will be asked
  for), so each value depends only on its point. Lerps run along the last axis first.
  """

  def __init__(self, key: int, bounds):
    self.lo = [int(b[0]) for b in bounds]
    self.n = [int(b[1]) - int(b[0]) + 3 for b in bounds]
    lat = np.meshgrid(
      *[np.arange(lo, lo + m) for lo, m in zip(self.lo, self.n, strict=True)],
      indexing="ij",
      sparse=True,
    )
    self.flat = (_unit(_hash_nd(key, lat)) * np.float32(2.0) - np.float32(1.0)).ravel()
    self.strides = [int(np.prod(self.n[k + 1 :])) for k in range(len(self.n))]
    # Flat indices are formed in float32 (exact for integers below 2**24) and gathered as
    # int32: fewer and cheaper passes than int64 index arithmetic.
    self.small = len(self.flat) < 1 << 24
    # The 4 corners of a cell's face across the last two axes, (j, k), (j, k+1), (j+1, k),
    # (j+1, k+1), as one 16-byte item: one gather per face instead of four.
    f, s = self.flat, self.strides[-2]
    m = len(f) - s - 1
    quads = np.stack([f[:m], f[1 : m + 1], f[s : m + s], f[s + 1 : m + s + 1]], -1)
    self.quads = quads.view(np.complex128).reshape(-1)

  def __call__(self, q) -> np.ndarray:
    """Noise at the points ``q`` (one float32 array per axis, same shape; a cache-sized
    chunk). The arrays in ``q`` are overwritten (scratch)."""
    fl = [np.floor(c) for c in q]
    for c, f in zip(q, fl, strict=True):
      c -= f  # the position in the cell
    if self.small:
      idx = fl[0]
      idx -= np.float32(self.lo[0])
      for f, lo, n in zip(fl[1:], self.lo[1:], self.n[1:], strict=True):
        idx *= np.float32(n)
        f -= np.float32(lo)
        idx += f
      idx = idx.astype(np.int32)
    else:
      idx = sum(
        (f.astype(np.intp) - lo) * s for f, lo, s in zip(fl, self.lo, self.strides, strict=True)
      )
    del fl
    w = []
    for f in q:  # _smoothstep(f) = f * f * (3 - 2 f)
      ww = f * f
      f *= np.float32(2.0)
      np.subtract(np.float32(3.0), f, out=f)
      ww *= f
      w.append(ww)
    faces = []
    for off in (0, self.strides[0]) if len(w) == 3 else (0,):
      g = np.take(self.quads[off:], idx).view(np.float32).reshape(*idx.shape, 4)
      c = np.moveaxis(g, -1, 0).copy()  # the 4 corners as contiguous arrays
      a = _lerp_into(c[0], c[1], w[-1])  # along the last axis
      b = _lerp_into(c[2], c[3], w[-1])
      faces.append(_lerp_into(a, b, w[-2]))  # along the second-last
    if len(faces) == 2:
      return _lerp_into(faces[0], faces[1], w[0])  # along the first (3D)
    return faces[0]


_LATTICE_CHUNK = 1 << 15  # points per chunk: a few arrays of it stay in the CPU cache


def _voxel_hash_parts(key: int, z, y, x):
  """Per-axis parts of the per-voxel uint32 hash on the outer grid of 1D coordinates:
  (hz [Z], hyx [Y, X]); voxel (k, j, i) hashes to ``_mix32(hyx[j, i] ^ hz[k])``."""
  hz = _mix32(_u32(z) * np.uint32(_PRIMES[0]) ^ _u32(key))
  hy = _mix32(_u32(y) * np.uint32(_PRIMES[1]) ^ _u32(key * 7 + 1))
  hx = _mix32(_u32(x) * np.uint32(_PRIMES[2]) ^ _u32(key * 13 + 2))
  return hz, hy[:, None] ^ (hx[None, :] * np.uint32(3))


def _lattice_noise(key: int, q, bounds=None) -> np.ndarray:
  """Value noise in [-1, 1] at float32 points ``q`` (2 or 3 same-shape arrays, lattice units).

  Lattice values are hashes of global lattice indices, gathered from a local
  table spanning ``bounds`` (per axis (lo, hi) lattice indices covering every
  point; computed from ``q`` if None), so each value depends only on its point.
  """
  shape = q[0].shape
  q = [np.array(c, np.float32).reshape(-1) for c in q]  # copies: the chunks are scratch
  if bounds is None:
    bounds = [(int(np.floor(c.min())), int(np.floor(c.max()))) for c in q]
  lat = _Lattice(key, bounds)
  out = np.empty(q[0].shape, np.float32)
  for a in range(0, len(out), _LATTICE_CHUNK):
    out[a : a + _LATTICE_CHUNK] = lat([c[a : a + _LATTICE_CHUNK] for c in q])
  return out.reshape(shape)


_QUANTILE_LEVELS = np.linspace(0.0, 1.0, 201)
_quantile_table = None


def _noise_quantile(p) -> np.ndarray:
  """Quantile function of ``_lattice_noise`` (so thresholds are set as area fractions)."""
  global _quantile_table
  if _quantile_table is None:
    h = _hash_nd(_key("quantile-table"), [np.arange(1 << 17)])
    pts = [
      (_unit(_mix32(h ^ np.uint32(k + 1))) * np.float32(61.0)).astype(np.float32) for k in range(3)
    ]
    _quantile_table = np.quantile(_lattice_noise(_key("quantile-lattice"), pts), _QUANTILE_LEVELS)
  return np.interp(p, _QUANTILE_LEVELS, _quantile_table).astype(np.float32)


_mass_tables: dict = {}


def _mass_quantile(p, var: float) -> np.float32:
  """Quantile function of value noise + ``var`` x independent value noise (axon masses)."""
  if var not in _mass_tables:
    h = _hash_nd(_key("mass-quantile-table"), [np.arange(1 << 17)])
    pts = [
      (_unit(_mix32(h ^ np.uint32(k + 1))) * np.float32(61.0)).astype(np.float32) for k in range(6)
    ]
    v = _lattice_noise(_key("mass-lattice-1"), pts[:3]) + np.float32(var) * _lattice_noise(
      _key("mass-lattice-2"), pts[3:]
    )
    _mass_tables[var] = np.quantile(v, _QUANTILE_LEVELS)
  return np.float32(np.interp(p, _QUANTILE_LEVELS, _mass_tables[var]))


def _warm_tables() -> None:
  """Computes the one-off quantile tables (a worker process does it before its first request)."""
  _noise_quantile(0.5)
  for var in sorted({p.axon_var for p in REGION_PARAMS.values() if p.fibre == "fibre"}):
    _mass_quantile(0.5, var)


# ---------------------------------------------------------------------------
# Anatomy. Region ids are BossDB roi ids. Boundaries are x positions wobbling
# with (z, y) (or y positions wobbling with (z, x)) by at most the amplitude
# given, which is smaller than the clearance to the nearest cube:
_MARGIN_NOTES = """
hypothalamus | ZI      x ~ 985 +- 20      (ZI cubes start at x >= 1031)
hypothalamus (ventral) y > 1245 +- 20     (ZI cubes end at y <= 1162)
ZI | VP                x ~ 2103 +- 20     (ZI <= 2055, VP >= 2151)
VP | TRN | IC | STR    x_s(y) - 120 | x_s(y) - 80 | x_s(y), x_s = 3290 + 260 * ramp((y - 780) / 40) +- 15
                       (STR C x >= 3344 at y <= 656: x_s <= 3320; VP A x <= 3319 at y >= 850: x_s - 120 >= 3380)
STR | CC | CTX         x_cc = 4300 + 0.1 (y - 700) +- 25, CTX from x_cc + 110 (STR <= 4084, CTX >= 4600)
tissue                 y in [130 +- 40, 1300 +- 40), x in [60 +- 20, 5745 +- 20), z in TISSUE_Z
"""


def _ramp(t):
  """A smooth 0..1 ramp over t in [-4, 4] (a polynomial sigmoid: no exp, see module doc)."""
  u = np.clip((t + np.float32(4.0)) / np.float32(8.0), 0.0, 1.0)
  return u * u * u * (u * (u * np.float32(6.0) - np.float32(15.0)) + np.float32(10.0))


class _Anatomy:
  """Region id (BossDB roi id; 0 outside tissue) of any voxel, annotated or not."""

  def __init__(self, seed: int):
    self.k = {
      name: _key(seed, "anatomy", name)
      for name in ("hyp", "hyp_v", "zv", "s", "cc", "top", "bot", "left", "right")
    }

  def _bounds(self, z, y, x):
    """Boundary positions: x limits as functions of (z, y), y limits of (z, x)."""
    sp = (180.0, 220.0)
    zy, zx = (z, y), (z, x)

    noise = {}
    for pair, group in (
      (zy, ("s", "cc", "zv", "hyp", "left", "right")),
      (zx, ("hyp_v", "top", "bot")),
    ):
      # one set of weights per pair of coordinates, a table per boundary
      noise.update(zip(group, _point_noise([self.k[m] for m in group], sp, pair), strict=True))

    def n(name, pair):
      return noise[name]

    ramp = _ramp(((y - 780.0) / 40.0).astype(np.float32))
    x_s = 3290.0 + 260.0 * ramp + 15.0 * n("s", zy)
    x_cc = 4300.0 + 0.1 * (y - 700.0) + 25.0 * n("cc", zy)
    # (x limit, region id on its high side), from the highest-precedence boundary down.
    xb = [
      (x_cc + 110.0, _ROI["CTX"]),
      (x_cc, _ROI["corpus_callosum"]),
      (x_s, _ROI["STR"]),
      (x_s - 80.0, _ROI["internal_capsule"]),
      (x_s - 120.0, _ROI["TRN"]),
      (2103.0 + 20.0 * n("zv", zy), _ROI["VP"]),
    ]
    return dict(
      xb=xb,
      x_hyp=985.0 + 20.0 * n("hyp", zy),
      y_hyp=1245.0 + 20.0 * n("hyp_v", zx),
      y_top=130.0 + 40.0 * n("top", zx),
      y_bot=1300.0 + 40.0 * n("bot", zx),
      x_lo=60.0 + 20.0 * n("left", zy),
      x_hi=5745.0 + 20.0 * n("right", zy),
    )

  def __call__(self, z, y, x) -> np.ndarray:
    """Region ids for broadcastable point arrays z, y, x (any shapes; float or int)."""
    z, y, x = (np.asarray(a, np.float64) for a in (z, y, x))
    b = self._bounds(z, y, x)
    conds = [x >= xl for xl, _ in b["xb"]] + [(x >= b["x_hyp"]) & (y < b["y_hyp"])]
    vals = [rid for _, rid in b["xb"]] + [_ROI["ZI"]]
    r = np.select(conds, vals, _ROI["hypothalamus"]).astype(np.uint8)
    return np.where(self._tissue(z, y, x, b), r, np.uint8(0)).astype(np.uint8)

  @staticmethod
  def _tissue(z, y, x, b):
    return (
      (z >= spec.TISSUE_Z[0])
      & (z < spec.TISSUE_Z[1])
      & (y >= b["y_top"])
      & (y < b["y_bot"])
      & (x >= b["x_lo"])
      & (x < b["x_hi"])
    )

  def grid(self, z, y, x) -> np.ndarray:
    """Region ids (uint8, shape (Z, Y, X)) on the outer grid of 1D coordinates.

    Same values as ``__call__``; comparisons that are constant over the grid
    (the usual case: a render chunk inside one region) are not expanded.
    """
    zz, yy, xx = (
      np.asarray(a, np.float64) for a in (z[:, None, None], y[None, :, None], x[None, None, :])
    )
    b = self._bounds(zz, yy, xx)

    def cmp_ge(a, lim):  # a >= lim, as a Python bool when the grid is all one way
      lo, hi = np.min(a), np.max(a)
      llo, lhi = np.min(lim), np.max(lim)
      if lo >= lhi:
        return True
      if hi < llo:
        return False
      return a >= lim

    # Walk from the lowest-precedence region up; later (higher) conditions overwrite.
    r = np.uint8(_ROI["hypothalamus"])
    zi = _and(cmp_ge(xx, b["x_hyp"]), _neg(cmp_ge(yy, b["y_hyp"])))
    for cond, rid in [(zi, _ROI["ZI"])] + [(cmp_ge(xx, xl), rid) for xl, rid in reversed(b["xb"])]:
      if cond is True:
        r = np.uint8(rid)
      elif cond is not False:
        r = np.where(cond, np.uint8(rid), r)
    tissue = True
    for c in (
      cmp_ge(zz, float(spec.TISSUE_Z[0])),
      _neg(cmp_ge(zz, float(spec.TISSUE_Z[1]))),
      cmp_ge(yy, b["y_top"]),
      _neg(cmp_ge(yy, b["y_bot"])),
      cmp_ge(xx, b["x_lo"]),
      _neg(cmp_ge(xx, b["x_hi"])),
    ):
      tissue = _and(tissue, c)
    shape = (len(z), len(y), len(x))
    if tissue is True:
      out = np.broadcast_to(np.asarray(r, np.uint8), shape)
    elif tissue is False:
      out = np.zeros(shape, np.uint8)
    else:
      out = np.where(tissue, r, np.uint8(0))
    return np.ascontiguousarray(np.broadcast_to(out, shape), dtype=np.uint8)


def _neg(c):
  return (not c) if isinstance(c, bool) else ~c


def _and(a, b):
  if a is False or b is False:
    return False
  if a is True:
    return b
  if b is True:
    return a
  return a & b


# ---------------------------------------------------------------------------
# Per-region microstructure and imaging parameters.
@dataclasses.dataclass(frozen=True)
class RegionParams:
  """Calibration of one region (BossDB roi id)."""

  cells_per_tile: float  # 2D cell profiles per 128x128 slice tile (sets the 3D density)
  cell_radius: float  # mean ellipsoid semi-axis, voxels
  vessel_density: float  # capillary length, voxels per 1000 voxels (2D profiles ~ half of it)
  vessel_radius: float  # mean capillary radius, voxels
  fibre: str  # "none" | "fascicle" (separate bundles) | "fibre" (fine fibres in masses)
  fibre_dir: tuple[float, float, float]  # dominant fibre direction (z, y, x), any length
  axon_frac: float  # axon label fraction before cells and vessels overwrite some of it
  axon_var: float  # tile-scale variation of the axon mass field (sets the tile-to-tile sd)
  axon_drift: float  # scale of the fibre-density drift between locations
  trend: tuple[float, float]  # (dy, dx) per 1000 voxels: systematic change away from the set-A cube
  grey: float  # tissue background grey level
  axon_gain: float  # how much brighter myelinated fibres are
  cell_dark: float  # how much darker a cell centre is
  fibre_in: float  # visible fibre area fraction inside axon masses ("fibre" regions)
  fibre_out: float  # visible fibre area fraction outside them
  texture: float = 1.0  # gain of the fine tissue texture (neuropil; CTX has no fibres)
  patch: float = 0.0  # grey levels of a coarser (_PATCH) neuropil texture (CTX: no fibres)


_NO_FIBRE = (0.0, 0.0, 1.0)
_P = RegionParams
# Calibrated against the shipped real masks (morphology.real_calibration_stats): cells per
# 128x128 tile, cell area, nearest-neighbour distance, vessel and axon density (+ its spread).
# vessel_density is the capillaries' share: the real density minus ~0.006, what the large
# lumens add on average (measured on the four set-A cubes with and without lumens).
# grey / texture / cell_dark / axon_gain are set so that, before the scan's global intensity
# (_SCAN), the four regions' tile histograms (mean, sd, 10th and 90th percentile at 4x) nearly
# coincide: region identity is in the structures, not in the grey levels.
REGION_PARAMS: dict[int, RegionParams] = {
  _ROI["CTX"]: _P(
    cells_per_tile=12.0,
    cell_radius=4.05,
    vessel_density=0.83,
    vessel_radius=1.9,
    fibre="none",
    fibre_dir=_NO_FIBRE,
    axon_frac=0.0,
    axon_var=0.0,
    axon_drift=0.0,
    trend=(-1.0, 0.0),
    grey=124.0,
    axon_gain=0.0,
    cell_dark=70.0,
    fibre_in=0.0,
    fibre_out=0.0,
    texture=2.0,
    patch=16.0,
  ),
  _ROI["STR"]: _P(
    cells_per_tile=11.1,
    cell_radius=5.1,
    vessel_density=1.05,
    vessel_radius=1.9,
    fibre="fascicle",
    fibre_dir=(0.25, 0.45, 0.86),
    axon_frac=0.2,
    axon_var=0.0,
    axon_drift=0.8,
    trend=(1.5, 0.5),
    grey=121.0,
    axon_gain=30.0,
    cell_dark=90.0,
    fibre_in=0.0,
    fibre_out=0.0,
    texture=1.1,
  ),
  _ROI["TRN"]: _P(
    cells_per_tile=9.0,
    cell_radius=5.2,
    vessel_density=2.0,
    vessel_radius=1.95,
    fibre="fibre",
    fibre_dir=(0.3, 0.85, 0.45),
    axon_frac=0.5,
    axon_var=0.3,
    axon_drift=1.0,
    trend=(0.0, 0.0),
    grey=114.0,
    axon_gain=34.0,
    cell_dark=66.0,
    fibre_in=0.5,
    fibre_out=0.15,
  ),
  _ROI["VP"]: _P(
    cells_per_tile=8.9,
    cell_radius=5.6,
    vessel_density=2.33,
    vessel_radius=2.0,
    fibre="fibre",
    fibre_dir=(0.35, -0.55, 0.77),
    axon_frac=0.52,
    axon_var=0.55,
    axon_drift=1.3,
    trend=(0.0, 1.0),
    grey=118.0,
    axon_gain=28.0,
    cell_dark=62.0,
    fibre_in=0.55,
    fibre_out=0.12,
    texture=1.0,
  ),
  _ROI["ZI"]: _P(
    cells_per_tile=16.2,
    cell_radius=5.8,
    vessel_density=3.28,
    vessel_radius=1.95,
    fibre="fibre",
    fibre_dir=(0.18, 0.22, 0.96),
    axon_frac=0.5,
    axon_var=0.35,
    axon_drift=2.2,
    trend=(0.0, 1.2),
    grey=121.0,
    axon_gain=30.0,
    cell_dark=28.0,
    fibre_in=0.42,
    fibre_out=0.1,
    texture=1.2,
  ),
  _ROI["internal_capsule"]: _P(
    cells_per_tile=4.0,
    cell_radius=3.8,
    vessel_density=1.5,
    vessel_radius=1.7,
    fibre="fibre",
    fibre_dir=(0.45, 0.85, 0.3),
    axon_frac=0.85,
    axon_var=0.2,
    axon_drift=0.5,
    trend=(0.0, 0.0),
    grey=110.0,
    axon_gain=40.0,
    cell_dark=55.0,
    fibre_in=0.6,
    fibre_out=0.3,
  ),
  _ROI["hypothalamus"]: _P(
    cells_per_tile=14.0,
    cell_radius=5.0,
    vessel_density=2.5,
    vessel_radius=1.95,
    fibre="fibre",
    fibre_dir=(0.1, 0.95, 0.3),
    axon_frac=0.15,
    axon_var=0.3,
    axon_drift=1.0,
    trend=(0.0, 0.0),
    grey=120.0,
    axon_gain=28.0,
    cell_dark=66.0,
    fibre_in=0.4,
    fibre_out=0.05,
  ),
  _ROI["corpus_callosum"]: _P(
    cells_per_tile=4.0,
    cell_radius=3.8,
    vessel_density=1.5,
    vessel_radius=1.7,
    fibre="fibre",
    fibre_dir=(0.05, 1.0, 0.1),
    axon_frac=0.88,
    axon_var=0.2,
    axon_drift=0.5,
    trend=(0.0, 0.0),
    grey=110.0,
    axon_gain=40.0,
    cell_dark=55.0,
    fibre_in=0.6,
    fibre_out=0.3,
  ),
}

# Fibre noise geometry: lattice spacing across / along the fibre direction (voxels),
# domain-warp amplitude (lattice units across) and warp spacing (voxels). "fibre" is
# fine and long (the real VP/ZI texture: thin wispy fibres tens of voxels long).
_FIBRE_GEOM = {
  "fibre": (2.1, 64.0, 6.0, 110.0),
  "fascicle": (20.0, 110.0, 1.1, 272.0),
  "striation": (3.0, 28.0, 4.0, 90.0),
}  # striation: fine fibres inside fascicles
# Axon masses of "fibre" regions (what the experts label): a coarse field (spacing z, y, x)
# plus RegionParams.axon_var times a tile-scale one, thresholded at the label fraction.
_MASS_FINE = (26.0, 34.0, 34.0)
_MASS_COARSE = (70.0, 150.0, 150.0)
_OBJ = 32  # object block edge for seeding cells and capillaries (voxels)
_CAP_SLOTS = 10  # candidate capillary walkers per object block
_CAP_SEGMENTS = 3  # segments per walker (+ an optional branch)
_CAP_SEG_LEN = (7.0, 13.0)  # segment length range, voxels
_CAP_BRANCH_PROB = 0.4
_CAP_SAMPLES = 15  # sphere centres per segment (spacing <= 0.93 voxel)
_CELL_SLOTS = 14  # candidate cells per object block
_CELL_RMAX = 9  # rasterisation radius bound (voxels)
# Large vessels: near-vertical capsules seeded per (z, y, x) block with probability
# _LUMEN_PROB; lumen radius range (a slice shows a round black lumen 15-40 px across, in
# about half of the 256x256 Task 1 tiles), half-length range, max tilt, bright rim width.
_LUMEN_OBJ = (200, 160, 160)
_LUMEN_PROB = 0.2
_LUMEN_RADIUS = (7.5, 20.0)
_LUMEN_HALF = (60.0, 200.0)
_LUMEN_TILT = 0.45
_LUMEN_RIM = (2.5, 55.0)  # rim width (voxels), rim brightness (grey levels)
_LUMEN_REACH = (
  int(_LUMEN_HALF[1] + _LUMEN_RADIUS[1] + _LUMEN_RIM[0]) + 1,
  int(_LUMEN_HALF[1] * _LUMEN_TILT + _LUMEN_RADIUS[1] + _LUMEN_RIM[0]) + 1,
  int(_LUMEN_HALF[1] * _LUMEN_TILT + _LUMEN_RADIUS[1] + _LUMEN_RIM[0]) + 1,
)
# Slow variations (lattice spacing z, y, x in voxels; amplitude). They make
# texture vary within a region and drift across the slab (cube sets B-D differ).
#
# "Drift" fields vary little over a cube's 360 slices but a lot between cube
# locations (xy lattice spacing ~ the distance between cube sets), so a model
# trained on set A meets other parameter values on sets B-D (ROI-C2's domain
# shift). They are anchored to 0 at the centre of each region's set-A cube, where
# the morphology calibration holds.
_DRIFT = {  # name: (spacing z, y, x; amplitude)
  "contrast": ((1000.0, 420.0, 420.0), 0.25),  # relative gain of all structure contrast
  "axon_gain": ((1000.0, 380.0, 380.0), 0.4),  # relative brightness of axons
  "fibre_density": ((1000.0, 380.0, 380.0), 0.14),  # fibre threshold shift x axon_drift
  "cell_density": ((1000.0, 380.0, 380.0), 0.3),  # relative cell density
  "cell_size": ((1000.0, 380.0, 380.0), 0.12),  # relative cell radius
}
# Systematic trends (RegionParams.trend, t = 0 at the set-A cube centre): per unit t,
# fibre threshold shift (x axon_drift), relative cell density and axon brightness.
_TREND = {"fibre_density": 0.12, "cell_density": 0.2, "axon_gain": 0.2}
# Local variation (changes along z too, not anchored); fibre density x axon_drift.
_LOCAL = {
  "fibre_density": ((110.0, 300.0, 300.0), 0.06),
  "cell_density": ((120.0, 300.0, 300.0), 0.2),
}
# The scan's global intensity (not anchored, independent of the region): what a microCT
# reconstruction shows from slice to slice and across a slice -- grey offset, contrast
# and noise level changing over tens of slices and hundreds of pixels. Applied after the
# blur as  mid + offset + contrast * (img - mid); (spacing z, y, x; amplitude).
_SCAN = {
  "offset": ((12.0, 140.0, 140.0), 55.0),  # shading within a tile and from slice to slice
  "contrast": ((14.0, 250.0, 250.0), 0.75),
  "noise": ((16.0, 300.0, 300.0), 1.0),
  "curve": ((14.0, 300.0, 300.0), 1.0),
}
_SCAN_MID = 120.0
_SCAN_CURVE_SCALE = 24.0  # grey levels: the curve term is curve * d * clip(d, +-cap) / this
_SCAN_CURVE_CAP = np.float32(30.0)  # d = img - mid
_SCAN_MIN_CONTRAST = 0.35
_SLICE_DRIFT = (12.0, 6.0)  # per-slice grey offset: z spacing, amplitude
_MOTTLE = ((2.5, 2.5, 2.5), 14.0)  # fine tissue texture
_PATCH = (9.0, 9.0, 9.0)  # lattice spacing of the coarse neuropil texture (RegionParams.patch)
_GRAIN = 44.0  # pre-blur per-voxel grain (uniform amplitude, grey levels)
_NOISE = 10.0  # post-blur per-voxel noise (triangular, grey levels; x the noise-level field)
_EMPTY_NOISE = 0.6  # noise level outside the tissue (the empty scan), relative to _NOISE
_VESSEL_GREY = 22.0  # large vessel lumens
_CAP_DARK = 58.0  # how much darker than the tissue a capillary is


def _param_table(name: str, default: float = 0.0) -> np.ndarray:
  t = np.full(_N_ROI, default, np.float32)
  for rid, p in REGION_PARAMS.items():
    t[rid] = getattr(p, name)
  return t


def _unit3(v) -> np.ndarray:
  v = np.asarray(v, np.float64)
  return v / np.sqrt(np.sum(v * v))


def _fibre_frame(direction) -> np.ndarray:
  """Rows: two unit vectors across the fibre direction, then the direction (z, y, x)."""
  d = _unit3(direction)
  ref = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
  e1 = _unit3(np.cross(d, ref))
  e2 = _unit3(np.cross(d, e1))
  return np.stack([e1, e2, d])


def _ball_offsets(radius: float) -> np.ndarray:
  """Integer offsets [M, 3] within ``radius`` (+0.5) of the origin."""
  r = int(np.ceil(radius))
  g = np.arange(-r, r + 1)
  off = np.stack([a.ravel() for a in np.meshgrid(g, g, g, indexing="ij")], 1)
  return off[np.sum(off * off, 1) <= (radius + 0.5) ** 2]


def _splat_spheres(
  mask: np.ndarray,
  origin,
  centres: np.ndarray,
  radii: np.ndarray,
  batch: int = 2048,
  by_reach: bool = True,
) -> None:
  """Sets ``mask`` (a grid whose voxel [0, 0, 0] is at global ``origin``) True at every
  voxel within ``radii[i]`` of ``centres[i]`` (global float coordinates [P, 3]).
  ``by_reach=False``: every sphere tested on the largest one's offsets (the plain
  formula, slower; the tests check that both give the same mask)."""
  shape = np.array(mask.shape)
  origin = np.asarray(origin, np.float64)
  rmax = float(radii.max(initial=0.0))
  keep = np.all((centres > origin - rmax - 1.0) & (centres < origin + shape + rmax), 1)
  centres, radii = centres[keep] - origin, radii[keep]
  if not len(centres):
    return
  off = _ball_offsets(rmax + 0.87)  # rounding the centre moves it by up to sqrt(3)/2
  pad = int(np.abs(off).max()) + int(np.ceil(rmax)) + 2  # centres may lie rmax + 1 outside
  padded = np.zeros(tuple(shape + 2 * pad), bool)
  strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1], np.int64)
  off_flat = off @ strides
  flat_mask = padded.reshape(-1)
  # A voxel within r of a centre lies within r + sqrt(3)/2 of the rounded centre: spheres
  # are grouped by that reach (squared, whole: the offsets' |o|^2 are integers) and each
  # group is tested on the offsets within its reach only (same per-voxel arithmetic).
  o2 = np.sum(off * off, 1)
  reach2 = np.floor((radii + 0.876) ** 2) if by_reach else np.full(len(radii), o2.max())
  for n in np.unique(reach2):
    group = np.flatnonzero(reach2 == n)
    near = o2 <= n
    offf, off_flat_n = off[near].astype(np.float32), off_flat[near]
    for b0 in range(0, len(group), batch):
      sel = group[b0 : b0 + batch]
      c = centres[sel]
      base = np.floor(c + 0.5)
      frac = (c - base).astype(np.float32)
      d2 = (
        (offf[None, :, 0] - frac[:, None, 0]) ** 2
        + (offf[None, :, 1] - frac[:, None, 1]) ** 2
        + (offf[None, :, 2] - frac[:, None, 2]) ** 2
      )
      r2 = (radii[sel] ** 2).astype(np.float32)[:, None]
      flat = (base.astype(np.int64) + pad) @ strides
      idx = (flat[:, None] + off_flat_n[None, :])[d2 <= r2]
      flat_mask[idx] = True
  mask |= padded[pad:-pad, pad:-pad, pad:-pad]


def _blur_core(img: np.ndarray, sigma: float, truncate: float) -> np.ndarray:
  """``ndi.gaussian_filter(img, sigma, mode="nearest", truncate=truncate)[core]`` (core: the
  grid without its _HALO), computing only what the core needs: the same float32 passes
  (z, then y, then x), each on the rows the later passes read. Every output value comes
  from the same inputs and arithmetic (the kernel radius is <= _HALO, so no core value
  reaches the grid's edge), so the bytes are those of the whole-grid filter."""
  h, r = _HALO, int(truncate * sigma + 0.5)
  z, y, x = img.shape
  kw = dict(sigma=sigma, mode="nearest", truncate=truncate)
  a = ndi.gaussian_filter1d(img[h - r : z - h + r], axis=0, **kw)[r : r + z - 2 * h]
  a = ndi.gaussian_filter1d(a[:, h - r : y - h + r], axis=1, **kw)[:, r : r + y - 2 * h]
  return ndi.gaussian_filter1d(a[:, :, h - r : x - h + r], axis=2, **kw)[:, :, r : r + x - 2 * h]


def _default_workers() -> int:
  """The CPUs this process may use (affinity-aware; 1 where unknown)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------
class PhantomVolume:
  """The synthetic volume of one seed; ``cutout`` serves any ZYX box of a channel.

  Thread-safe; keeps an LRU cache of rendered boxes (``cache_bytes``).
  """

  def __init__(
    self,
    seed: int = 0,
    *,
    workers: int | None = None,
    zi_axon_labels: bool = False,
    cache_bytes: int = 256 << 20,
  ):
    self.seed = int(seed)
    self.zi_axon_labels = bool(zi_axon_labels)
    self.workers = _default_workers() if workers is None else int(workers)
    if self.workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}")
    self.shape = tuple(spec.VOLUME_SHAPE_ZYX)
    self._anatomy = _Anatomy(self.seed)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._cache_bytes = int(cache_bytes)
    self._lock = threading.Lock()
    self._tables = {
      f.name: _param_table(f.name) for f in dataclasses.fields(RegionParams) if f.type == "float"
    }

    # Drift fields are anchored to 0 at the centre of each benchmark region's set-A cube.
    self._anchors = {name: np.zeros(_N_ROI, np.float32) for name in _DRIFT}
    for r in spec.REGIONS:
      x0, x1, y0, y1 = spec.CUBE_SETS["A"][r]
      centre = (float(sum(spec.Z_FULL) // 2), float((y0 + y1) // 2), float((x0 + x1) // 2))
      for name, (sp, _) in _DRIFT.items():
        self._anchors[name][_ROI[r]] = _point_noise(
          self.key("drift", name), sp, [np.array([c]) for c in centre]
        )[0]

    self._trend = {k: np.zeros(_N_ROI, np.float32) for k in ("gy", "gx", "y0", "x0")}
    for rid, p in REGION_PARAMS.items():
      self._trend["gy"][rid], self._trend["gx"][rid] = (g / 1000.0 for g in p.trend)
    for r in spec.REGIONS:
      x0, x1, y0, y1 = spec.CUBE_SETS["A"][r]
      self._trend["y0"][_ROI[r]], self._trend["x0"][_ROI[r]] = (y0 + y1) // 2, (x0 + x1) // 2

  def key(self, *parts) -> int:
    return _key(self.seed, GENERATOR_VERSION, *parts)

  def _trend_at(self, y, x, per_region, k=None):
    """The linear trend t of each voxel's region (0 at its set-A cube centre), broadcastable
    to the grid, or with ``k`` to its z slice k (Y, X)."""
    t = self._trend
    yy = y.astype(np.float32)[:, None]
    xx = x.astype(np.float32)[None, :]
    if k is None:
      yy, xx = yy[None], xx[None]
    return per_region(t["gy"], k) * (yy - per_region(t["y0"], k)) + per_region(t["gx"], k) * (
      xx - per_region(t["x0"], k)
    )

  # -- public ---------------------------------------------------------------
  def cutout(self, channel: str, box: spec.Box) -> np.ndarray:
    """ZYX array of ``box.shape``: uint8 "image", uint64 "roi_labels"/"pixel_labels"."""
    if channel not in spec.CHANNELS:
      raise ValueError(f"unknown channel {channel!r}; known: {', '.join(spec.CHANNELS)}")
    box.check_inside(self.shape)
    out = np.empty(box.shape, np.dtype(spec.CHANNELS[channel].dtype))
    parts = self._render_boxes(box)
    batch = 4 * self.workers  # parts rendered together (spread over the workers); bounds memory
    for b0 in range(0, len(parts), batch):
      chunk = parts[b0 : b0 + batch]
      for part, (arrays, rbox) in zip(chunk, self._rendered(chunk), strict=True):
        src = tuple(
          slice(a - r0, b - r0)
          for a, b, r0 in zip(
            (part.z0, part.y0, part.x0),
            (part.z1, part.y1, part.x1),
            (rbox.z0, rbox.y0, rbox.x0),
            strict=True,
          )
        )
        dst = tuple(
          slice(a - b0, b - b0)
          for a, b, b0 in zip(
            (part.z0, part.y0, part.x0),
            (part.z1, part.y1, part.x1),
            (box.z0, box.y0, box.x0),
            strict=True,
          )
        )
        out[dst] = arrays[channel][src]
    return out

  def anatomy(self, z, y, x) -> np.ndarray:
    """Region id (roi id; 0 outside tissue) at broadcastable points, ignoring ROI_ANNOTATED_Z."""
    return self._anatomy(z, y, x)

  # -- chunking and cache ---------------------------------------------------
  def _render_boxes(self, box: spec.Box) -> list[spec.Box]:
    """Splits a request into the parts that are rendered (and cached) separately."""
    edges = [list(range(box.z0 - box.z0 % _CHUNK_Z + _CHUNK_Z, box.z1, _CHUNK_Z))]
    edges[0] = [box.z0] + edges[0] + [box.z1]
    for lo, hi in ((box.y0, box.y1), (box.x0, box.x1)):
      n = -(-(hi - lo) // _MAX_RENDER_XY)
      edges.append([int(e) for e in np.linspace(lo, hi, n + 1).round()])
    pairs = [list(zip(e[:-1], e[1:], strict=True)) for e in edges]
    return [
      spec.Box(a, b, c, d, e, f) for a, b in pairs[0] for c, d in pairs[1] for e, f in pairs[2]
    ]

  def _cached(self, part: spec.Box):
    """(arrays, rendered box) of a cached box that holds ``part``, or None (lock held)."""
    for rbox in reversed(self._cache):
      if (
        rbox.z0 <= part.z0
        and part.z1 <= rbox.z1
        and rbox.y0 <= part.y0
        and part.y1 <= rbox.y1
        and rbox.x0 <= part.x0
        and part.x1 <= rbox.x1
      ):
        self._cache.move_to_end(rbox)
        return self._cache[rbox], rbox
    return None

  def _rendered(self, parts: list[spec.Box]) -> list:
    """(arrays, rendered box) holding each part: from the cache, or rendered (the missing
    ones together, spread over the workers) and cached."""
    found: list = [None] * len(parts)
    todo: dict = {}  # rendered box -> indices of the parts it serves
    with self._lock:
      for i, part in enumerate(parts):
        found[i] = self._cached(part)
        if found[i] is None:
          todo.setdefault(self._widen(part), []).append(i)
    rboxes = list(todo)
    rendered = self._render_many(rboxes)
    with self._lock:
      for rbox, arrays in zip(rboxes, rendered, strict=True):
        for i in todo[rbox]:
          found[i] = (arrays, rbox)
        self._cache[rbox] = arrays
      total = sum(sum(a.nbytes for a in v.values()) for v in self._cache.values())
      while total > self._cache_bytes and len(self._cache) > 1:
        _, old = self._cache.popitem(last=False)
        total -= sum(a.nbytes for a in old.values())
    return found

  def _render_many(self, boxes: list[spec.Box]) -> list[dict[str, np.ndarray]]:
    """``render`` of each box, spread over ``workers`` renderers (this process and worker
    processes) when there is enough work (_PARALLEL_MIN_VOXELS in all): a multiple of
    ``workers`` pieces where it can (boxes too few to go round evenly are split along y
    into pieces of at least _PARALLEL_MIN_ROWS rows, boxes of at least _PARALLEL_MIN_VOXELS).
    Values are pointwise functions of the coordinates, so no split changes a byte.
    """
    per_box = -(-self.workers // max(1, len(boxes)))
    if (len(boxes) * per_box) % self.workers:  # e.g. 3 parts, 2 renderers: 6 halves balance
      per_box = self.workers
    tasks, owner = [], []
    for j, box in enumerate(boxes):
      n = min(per_box, box.shape[1] // _PARALLEL_MIN_ROWS)
      if int(np.prod(box.shape)) < _PARALLEL_MIN_VOXELS:
        n = 1
      edges = [int(e) for e in np.linspace(box.y0, box.y1, max(n, 1) + 1).round()]
      for a, b in zip(edges[:-1], edges[1:], strict=True):
        tasks.append((box.z0, box.z1, a, b, box.x0, box.x1))
        owner.append(j)
    total = sum(int(np.prod(b.shape)) for b in boxes)
    if self.workers < 2 or len(tasks) < 2 or total < _PARALLEL_MIN_VOXELS:
      return [self.render(b) for b in boxes]
    from mtneuro_jax.volumes import phantom_pool  # the pool only when parallel rendering

    results = phantom_pool.render_parts(
      self.workers,
      self.seed,
      self.zi_axon_labels,
      tasks,
      local=lambda bounds: self.render(spec.Box(*bounds)),
    )
    out = []
    for j in range(len(boxes)):
      pieces = [r for r, o in zip(results, owner, strict=True) if o == j]
      if len(pieces) == 1:
        out.append(pieces[0])
      else:
        out.append({ch: np.concatenate([p[ch] for p in pieces], axis=1) for ch in pieces[0]})
    return out

  def _widen(self, part: spec.Box) -> spec.Box:
    """Widens a thin request to the aligned block around it (values never depend on it)."""
    out = []
    for lo, hi, m, n in zip(
      (part.z0, part.y0, part.x0),
      (part.z1, part.y1, part.x1),
      _MIN_RENDER_ZYX,
      self.shape,
      strict=True,
    ):
      if hi - lo < m:
        a, b = (lo // m) * m, -(-hi // m) * m
        if m == _CHUNK_Z:  # stay inside the part's z chunk (parts never cross one)
          b = min(b, (lo // _CHUNK_Z + 1) * _CHUNK_Z)
        lo, hi = max(0, min(lo, a)), min(n, max(hi, b))
      out.append((lo, hi))
    return spec.Box(*out[0], *out[1], *out[2])

  # -- rendering ------------------------------------------------------------
  def render(self, box: spec.Box) -> dict[str, np.ndarray]:
    """All channels of ``box`` as uint8 ZYX arrays {"image", "roi_labels", "pixel_labels"}.

    Any box (also outside the volume) is allowed; values depend only on the
    voxel coordinates. Memory is roughly 100 bytes per voxel of box + halo, so
    callers render large boxes in chunks (``cutout`` does).
    """
    h = _HALO
    z = np.arange(box.z0 - h, box.z1 + h)
    y = np.arange(box.y0 - h, box.y1 + h)
    x = np.arange(box.x0 - h, box.x1 + h)
    shape = (len(z), len(y), len(x))
    core = (slice(h, -h), slice(h, -h), slice(h, -h))
    anat = self._anatomy.grid(z, y, x)
    present = [int(r) for r in np.flatnonzero(np.bincount(anat.ravel(), minlength=_N_ROI)) if r]
    tissue = anat > 0
    tissue_all = bool(tissue.all())

    single = present[0] if len(present) == 1 and tissue_all else None

    def per_region(t, k=None):  # a per-region table on the grid (z slice k): a scalar
      if single is not None:  # when one region fills the grid
        return np.float32(t[single])
      return t[anat] if k is None else t[anat[k]]

    pix = np.zeros(shape, np.uint8)
    if not present:  # outside tissue: the empty scan
      img = np.full(shape, _OUTSIDE_GREY, np.float32)
    else:
      axon, ax_strength = self._axons(z, y, x, anat, present, per_region)
      pix[axon] = _PIX["axon"]
      del axon
      cell, cell_profile = self._cells(z, y, x, shape)
      pix[cell] = _PIX["cell"]
      del cell
      vessel, lumen, rim = self._vessels(z, y, x, shape)
      pix[vessel] = _PIX["vessel"]
      del vessel
      if not tissue_all:
        pix[~tissue] = _PIX["background"]
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
    g1 = _blur_core(img, *_BLUR)
    g2 = _blur_core(img, *_FRINGE[:2])
    del img
    zc, yc, xc = z[h:-h], y[h:-h], x[h:-h]
    image = self._finish(zc, yc, xc, g1, g2, bool(present), tissue_all, tissue[core])
    del g1, g2
    roi = np.array(anat[core], np.uint8)
    roi[(zc < spec.ROI_ANNOTATED_Z[0]) | (zc >= spec.ROI_ANNOTATED_Z[1])] = _ROI["clear"]
    return {
      "image": image,
      "roi_labels": roi,
      "pixel_labels": np.ascontiguousarray(pix[core]),
    }

  def _finish(self, zc, yc, xc, g1, g2, present, tissue_all, tissue):
    """The image after the blur (uint8, core shape): fringes, the scan's global intensity
    (``_SCAN``, on tissue only), per-voxel noise, rounding.

    ``g1``, ``g2``: the two blurred images (core); ``tissue``: the core's tissue mask.
    Slice by slice (cache-sized temporaries); per voxel the float32 operations of
    ``out = g1 + k (g1 - g2)``, ``mid + offset + gain (out - mid)``, ``+ noise``, in that order.
    """
    shape = (len(zc), len(yc), len(xc))
    image = np.empty(shape, np.uint8)
    k_fringe = np.float32(_FRINGE[2])
    noise_amp = np.float32(_NOISE * 2.0)
    if present:
      scan = {n: _GridNoise(self.key("scan", n), sp, (zc, yc, xc)) for n, (sp, _) in _SCAN.items()}
      amp = {n: np.float32(a) for n, (_, a) in _SCAN.items()}
      zs, za = _SLICE_DRIFT
      slice_offset = np.float32(za) * _grid_noise(self.key("slice"), (zs,), (zc,))
      mid = np.float32(_SCAN_MID)
    else:
      noise_amp = noise_amp * np.float32(_EMPTY_NOISE)
    hz, hyx = _voxel_hash_parts(self.key("noise"), zc, yc, xc)  # per-voxel noise, slice by slice
    hn, hbuf = np.empty(shape[1:], np.uint32), np.empty(shape[1:], np.uint32)
    tri, t = np.empty(shape[1:], np.float32), np.empty(shape[1:], np.float32)
    qbuf = np.empty(shape[1:], np.float32)  # the response curve's term
    for k in range(shape[0]):
      a = g1[k]
      img = g1[k] - g2[k]
      img *= k_fringe
      img += a  # g1 + k (g1 - g2)
      if present:
        offset = scan["offset"].slice(k)
        offset *= amp["offset"]
        offset += slice_offset[k]
        gain = scan["contrast"].slice(k)
        gain *= amp["contrast"]
        gain += np.float32(1.0)
        np.maximum(gain, np.float32(_SCAN_MIN_CONTRAST), out=gain)
        plain = None if tissue_all else img.copy()
        img -= mid  # d = img - mid
        # The scan's response curve: d + curve * d * clip(d, +-cap) / scale. A quadratic
        # term of varying sign skews the histogram either way, so a region's skew says
        # little about the region (the cap keeps bright and dark extremes from exploding).
        c = scan["curve"].slice(k, t)
        c *= amp["curve"]
        c *= np.float32(1.0 / _SCAN_CURVE_SCALE)
        q = np.clip(img, -_SCAN_CURVE_CAP, _SCAN_CURVE_CAP, out=qbuf)
        q *= img
        q *= c
        img += q
        img *= gain
        offset += mid
        img += offset  # (mid + offset) + gain (img - mid)
        if plain is not None:
          np.copyto(img, plain, where=~tissue[k])
        level = scan["noise"].slice(k)
        level *= amp["noise"]
        level += np.float32(1.0)
        np.maximum(level, np.float32(0.25), out=level)
        if not tissue_all:
          np.copyto(level, np.float32(_EMPTY_NOISE), where=~tissue[k])
        level *= noise_amp
        amp_k = level
      else:
        amp_k = noise_amp
      np.bitwise_xor(hyx, hz[k], out=hn)
      _mix32_inplace(hn, hbuf)
      np.bitwise_and(hn, np.uint32(0xFFFF), out=hbuf)
      np.copyto(tri, hbuf, casting="unsafe")
      np.right_shift(hn, 16, out=hbuf)
      np.copyto(t, hbuf, casting="unsafe")
      tri += t
      tri *= np.float32(1.0 / 65536.0)
      tri -= np.float32(1.0)
      tri *= amp_k
      img += tri
      img += np.float32(0.5)
      np.clip(img, 0.0, 255.0, out=img)
      np.copyto(image[k], img, casting="unsafe")
    return image

  def _axons(self, z, y, x, anat, present, per_region):
    """Axon label mask and visible fibre strength in [0, 1] (bright fibres) on the grid.

    "fascicle" regions (STR): the labels are the bundles, which are what the image shows.
    "fibre" regions (VP, ZI, ...): the labels are coarse masses (as the experts draw them)
    of a coarse + tile-scale field; the image shows fine, long fibres, dense inside the
    masses (``fibre_in``) and sparse outside (``fibre_out``). ZI's masses are labelled
    only with ``zi_axon_labels`` (the shipped real ZI masks carry no axon labels).
    """
    regions = [
      rid
      for rid in present
      if REGION_PARAMS[rid].fibre != "none" and REGION_PARAMS[rid].axon_frac > 0
    ]
    if not regions:
      return np.zeros(anat.shape, bool), np.float32(0.0)
    multi = len(present) > 1
    # Threshold shifts: location drift and trend + local variation (shared by the regions).
    sp, drift_amp = _DRIFT["fibre_density"]
    drift_field = _GridNoise(self.key("drift", "fibre_density"), sp, (z, y, x))
    sp, local_amp = _LOCAL["fibre_density"]
    local_field = _GridNoise(self.key("local-fibre-density"), sp, (z, y, x))
    fields = {}  # per region: its full fibre fields and its mass fields (served per slice)
    for rid in regions:
      p = REGION_PARAMS[rid]
      if p.fibre == "fascicle":
        f, warp = self._fibre_field(rid, p.fibre, p.fibre_dir, z, y, x)
        fine, _ = self._fibre_field(rid, "striation", p.fibre_dir, z, y, x, warp=warp)
        fields[rid] = (f, fine)
      else:
        f, _ = self._fibre_field(rid, p.fibre, p.fibre_dir, z, y, x)
        mass = _GridNoise(self.key("mass", rid), _MASS_FINE, (z, y, x))
        coarse = _GridNoise(self.key("mass-coarse", rid), _MASS_COARSE, (z, y, x))
        fields[rid] = (f, mass, coarse)
    axon = np.zeros(anat.shape, bool)
    strength = np.empty(anat.shape, np.float32)
    # Slice by slice (cache-sized temporaries); per voxel the float32 operations of the
    # whole-grid formulas, in the same order.
    for k in range(anat.shape[0]):
      drift = drift_field.slice(k)
      drift -= per_region(self._anchors["fibre_density"], k)
      drift *= np.float32(drift_amp)
      drift += np.float32(_TREND["fibre_density"]) * self._trend_at(y, x, per_region, k)
      drift += local_field.slice(k) * np.float32(local_amp)  # drift + local
      for n, rid in enumerate(regions):
        p = REGION_PARAMS[rid]
        shift = np.float32(p.axon_drift) * drift
        if p.fibre == "fascicle":
          f, fine = fields[rid]
          m = f[k] > _noise_quantile(1.0 - p.axon_frac) - shift
          s = np.float32(0.55) + np.float32(0.45) * np.clip(
            fine[k] * np.float32(1.6) + np.float32(0.4), 0.0, 1.0
          )
          lab = m
        else:
          f, mass_field, coarse = fields[rid]
          mass = mass_field.slice(k)
          mass += np.float32(p.axon_var) * coarse.slice(k)
          lab = mass > _mass_quantile(1.0 - p.axon_frac, p.axon_var) - shift
          thr = np.where(lab, _noise_quantile(1.0 - p.fibre_in), _noise_quantile(1.0 - p.fibre_out))
          m = f[k] > thr
          s = np.clip((f[k] - thr) * np.float32(3.0) + np.float32(0.35), 0.0, 1.0)
          if rid == _ROI["ZI"] and not self.zi_axon_labels:
            lab = None
        if multi:
          inside = anat[k] == rid
          m &= inside
          if lab is not None:
            lab &= inside
        if n == 0:
          np.copyto(strength[k], np.where(m, s, np.float32(0.0)))
        else:
          np.copyto(strength[k], s, where=m)
        if lab is not None:
          axon[k] |= lab
    return axon, strength

  def _fibre_field(self, rid, kind, direction, z, y, x, warp=None):
    """Domain-warped anisotropic value noise, long along ``direction``: fibres / fascicles.

    The two across-fibre coordinates are shifted by a smooth warp (voxels; made
    here from the region's warp noise unless ``warp`` is given), which bends the
    fibres. "striation" is 2D noise across the direction only (fine, long fibres).
    Returns (field float32 (Z, Y, X), warp) so a second field can bend along; ``warp``
    is (its two noise fields, amplitude in voxels), evaluated slice by slice.
    """
    across, along, warp_amp, warp_sp = _FIBRE_GEOM[kind]
    frame = _fibre_frame(direction)
    corners = np.array(
      list(itertools.product((z[0], z[-1]), (y[0], y[-1]), (x[0], x[-1]))), np.float64
    )
    if warp is None:
      fields = [
        _GridNoise(self.key("warp", rid, kind, k), (warp_sp,) * 3, (z, y, x)) for k in range(2)
      ]
      warp = (fields, np.float32(warp_amp * across))
    fields, amp_vox = warp
    warp_max = float(amp_vox)  # |noise| <= 1: a bound for the lattice table's range
    dims = 2 if kind == "striation" else 3
    proj, bounds = [], []
    for k in range(dims):
      e = frame[k] / (across if k < 2 else along)
      # The projection (e . (z, y, x)) as float32 per axis, summed per voxel (z + y) + x.
      proj.append([(e[0] * z).astype(np.float32), (e[1] * y).astype(np.float32)])
      proj[-1].append((e[2] * x).astype(np.float32)[None, :])
      amp = warp_max / across if k < 2 else 0.0
      pc = corners @ e  # the projection is linear: its extremes are at the corners
      bounds.append((int(np.floor(pc.min() - amp)) - 1, int(np.floor(pc.max() + amp)) + 1))
    lattice = _Lattice(self.key("fibre", rid, kind), bounds)
    inv = np.float32(1.0 / across)
    out = np.empty((len(z), len(y), len(x)), np.float32)
    rows = max(1, _LATTICE_CHUNK // len(x))  # points = lattice coordinates of a few rows
    bend = [np.empty((len(y), len(x)), np.float32) for _ in range(2)]
    qbuf = [np.empty((rows, len(x)), np.float32) for _ in range(dims)]
    tbuf = np.empty((rows, len(x)), np.float32)
    for i in range(len(z)):
      for k in range(2):  # the warp of this slice, voxels (noise * amplitude)
        fields[k].slice(i, bend[k])
        bend[k] *= amp_vox
      for r0 in range(0, len(y), rows):
        r1 = min(len(y), r0 + rows)
        q = []
        for k, (pz, py, px) in enumerate(proj):
          c = np.add((pz[i] + py[r0:r1])[:, None], px, out=qbuf[k][: r1 - r0])
          if k < 2:  # bent by the warp (voxels -> lattice units across)
            c += np.multiply(bend[k][r0:r1], inv, out=tbuf[: r1 - r0])
          q.append(c)
        out[i, r0:r1] = lattice(q)  # (q is scratch, refilled per chunk)
    return out, warp

  def _vessels(self, z, y, x, shape):
    """Vessels: capillary walkers + sparse large vessels.

    Returns (vessel mask, large-lumen mask or None, bright rim mask or None) on the grid.
    """
    vessel = self._capillaries(z, y, x, shape)
    lumen, rim = self._lumens(z, y, x)
    if lumen is not None:
      vessel |= lumen
      rim &= ~vessel
    return vessel, lumen, rim

  def _candidates(self, name, slots, reach, z, y, x, n_attr):
    """Objects seeded per ``_OBJ``-voxel block near the grid, in global order.

    Returns (origin [N, 3] float64 block corner, uniforms list of n_attr float32 [N]),
    for the slots of every block within ``reach`` voxels of the grid.
    """
    o = _OBJ
    rngs = [np.arange((a[0] - reach) // o, (a[-1] + reach) // o + 1) for a in (z, y, x)]
    bz, by, bx, slot = (g.ravel() for g in np.meshgrid(*rngs, np.arange(slots), indexing="ij"))
    h = _hash_nd(self.key(name), [bz, by, bx, slot])
    u = [_unit(_mix32(h ^ np.uint32(k + 1))) for k in range(n_attr)]
    return np.stack([bz, by, bx], 1).astype(np.float64) * o, u

  def _capillaries(self, z, y, x, shape):
    """Capillaries: short random-walk polylines (3 segments, optional branch) thickened
    into tubes (union of spheres along the path), seeded per object block."""
    o = _OBJ
    lmax = _CAP_SEG_LEN[1]
    reach = int(np.ceil(_CAP_SEGMENTS * lmax + 3.5))
    origin, u = self._candidates("capillaries", _CAP_SLOTS, reach, z, y, x, 40)
    start = origin + np.stack(u[:3], 1).astype(np.float64) * o
    near = np.all(
      (start > np.array([z[0], y[0], x[0]]) - reach)
      & (start < np.array([z[-1], y[-1], x[-1]]) + reach),
      1,
    )
    idx = np.flatnonzero(near)
    start, u = start[idx], [a[idx] for a in u]
    reg = self._anatomy(start[:, 0], start[:, 1], start[:, 2])
    mean_len = _CAP_SEGMENTS * 0.5 * sum(_CAP_SEG_LEN) + _CAP_BRANCH_PROB * 0.5 * sum(_CAP_SEG_LEN)
    p = self._tables["vessel_density"][reg] * 1e-3 * o**3 / (_CAP_SLOTS * mean_len)
    sel = np.flatnonzero((reg > 0) & (u[3] < p))
    mask = np.zeros(shape, bool)
    if not len(sel):
      return mask
    start, u = start[sel], [a[sel].astype(np.float64) for a in u]
    radius = self._tables["vessel_radius"][reg[sel]] * (0.75 + 0.5 * u[4])

    def direction(k):  # a random unit vector from three triangular variates
      v = np.stack([u[k] + u[k + 1] - 1.0, u[k + 2] + u[k + 3] - 1.0, u[k + 4] + u[k + 5] - 1.0], 1)
      return v / np.sqrt(np.sum(v * v, 1, keepdims=True) + 1e-9)

    d = direction(5)
    pts = [start]
    for s_ in range(_CAP_SEGMENTS):
      length = _CAP_SEG_LEN[0] + (_CAP_SEG_LEN[1] - _CAP_SEG_LEN[0]) * u[11 + s_]
      pts.append(pts[-1] + length[:, None] * d)
      turn = direction(14 + 6 * s_)
      d = d + 0.9 * turn
      d = d / np.sqrt(np.sum(d * d, 1, keepdims=True))
    seg_a = np.stack(pts[:-1], 1)  # [W, S, 3]
    seg_b = np.stack(pts[1:], 1)
    # Optional branch from the first inner vertex, roughly across the path.
    branch_len = np.where(u[32] < _CAP_BRANCH_PROB, _CAP_SEG_LEN[0] + 5.0 * u[33], 0.0)
    bdir = direction(34)
    seg_a = np.concatenate([seg_a, pts[1][:, None]], 1)
    seg_b = np.concatenate([seg_b, (pts[1] + branch_len[:, None] * bdir)[:, None]], 1)
    t = np.linspace(0.0, 1.0, _CAP_SAMPLES)[None, None, :, None]
    centres = (seg_a[:, :, None] + (seg_b - seg_a)[:, :, None] * t).reshape(len(sel), -1, 3)
    rad = np.broadcast_to(radius[:, None], centres.shape[:2])
    centres, rad = centres.reshape(-1, 3), rad.reshape(-1)
    _splat_spheres(mask, np.array([z[0], y[0], x[0]]), centres, rad)
    return mask

  def _lumens(self, z, y, x):
    """Large vessels: near-vertical capsules seeded per ``_LUMEN_OBJ`` block.

    Returns (lumen mask, rim mask) on the grid, or (None, None) when none is near.
    """
    rngs = [
      np.arange((a[0] - r) // o, (a[-1] + r) // o + 1)
      for a, r, o in zip((z, y, x), _LUMEN_REACH, _LUMEN_OBJ, strict=True)
    ]
    cz, cy, cx = (g.ravel() for g in np.meshgrid(*rngs, indexing="ij"))
    h = _hash_nd(self.key("lumen"), [cz, cy, cx])
    u = [_unit(_mix32(h ^ np.uint32(k + 1))).astype(np.float64) for k in range(8)]
    keep = u[0] < _LUMEN_PROB
    if not keep.any():
      return None, None
    oz, oy, ox = _LUMEN_OBJ
    centre = np.stack([(cz + u[1]) * oz, (cy + u[2]) * oy, (cx + u[3]) * ox], 1)[keep]
    half = (_LUMEN_HALF[0] + (_LUMEN_HALF[1] - _LUMEN_HALF[0]) * u[4])[keep]
    tilt = _LUMEN_TILT
    slope = np.stack([np.ones_like(u[5]), tilt * (2 * u[5] - 1), tilt * (2 * u[6] - 1)], 1)[keep]
    # Radii skewed to the small end (many ~8-12 px lumens, a few up to 20).
    radius = (_LUMEN_RADIUS[0] + (_LUMEN_RADIUS[1] - _LUMEN_RADIUS[0]) * u[7] * u[7])[keep]
    region = self._anatomy(centre[:, 0], centre[:, 1], centre[:, 2])
    width = _LUMEN_RIM[0]
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
      pz = a[0] + t * d[0] - zz
      py = a[1] + t * d[1]
      px = a[2] + t * d[2]
      # Per slice only the window within ro (+1) of the axis point can be inside the ring;
      # the rest of the bounding box has d2 >= ro^2 (same d2 arithmetic per voxel).
      (y0, y1), (x0, x1) = (sel[1][0], sel[1][-1] + 1), (sel[2][0], sel[2][-1] + 1)
      for k, iz in enumerate(sel[0]):
        j0 = max(y0, int(np.floor(py[k] - ro)) - 1 - int(y[0]))
        j1 = min(y1, int(np.floor(py[k] + ro)) + 2 - int(y[0]))
        i0 = max(x0, int(np.floor(px[k] - ro)) - 1 - int(x[0]))
        i1 = min(x1, int(np.floor(px[k] + ro)) + 2 - int(x[0]))
        if j0 >= j1 or i0 >= i1:
          continue
        gy = y[j0:j1].astype(np.float64)[:, None] - py[k]
        gx = x[i0:i1].astype(np.float64)[None, :] - px[k]
        d2 = gy * gy + gx * gx + pz[k] * pz[k]
        ring = d2 < ro * ro
        if not ring.any():
          continue
        if mask is None:
          mask = np.zeros((len(z), len(y), len(x)), bool)
          rim = np.zeros((len(z), len(y), len(x)), bool)
        mask[iz, j0:j1, i0:i1] |= d2 < r * r
        rim[iz, j0:j1, i0:i1] |= ring
    if mask is None:
      return None, None
    return mask, rim

  def _cells(self, z, y, x, shape, by_reach: bool = True):
    """Cell bodies: rotated ellipsoids, seeded per object block. Returns (mask, profile).

    ``profile`` is 1 at a cell centre and 0 at its rim (used for shading).
    ``by_reach=False``: every cell evaluated on the whole rmax ball (the plain formula,
    slower; the tests check that both give the same bytes).
    """
    o, rmax = _OBJ, _CELL_RMAX
    origin, u = self._candidates("cells", _CELL_SLOTS, rmax, z, y, x, 16)
    cz = origin[:, 0] + u[0].astype(np.float64) * o
    cy = origin[:, 1] + u[1].astype(np.float64) * o
    cx = origin[:, 2] + u[2].astype(np.float64) * o
    # Cheap bounding test first, then the region/density test at the centres.
    near = (
      (cz > z[0] - rmax)
      & (cz < z[-1] + rmax)
      & (cy > y[0] - rmax)
      & (cy < y[-1] + rmax)
      & (cx > x[0] - rmax)
      & (cx < x[-1] + rmax)
    )
    idx = np.flatnonzero(near)
    cz, cy, cx = cz[idx], cy[idx], cx[idx]
    u = [a[idx] for a in u]
    reg = self._anatomy(cz, cy, cx)
    sp, samp = _DRIFT["cell_size"]
    size = (
      _point_noise(self.key("drift", "cell_size"), sp, (cz, cy, cx))
      - self._anchors["cell_size"][reg]
    )
    rmean = self._tables["cell_radius"][reg] * (np.float32(1.0) + np.float32(samp) * size)
    # 3D density so that a slice shows cells_per_tile profiles per 128x128 tile:
    # an ellipsoid of mean semi-axis r is cut by ~2r slices.
    dens = self._tables["cells_per_tile"][reg] / (128.0 * 128.0 * 2.0 * np.maximum(rmean, 1.0))
    sp, amp = _DRIFT["cell_density"]
    drift = (
      _point_noise(self.key("drift", "cell_density"), sp, (cz, cy, cx))
      - self._anchors["cell_density"][reg]
    )
    sp, lamp = _LOCAL["cell_density"]
    local = _point_noise(self.key("local-cell-density"), sp, (cz, cy, cx))
    t = self._trend
    trend = t["gy"][reg] * (cy - t["y0"][reg]) + t["gx"][reg] * (cx - t["x0"][reg])
    dens = dens * np.maximum(0.2, 1.0 + amp * drift + lamp * local + _TREND["cell_density"] * trend)
    accept = (reg > 0) & (u[3] < dens * (o**3) / _CELL_SLOTS)
    mask = np.zeros(shape, bool)
    profile = np.zeros(shape, np.float32)
    if not accept.any():
      return mask, profile
    sel = np.flatnonzero(accept)
    cz, cy, cx = cz[sel], cy[sel], cx[sel]
    u = [a[sel] for a in u]
    rm = rmean[sel]
    radii = np.stack([rm * (np.float32(0.65) + np.float32(0.7) * u[k]) for k in (4, 5, 6)], 1)
    radii = np.minimum(radii, np.float32(rmax - 0.3)).astype(np.float64)
    # Random rotation from a normalised quaternion of near-Gaussian components.
    qv = np.stack([(u[7 + 2 * k] + u[8 + 2 * k] - 1.0).astype(np.float64) for k in range(4)], 1)
    qv = qv / np.sqrt(np.sum(qv * qv, 1, keepdims=True) + 1e-12)
    a, b, c, d = qv.T
    rot = np.stack(
      [
        np.stack([a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)], 1),
        np.stack([2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)], 1),
        np.stack([2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d], 1),
      ],
      1,
    )
    # Quadratic form A = R^T diag(1/r^2) R per cell.
    inv = 1.0 / (radii * radii)
    A = np.einsum("nki,nk,nkj->nij", rot, inv, rot)
    # Offsets inside the bounding sphere (radius rmax + 0.5). A voxel with rho2 <= 1 lies
    # within the cell's largest semi-axis of its centre, so within that + sqrt(3) of the
    # rounded-down centre: each cell is evaluated on the offsets of that reach only
    # (cells grouped by whole reach), with the same per-(cell, offset) arithmetic.
    g = np.arange(-rmax, rmax + 1)
    oz, oy, ox = [a.ravel() for a in np.meshgrid(g, g, g, indexing="ij")]
    o2 = oz * oz + oy * oy + ox * ox
    ball = o2 <= (rmax + 0.5) ** 2
    oz, oy, ox, o2 = oz[ball], oy[ball], ox[ball], o2[ball]
    reach = np.ceil(radii.max(1) + np.sqrt(3.0) + 0.01) if by_reach else np.full(len(cz), 99.0)
    iz, iy, ix = np.floor(cz), np.floor(cy), np.floor(cx)
    dark_all = np.float32(0.75) + np.float32(0.5) * u[15]
    found = []
    for r in np.unique(reach):
      cells = np.flatnonzero(reach == r)
      near = o2 <= r * r
      ozr, oyr, oxr = oz[near], oy[near], ox[near]
      Ar = A[cells]
      dz = ozr[None, :] - (cz[cells] - iz[cells])[:, None]
      dy = oyr[None, :] - (cy[cells] - iy[cells])[:, None]
      dx = oxr[None, :] - (cx[cells] - ix[cells])[:, None]
      rho2 = (
        Ar[:, 0, 0, None] * dz * dz
        + Ar[:, 1, 1, None] * dy * dy
        + Ar[:, 2, 2, None] * dx * dx
        + 2.0
        * (Ar[:, 0, 1, None] * dz * dy + Ar[:, 0, 2, None] * dz * dx + Ar[:, 1, 2, None] * dy * dx)
      )
      del dz, dy, dx
      vz = iz[cells].astype(np.int64)[:, None] + ozr[None, :] - z[0]
      vy = iy[cells].astype(np.int64)[:, None] + oyr[None, :] - y[0]
      vx = ix[cells].astype(np.int64)[:, None] + oxr[None, :] - x[0]
      ok = (
        (rho2 <= 1.0)
        & (vz >= 0)
        & (vz < shape[0])
        & (vy >= 0)
        & (vy < shape[1])
        & (vx >= 0)
        & (vx < shape[2])
      )
      flat = ((vz * shape[1] + vy) * shape[2] + vx)[ok]
      dark = dark_all[cells][:, None]
      val = (dark * (np.float32(1.0) - rho2.astype(np.float32) * np.float32(0.35)))[ok]
      found.append((flat, val, np.broadcast_to(cells[:, None], ok.shape)[ok]))
    flat, val, cell = (np.concatenate(parts) for parts in zip(*found, strict=True))
    # Cells are in a fixed global order (object block, slot): where two overlap the
    # later one wins, whichever box is rendered (made explicit: numpy does not
    # promise an order for repeated indices).
    order = np.argsort(cell, kind="stable")[::-1]
    flat, val = flat[order], val[order]
    flat, first = np.unique(flat, return_index=True)
    mask.ravel()[flat] = True
    profile.ravel()[flat] = val[first]
    return mask, profile

  def _image(self, z, y, x, pix, ax_strength, cell_profile, lumen, rim, per_region, tissue):
    """Pre-blur grey levels (float32, grid shape). ``tissue`` None means all tissue.

    Slice by slice (cache-sized temporaries), per voxel the float32 operations of
    ``grey + contrast (gain axon_strength + texture)`` and the overrides, in that order.
    """
    shape = pix.shape
    out = np.empty(shape, np.float32)
    drift = {}
    for name in ("contrast", "axon_gain"):
      sp, amp = _DRIFT[name]
      drift[name] = (_GridNoise(self.key("drift", name), sp, (z, y, x)), np.float32(amp))
    sp, mottle_amp = _MOTTLE
    mottle = _GridNoise(self.key("mottle"), sp, (z, y, x))
    hz, hyx = _voxel_hash_parts(self.key("grain"), z, y, x)  # per-voxel noise, slice by slice
    hg, hbuf = np.empty(shape[1:], np.uint32), np.empty(shape[1:], np.uint32)
    full_strength = np.ndim(ax_strength) > 0
    patch_field = None

    for k in range(shape[0]):

      def table(name, k=k):
        return per_region(self._tables[name], k)

      def drift_at(name, k=k):  # amplitude * (drift noise - its set-A anchor)
        field, amp = drift[name]
        d = field.slice(k)
        d -= per_region(self._anchors[name], k)
        d *= amp
        return d

      grey = table("grey")
      contrast = drift_at("contrast")
      contrast += np.float32(1.0)
      gain = drift_at("axon_gain")
      gain += np.float32(1.0)
      gain += np.float32(_TREND["axon_gain"]) * self._trend_at(y, x, per_region, k)
      gain *= table("axon_gain")
      tex = mottle.slice(k)
      tex *= np.float32(mottle_amp)
      np.bitwise_xor(hyx, hz[k], out=hg)
      _mix32_inplace(hg, hbuf)
      hg >>= np.uint32(8)
      grain = hg.astype(np.float32)
      grain *= np.float32(1.0 / (1 << 24))  # _unit
      grain -= np.float32(0.5)
      grain *= np.float32(2.0 * _GRAIN)
      tex += grain
      tex *= table("texture")
      patch = table("patch")
      if np.any(patch):  # only regions without fibres have it: the field is made on demand
        if patch_field is None:
          patch_field = _GridNoise(self.key("patch"), _PATCH, (z, y, x))
        tex += patch * patch_field.slice(k)
      img = out[k]
      np.multiply(gain, ax_strength[k] if full_strength else ax_strength, out=img)
      img += tex
      img *= contrast
      img += grey
      if rim is not None:  # the bright wall of large vessels
        np.add(img, np.float32(_LUMEN_RIM[1]), out=img, where=rim[k])
      t = table("cell_dark") * cell_profile[k]
      t -= tex
      t *= contrast
      np.subtract(grey, t, out=t)
      np.copyto(img, t, where=pix[k] == _PIX["cell"])
      # Capillaries (2-5 px across) look dark grey after the point spread; large lumens black.
      t = np.float32(_CAP_DARK) - tex
      t *= contrast
      np.subtract(grey, t, out=t)
      np.copyto(img, t, where=pix[k] == _PIX["vessel"])
      if lumen is not None:
        t = tex * np.float32(0.3)
        t += np.float32(_VESSEL_GREY) + np.float32(0.1) * (grey - np.float32(120.0))
        np.copyto(img, t, where=lumen[k])
      if tissue is not None:
        np.copyto(img, np.float32(_OUTSIDE_GREY), where=~tissue[k])
    return out
