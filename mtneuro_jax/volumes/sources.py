"""Where voxels come from. Every source is read through ``intern.array``.

A ``Source`` owns an intern ``VolumeProvider``; ``Source.read(channel, box)``
builds ``intern.array(channel, volume_provider=...)`` and slices it ZYX, so the
phantom, a local volume and real BossDB all take the same path to the exporter.

Sources are named by a short spec string (CLI ``--source``):

  ``phantom``                    the embedded synthetic volume (seed 0)
  ``phantom:seed=3``             another phantom
  ``local:/path/to/volume``      a folder of ``<channel>.npy`` files or a zarr group
  ``bossdb``                     real BossDB (api.bossdb.io, public token)
  ``bossdb:host=127.0.0.1:8123,protocol=http``   any Boss-API server
"""

from __future__ import annotations

import abc
import os
import threading
from typing import Any, Callable, Mapping

import numpy as np
from intern.convenience.array import VolumeProvider
from intern.convenience.array import array as intern_array
from intern.resource.boss.resource import ChannelResource

from mtneuro_jax.volumes import bossdb, spec
from mtneuro_jax.volumes.errors import SourceError


def _channel_resource(channel: spec.Channel) -> ChannelResource:
  return ChannelResource(
      channel.channel, channel.collection, channel.experiment,
      type=channel.kind, datatype=channel.dtype)


class ArrayVolumeProvider(VolumeProvider):
  """An intern VolumeProvider over a ``read_fn(channel_name, Box) -> ZYX ndarray``.

  Used for the phantom and for local volumes: intern sees an ordinary provider.
  """

  def __init__(self, vp_type: str, read_fn: Callable[[str, spec.Box], np.ndarray],
               shape_zyx=spec.VOLUME_SHAPE_ZYX):
    self._vp_type = vp_type
    self._read_fn = read_fn
    self._shape = tuple(int(s) for s in shape_zyx)

  def get_vp_type(self) -> str:
    return self._vp_type

  def get_axis_order(self) -> str:
    return "ZYX"

  def get_channel(self, channel: str, collection: str, experiment: str):
    for ch in spec.CHANNELS.values():
      if (ch.channel, ch.collection, ch.experiment) == (channel, collection, experiment):
        return _channel_resource(ch)
    raise SourceError(f"unknown channel {collection}/{experiment}/{channel}")

  def get_cutout(self, channel, resolution, xs, ys, zs) -> np.ndarray:
    if resolution != 0:
      raise SourceError(f"{self._vp_type} serves resolution 0 only (asked {resolution}); "
                        "downsample in the pipeline instead")
    return self._read_fn(channel.name, spec.Box(zs[0], zs[1], ys[0], ys[1], xs[0], xs[1]))

  def get_shape(self, channel, resolution: int = 0):
    return self._shape

  def get_voxel_size(self, channel, resolution: int = 0):
    s = spec.VOXEL_SIZE_UM * 2**resolution
    return (s, s, s)

  def get_voxel_unit(self, channel, resolution: int = 0) -> str:
    return "micrometers"

  def get_available_resolutions(self, channel) -> list[int]:
    return [0]


class Source(abc.ABC):
  """A volume with the three MTNeuro channels, read through intern."""

  kind: str = ""

  @abc.abstractmethod
  def volume_provider(self) -> VolumeProvider:
    """The intern VolumeProvider behind this source."""

  @abc.abstractmethod
  def describe(self) -> dict[str, Any]:
    """JSON-able identity for manifests and cache keys (never includes a token)."""

  def shape(self) -> tuple[int, int, int]:
    return spec.VOLUME_SHAPE_ZYX

  def open(self, channel: str, resolution: int = 0):
    """``intern.array`` for one channel name of ``spec.CHANNELS``."""
    if channel not in spec.CHANNELS:
      raise SourceError(f"unknown channel {channel!r}; known: {', '.join(spec.CHANNELS)}")
    return intern_array(_channel_resource(spec.CHANNELS[channel]), resolution=resolution,
                        volume_provider=self.volume_provider())

  def read(self, channel: str, box: spec.Box, resolution: int = 0) -> np.ndarray:
    """Cutout ``box`` (ZYX, full-res coordinates) of ``channel`` as a 3D ZYX array.

    The dtype is the channel's BossDB dtype. Raises SourceError for a box outside
    the volume or a reply of the wrong shape.
    """
    try:
      box.check_inside(self.shape())
    except ValueError as e:
      raise SourceError(str(e)) from None
    arr = self.open(channel, resolution)
    fetch = _widen_singletons(box, self.shape())
    data = np.asarray(arr[fetch.z0:fetch.z1, fetch.y0:fetch.y1, fetch.x0:fetch.x1])
    # intern squeezes length-1 axes; restore the 3D box shape.
    if data.size != int(np.prod(fetch.shape)):
      raise SourceError(f"{self.kind}: cutout {fetch} of {channel} returned shape {data.shape}, "
                        f"expected {fetch.shape}")
    data = data.reshape(fetch.shape)
    if fetch != box:
      data = data[box.z0 - fetch.z0:box.z1 - fetch.z0, box.y0 - fetch.y0:box.y1 - fetch.y0,
                  box.x0 - fetch.x0:box.x1 - fetch.x0]
    want = np.dtype(spec.CHANNELS[channel].dtype)
    if data.dtype != want:
      data = data.astype(want)
    return data


def _widen_singletons(box: spec.Box, shape_zyx) -> spec.Box:
  """``box`` grown by one voxel on all but one of its length-1 axes.

  intern's ``array.__getitem__`` squeezes each length-1 axis using the shape from
  before the previous squeeze, so a cutout with two or more length-1 axes raises
  IndexError inside intern (intern issue #120). We fetch a slightly larger box and
  crop; a box with at most one length-1 axis is returned unchanged.
  """
  lo, hi = [box.z0, box.y0, box.x0], [box.z1, box.y1, box.x1]
  singles = [a for a in range(3) if hi[a] - lo[a] == 1]
  for axis in singles[1:]:
    if hi[axis] < shape_zyx[axis]:
      hi[axis] += 1
    elif lo[axis] > 0:
      lo[axis] -= 1
  return spec.Box(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])


class PhantomSource(Source):
  """The embedded synthetic volume (see ``mtneuro_jax.volumes.phantom``)."""

  kind = "phantom"

  def __init__(self, seed: int = 0):
    from mtneuro_jax.volumes import phantom  # lazy: heavy-ish import
    self.seed = int(seed)
    self._volume = phantom.PhantomVolume(seed=self.seed)
    self._provider = ArrayVolumeProvider("phantom", self._volume.cutout)

  def volume_provider(self):
    return self._provider

  def describe(self):
    from mtneuro_jax.volumes import phantom
    return {"kind": "phantom", "seed": self.seed, "generator_version": phantom.GENERATOR_VERSION,
            "note": "SYNTHETIC phantom volume: results are not comparable to the paper's"}


class LocalSource(Source):
  """A local volume: a folder with ``image.npy``/``roi_labels.npy``/``pixel_labels.npy``
  (memory-mapped) or a zarr group with arrays of those names. ZYX, full extent."""

  kind = "local"

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    if not os.path.exists(self.path):
      raise SourceError(f"local volume {self.path} does not exist; pass a folder of "
                        "<channel>.npy files or a zarr group")
    self._arrays: dict[str, Any] = {}
    self._shape = None
    self._provider = ArrayVolumeProvider("local", self._read, self.shape())

  def _array(self, channel: str):
    if channel not in self._arrays:
      npy = os.path.join(self.path, channel + ".npy")
      if os.path.isfile(npy):
        self._arrays[channel] = np.load(npy, mmap_mode="r")
      else:
        try:
          import zarr
          self._arrays[channel] = zarr.open_group(self.path, mode="r")[channel]
        except Exception as e:  # noqa: BLE001 - report any zarr failure the same way
          raise SourceError(f"local volume {self.path} has no channel {channel!r} "
                            f"({channel}.npy or zarr array): {e}") from None
    return self._arrays[channel]

  def shape(self):
    if self._shape is None:
      self._shape = tuple(int(s) for s in self._array("image").shape)
      if len(self._shape) != 3:
        raise SourceError(f"local volume image must be 3D ZYX, got shape {self._shape}")
    return self._shape

  def _read(self, channel_name: str, box: spec.Box) -> np.ndarray:
    return np.asarray(self._array(channel_name)[box.slices])

  def volume_provider(self):
    return self._provider

  def describe(self):
    return {"kind": "local", "path": self.path, "shape": list(self.shape())}


class BossDBSource(Source):
  """Real BossDB (or any Boss-API server) through intern's ``BossRemote``.

  Spec strings (``--source``)::

    bossdb                                     https://api.bossdb.io, public read-only token
    bossdb:host=127.0.0.1:8123,protocol=http   a local server, e.g.
                                               ``python -m mtneuro_jax.volumes.boss_server --source phantom``
    bossdb:token_file=~/.bossdb/token          a private token read from a file

  The MTNeuro channels are public, so the real BossDB needs no setup: plain
  ``bossdb`` reads ``bossdb://prasad/...`` from https://api.bossdb.io with the
  public token, with TLS verification always on.

  Host / protocol / token, field by field, first found wins:
    1. the spec options (``host=``, ``protocol=``, ``token=`` or ``token_file=``),
    2. ``MTNEURO_BOSS_HOST`` / ``MTNEURO_BOSS_PROTOCOL`` / ``MTNEURO_BOSS_TOKEN``,
    3. intern's own config: ``~/.intern/intern.cfg`` if it exists, else
       ``INTERN_HOST`` / ``INTERN_PROTOCOL`` / ``INTERN_TOKEN``,
    4. ``https`` + ``api.bossdb.io`` + the public token.
  A token from 2 or 3 is only sent to the host configured next to it. Prefer
  ``MTNEURO_BOSS_TOKEN`` or ``token_file=`` to ``token=``: a spec string ends up
  in shell history. The token never appears in ``describe()``, logs or errors.

  Transfer options (defaults in brackets): ``chunk`` ZYX voxels per request
  [32x512x512; the Boss refuses cutouts over 500 MB uncompressed],
  ``concurrency`` requests in flight [4], ``retries`` per request [5],
  ``timeout`` read timeout s [60], ``connect_timeout`` s [10], ``backoff`` first
  retry wait s [0.5], ``max_backoff`` s [30], ``expect_tissue`` image|none
  [image: an all-zero image cutout inside the tissue z range is a fault],
  ``max_request_mb`` [500]. Faults are retried with exponential backoff and
  jitter; ``fetch_stats()`` counts requests, retries and faults by kind.
  """

  kind = "bossdb"

  def __init__(self, host: str | None = None, protocol: str | None = None, token: str | None = None,
               token_file: str | None = None, chunk: str | None = None, concurrency: int = 4,
               retries: int = 5, timeout: float = 60.0, connect_timeout: float = 10.0,
               backoff: float = 0.5, max_backoff: float = 30.0, expect_tissue: str = "image",
               max_request_mb: float = 500.0, seed: int | None = None,
               intern_cfg: str = "~/.intern/intern.cfg"):
    config, self.config_origins = bossdb.resolve_boss_config(
        None if host is None else str(host), protocol, None if token is None else str(token),
        token_file=token_file, intern_cfg=intern_cfg)
    self._config = config
    self.host, self.protocol = config["host"], config["protocol"]
    if expect_tissue not in bossdb.EXPECT_NONZERO:
      raise SourceError(f"expect_tissue must be one of {', '.join(bossdb.EXPECT_NONZERO)}, got {expect_tissue!r}")
    try:
      self.retry = bossdb.RetryPolicy(int(retries) + 1, float(backoff), float(max_backoff))
      self.timeouts = (float(connect_timeout), float(timeout))
      self.concurrency = int(concurrency)
      self.max_request_bytes = int(float(max_request_mb) * 2**20)
    except ValueError as e:
      raise SourceError(f"bad bossdb source option: {e}") from None
    if min(self.timeouts) <= 0:
      raise SourceError("timeout and connect_timeout must be > 0 seconds")
    self.chunk_zyx = bossdb.parse_chunk(chunk)
    self.expect_tissue = expect_tissue
    self.seed = None if seed is None else int(seed)
    self._provider = None
    self._shape = None
    self._checked: set[str] = set()
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"BossDBSource({self.protocol}://{self.host})"

  def __getstate__(self):
    # The provider holds threads and sessions; a copy builds its own.
    state = dict(self.__dict__)
    state.update(_provider=None, _lock=None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def volume_provider(self):
    with self._lock:
      if self._provider is None:
        self._provider = bossdb.make_boss_provider(
            self._config, chunk_zyx=self.chunk_zyx, concurrency=self.concurrency, retry=self.retry,
            timeout_s=self.timeouts[1], connect_timeout_s=self.timeouts[0],
            expect_nonzero=bossdb.EXPECT_NONZERO[self.expect_tissue],
            max_request_bytes=self.max_request_bytes, seed=self.seed)
      return self._provider

  def describe(self):
    # Data identity only (cache keys): no token, no transfer tuning.
    return {"kind": "bossdb", "host": self.host, "protocol": self.protocol,
            "uris": {k: c.uri for k, c in spec.CHANNELS.items()}}

  def shape(self):
    """ZYX extent of the coordinate frame the server reports (fetched once)."""
    if self._shape is None:
      self._shape = tuple(int(s) for s in self.volume_provider().get_shape(
          _channel_resource(spec.CHANNELS["image"]), 0))
    return self._shape

  def _check_channel(self, channel: str) -> None:
    """Once per channel: it exists on the server with the dtype the spec expects."""
    if channel in self._checked or channel not in spec.CHANNELS:
      return
    c = spec.CHANNELS[channel]
    remote = self.volume_provider().get_channel(c.channel, c.collection, c.experiment)
    if remote.datatype != c.dtype:
      raise SourceError(f"{self.protocol}://{self.host} serves {c.uri} as {remote.datatype}, "
                        f"expected {c.dtype}: is this the MTNeuro volume?")
    self._checked.add(channel)

  def open(self, channel: str, resolution: int = 0):
    self._check_channel(channel)
    return super().open(channel, resolution)

  def read(self, channel: str, box: spec.Box, resolution: int = 0):
    # Fetch the frame first: Source.read turns errors inside its range check into
    # a range error, and a refused token or a dead host must say so instead.
    self.shape()
    return super().read(channel, box, resolution)

  def read_many(self, channel: str, boxes, resolution: int = 0) -> list:
    """Several ZYX boxes of one channel with all their requests in flight at
    once (bounded by ``concurrency``); all-or-nothing like ``read``."""
    if channel not in spec.CHANNELS:
      raise SourceError(f"unknown channel {channel!r}; known: {', '.join(spec.CHANNELS)}")
    for box in boxes:
      try:
        box.check_inside(self.shape())
      except ValueError as e:
        raise SourceError(str(e)) from None
    self._check_channel(channel)
    return self.volume_provider().get_cutouts(_channel_resource(spec.CHANNELS[channel]), resolution, list(boxes))

  def fetch_stats(self) -> dict[str, Any]:
    """Requests, bytes, retries and faults by kind so far (JSON-able)."""
    if self._provider is None:
      return bossdb.FetchStats().snapshot()
    return self._provider.stats.snapshot()

  def close(self) -> None:
    if self._provider is not None:
      self._provider.close()


SOURCES: Mapping[str, type[Source]] = {
    "phantom": PhantomSource,
    "local": LocalSource,
    "bossdb": BossDBSource,
}


def make_source(source_spec: str) -> Source:
  """Builds a Source from a spec string (see module docstring)."""
  kind, _, rest = source_spec.partition(":")
  if kind not in SOURCES:
    raise SourceError(f"unknown source {kind!r}; use one of: {', '.join(SOURCES)} "
                      "(e.g. 'phantom', 'local:/data/vol', 'bossdb')")
  if kind == "local":
    if not rest:
      raise SourceError("local source needs a path: 'local:/path/to/volume'")
    return LocalSource(rest)
  kwargs: dict[str, Any] = {}
  if rest:
    for item in rest.split(","):
      k, eq, v = item.partition("=")
      if not eq:
        raise SourceError(f"bad source option {item!r} in {source_spec!r}; expected key=value")
      kwargs[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
  try:
    return SOURCES[kind](**kwargs)
  except TypeError as e:
    raise SourceError(f"bad options for source {kind!r}: {e}") from None
