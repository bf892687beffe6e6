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
from typing import Any, Callable, Mapping

import numpy as np
from intern.convenience.array import VolumeProvider
from intern.convenience.array import array as intern_array
from intern.resource.boss.resource import ChannelResource

from mtneuro_jax.volumes import spec


class SourceError(ValueError):
  """A source cannot serve a request; the message names the problem and the fix."""


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
    data = np.asarray(arr[box.z0:box.z1, box.y0:box.y1, box.x0:box.x1])
    # intern squeezes length-1 axes; restore the 3D box shape.
    if data.size != int(np.prod(box.shape)):
      raise SourceError(f"{self.kind}: cutout {box} of {channel} returned shape {data.shape}, "
                        f"expected {box.shape}")
    data = data.reshape(box.shape)
    want = np.dtype(spec.CHANNELS[channel].dtype)
    if data.dtype != want:
      data = data.astype(want)
    return data


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
  """Real BossDB (or any Boss-API server) through intern's BossRemote.

  Host/protocol/token come from arguments, else ``INTERN_*``/``BOSS_*`` environment
  or ``~/.intern/intern.cfg``, else the public read-only token on api.bossdb.io.
  """

  kind = "bossdb"

  def __init__(self, host: str | None = None, protocol: str | None = None,
               token: str | None = None, **options):
    self.host = host or os.environ.get("MTNEURO_BOSS_HOST") or "api.bossdb.io"
    self.protocol = protocol or os.environ.get("MTNEURO_BOSS_PROTOCOL") or "https"
    self._token = token or os.environ.get("MTNEURO_BOSS_TOKEN") or "public"
    self.options = options
    self._provider = None

  def volume_provider(self):
    if self._provider is None:
      from intern.convenience.array import _BossDBVolumeProvider
      from intern.remote.boss import BossRemote
      self._provider = _BossDBVolumeProvider(BossRemote(
          {"protocol": self.protocol, "host": self.host, "token": self._token}))
    return self._provider

  def describe(self):
    return {"kind": "bossdb", "host": self.host, "protocol": self.protocol,
            "uris": {k: c.uri for k, c in spec.CHANNELS.items()}}


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
