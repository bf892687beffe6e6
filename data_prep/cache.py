"""On-disk cutout cache: one ``.npy`` per (source identity, channel URI, resolution, box).

The exporter reads every cube in aligned z chunks (``chunk_boxes``), so the boxes
are the same for every task: exporting all tasks reads each chunk from the source
once, and a re-run after a kill resumes from the chunks already cached.

Layout::

  <cache_dir>/<source kind>-<sha256(describe())[:16]>/source.json
  <cache_dir>/<source kind>-<hash>/<collection>/<experiment>/<channel>/r<res>/z<z0>-<z1>_y<y0>-<y1>_x<x0>-<x1>.npy

Label channels are stored in the smallest unsigned dtype that holds their values
(the BossDB uint64 ids of this dataset are all < 256, so uint8: 8x less disk).
Files are written to a temporary name and ``os.replace``d into place, so a
killed process never leaves a partial cutout under a final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict

import numpy as np

from mtneuro_jax.volumes import spec
from mtneuro_jax.volumes.sources import Source, SourceError

log = logging.getLogger(__name__)

_UINTS = (np.uint8, np.uint16, np.uint32, np.uint64)


def smallest_uint(values: np.ndarray) -> np.ndarray:
  """``values`` (any unsigned/non-negative int array) cast to the smallest uint dtype that fits.

  The cast is checked against the actual maximum, never assumed.
  """
  values = np.asarray(values)
  if values.size == 0:
    return values.astype(np.uint8)
  if values.dtype.kind == "i" and values.min() < 0:
    raise ValueError(f"label array has negative ids (min {values.min()}); labels must be >= 0")
  vmax = int(values.max())
  for dt in _UINTS:
    if vmax <= np.iinfo(dt).max:
      return values.astype(dt, copy=False)
  raise ValueError(f"label id {vmax} does not fit in uint64")


def source_identity(source: Source) -> str:
  """Stable short id of a source: its kind + a hash of ``describe()`` (which never holds a token)."""
  desc = json.dumps(source.describe(), sort_keys=True, default=str)
  return f"{source.kind or 'source'}-{hashlib.sha256(desc.encode()).hexdigest()[:16]}"


def atomic_save_npy(path: str, array: np.ndarray) -> None:
  """Writes ``array`` to ``path`` via a temporary file in the same folder + ``os.replace``."""
  d = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=d)
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


@dataclasses.dataclass
class CacheStats:
  """Counters of one cache object (also written to the export manifest)."""

  hits: int = 0
  misses: int = 0
  fetched_bytes: int = 0  # bytes returned by the source, in its own dtype (uint64 labels)
  stored_bytes: int = 0  # bytes of the .npy payloads written to the cache
  read_bytes: int = 0  # payload bytes loaded from cache hits
  corrupt_refetched: int = 0  # unreadable cache files that were fetched again

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def line(self) -> str:
    return (
      f"cache: {self.hits} hits, {self.misses} misses, fetched {self.fetched_bytes / 1e6:.1f} MB "
      f"from the source, stored {self.stored_bytes / 1e6:.1f} MB"
    )


class CutoutCache:
  """Reads cutouts of a Source, through an on-disk cache when ``cache_dir`` is set.

  ``read(channel, box)`` returns a ZYX array of ``box.shape``: uint8 for the image,
  the smallest fitting uint dtype for label channels, on hits and misses alike.
  With ``cache_dir=None`` every read goes to the source (still counted as a miss).
  """

  def __init__(self, source: Source, cache_dir: str | None, resolution: int = 0):
    self.source = source
    self.resolution = int(resolution)
    self.stats = CacheStats()
    self.root = None
    if cache_dir is not None:
      self.root = os.path.join(os.path.abspath(cache_dir), source_identity(source))
      os.makedirs(self.root, exist_ok=True)
      info = os.path.join(self.root, "source.json")
      if not os.path.exists(info):
        tmp = info + f".tmp-{os.getpid()}"
        with open(tmp, "w") as f:
          json.dump(source.describe(), f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, info)

  def path(self, channel: str, box: spec.Box) -> str | None:
    if self.root is None:
      return None
    uri_path = spec.CHANNELS[channel].uri.split("://", 1)[1]
    z0, z1, y0, y1, x0, x1 = box.as_tuple()
    return os.path.join(
      self.root, uri_path, f"r{self.resolution}", f"z{z0}-{z1}_y{y0}-{y1}_x{x0}-{x1}.npy"
    )

  def _load(self, path: str, box: spec.Box) -> np.ndarray | None:
    try:
      arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
      return None
    except (OSError, ValueError, EOFError) as e:
      # Files only appear via os.replace, so this is disk damage or tampering: refetch.
      log.warning("cache file %s is unreadable (%s); fetching it again", path, e)
      self.stats.corrupt_refetched += 1
      return None
    if arr.shape != box.shape or arr.dtype not in _UINTS:
      log.warning(
        "cache file %s has shape %s dtype %s, expected %s; fetching it again",
        path,
        arr.shape,
        arr.dtype,
        box.shape,
      )
      self.stats.corrupt_refetched += 1
      return None
    return arr

  def ensure(self, channel: str, box: spec.Box) -> None:
    """Fetches and stores ``box`` of ``channel`` unless it is already cached (no load on a hit)."""
    path = self.path(channel, box)
    if path is not None and not os.path.exists(path):
      self.read(channel, box)

  def read(self, channel: str, box: spec.Box) -> np.ndarray:
    """Cutout of ``channel`` over ``box`` (ZYX, full-resolution coordinates)."""
    if channel not in spec.CHANNELS:
      raise SourceError(f"unknown channel {channel!r}; known: {', '.join(spec.CHANNELS)}")
    path = self.path(channel, box)
    if path is not None:
      arr = self._load(path, box)
      if arr is not None:
        self.stats.hits += 1
        self.stats.read_bytes += arr.nbytes
        return arr
    # Source.read validates the shape, so a partial reply raises before anything is cached.
    raw = self.source.read(channel, box, self.resolution)
    self.stats.misses += 1
    self.stats.fetched_bytes += raw.nbytes
    arr = smallest_uint(raw) if spec.CHANNELS[channel].kind == "annotation" else raw
    if path is not None:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      atomic_save_npy(path, arr)
      self.stats.stored_bytes += arr.nbytes
    return arr


def chunk_boxes(
  z_range: tuple[int, int],
  xy: tuple[int, int, int, int],
  chunk_z: int,
  volume_z: int = spec.VOLUME_SHAPE_ZYX[0],
) -> list[spec.Box]:
  """Aligned chunks covering ``z_range`` of one cube window ``xy = (x0, x1, y0, y1)``.

  Chunk k covers z ``[k * chunk_z, (k + 1) * chunk_z)`` clipped to the volume: the grid
  is absolute (not relative to the range), so every task asks for the same boxes.
  """
  x0, x1, y0, y1 = xy
  z0, z1 = z_range
  out = []
  for k in range(z0 // chunk_z, (z1 - 1) // chunk_z + 1):
    out.append(spec.Box(k * chunk_z, min((k + 1) * chunk_z, volume_z), y0, y1, x0, x1))
  return out


class ChunkReader:
  """Assembles sample boxes from aligned cube chunks read through a CutoutCache.

  Keeps the last ``keep`` chunks in memory: samples arrive in z order per cube,
  so a 3D window that straddles two chunks costs no second read.

  ``companions`` (``"<cube set>:<region>"`` -> channel names): when a chunk of that
  cube is read, these channels of the same box are fetched into the disk cache too. A
  multi-task export (e.g. ``--tasks all``) passes the channels its other tasks will
  need, so each chunk is fetched while the source has it at hand (the phantom
  renders all channels of a box at once; BossDB costs the same either way).
  """

  def __init__(
    self,
    cache: CutoutCache,
    chunk_z: int,
    keep: int = 6,
    companions: dict[str, tuple[str, ...]] | None = None,
  ):
    if chunk_z < 1:
      raise ValueError(f"chunk_z must be >= 1, got {chunk_z}")
    self.cache = cache
    self.chunk_z = int(chunk_z)
    self.keep = int(keep)
    self.companions = {k: tuple(v) for k, v in (companions or {}).items()} if cache.root else {}
    self._mem: OrderedDict = OrderedDict()
    self.volume_z = cache.source.shape()[0]

  def _chunk(self, channel: str, box: spec.Box, cube: str) -> np.ndarray:
    key = (channel, box)
    if key in self._mem:
      self._mem.move_to_end(key)
      return self._mem[key]
    arr = self.cache.read(channel, box)
    for other in self.companions.get(cube, ()):
      if other != channel:
        self.cache.ensure(other, box)
    self._mem[key] = arr
    while len(self._mem) > self.keep:
      self._mem.popitem(last=False)
    return arr

  def read(self, channel: str, sample: spec.SampleRef) -> np.ndarray:
    """ZYX array of ``sample.box`` for ``channel`` (the sample lies inside its cube window)."""
    xy = spec.CUBE_SETS[sample.cube_set][sample.region]
    x0, _, y0, _ = xy
    b = sample.box
    parts = []
    for cb in chunk_boxes((b.z0, b.z1), xy, self.chunk_z, self.volume_z):
      arr = self._chunk(channel, cb, f"{sample.cube_set}:{sample.region}")
      lo, hi = max(b.z0, cb.z0) - cb.z0, min(b.z1, cb.z1) - cb.z0
      parts.append(arr[lo:hi, b.y0 - y0 : b.y1 - y0, b.x0 - x0 : b.x1 - x0])
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if out.shape != b.shape:  # a sample outside its cube window is a planning bug
      raise SourceError(f"sample {sample.key} box {b} is not inside cube window {xy}")
    return out
