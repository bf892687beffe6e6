"""Resilient BossDB access through intern's real ``BossRemote``.

Two layers, both intern ``VolumeProvider``s so ``intern.array`` sees nothing new:

* ``BossRemoteProvider``: intern's own BossDB provider (``_BossDBVolumeProvider``)
  with one ``BossRemote`` per thread (``requests.Session`` is not documented as
  thread-safe), a (connect, read) timeout on every request, TLS verification
  forced on, and cutouts sent as ONE HTTP request each (``parallel=False`` and a
  chunk size equal to the request, so intern neither forks a process pool nor
  splits the box itself).
* ``ResilientVolumeProvider``: wraps ANY provider. A cutout is split into
  bounded requests (``plan_chunks``), fetched by a bounded thread pool, and
  every request is validated and retried with exponential backoff + jitter.
  Only a complete, validated cutout is ever returned: on a final failure the
  whole cutout raises ``BossFetchError`` naming the box, the chunk and the
  faults seen, and nothing partial escapes (so nothing partial gets cached).

Fault kinds (``FAULT_KINDS``), all retried up to ``RetryPolicy.max_attempts``:

  connection   refused / reset / dropped connection
  timeout      connect or read timeout (every request carries a timeout)
  http_5xx     HTTP 500-599
  http_429     HTTP 429 (throttled); a ``Retry-After`` header is honoured, capped
  truncated    body shorter than its Content-Length
  undecodable  body is not a valid blosc buffer
  wrong_size   decoded payload has the wrong number of bytes for the box
               (a wrong-dtype payload shows up here too: intern decodes with the
               channel dtype, so the element count is off)
  wrong_shape  provider returned an array whose shape is not the chunk's
  wrong_dtype  provider returned an array whose dtype is not the channel's
  all_zero     an all-zero cutout where tissue is expected (intern's CloudVolume
               path can return zeros silently). Pluggable: ``expect_nonzero``.

Any other HTTP status (400, 401, 403, 404, 413, ...) is fatal at once: retrying
cannot fix a bad token or a missing channel.

Tokens are never logged, never put in an error message and never in
``describe()``; error texts are scrubbed of the token as a second guard.
"""

from __future__ import annotations

import collections
import concurrent.futures
import configparser
import dataclasses
import logging
import os
import random
import re
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from intern.convenience.array import VolumeProvider, _BossDBVolumeProvider
from intern.remote.boss import BossRemote

from mtneuro_jax.volumes import spec
from mtneuro_jax.volumes.errors import SourceError

log = logging.getLogger(__name__)

DEFAULT_HOST = "api.bossdb.io"
DEFAULT_PROTOCOL = "https"
PUBLIC_TOKEN = "public"
# The Boss refuses a cutout over 500 MB uncompressed with HTTP 413 ("Cutout
# request is over 500MB when uncompressed. Reduce cutout dimensions.",
# jhuapl-boss/boss django/bossspatialdb/views.py). Older deployments said 1 GB.
BOSS_MAX_CUTOUT_BYTES = 500 * 1024 * 1024
# Boss res-0 cuboids are 512x512x16 (XYZ); the default request is two cuboids
# deep: 32x512x512 ZYX = 8 MiB of uint8 or 64 MiB of uint64, well under the limit.
DEFAULT_CHUNK_ZYX = (32, 512, 512)
DEFAULT_CONCURRENCY = 4

FAULT_KINDS = (
  "connection",
  "timeout",
  "http_5xx",
  "http_429",
  "truncated",
  "undecodable",
  "wrong_size",
  "wrong_shape",
  "wrong_dtype",
  "all_zero",
)


class BossFetchError(SourceError):
  """A BossDB request failed for good (fatal status, or retries exhausted).

  Attributes: ``box`` (the requested ``spec.Box``), ``chunk`` (the failing
  request's box), ``kind`` (last fault kind, or ``"fatal"``), ``attempts``.
  """

  def __init__(self, message: str, *, box=None, chunk=None, kind: str = "fatal", attempts: int = 0):
    super().__init__(message)
    self.box, self.chunk, self.kind, self.attempts = box, chunk, kind, attempts


class _Fault(Exception):
  """A validation failure of a reply (shape, dtype, all-zero): retryable."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


class _Cancelled(Exception):
  """Another request of the same cutout failed for good; stop early."""


# ---------------------------------------------------------------------------
# Configuration: host, protocol, token.
def _read_intern_config(path: str, environ: Mapping[str, str]) -> tuple[dict[str, str], str]:
  """intern's own configuration, resolved as intern does: the config file if it
  exists, else INTERN_PROTOCOL/INTERN_HOST/INTERN_TOKEN. Returns (values, origin)."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    parser = configparser.ConfigParser(interpolation=None)
    try:
      parser.read(path)
    except configparser.Error as e:
      raise SourceError(
        f"cannot parse intern config {path}: {type(e).__name__}; fix or move that "
        "file, or pass host=/token= in the source spec"
      ) from None
    # BossRemote reads the cutout service from [Volume Service] when present.
    for section in ("Volume Service", "Default"):
      if parser.has_section(section):
        return {k: v for k, v in parser.items(section) if k in ("protocol", "host", "token")}, path
    return {}, path
  values = {
    k: environ[f"INTERN_{k.upper()}"]
    for k in ("protocol", "host", "token")
    if environ.get(f"INTERN_{k.upper()}")
  }
  return values, "INTERN_* environment"


def resolve_boss_config(
  host: str | None = None,
  protocol: str | None = None,
  token: str | None = None,
  *,
  token_file: str | None = None,
  environ: Mapping[str, str] | None = None,
  intern_cfg: str = "~/.intern/intern.cfg",
) -> tuple[dict[str, str], dict[str, str]]:
  """Resolves ``{"protocol", "host", "token"}`` for a BossRemote.

  Precedence, field by field:
    1. arguments (``token_file=`` reads the token from a file),
    2. ``MTNEURO_BOSS_HOST`` / ``MTNEURO_BOSS_PROTOCOL`` / ``MTNEURO_BOSS_TOKEN``,
    3. intern's own configuration: ``~/.intern/intern.cfg`` if it exists, else
       ``INTERN_HOST`` / ``INTERN_PROTOCOL`` / ``INTERN_TOKEN``,
    4. ``https://api.bossdb.io`` with the public read-only token.
  A token from level 2 or 3 is only sent to the host configured at that same
  level (or api.bossdb.io when that level names no host): pointing ``host=`` at
  another server falls back to the public token unless a token is passed too.

  Returns ``(config, origins)``; ``origins`` says where each field came from and
  never holds the token itself.
  """
  environ = os.environ if environ is None else environ
  if token is None and token_file:
    try:
      with open(os.path.expanduser(token_file)) as f:
        token = f.read().strip()
    except OSError as e:
      raise SourceError(
        f"cannot read token_file {token_file}: {e.strerror}; check the path"
      ) from None
    if not token:
      raise SourceError(f"token_file {token_file} is empty; put the token in it")
  env = {k: environ.get(f"MTNEURO_BOSS_{k.upper()}") or None for k in ("protocol", "host", "token")}
  cfg, cfg_origin = _read_intern_config(intern_cfg, environ)
  levels = [
    ({"host": host, "protocol": protocol, "token": token}, "argument"),
    (env, "MTNEURO_BOSS_* environment"),
    (cfg, cfg_origin),
  ]
  out, origins = {}, {}
  for field in ("host", "protocol"):
    for values, origin in levels:
      if values.get(field):
        out[field], origins[field] = str(values[field]), origin
        break
    else:
      out[field], origins[field] = (
        (DEFAULT_HOST if field == "host" else DEFAULT_PROTOCOL),
        "default",
      )
  out["token"], origins["token"] = PUBLIC_TOKEN, "default (public)"
  for values, origin in levels:
    if not values.get("token"):
      continue
    if origin != "argument" and out["host"] != (values.get("host") or DEFAULT_HOST):
      # A stored token belongs to its host; never hand it to another server.
      continue
    out["token"], origins["token"] = str(values["token"]), origin
    break
  out["host"] = out["host"].rstrip("/")
  if out["protocol"] not in ("http", "https"):
    raise SourceError(
      f"BossDB protocol must be 'http' or 'https', got {out['protocol']!r}; "
      "fix protocol= (or MTNEURO_BOSS_PROTOCOL)"
    )
  if "://" in out["host"] or "/" in out["host"]:
    raise SourceError(
      f"BossDB host must be 'name[:port]' without scheme or path, got {out['host']!r}; "
      "pass the scheme as protocol=http|https"
    )
  if out["protocol"] == "http" and out["token"] != PUBLIC_TOKEN:
    log.warning("sending a non-public BossDB token to %s over plain http", out["host"])
  return out, origins


def _scrub(text: str, token: str | None) -> str:
  """Removes the token from a message (a second guard: intern's messages carry
  the server's reply text, which a misbehaving server could echo the token in)."""
  if token and token != PUBLIC_TOKEN and len(token) >= 4:
    text = text.replace(token, "***")
  return text


# ---------------------------------------------------------------------------
# The real provider: intern's BossRemote, one per thread, with timeouts.
class BossRemoteProvider(_BossDBVolumeProvider):
  """intern's BossDB VolumeProvider with per-thread remotes and request timeouts.

  ``get_cutout`` returns the ZYX array of one HTTP request (C order, channel dtype).
  """

  def __init__(
    self, config: Mapping[str, str], *, timeout_s: float = 60.0, connect_timeout_s: float = 10.0
  ):
    # Deliberately not calling super().__init__: it would build a default
    # BossRemote from ~/.intern; ``boss`` below is per-thread instead.
    self._config = {k: str(config[k]) for k in ("protocol", "host", "token")}
    self._timeout = (float(connect_timeout_s), float(timeout_s))
    self._local = threading.local()

  def __repr__(self) -> str:
    return f"BossRemoteProvider({self._config['protocol']}://{self._config['host']})"

  @property
  def host(self) -> str:
    return self._config["host"]

  @property
  def boss(self) -> BossRemote:
    remote = getattr(self._local, "remote", None)
    if remote is None:
      remote = BossRemote(dict(self._config))
      for service in (remote.project_service, remote.metadata_service, remote.volume_service):
        opts = dict(service.session_send_opts)
        opts["timeout"] = (
          self._timeout
        )  # requests has no default timeout: a stall would hang forever
        if opts.get("verify") is False:
          opts["verify"] = True  # never talk to BossDB without TLS verification
        service.session_send_opts = opts
      self._local.remote = remote
    return remote

  def get_cutout(self, channel, resolution, xs, ys, zs) -> np.ndarray:
    size_xyz = (xs[1] - xs[0], ys[1] - ys[0], zs[1] - zs[0])
    return self.boss.get_cutout(
      channel, resolution, list(xs), list(ys), list(zs), parallel=False, chunk_size=size_xyz
    )


# ---------------------------------------------------------------------------
# Retry policy and fault classification.
@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """Exponential backoff with "equal jitter": before retry ``n`` (1-based) wait
  ``d/2 + U(0, d/2)`` with ``d = min(max_delay_s, base_delay_s * 2**(n-1))``;
  a server ``Retry-After`` raises the wait (still capped at ``max_delay_s``)."""

  max_attempts: int = 6
  base_delay_s: float = 0.5
  max_delay_s: float = 30.0

  def __post_init__(self):
    if self.max_attempts < 1:
      raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
    if self.base_delay_s < 0 or self.max_delay_s < 0:
      raise ValueError("backoff delays must be >= 0")

  def delay(self, retry: int, rng: random.Random, retry_after: float | None = None) -> float:
    d = min(self.max_delay_s, self.base_delay_s * 2.0 ** (retry - 1))
    wait = d / 2 + rng.uniform(0.0, d / 2)
    if retry_after is not None:
      wait = max(wait, min(float(retry_after), self.max_delay_s))
    return wait


def _retry_after(response) -> float | None:
  value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
  try:
    return max(0.0, float(value)) if value is not None else None
  except ValueError:
    return None  # an HTTP-date; the backoff alone is fine


_FATAL_HINTS = {
  400: "the server rejected the request (bad range or resolution?)",
  401: "the token was refused: pass token=/token_file= or set MTNEURO_BOSS_TOKEN",
  403: "no permission for this channel with this token",
  404: "no such collection/experiment/channel on this host: check host= and the channel URI",
  413: "the request is over the server's cutout size limit: lower chunk=",
}


def classify(exc: BaseException) -> tuple[str | None, float | None]:
  """(fault kind, Retry-After seconds) for an exception from a cutout request;
  kind None means fatal (not retried)."""
  import requests  # intern depends on requests; imported here to keep module import light

  if isinstance(exc, _Fault):
    return exc.kind, None
  if isinstance(exc, requests.exceptions.Timeout):  # before ConnectionError: ConnectTimeout is both
    return "timeout", None
  if isinstance(exc, requests.exceptions.ChunkedEncodingError):
    return "truncated", None
  if isinstance(
    exc, (requests.exceptions.ContentDecodingError, requests.exceptions.JSONDecodeError)
  ):
    return "undecodable", None
  if isinstance(exc, requests.exceptions.HTTPError):
    status = getattr(exc.response, "status_code", None)
    if status == 429:
      return "http_429", _retry_after(exc.response)
    if status is not None and 500 <= status < 600:
      return "http_5xx", _retry_after(exc.response)
    return None, None
  if isinstance(exc, requests.exceptions.ConnectionError):
    return "connection", None
  if type(exc).__name__ == "error" and type(exc).__module__ == "blosc_extension":
    return "undecodable", None
  if isinstance(exc, ValueError) and re.search(
    r"reshape|buffer size|multiple of element size", str(exc)
  ):
    return "wrong_size", None
  return None, None


def tissue_expected(channel, resolution: int, box: spec.Box) -> bool:
  """Default ``expect_nonzero`` predicate: image channels inside the tissue z range.

  ``channel`` is an intern ChannelResource; labels may legitimately be all zero.
  """
  del resolution  # z is not downsampled in the Boss hierarchies MTNeuro uses
  return (
    getattr(channel, "type", "") == "image"
    and box.z0 < spec.TISSUE_Z[1]
    and box.z1 > spec.TISSUE_Z[0]
  )


def never_expected(channel, resolution: int, box: spec.Box) -> bool:
  """``expect_nonzero`` predicate that disables the all-zero check."""
  return False


EXPECT_NONZERO: Mapping[str, Callable[..., bool]] = {
  "image": tissue_expected,
  "none": never_expected,
}


# ---------------------------------------------------------------------------
# Chunking.
def parse_chunk(text: str | Sequence[int] | None) -> tuple[int, int, int]:
  """``"32x512x512"`` (ZYX) or a 3-sequence -> a ZYX chunk shape."""
  if text is None:
    return DEFAULT_CHUNK_ZYX
  parts = text.lower().split("x") if isinstance(text, str) else list(text)
  try:
    chunk = tuple(int(p) for p in parts)
  except (TypeError, ValueError):
    chunk = ()
  if len(chunk) != 3 or min(chunk) < 1:
    raise SourceError(
      f"chunk must be three positive ZYX sizes like '32x512x512', got {text!r}; "
      "fix the chunk= option"
    )
  return chunk  # type: ignore[return-value]


def plan_chunks(box: spec.Box, chunk_zyx: Sequence[int]) -> list[spec.Box]:
  """Splits ``box`` into the fewest near-equal requests no larger than ``chunk_zyx``.

  Per axis, ``ceil(extent / chunk)`` parts; a box that fits is one request (the
  exporter's 32x256x256 cache chunks map 1:1 to requests). The parts tile
  ``box`` exactly, in C (z, y, x) order.
  """
  edges = []
  for lo, hi, c in zip((box.z0, box.y0, box.x0), (box.z1, box.y1, box.x1), chunk_zyx, strict=True):
    n = -(-(hi - lo) // c)
    cuts = [lo + (hi - lo) * i // n for i in range(n + 1)]
    edges.append(list(zip(cuts[:-1], cuts[1:], strict=True)))
  return [
    spec.Box(z0, z1, y0, y1, x0, x1)
    for z0, z1 in edges[0]
    for y0, y1 in edges[1]
    for x0, x1 in edges[2]
  ]


# ---------------------------------------------------------------------------
# Counters.
class FetchStats:
  """Thread-safe counters. ``snapshot()`` (JSON-able): cutout ``requests``
  (attempts), ``ok`` (validated replies), ``bytes``, ``cutouts`` (whole boxes
  returned), ``metadata_requests``; ``faults_by_kind`` / ``retries_by_kind`` /
  ``failures_by_kind`` (final) over cutouts and metadata; ``fatal``; total
  ``backoff_wait_s``."""

  def __init__(self):
    self._lock = threading.Lock()
    self.reset()

  def reset(self) -> None:
    with self._lock:
      self.requests = 0
      self.ok = 0
      self.bytes = 0
      self.cutouts = 0
      self.faults: collections.Counter = collections.Counter()
      self.retries: collections.Counter = collections.Counter()
      self.failures: collections.Counter = collections.Counter()
      self.fatal = 0
      self.wait_s = 0.0
      self.metadata_requests = 0

  _COUNTERS = {"fault": "faults", "retry": "retries", "failure": "failures"}

  def add(self, **kw) -> None:
    """``add(requests=1, fault="timeout", ...)``: numbers add, kinds count."""
    with self._lock:
      for k, v in kw.items():
        if k in self._COUNTERS:
          getattr(self, self._COUNTERS[k])[v] += 1
        else:
          setattr(self, k, getattr(self, k) + v)

  def snapshot(self) -> dict[str, Any]:
    with self._lock:
      return {
        "requests": self.requests,
        "ok": self.ok,
        "bytes": self.bytes,
        "cutouts": self.cutouts,
        "metadata_requests": self.metadata_requests,
        "retries": int(sum(self.retries.values())),
        "retries_by_kind": dict(sorted(self.retries.items())),
        "faults_by_kind": dict(sorted(self.faults.items())),
        "failures_by_kind": dict(sorted(self.failures.items())),
        "fatal": self.fatal,
        "backoff_wait_s": round(self.wait_s, 3),
      }


# ---------------------------------------------------------------------------
# The resilient provider.
class ResilientVolumeProvider(VolumeProvider):
  """Wraps a VolumeProvider: bounded, concurrent, validated, retried cutouts.

  Args:
    inner: the provider that performs one request per ``get_cutout`` call.
    chunk_zyx: largest request, ZYX voxels; must stay under ``max_request_bytes``
      for every dtype requested.
    concurrency: worker threads (the bound on requests in flight, shared by all
      callers of this provider).
    retry: ``RetryPolicy``.
    expect_nonzero: ``(channel, resolution, box) -> bool``; True where an
      all-zero reply is a fault. Default: image channel inside ``spec.TISSUE_Z``.
    max_request_bytes: the server's uncompressed cutout limit.
    sleep / seed: injectable for tests (backoff sleeping, jitter RNG).
    describe_target: how errors name the server (e.g. ``"https://api.bossdb.io"``).
    secret: a string never to appear in errors (the token).
  """

  def __init__(
    self,
    inner: VolumeProvider,
    *,
    chunk_zyx: Sequence[int] = DEFAULT_CHUNK_ZYX,
    concurrency: int = DEFAULT_CONCURRENCY,
    retry: RetryPolicy | None = None,
    expect_nonzero: Callable[..., bool] = tissue_expected,
    max_request_bytes: int = BOSS_MAX_CUTOUT_BYTES,
    sleep: Callable[[float], None] = time.sleep,
    seed: int | None = None,
    describe_target: str = "",
    secret: str | None = None,
  ):
    self.inner = inner
    self.chunk_zyx = parse_chunk(chunk_zyx)
    if int(concurrency) < 1:
      raise SourceError(f"concurrency must be >= 1, got {concurrency}")
    self.concurrency = int(concurrency)
    self.retry = retry or RetryPolicy()
    self.expect_nonzero = expect_nonzero
    self.max_request_bytes = int(max_request_bytes)
    self.stats = FetchStats()
    self._sleep = sleep
    self._rng = random.Random(seed)
    self._rng_lock = threading.Lock()
    self._target = describe_target or repr(inner)
    self._secret = secret
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pool_lock = threading.Lock()

  # -- intern VolumeProvider metadata: retried, but not validated.
  def get_vp_type(self) -> str:
    return self.inner.get_vp_type()

  def get_axis_order(self) -> str:
    return self.inner.get_axis_order()

  def get_remote(self):
    return self.inner.get_remote() if hasattr(self.inner, "get_remote") else None

  def get_channel(self, channel: str, collection: str, experiment: str):
    return self._call(
      f"channel {collection}/{experiment}/{channel}",
      lambda: self.inner.get_channel(channel, collection, experiment),
    )

  def get_project(self, resource):
    return self._call(
      f"resource {getattr(resource, 'name', resource)}", lambda: self.inner.get_project(resource)
    )

  def get_shape(self, channel, resolution: int = 0):
    return self._call(
      f"shape of {_uri(channel)}", lambda: self.inner.get_shape(channel, resolution)
    )

  def get_voxel_size(self, channel, resolution: int = 0):
    return self._call(
      f"voxel size of {_uri(channel)}", lambda: self.inner.get_voxel_size(channel, resolution)
    )

  def get_voxel_unit(self, channel, resolution: int = 0):
    return self._call(
      f"voxel unit of {_uri(channel)}", lambda: self.inner.get_voxel_unit(channel, resolution)
    )

  def get_available_resolutions(self, channel):
    return self._call(
      f"resolutions of {_uri(channel)}", lambda: self.inner.get_available_resolutions(channel)
    )

  # -- cutouts.
  def get_cutout(self, channel, resolution, xs, ys, zs) -> np.ndarray:
    """ZYX array of ``channel`` over ``zs, ys, xs`` (half-open), validated."""
    box = spec.Box(int(zs[0]), int(zs[1]), int(ys[0]), int(ys[1]), int(xs[0]), int(xs[1]))
    return self.get_cutouts(channel, resolution, [box])[0]

  def get_cutouts(self, channel, resolution: int, boxes: Sequence[spec.Box]) -> list[np.ndarray]:
    """Several ZYX boxes of one channel, all their requests fetched concurrently.

    All-or-nothing: either every box comes back complete, or ``BossFetchError``
    is raised (naming the first box that failed) and nothing is returned.
    """
    dtype = np.dtype(channel.datatype)
    chunk_bytes = int(np.prod(self.chunk_zyx)) * dtype.itemsize
    if chunk_bytes > self.max_request_bytes:
      raise SourceError(
        f"chunk {'x'.join(map(str, self.chunk_zyx))} of {dtype.name} is {chunk_bytes / 2**20:.0f} MiB per "
        f"request, over the server's {self.max_request_bytes / 2**20:.0f} MiB cutout limit; lower chunk="
      )
    outs = [np.empty(b.shape, dtype=dtype) for b in boxes]
    cancel = threading.Event()
    pool = self._executor()
    futures = {}
    for i, box in enumerate(boxes):
      for chunk in plan_chunks(box, self.chunk_zyx):
        fut = pool.submit(self._fetch_chunk, channel, resolution, box, chunk, cancel)
        futures[fut] = (i, chunk)
    error: BaseException | None = None
    try:
      for fut in concurrent.futures.as_completed(futures):
        i, chunk = futures[fut]
        try:
          data = fut.result()
        except (_Cancelled, concurrent.futures.CancelledError):
          continue
        except Exception as e:  # noqa: BLE001 - re-raised below, after the rest stopped
          if error is None:
            error = e
            cancel.set()
            for other in futures:
              other.cancel()
          continue
        b = boxes[i]
        outs[i][
          chunk.z0 - b.z0 : chunk.z1 - b.z0,
          chunk.y0 - b.y0 : chunk.y1 - b.y0,
          chunk.x0 - b.x0 : chunk.x1 - b.x0,
        ] = data
    except BaseException:
      # Interrupted (KeyboardInterrupt): stop queued requests, return nothing.
      cancel.set()
      for other in futures:
        other.cancel()
      raise
    if error is not None:
      raise error
    self.stats.add(cutouts=len(boxes))
    return outs

  def close(self) -> None:
    with self._pool_lock:
      if self._pool is not None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

  def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._pool_lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
          self.concurrency, thread_name_prefix="bossdb"
        )
      return self._pool

  def _backoff(self, retry: int, retry_after: float | None) -> None:
    with self._rng_lock:
      wait = self.retry.delay(retry, self._rng, retry_after)
    self.stats.add(wait_s=wait)
    self._sleep(wait)

  def _validate(self, channel, resolution, chunk: spec.Box, data) -> np.ndarray:
    data = np.asarray(data)
    want = np.dtype(channel.datatype)
    if data.shape != chunk.shape:
      raise _Fault("wrong_shape", f"reply shape {data.shape}, expected {chunk.shape}")
    if data.dtype != want:
      raise _Fault("wrong_dtype", f"reply dtype {data.dtype}, expected {want}")
    if self.expect_nonzero(channel, resolution, chunk) and not data.any():
      raise _Fault("all_zero", "all-zero image where tissue is expected")
    return data

  def _fetch_chunk(
    self, channel, resolution, box: spec.Box, chunk: spec.Box, cancel: threading.Event
  ):
    kinds: list[str] = []
    last = ""
    for attempt in range(1, self.retry.max_attempts + 1):
      if cancel.is_set():
        raise _Cancelled()
      self.stats.add(requests=1)
      try:
        data = self.inner.get_cutout(
          channel, resolution, (chunk.x0, chunk.x1), (chunk.y0, chunk.y1), (chunk.z0, chunk.z1)
        )
        data = self._validate(channel, resolution, chunk, data)
      except Exception as e:  # noqa: BLE001 - classified below; unknown errors are fatal
        kind, retry_after = classify(e)
        last = _scrub(f"{type(e).__name__}: {e}", self._secret)[:500]
        if kind is None:
          self.stats.add(fatal=1)
          raise BossFetchError(
            f"{self._target}: cutout of {_uri(channel)} {box} failed (request {chunk}): {last}"
            f"{_hint(e)}",
            box=box,
            chunk=chunk,
            kind="fatal",
            attempts=attempt,
          ) from None
        kinds.append(kind)
        self.stats.add(fault=kind)
        if attempt < self.retry.max_attempts:
          self.stats.add(retry=kind)
          log.info(
            "%s: %s on %s %s (attempt %d/%d), retrying",
            self._target,
            kind,
            _uri(channel),
            chunk,
            attempt,
            self.retry.max_attempts,
          )
          self._backoff(attempt, retry_after)
          continue
        self.stats.add(failure=kind)
        seen = ", ".join(f"{k} x{n}" for k, n in collections.Counter(kinds).items())
        raise BossFetchError(
          f"{self._target}: cutout of {_uri(channel)} {box} failed after {attempt} attempts on request "
          f"{chunk} (faults: {seen}); last error: {last}. Check the server and network, or raise "
          "retries=/timeout= in the source spec",
          box=box,
          chunk=chunk,
          kind=kind,
          attempts=attempt,
        ) from None
      self.stats.add(ok=1, bytes=int(data.nbytes))
      return data
    raise AssertionError("unreachable")

  def _call(self, what: str, fn: Callable[[], Any]):
    """Metadata request with the same retry policy (no payload validation)."""
    kinds: list[str] = []
    for attempt in range(1, self.retry.max_attempts + 1):
      self.stats.add(metadata_requests=1)
      try:
        out = fn()
      except Exception as e:  # noqa: BLE001 - classified below
        kind, retry_after = classify(e)
        if kind in ("wrong_size",):
          kind = None
        last = _scrub(f"{type(e).__name__}: {e}", self._secret)[:500]
        if kind is None:
          self.stats.add(fatal=1)
          raise BossFetchError(
            f"{self._target}: {what} failed: {last}{_hint(e)}", kind="fatal", attempts=attempt
          ) from None
        kinds.append(kind)
        self.stats.add(fault=kind)
        if attempt < self.retry.max_attempts:
          self.stats.add(retry=kind)
          self._backoff(attempt, retry_after)
          continue
        self.stats.add(failure=kind)
        raise BossFetchError(
          f"{self._target}: {what} failed after {attempt} attempts "
          f"({', '.join(kinds)}); last error: {last}",
          kind=kind,
          attempts=attempt,
        ) from None
      return out
    raise AssertionError("unreachable")


def _uri(channel) -> str:
  try:
    return f"bossdb://{channel.coll_name}/{channel.exp_name}/{channel.name}"
  except AttributeError:
    return str(channel)


def _hint(exc: BaseException) -> str:
  status = getattr(getattr(exc, "response", None), "status_code", None)
  return f" ({_FATAL_HINTS[status]})" if status in _FATAL_HINTS else ""


def make_boss_provider(
  config: Mapping[str, str],
  *,
  chunk_zyx=DEFAULT_CHUNK_ZYX,
  concurrency: int = DEFAULT_CONCURRENCY,
  retry: RetryPolicy | None = None,
  timeout_s: float = 60.0,
  connect_timeout_s: float = 10.0,
  expect_nonzero: Callable[..., bool] = tissue_expected,
  max_request_bytes: int = BOSS_MAX_CUTOUT_BYTES,
  seed: int | None = None,
) -> ResilientVolumeProvider:
  """The resilient provider over intern's BossRemote for ``config`` (see
  ``resolve_boss_config``)."""
  inner = BossRemoteProvider(config, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
  return ResilientVolumeProvider(
    inner,
    chunk_zyx=chunk_zyx,
    concurrency=concurrency,
    retry=retry,
    expect_nonzero=expect_nonzero,
    max_request_bytes=max_request_bytes,
    seed=seed,
    describe_target=f"{config['protocol']}://{config['host']}",
    secret=config.get("token"),
  )
