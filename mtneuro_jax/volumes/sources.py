"""Where voxels come from. Every source is read through ``intern.array``.

A ``Source`` owns an intern ``VolumeProvider``; ``Source.read(channel, box)``
builds ``intern.array(channel, volume_provider=...)`` and slices it ZYX, so the
phantom, a local volume and real BossDB all take the same path to the exporter.

Sources are named by a short spec string (CLI ``--source``):

  ``phantom``                    the embedded synthetic volume (seed 0)
  ``phantom:seed=3``             another phantom
  ``phantom:workers=2,zi_axons=1`` render with 2 processes; label ZI's fibres as axons
  ``local:/path/to/volume``      a folder of ``<channel>.npy`` files or a zarr group
  ``local:/path,scale=255``      ... whose image is not uint8: uint8 = round(image * 255)
  ``bossdb``                     real BossDB (api.bossdb.io, public token)
  ``bossdb:host=127.0.0.1:8123,protocol=http``   any Boss-API server

Values are checked, not just dtypes (``to_channel_dtype``): every cutout is turned
into its channel's dtype only when no value would clip, wrap or lose precision,
and label channels must hold known ids (``spec.ROI_IDS``, ``spec.PIXEL_IDS``);
anything else raises ``SourceError`` naming the channel, its dtype and value range,
and the fix. The checks are a min/max over the box read (a no-op for uint8 images).
"""

from __future__ import annotations

import abc
import inspect
import math
import os
import re
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
    channel.channel,
    channel.collection,
    channel.experiment,
    type=channel.kind,
    datatype=channel.dtype,
  )


class ArrayVolumeProvider(VolumeProvider):
  """An intern VolumeProvider over a ``read_fn(channel_name, Box) -> ZYX ndarray``.

  Used for the phantom and for local volumes: intern sees an ordinary provider.
  """

  def __init__(
    self,
    vp_type: str,
    read_fn: Callable[[str, spec.Box], np.ndarray],
    shape_zyx=spec.VOLUME_SHAPE_ZYX,
  ):
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
      raise SourceError(
        f"{self._vp_type} serves resolution 0 only (asked {resolution}); "
        "downsample in the pipeline instead"
      )
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


# ---------------------------------------------------------------------------
# Value checks.
def _known_ids(channel: str) -> tuple[str, tuple[int, ...]]:
  if channel == "roi_labels":
    return "ROI ids (spec.ROI_IDS)", tuple(sorted(spec.ROI_IDS.values()))
  return "pixel ids (spec.PIXEL_IDS)", tuple(sorted(spec.PIXEL_IDS.values()))


def _range(data: np.ndarray) -> str:
  if not data.size:
    return "[] (empty)"
  lo, hi = data.min(), data.max()
  if data.dtype.kind == "f":
    return f"[{lo:.6g}, {hi:.6g}]"
  return f"[{int(lo)}, {int(hi)}]"


def _ids_text(ids) -> str:
  ids = [int(v) for v in ids]
  return ", ".join(map(str, ids[:8])) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")


def to_channel_dtype(
  channel: str, data: np.ndarray, *, where: str = "source", scale: float | None = None
) -> np.ndarray:
  """``data`` (any numeric dtype, ZYX) in ``channel``'s dtype, converted only where values allow.

  Image (uint8): uint8 passes as is; integers pass if every value lies in [0, 255];
  floats are refused unless ``scale`` is given. With ``scale`` (any input dtype), the
  documented rule is ``uint8 = rint(x * scale)``, refused if a value is not finite or
  rounds outside [0, 255]. Labels (uint64): integer (or integral float) ids, every one
  of them known (``spec.ROI_IDS`` for roi_labels, ``spec.PIXEL_IDS`` for pixel_labels).
  Anything else raises SourceError naming the channel, dtype, value range and fix.
  ``where`` names the source and box in that message. Cost: one min/max pass (none
  for a uint8 image); ``np.unique`` only to name the culprits of a refusal.
  """
  want = np.dtype(spec.CHANNELS[channel].dtype)
  data = np.asarray(data)
  kind = data.dtype.kind
  what = f"{where}: channel {channel} is {data.dtype}"
  if kind not in "buif":
    raise SourceError(f"{what}, not a numeric array; save it as {want} (ZYX)")
  if spec.CHANNELS[channel].kind == "image":
    if scale is not None:
      x = data.astype(np.float64) * float(scale)
      if not np.isfinite(x).all():
        raise SourceError(
          f"{what} with non-finite values (NaN or inf); replace them before exporting"
        )
      y = np.rint(x)
      if y.size and (y.min() < 0 or y.max() > 255):
        raise SourceError(
          f"{what} with values in {_range(data)}, which scale={scale:g} maps to "
          f"{_range(y)}, outside uint8 [0, 255]; choose scale so that "
          "max * scale <= 255 (e.g. scale=255 for values in [0, 1])"
        )
      return y.astype(np.uint8)
    if data.dtype == want:
      return data
    if kind == "f":
      raise SourceError(
        f"{what} with values in {_range(data)}; a float image is never cast "
        "silently: save it as uint8, or add the scaling rule scale=S to the source "
        "(e.g. 'local:DIR,scale=255' for values in [0, 1]: uint8 = round(x * S))"
      )
    if data.size and (data.min() < 0 or data.max() > 255):
      raise SourceError(
        f"{what} with values in {_range(data)}, outside uint8 [0, 255] (a cast would "
        "wrap); rescale it to uint8, or add scale=S to the source "
        "(uint8 = round(x * S), e.g. scale=0.0625 for 12-bit values)"
      )
    return data.astype(want)
  # Label channels: ids, nothing else.
  if kind == "f":
    if not np.isfinite(data).all() or not np.array_equal(data, np.floor(data)):
      raise SourceError(
        f"{what} with non-integer values (in {_range(data)}); label ids must be "
        "integers: save the labels as an unsigned integer array"
      )
  name, known = _known_ids(channel)
  if data.size:
    lo, hi = data.min(), data.max()
    contiguous = known == tuple(range(known[0], known[-1] + 1))
    if not (contiguous and known[0] <= lo and hi <= known[-1]):
      present = np.unique(data)
      unknown = [v for v in present if v < 0 or int(v) not in known]
      if unknown:
        raise SourceError(
          f"{what} with ids {_ids_text(unknown)} that are not MTNeuro {name} "
          f"{known[0]}..{known[-1]}; map them to those ids before exporting "
          "(mtneuro_jax/volumes/spec.py lists them)"
        )
  return data if data.dtype == want else data.astype(want)


class Source(abc.ABC):
  """A volume with the three MTNeuro channels, read through intern."""

  kind: str = ""
  # Scaling rule for a non-uint8 image (``to_channel_dtype``): uint8 = rint(x * image_scale).
  image_scale: float | None = None

  def where(self) -> str:
    """Names the source in error messages."""
    return f"{self.kind} source"

  @abc.abstractmethod
  def volume_provider(self) -> VolumeProvider:
    """The intern VolumeProvider behind this source."""

  @abc.abstractmethod
  def describe(self) -> dict[str, Any]:
    """JSON-able identity for manifests and cache keys (never includes a token)."""

  def shape(self) -> tuple[int, int, int]:
    return spec.VOLUME_SHAPE_ZYX

  def check_channels(self, channels) -> None:
    """SourceError now (before an export writes anything) if a channel cannot be served.

    Cheap: metadata only (local arrays' headers, the server's channel records).
    """
    for channel in channels:
      if channel not in spec.CHANNELS:
        raise SourceError(f"unknown channel {channel!r}; known: {', '.join(spec.CHANNELS)}")

  def open(self, channel: str, resolution: int = 0):
    """``intern.array`` for one channel name of ``spec.CHANNELS``."""
    if channel not in spec.CHANNELS:
      raise SourceError(f"unknown channel {channel!r}; known: {', '.join(spec.CHANNELS)}")
    return intern_array(
      _channel_resource(spec.CHANNELS[channel]),
      resolution=resolution,
      volume_provider=self.volume_provider(),
    )

  def read(self, channel: str, box: spec.Box, resolution: int = 0) -> np.ndarray:
    """Cutout ``box`` (ZYX, full-res coordinates) of ``channel`` as a 3D ZYX array.

    The dtype is the channel's BossDB dtype, reached by value-checked conversion
    (``to_channel_dtype``). Raises SourceError for a box outside the volume, a reply
    of the wrong shape, or values the channel cannot hold.
    """
    try:
      box.check_inside(self.shape())
    except ValueError as e:
      raise SourceError(str(e)) from None
    arr = self.open(channel, resolution)
    fetch = _widen_singletons(box, self.shape())
    data = np.asarray(arr[fetch.z0 : fetch.z1, fetch.y0 : fetch.y1, fetch.x0 : fetch.x1])
    # intern squeezes length-1 axes; restore the 3D box shape.
    if data.size != int(np.prod(fetch.shape)):
      raise SourceError(
        f"{self.kind}: cutout {fetch} of {channel} returned shape {data.shape}, "
        f"expected {fetch.shape}"
      )
    data = data.reshape(fetch.shape)
    if fetch != box:
      data = data[
        box.z0 - fetch.z0 : box.z1 - fetch.z0,
        box.y0 - fetch.y0 : box.y1 - fetch.y0,
        box.x0 - fetch.x0 : box.x1 - fetch.x0,
      ]
    return to_channel_dtype(
      channel,
      data,
      scale=self.image_scale,
      where=f"{self.where()}, box z{box.z0}:{box.z1} y{box.y0}:{box.y1} x{box.x0}:{box.x1}",
    )


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

  def __init__(self, seed: int = 0, workers: int | None = None, zi_axons: int = 0):
    from mtneuro_jax.volumes import phantom  # lazy: heavy-ish import

    def integer(name, v, example):
      if (
        isinstance(v, bool)
        or not isinstance(v, (int, np.integer, str))
        or not re.fullmatch(r"\s*-?\d+\s*", str(v))
      ):
        raise SourceError(f"phantom {name} must be an integer, got {v!r}; e.g. {example}")
      return int(v)

    self.seed = integer("seed", seed, "--source phantom:seed=3")
    self.workers = None if workers is None else integer("workers", workers, "phantom:workers=2")
    if self.workers is not None and self.workers < 1:
      raise SourceError(f"phantom workers must be >= 1, got {workers!r}; e.g. phantom:workers=2")
    zi = integer("zi_axons", zi_axons, "phantom:zi_axons=1")
    if zi not in (0, 1):
      raise SourceError(
        f"phantom zi_axons must be 0 or 1, got {zi_axons!r}; e.g. phantom:zi_axons=1"
      )
    self.zi_axon_labels = bool(zi)
    self._volume = phantom.PhantomVolume(
      seed=self.seed, workers=self.workers, zi_axon_labels=self.zi_axon_labels
    )
    self._provider = ArrayVolumeProvider("phantom", self._volume.cutout)

  def volume_provider(self):
    return self._provider

  def describe(self):
    from mtneuro_jax.volumes import phantom

    # ``workers`` is left out on purpose: it changes no byte of the volume.
    return {
      "kind": "phantom",
      "seed": self.seed,
      "generator_version": phantom.GENERATOR_VERSION,
      "zi_axon_labels": self.zi_axon_labels,
      "note": "SYNTHETIC phantom volume: results are not comparable to the paper's",
    }


class LocalSource(Source):
  """A local volume: a folder with ``image.npy``/``roi_labels.npy``/``pixel_labels.npy``
  (memory-mapped) or a zarr group with arrays of those names. ZYX, full extent.

  ``scale``: the scaling rule for an image that is not uint8 (e.g. float32 in [0, 1]:
  ``scale=255``): uint8 = rint(x * scale), refused where a value is not finite or
  falls outside [0, 255]. Without it, a float image is refused at once and an
  integer image is accepted only where every value fits uint8 (``to_channel_dtype``).
  Label channels must hold known ids whatever their dtype.
  """

  kind = "local"
  OPTIONS = ("scale",)

  def __init__(self, path: str, scale: float | str | None = None):
    self.path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(self.path):
      raise SourceError(
        f"local volume {self.path} does not exist; pass a folder of "
        "<channel>.npy files or a zarr group"
      )
    if scale is not None:
      try:
        value = float(scale)
      except (TypeError, ValueError):
        value = math.nan
      if not (math.isfinite(value) and value > 0):
        raise SourceError(
          f"local source option scale must be a positive number, got {scale!r}; "
          "e.g. 'local:DIR,scale=255' for a float image in [0, 1]"
        )
      scale = value
    self.image_scale = scale
    self._arrays: dict[str, Any] = {}
    self._shape = None
    self._provider = ArrayVolumeProvider("local", self._read, self.shape())

  def where(self) -> str:
    return f"local volume {self.path}"

  def _open_array(self, channel: str):
    npy = os.path.join(self.path, channel + ".npy")
    if os.path.isfile(npy):
      with open(npy, "rb") as f:
        magic = f.read(6)
      if magic != b"\x93NUMPY":  # np.load would try it as a pickle and say so, confusingly
        raise SourceError(
          f"{npy} is not a .npy file (no NUMPY header); write it with numpy.save "
          "(a numeric ZYX array)"
        )
      try:
        return np.load(npy, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError, EOFError) as e:
        raise SourceError(
          f"{npy} is not a readable .npy array ({e}); write it with numpy.save "
          "(a numeric ZYX array, no pickled objects)"
        ) from None
    try:
      import zarr  # lazy: optional dependency, only for zarr volumes

      return zarr.open_group(self.path, mode="r")[channel]
    except Exception as e:  # noqa: BLE001 - report any zarr failure the same way
      raise SourceError(
        f"local volume {self.path} has no readable channel {channel!r} ({channel}.npy "
        f"or zarr array: {type(e).__name__}: {e}); add {channel}.npy (ZYX) to the "
        "folder"
      ) from None

  def _array(self, channel: str):
    """The array of ``channel`` (memory-mapped), checked for rank, shape and a numeric dtype."""
    if channel not in self._arrays:
      arr = self._open_array(channel)
      shape, dtype = tuple(int(n) for n in arr.shape), np.dtype(arr.dtype)
      if len(shape) != 3:
        raise SourceError(
          f"local volume {channel} must be 3D ZYX, got shape {shape}; save it "
          "without channel or time axes"
        )
      if channel != "image" and shape != self.shape():
        raise SourceError(
          f"local volume {channel} has shape {shape}, the image {self.shape()}; "
          "every channel must cover the same ZYX extent"
        )
      if dtype.kind not in "buif":
        raise SourceError(
          f"local volume {channel} is {dtype}, not a numeric array; save it as "
          f"{spec.CHANNELS[channel].dtype}"
        )
      if channel == "image" and dtype.kind == "f" and self.image_scale is None:
        # Refused before anything is read (every cutout would be); a small central sample
        # shows the value range, which decides the scale.
        z, y, x = (n // 2 for n in shape)
        sample = np.asarray(arr[z, y : y + 64, x : x + 64])
        raise SourceError(
          f"{self.where()}: channel image is {dtype} (values in {_range(sample)} in a "
          f"64x64 sample of slice {z}); a float image is never cast silently: save it as "
          "uint8, or add the scaling rule scale=S to the source (e.g. 'local:DIR,scale=255' "
          "for values in [0, 1]: uint8 = round(x * S))"
        )
      self._arrays[channel] = arr
    return self._arrays[channel]

  def shape(self):
    if self._shape is None:
      self._shape = tuple(int(s) for s in self._array("image").shape)
    return self._shape

  def check_channels(self, channels) -> None:
    super().check_channels(channels)
    for channel in channels:
      self._array(channel)

  def _read(self, channel_name: str, box: spec.Box) -> np.ndarray:
    return np.asarray(self._array(channel_name)[box.slices])

  def volume_provider(self):
    return self._provider

  def describe(self):
    out = {"kind": "local", "path": self.path, "shape": list(self.shape())}
    if self.image_scale is not None:  # changes the bytes; absent otherwise (older manifests)
      out["image_scale"] = self.image_scale
    return out


def _number(name: str, value, cast, minimum, *, strict: bool = False):
  """A numeric source option, checked: ``cast(value)`` >= ``minimum`` (> with ``strict``)."""
  try:
    if isinstance(value, bool):
      raise ValueError
    out = cast(value)
    if isinstance(out, float) and not math.isfinite(out):
      raise ValueError
  except (TypeError, ValueError):
    raise SourceError(
      f"source option {name} must be {'an integer' if cast is int else 'a number'}, "
      f"got {value!r}; e.g. {name}={max(minimum or 0, 1)}"
    ) from None
  if minimum is not None and (out <= minimum if strict else out < minimum):
    raise SourceError(
      f"source option {name} must be {'>' if strict else '>='} {minimum}, got {value!r}; "
      "fix the source spec"
    )
  return out


class BossDBSource(Source):
  """Real BossDB (or any Boss-API server) through intern's ``BossRemote``.

  Spec strings (``--source``)::

    bossdb                                     https://api.bossdb.io, public read-only token
    bossdb:host=127.0.0.1:8123,protocol=http   a local server, e.g.
                                               ``mtneuro serve --source phantom``
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

  def __init__(
    self,
    host: str | None = None,
    protocol: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
    chunk: str | None = None,
    concurrency: int = 4,
    retries: int = 5,
    timeout: float = 60.0,
    connect_timeout: float = 10.0,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    expect_tissue: str = "image",
    max_request_mb: float = 500.0,
    seed: int | None = None,
    intern_cfg: str = "~/.intern/intern.cfg",
  ):
    for name, value in (
      ("host", host),
      ("protocol", protocol),
      ("token", token),
      ("token_file", token_file),
    ):
      if value is not None and not str(value).strip():
        # An empty value must not fall back to api.bossdb.io (or a stored token) silently.
        raise SourceError(
          f"bossdb option {name} is empty; give it a value ({name}=...) or leave "
          "it out to use the default"
        )
    config, self.config_origins = bossdb.resolve_boss_config(
      None if host is None else str(host),
      protocol,
      None if token is None else str(token),
      token_file=token_file,
      intern_cfg=intern_cfg,
    )
    self._config = config
    self.host, self.protocol = config["host"], config["protocol"]
    if expect_tissue not in bossdb.EXPECT_NONZERO:
      raise SourceError(
        f"bossdb option expect_tissue must be one of {', '.join(bossdb.EXPECT_NONZERO)}, "
        f"got {expect_tissue!r}; e.g. expect_tissue=none"
      )
    retries = _number("retries", retries, int, 0)
    concurrency = _number("concurrency", concurrency, int, 1)
    timeout = _number("timeout", timeout, float, 0, strict=True)
    connect_timeout = _number("connect_timeout", connect_timeout, float, 0, strict=True)
    backoff = _number("backoff", backoff, float, 0)
    max_backoff = _number("max_backoff", max_backoff, float, 0)
    max_request_mb = _number("max_request_mb", max_request_mb, float, 0, strict=True)
    self.retry = bossdb.RetryPolicy(retries + 1, backoff, max_backoff)
    self.timeouts = (connect_timeout, timeout)
    self.concurrency = concurrency
    self.max_request_bytes = int(max_request_mb * 2**20)
    self.chunk_zyx = bossdb.parse_chunk(chunk)
    self.expect_tissue = expect_tissue
    self.seed = None if seed is None else _number("seed", seed, int, None)
    self._provider = None
    self._shape = None
    self._checked: set[str] = set()
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"BossDBSource({self.protocol}://{self.host})"

  def where(self) -> str:
    return f"{self.protocol}://{self.host}"

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
          self._config,
          chunk_zyx=self.chunk_zyx,
          concurrency=self.concurrency,
          retry=self.retry,
          timeout_s=self.timeouts[1],
          connect_timeout_s=self.timeouts[0],
          expect_nonzero=bossdb.EXPECT_NONZERO[self.expect_tissue],
          max_request_bytes=self.max_request_bytes,
          seed=self.seed,
        )
      return self._provider

  def describe(self):
    # Data identity only (cache keys): no token, no transfer tuning.
    return {
      "kind": "bossdb",
      "host": self.host,
      "protocol": self.protocol,
      "uris": {k: c.uri for k, c in spec.CHANNELS.items()},
    }

  def shape(self):
    """ZYX extent of the coordinate frame the server reports (fetched once)."""
    if self._shape is None:
      self._shape = tuple(
        int(s)
        for s in self.volume_provider().get_shape(_channel_resource(spec.CHANNELS["image"]), 0)
      )
    return self._shape

  def _check_channel(self, channel: str) -> None:
    """Once per channel: it exists on the server with the dtype the spec expects."""
    if channel in self._checked or channel not in spec.CHANNELS:
      return
    c = spec.CHANNELS[channel]
    remote = self.volume_provider().get_channel(c.channel, c.collection, c.experiment)
    if remote.datatype != c.dtype:
      raise SourceError(
        f"{self.protocol}://{self.host} serves {c.uri} as {remote.datatype}, "
        f"expected {c.dtype}; is this the MTNeuro volume? point host= at a server "
        "that holds it"
      )
    self._checked.add(channel)

  def check_channels(self, channels) -> None:
    super().check_channels(channels)
    for channel in channels:
      self._check_channel(channel)

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
    boxes = list(boxes)
    outs = self.volume_provider().get_cutouts(
      _channel_resource(spec.CHANNELS[channel]), resolution, boxes
    )
    return [
      to_channel_dtype(channel, a, where=f"{self.where()}, box {b}")
      for a, b in zip(outs, boxes, strict=True)
    ]

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


def _parse_options(source_spec: str, items: list[str]) -> dict[str, Any]:
  """``["k=v", ...]`` -> kwargs; digit strings become ints. Empty or repeated keys/values are refused."""
  kwargs: dict[str, Any] = {}
  for item in items:
    k, eq, v = item.partition("=")
    k, v = k.strip(), v.strip()
    if not eq or not k:
      raise SourceError(
        f"bad source option {item!r} in {source_spec!r}; expected key=value, "
        "e.g. 'phantom:seed=3' or 'bossdb:host=127.0.0.1:8123,protocol=http'"
      )
    if not v:
      raise SourceError(
        f"source option {k} is empty in {source_spec!r}; give it a value ({k}=...) "
        "or leave it out to use the default"
      )
    if k in kwargs:
      raise SourceError(f"source option {k} is given twice in {source_spec!r}; keep one")
    kwargs[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
  return kwargs


def _split_local(rest: str) -> tuple[str, list[str]]:
  """``"/path[,key=value...]"`` -> (path, options): trailing ``,identifier=value`` items are
  options, the rest (commas included) is the path."""
  parts = rest.split(",")
  n = len(parts)
  while n > 1 and re.fullmatch(r"\s*[A-Za-z_]\w*\s*=.*", parts[n - 1]):
    n -= 1
  return ",".join(parts[:n]), parts[n:]


def make_source(source_spec: str) -> Source:
  """Builds a Source from a spec string (see module docstring); SourceError naming the fix."""
  kind, _, rest = str(source_spec).partition(":")
  if kind not in SOURCES:
    raise SourceError(
      f"unknown source {kind!r}; use one of: {', '.join(SOURCES)} "
      "(e.g. 'phantom', 'local:/data/vol', 'bossdb')"
    )
  if kind == "local":
    path, items = _split_local(rest)
    if not path.strip():
      raise SourceError("local source needs a path; use 'local:/path/to/volume'")
    kwargs = _parse_options(source_spec, items)
    unknown = sorted(set(kwargs) - set(LocalSource.OPTIONS))
    if unknown:
      raise SourceError(
        f"unknown option(s) {', '.join(unknown)} for source 'local' in {source_spec!r}; "
        f"known: {', '.join(LocalSource.OPTIONS)}"
      )
    return LocalSource(path, **kwargs)
  kwargs = _parse_options(source_spec, rest.split(",")) if rest else {}
  known = [p for p in inspect.signature(SOURCES[kind].__init__).parameters if p != "self"]
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    raise SourceError(
      f"bad options for source {kind!r} in {source_spec!r}: unknown option(s) "
      f"{', '.join(unknown)}; known: {', '.join(known) or 'none'}"
    )
  return SOURCES[kind](**kwargs)
