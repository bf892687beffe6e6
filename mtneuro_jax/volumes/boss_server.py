"""A local Boss v1 REST API over any ``Source``, with deterministic fault injection.

Serves the subset of the Boss API that intern uses for ``intern.array`` and
cutouts, so intern-based tools can read a local volume (phantom, ``local:`` npy
or zarr, even another Boss) as if it were BossDB:

  GET /v1/collection/                                    {"collections": [...]}
  GET /v1/collection/<c>[/]                              collection
  GET /v1/collection/<c>/experiment/[<e>[/]]             experiments / experiment
  GET /v1/collection/<c>/experiment/<e>/channel/[<ch>]   channels / channel
  GET /v1/coord/[<cf>[/]]                                coordinate frames / frame
  GET /v1/meta/<c>[/<e>[/<ch>]]/[?key=k]                 metadata (empty store)
  GET /v1/downsample/<c>/<e>/<ch>[/]                     downsample status
  GET /v1/cutout/<c>/<e>/<ch>/<res>/<x0:x1>/<y0:y1>/<z0:z1>/[?access-mode=...]
      body: ``blosc.compress`` of the C-order ZYX array in the channel dtype
      (``Content-Type: application/blosc``), as the Boss sends it.

Resolution 0 only; one experiment per channel group as in ``spec.CHANNELS``,
sharing one coordinate frame of the source's ``shape()``. Cutouts over
``max_cutout_bytes`` (default 500 MiB, the Boss limit) get 413, ranges outside the
frame 400, unknown resources 404, and with ``token=`` set every request must
carry ``Authorization: Token <token>`` (401 otherwise). Nothing is logged but the
request path; headers (the token) never are.

Fault injection (``FaultPlan``), cutout requests only by default. Each request
is decided by a hash of (seed, request path, how many times that path was
asked before), so a run is reproducible whatever the thread interleaving:

  delay       sleep ``delay_s`` (set it past the client's read timeout), then answer
  5xx         HTTP 500/502/503/504 with a Boss-style JSON error
  429         HTTP 429 with ``Retry-After: <retry_after_s>``
  drop        close the connection without an answer (TCP reset)
  truncate    full Content-Length, half the body, then close
  wrong_size  valid blosc of a payload one tenth short
  wrong_dtype valid blosc of the payload in the wrong dtype (uint8 <-> uint16)
  corrupt     right length, bytes that are not blosc
  zeros       an all-zero image where tissue is expected (what intern's
              CloudVolume path can return); only on image boxes that intersect
              ``spec.TISSUE_Z``, the only place a client can tell

Use from Python::

  with serve(make_source("phantom"), faults=FaultPlan(rate=0.2)) as srv:
    src = make_source(f"bossdb:host={srv.host_port},protocol=http")

or the CLI: ``mtneuro serve --source phantom --port 0`` (= ``python -m mtneuro_jax.volumes.boss_server``)
(prints ``BOSS_SERVER_URL=http://127.0.0.1:<port>``; ``--faults``, ``--latency_ms``
to emulate a WAN, ``--memo_mb`` to keep a slow source's cutouts in memory, see
``MemoSource``; encoded replies are also kept in a byte-bounded LRU, ``--cache_mb``). Plain intern then works with
``INTERN_PROTOCOL=http INTERN_HOST=127.0.0.1:<port> INTERN_TOKEN=public`` (and no
``~/.intern/intern.cfg``), e.g. ``intern.array("bossdb://prasad/prasad2020/image")``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import http.server
import json
import logging
import re
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from typing import Any, Iterator, Mapping, Sequence

import blosc
import numpy as np

from mtneuro_jax.errors import ArgumentParser, UserError, run_cli
from mtneuro_jax.volumes import spec
from mtneuro_jax.volumes.sources import Source, make_source

log = logging.getLogger(__name__)

MAX_CUTOUT_BYTES = 500 * 1024 * 1024  # the Boss limit (HTTP 413 above it)
FAULT_KINDS = (
  "delay",
  "5xx",
  "429",
  "drop",
  "truncate",
  "wrong_size",
  "wrong_dtype",
  "corrupt",
  "zeros",
)
COORD_FRAME = "mtneuro_local_frame"


class _KeyedLocks:
  """One lock per key, created on demand and dropped when nobody holds it."""

  def __init__(self):
    self._lock = threading.Lock()
    self._locks: dict[Any, list] = {}  # key -> [lock, users]

  @contextlib.contextmanager
  def hold(self, key):
    with self._lock:
      entry = self._locks.setdefault(key, [threading.Lock(), 0])
      entry[1] += 1
    try:
      with entry[0]:
        yield
    finally:
      with self._lock:
        entry[1] -= 1
        if entry[1] == 0:
          self._locks.pop(key, None)


class MemoSource(Source):
  """A Source that keeps decoded cutouts of ``inner`` in memory (byte-bounded LRU).

  A request inside a memoized box is served by slicing it, so a slow renderer
  (the realistic phantom) runs once per box however the clients chunk their
  requests. Label channels are stored in the smallest uint dtype that holds
  them (checked) and given back in the channel dtype. Same ``describe()`` as
  ``inner``: it changes no byte, only when they are computed.

  prefetch_channels: on a miss, read every channel of the box at once (the
    phantom renders them together, so consecutive reads are nearly free).
  """

  def __init__(self, inner: Source, *, max_bytes: int = 1 << 30, prefetch_channels: bool = False):
    from mtneuro_jax.volumes.sources import ArrayVolumeProvider

    self.inner = inner
    self.kind = inner.kind
    self.max_bytes = int(max_bytes)
    self.prefetch_channels = bool(prefetch_channels)
    self._boxes: collections.OrderedDict[tuple[str, spec.Box], np.ndarray] = (
      collections.OrderedDict()
    )
    self._held = 0
    self._lock = threading.Lock()
    self._inflight = _KeyedLocks()
    self._provider = ArrayVolumeProvider(inner.kind, self._read, inner.shape())

  def volume_provider(self):
    return self._provider

  def describe(self):
    return self.inner.describe()

  def shape(self):
    return self.inner.shape()

  def _lookup(self, channel: str, box: spec.Box) -> np.ndarray | None:
    with self._lock:
      for (ch, b), arr in reversed(self._boxes.items()):
        if (
          ch == channel
          and b.z0 <= box.z0
          and box.z1 <= b.z1
          and b.y0 <= box.y0
          and box.y1 <= b.y1
          and b.x0 <= box.x0
          and box.x1 <= b.x1
        ):
          self._boxes.move_to_end((ch, b))
          return arr[
            box.z0 - b.z0 : box.z1 - b.z0,
            box.y0 - b.y0 : box.y1 - b.y0,
            box.x0 - b.x0 : box.x1 - b.x0,
          ]
    return None

  def _store(self, channel: str, box: spec.Box, arr: np.ndarray) -> None:
    if spec.CHANNELS[channel].kind == "annotation" and arr.size:
      vmax = int(arr.max())
      for dt in (np.uint8, np.uint16, np.uint32):
        if vmax <= np.iinfo(dt).max:
          arr = arr.astype(dt)
          break
    with self._lock:
      if (channel, box) not in self._boxes:
        self._boxes[(channel, box)] = arr
        self._held += arr.nbytes
      while self._held > self.max_bytes and len(self._boxes) > 1:
        _, old = self._boxes.popitem(last=False)
        self._held -= old.nbytes

  def _read(self, channel: str, box: spec.Box) -> np.ndarray:
    want = spec.CHANNELS[channel].dtype
    hit = self._lookup(channel, box)
    if hit is not None:
      return hit.astype(want)
    # One render per box: a concurrent request for it (e.g. a client's retry
    # after a timeout) waits for this one instead of rendering it again.
    with self._inflight.hold(box if self.prefetch_channels else (channel, box)):
      hit = self._lookup(channel, box)
      if hit is not None:
        return hit.astype(want)
      names = list(spec.CHANNELS) if self.prefetch_channels else [channel]
      out = None
      for name in names:
        arr = self.inner.read(name, box)
        self._store(name, box, arr)
        if name == channel:
          out = arr
    return out.astype(want, copy=False)


@dataclasses.dataclass(frozen=True)
class FaultPlan:
  """Which requests to break, and how.

  rate: fraction of eligible requests to fault, in [0, 1].
  kinds: fault kinds to draw from (``FAULT_KINDS``).
  seed: decisions are a pure function of (seed, path, repeat count).
  delay_s: how long ``delay`` stalls (make it exceed the client read timeout).
  retry_after_s: the ``Retry-After`` header of a 429.
  max_per_path: fault one path at most this many times (then serve it), so a
    test can force "fails N times, then works"; None = no cap.
  fail_after: after this many cutouts served OK, answer every cutout with 403
    (a fatal error for the client; simulates a run dying mid-way); None = never.
  cutouts_only: fault only cutout requests (metadata is served untouched).
  """

  rate: float = 0.0
  kinds: tuple[str, ...] = FAULT_KINDS
  seed: int = 0
  delay_s: float = 2.0
  retry_after_s: float = 1.0
  max_per_path: int | None = None
  fail_after: int | None = None
  cutouts_only: bool = True

  def __post_init__(self):
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f"fault rate must be in [0, 1], got {self.rate}")
    bad = [k for k in self.kinds if k not in FAULT_KINDS]
    if bad or not self.kinds:
      raise ValueError(f"unknown fault kinds {bad}; choose from {', '.join(FAULT_KINDS)}")

  @classmethod
  def parse(cls, text: str | None) -> "FaultPlan":
    """``"rate=0.2,kinds=5xx+429+drop,seed=1,delay=2,max_per_path=2,fail_after=50"``."""
    if not text:
      return cls()
    kw: dict[str, Any] = {}
    names = {"delay": "delay_s", "retry_after": "retry_after_s"}
    for item in text.split(","):
      k, eq, v = item.partition("=")
      k = names.get(k.strip(), k.strip())
      if not eq or k not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(
          f"bad fault option {item!r}; expected key=value with key in "
          "rate, kinds, seed, delay, retry_after, max_per_path, fail_after, cutouts_only"
        )
      if k == "kinds":
        kw[k] = tuple(x for x in v.split("+") if x)
      elif k in ("seed", "max_per_path", "fail_after"):
        kw[k] = int(v)
      elif k == "cutouts_only":
        kw[k] = v.lower() in ("1", "true", "yes")
      else:
        kw[k] = float(v)
    return cls(**kw)

  def decide(self, path: str, nth: int) -> str | None:
    """The fault for the ``nth`` (0-based) request of ``path``, or None."""
    if self.rate <= 0 or (self.max_per_path is not None and nth >= self.max_per_path):
      return None
    h = hashlib.sha256(f"{self.seed}|{path}|{nth}".encode()).digest()
    if int.from_bytes(h[:8], "little") / 2.0**64 >= self.rate:
      return None
    return self.kinds[int.from_bytes(h[8:16], "little") % len(self.kinds)]


class _Reply(Exception):
  """An HTTP error reply, Boss style: ``{"status", "code", "message"}``."""

  def __init__(
    self, status: int, message: str, code: int = 0, headers: Mapping[str, str] | None = None
  ):
    super().__init__(message)
    self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})


class ServerState:
  """What the server serves and what it has seen. All counters are thread-safe."""

  def __init__(
    self,
    source: Source,
    *,
    token: str | None = None,
    faults: FaultPlan | None = None,
    max_cutout_bytes: int = MAX_CUTOUT_BYTES,
    cache_bytes: int = 256 * 2**20,
    latency_s: float = 0.0,
  ):
    self.source = source
    self.latency_s = float(latency_s)
    self._token = token
    self.faults = faults or FaultPlan()
    self.max_cutout_bytes = int(max_cutout_bytes)
    self.cache_bytes = int(cache_bytes)
    self.shape = tuple(int(s) for s in source.shape())
    self._lock = threading.Lock()
    self._cache: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
    self._cached = 0
    self._inflight = _KeyedLocks()
    # Channel tables, keyed the Boss way.
    self.channels = {
      (c.collection, c.experiment, c.channel): (name, c) for name, c in spec.CHANNELS.items()
    }
    self.reset_counters()

  def reset_counters(self) -> None:
    with self._lock:
      self.requests: collections.Counter = collections.Counter()  # by endpoint
      self.path_counts: collections.Counter = collections.Counter()  # cutout path -> requests
      self.meta_counts: collections.Counter = collections.Counter()  # metadata path -> requests
      # (channel name, box ZYX tuple) -> cutout requests / complete 200 replies
      self.requested: collections.Counter = collections.Counter()
      self.served: collections.Counter = collections.Counter()
      self.injected: collections.Counter = collections.Counter()  # fault kind -> count
      self.statuses: collections.Counter = collections.Counter()
      self.bytes_sent = 0
      self.cache_hits = 0
      self.cutouts_ok = 0

  def set_faults(self, faults: FaultPlan | None) -> None:
    with self._lock:
      self.faults = faults or FaultPlan()

  def check_token(self, header: str | None) -> None:
    if self._token is None:
      return
    if header is None or not header.startswith("Token ") or header[6:].strip() != self._token:
      raise _Reply(401, "Invalid token.", 0)

  def stats(self) -> dict[str, Any]:
    with self._lock:
      return {
        "requests": dict(self.requests),
        "cutout_requests": int(sum(self.path_counts.values())),
        "cutout_paths": len(self.path_counts),
        "cutouts_ok": self.cutouts_ok,
        "injected": dict(sorted(self.injected.items())),
        "injected_total": int(sum(self.injected.values())),
        "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        "bytes_sent": self.bytes_sent,
        "cache_hits": self.cache_hits,
      }

  def cutout_body(self, channel: str, box: spec.Box) -> bytes:
    """blosc bytes of a cutout, from the byte-bounded LRU cache or the source."""
    key = (channel, box.as_tuple())
    with self._inflight.hold(key):  # concurrent asks for one box compute it once
      with self._lock:
        body = self._cache.get(key)
        if body is not None:
          self._cache.move_to_end(key)
          self.cache_hits += 1
          return body
      data = np.ascontiguousarray(self.source.read(channel, box))
      body = blosc.compress(data.tobytes(), typesize=data.dtype.itemsize)
      self._remember(key, body)
    return body

  def _remember(self, key, body: bytes) -> None:
    if len(body) <= self.cache_bytes:
      with self._lock:
        if key not in self._cache:
          self._cache[key] = body
          self._cached += len(body)
        while self._cached > self.cache_bytes:
          _, old = self._cache.popitem(last=False)
          self._cached -= len(old)


_RANGE = r"(\d+):(\d+)"
_ROUTES = [
  (
    "cutout",
    re.compile(
      rf"^/v1/cutout/([^/]+)/([^/]+)/([^/]+)/(\d+)/{_RANGE}/{_RANGE}/{_RANGE}(?:/(\d+):(\d+))?/?$"
    ),
  ),
  ("collections", re.compile(r"^/v1/collection/?$")),
  ("collection", re.compile(r"^/v1/collection/([^/]+)/?$")),
  ("experiments", re.compile(r"^/v1/collection/([^/]+)/experiment/?$")),
  ("experiment", re.compile(r"^/v1/collection/([^/]+)/experiment/([^/]+)/?$")),
  ("channels", re.compile(r"^/v1/collection/([^/]+)/experiment/([^/]+)/channel/?$")),
  ("channel", re.compile(r"^/v1/collection/([^/]+)/experiment/([^/]+)/channel/([^/]+)/?$")),
  ("coords", re.compile(r"^/v1/coord/?$")),
  ("coord", re.compile(r"^/v1/coord/([^/]+)/?$")),
  ("meta", re.compile(r"^/v1/meta/([^/]+)(?:/([^/]+))?(?:/([^/]+))?/?$")),
  ("downsample", re.compile(r"^/v1/downsample/([^/]+)/([^/]+)/([^/]+)/?$")),
]


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive: intern's requests.Session reuses connections
  # Headers and body go out in separate writes; with Nagle on, the body waits for
  # the client's delayed ACK (~40 ms per request on loopback).
  disable_nagle_algorithm = True
  server_version = "mtneuro-boss-local/1"

  @property
  def state(self) -> ServerState:
    return self.server.state  # type: ignore[attr-defined]

  def log_message(self, fmt, *args):  # the request line only; never headers
    log.debug("%s %s", self.address_string(), fmt % args)

  # -- helpers
  def _send(
    self,
    status: int,
    body: bytes,
    ctype: str,
    headers: Mapping[str, str] | None = None,
    served_key=None,
  ) -> None:
    """One complete reply. Counters move before the write (a client that has the
    reply must see them) and move back if the write fails."""
    st = self.state
    with st._lock:
      st.bytes_sent += len(body)
      st.statuses[status] += 1
      if served_key is not None:
        st.served[served_key] += 1
        st.cutouts_ok += 1
    try:
      self.send_response(status)
      self.send_header("Content-Type", ctype)
      self.send_header("Content-Length", str(len(body)))
      for k, v in (headers or {}).items():
        self.send_header(k, v)
      self.end_headers()
      self.wfile.write(body)
    except BaseException:
      with st._lock:
        st.bytes_sent -= len(body)
        st.statuses[status] -= 1
        if served_key is not None:
          st.served[served_key] -= 1
          st.cutouts_ok -= 1
      raise

  def _json(self, obj: Any, status: int = 200, headers=None) -> None:
    self._send(status, json.dumps(obj).encode(), "application/json", headers)

  def _error(self, e: _Reply) -> None:
    body = (
      {"detail": e.message}
      if e.status == 401
      else {"status": e.status, "code": e.code, "message": e.message}
    )
    self._json(body, e.status, e.headers)

  def _drop(self) -> None:
    # SO_LINGER 0: close with a reset, as a crashed proxy would.
    with contextlib.suppress(OSError):
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    self.close_connection = True

  # -- dispatch
  def do_GET(self):  # noqa: N802 - http.server API
    url = urllib.parse.urlsplit(self.path)
    try:
      for name, rx in _ROUTES:
        m = rx.match(url.path)
        if m:
          with self.state._lock:
            self.state.requests[name] += 1
          self.state.check_token(self.headers.get("Authorization"))
          if name != "cutout" and self._metadata_fault(url.path):
            return
          getattr(self, "_get_" + name)(*m.groups(), query=urllib.parse.parse_qs(url.query))
          return
      raise _Reply(404, f"no such endpoint {url.path}", 4004)
    except _Reply as e:
      self._error(e)
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True  # the client gave up (e.g. after its timeout)
    except Exception as e:  # noqa: BLE001 - a server bug must still answer, not hang the client
      log.exception("boss_server: error serving %s", url.path)
      with contextlib.suppress(Exception):
        self._error(_Reply(500, f"server error: {type(e).__name__}: {e}", 5000))

  def _metadata_fault(self, path: str) -> bool:
    """Fault a metadata request when the plan covers them; True if answered."""
    st = self.state
    with st._lock:
      faults = st.faults
      if faults.cutouts_only or faults.rate <= 0:
        return False
      nth = st.meta_counts[path]
      st.meta_counts[path] += 1
    kind = faults.decide("meta:" + path, nth)
    if kind is None or kind in ("wrong_size", "wrong_dtype", "zeros"):
      return False  # payload faults that only make sense for cutouts
    with st._lock:
      st.injected[kind] += 1
    if kind == "delay":
      time.sleep(faults.delay_s)
      return False
    if kind in ("truncate", "corrupt"):
      body = b'{"name": "' + b"x" * 64 + b'"}'
      if kind == "truncate":
        self._truncated(body, "application/json")
      else:
        self._send(200, body[:-3], "application/json")
      return True
    return self._inject_http(kind)

  def _channel(self, c: str, e: str, ch: str):
    try:
      return self.state.channels[(c, e, ch)]
    except KeyError:
      raise _Reply(404, f"Channel {c}/{e}/{ch} not found", 4004) from None

  def _experiments(self, c: str) -> list[str]:
    exps = sorted({e for (cc, e, _) in self.state.channels if cc == c})
    if not exps:
      raise _Reply(404, f"Collection {c} not found", 4004)
    return exps

  def _get_collections(self, query):
    self._json({"collections": sorted({c for (c, _, _) in self.state.channels})})

  def _get_collection(self, c, query):
    self._json(
      {
        "name": c,
        "description": f"local copy of {c} ({self.state.source.kind})",
        "experiments": self._experiments(c),
        "creator": "mtneuro",
        "public": True,
      }
    )

  def _get_experiments(self, c, query):
    self._json({"experiments": self._experiments(c)})

  def _get_experiment(self, c, e, query):
    if e not in self._experiments(c):
      raise _Reply(404, f"Experiment {c}/{e} not found", 4004)
    chans = sorted(ch for (cc, ee, ch) in self.state.channels if (cc, ee) == (c, e))
    self._json(
      {
        "name": e,
        "description": "",
        "collection": c,
        "coord_frame": COORD_FRAME,
        "num_hierarchy_levels": 1,
        "hierarchy_method": "isotropic",
        "num_time_samples": 1,
        "time_step": None,
        "time_step_unit": "",
        "creator": "mtneuro",
        "channels": chans,
        "public": True,
      }
    )

  def _get_channels(self, c, e, query):
    if e not in self._experiments(c):
      raise _Reply(404, f"Experiment {c}/{e} not found", 4004)
    self._json(
      {"channels": sorted(ch for (cc, ee, ch) in self.state.channels if (cc, ee) == (c, e))}
    )

  def _get_channel(self, c, e, ch, query):
    _, chan = self._channel(c, e, ch)
    self._json(
      {
        "name": ch,
        "description": chan.uri,
        "experiment": e,
        "default_time_sample": 0,
        "type": chan.kind,
        "base_resolution": 0,
        "datatype": chan.dtype,
        "creator": "mtneuro",
        "sources": [],
        "downsample_status": "NOT_DOWNSAMPLED",
        "related": [],
        "storage_type": "spdb",
        "bucket": None,
        "cv_path": None,
      }
    )

  def _get_coords(self, query):
    self._json({"coords": [COORD_FRAME]})

  def _get_coord(self, name, query):
    if name != COORD_FRAME:
      raise _Reply(404, f"Coordinate frame {name} not found", 4004)
    z, y, x = self.state.shape
    v = spec.VOXEL_SIZE_UM
    self._json(
      {
        "name": COORD_FRAME,
        "description": "",
        "x_start": 0,
        "x_stop": x,
        "y_start": 0,
        "y_stop": y,
        "z_start": 0,
        "z_stop": z,
        "x_voxel_size": v,
        "y_voxel_size": v,
        "z_voxel_size": v,
        "voxel_unit": "micrometers",
      }
    )

  def _get_meta(self, c, e, ch, query):
    if "key" in query:
      raise _Reply(404, f"Key {query['key'][0]} not found", 4004)
    self._json({"keys": []})

  def _get_downsample(self, c, e, ch, query):
    self._channel(c, e, ch)
    z, y, x = self.state.shape
    self._json(
      {
        "num_hierarchy_levels": 1,
        "cuboid_size": {"0": [512, 512, 16]},
        "status": "NOT_DOWNSAMPLED",
        "voxel_size": {"0": [spec.VOXEL_SIZE_UM] * 3},
        "extent": {"0": [x, y, z]},
      }
    )

  def _get_cutout(self, c, e, ch, res, x0, x1, y0, y1, z0, z1, t0, t1, query):
    st = self.state
    name, chan = self._channel(c, e, ch)
    if int(res) != 0:
      raise _Reply(400, f"this server serves resolution 0 only, asked {res}", 4000)
    if t0 is not None and (int(t0), int(t1)) != (0, 1):
      raise _Reply(400, "only time sample 0 exists", 4000)
    try:
      box = spec.Box(int(z0), int(z1), int(y0), int(y1), int(x0), int(x1))
      box.check_inside(st.shape)
    except ValueError as err:
      raise _Reply(400, f"Invalid cutout range: {err}", 4000) from None
    nbytes = int(np.prod(box.shape)) * np.dtype(chan.dtype).itemsize
    if nbytes > st.max_cutout_bytes:
      raise _Reply(
        413,
        f"Cutout request is over {st.max_cutout_bytes / 2**20:.0f}MB when uncompressed. "
        "Reduce cutout dimensions.",
        4014,
      )
    path = urllib.parse.urlsplit(self.path).path
    key = (name, box.as_tuple())
    with st._lock:
      nth = st.path_counts[path]
      st.path_counts[path] += 1
      st.requested[key] += 1
      faults = st.faults
      dead = faults.fail_after is not None and st.cutouts_ok >= faults.fail_after
    if dead:
      raise _Reply(403, "Permission denied (injected fatal failure: fail_after reached)", 4003)
    kind = faults.decide(path, nth)
    tissue = chan.kind == "image" and box.z0 < spec.TISSUE_Z[1] and box.z1 > spec.TISSUE_Z[0]
    if kind == "zeros" and not tissue:
      kind = (
        None  # undetectable there: it would silently corrupt the data instead of testing the client
      )
    if kind is not None:
      with st._lock:
        st.injected[kind] += 1
      if kind == "delay":
        time.sleep(faults.delay_s)  # then answer; the client has normally given up by now
      else:
        self._inject(kind, name, chan, box)
        return
    body = st.cutout_body(name, box)
    if st.latency_s > 0:
      time.sleep(st.latency_s)  # emulated WAN round trip
    # A late reply after a delay does not count as served: its client is gone.
    self._send(200, body, "application/blosc", served_key=key if kind is None else None)

  def _inject_http(self, kind: str) -> bool:
    """Faults that need no payload (any endpoint); False if ``kind`` needs one."""
    faults = self.state.faults
    if kind == "5xx":
      status = (500, 502, 503, 504)[int(hashlib.sha256(self.path.encode()).digest()[0]) % 4]
      raise _Reply(status, "Service temporarily unavailable (injected)", 5000)
    if kind == "429":
      raise _Reply(
        429,
        "Request was throttled (injected)",
        4029,
        headers={"Retry-After": f"{faults.retry_after_s:g}"},
      )
    if kind == "drop":
      self._drop()
      return True
    return False

  def _truncated(self, body: bytes, ctype: str) -> None:
    self.send_response(200)
    self.send_header("Content-Type", ctype)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body[: len(body) // 2])
    self.wfile.flush()
    self.close_connection = True
    with contextlib.suppress(OSError):
      self.connection.shutdown(socket.SHUT_WR)

  def _inject(self, kind: str, name: str, chan, box: spec.Box) -> None:
    """Answers this cutout request broken in the way ``kind`` says."""
    if self._inject_http(kind):
      return
    body = self.state.cutout_body(name, box)
    if kind == "truncate":
      self._truncated(body, "application/blosc")
      return
    data = np.frombuffer(blosc.decompress(body), dtype=chan.dtype)
    if kind == "wrong_size":
      bad = blosc.compress(
        data[: len(data) - max(1, len(data) // 10)].tobytes(), typesize=data.itemsize
      )
    elif kind == "wrong_dtype":
      other = np.uint16 if data.dtype == np.uint8 else np.uint8
      bad = blosc.compress(data.astype(other).tobytes(), typesize=np.dtype(other).itemsize)
    elif kind == "corrupt":
      bad = hashlib.sha256(body).digest() * (len(body) // 32 + 1)
      bad = bad[: len(body)]
    elif kind == "zeros":
      bad = blosc.compress(np.zeros_like(data).tobytes(), typesize=data.itemsize)
    else:
      raise AssertionError(kind)
    self._send(200, bad, "application/blosc")


class BossServer:
  """A running server: ``url``, ``host_port``, ``state``; ``stats()``; ``close()``.

  ``state.requested`` / ``state.served`` count cutout requests / complete replies
  per ``(channel name, box.as_tuple())``; ``latency_s`` delays every cutout reply.
  """

  def __init__(
    self,
    source: Source,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    faults: FaultPlan | None = None,
    max_cutout_bytes: int = MAX_CUTOUT_BYTES,
    cache_bytes: int = 256 * 2**20,
    latency_s: float = 0.0,
  ):
    self.state = ServerState(
      source,
      token=token,
      faults=faults,
      max_cutout_bytes=max_cutout_bytes,
      cache_bytes=cache_bytes,
      latency_s=latency_s,
    )
    self._httpd = http.server.ThreadingHTTPServer((host, int(port)), _Handler)
    self._httpd.daemon_threads = True  # a delayed reply must not block shutdown
    self._httpd.block_on_close = False
    self._httpd.state = self.state  # type: ignore[attr-defined]
    self.host, self.port = self._httpd.server_address[:2]
    self.host_port = f"{self.host}:{self.port}"
    self.url = f"http://{self.host_port}"
    self._thread = threading.Thread(
      target=self._httpd.serve_forever,
      kwargs={"poll_interval": 0.1},
      name=f"boss-server-{self.port}",
      daemon=True,
    )
    self._thread.start()

  def stats(self) -> dict[str, Any]:
    return self.state.stats()

  def set_faults(self, faults: FaultPlan | None) -> None:
    self.state.set_faults(faults)

  def reset(self) -> None:
    """Back to a plain server: no faults, no added latency, counters zeroed."""
    self.state.set_faults(None)
    self.state.latency_s = 0.0
    self.state.reset_counters()

  def source_spec(self, **options) -> str:
    """A ``make_source`` spec string for this server (extra options appended)."""
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    return f"bossdb:host={self.host_port},protocol=http" + ("," + opts if opts else "")

  def close(self) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join(timeout=5)

  def __enter__(self) -> "BossServer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@contextlib.contextmanager
def serve(source: Source, **kwargs) -> Iterator[BossServer]:
  """Context manager: a ``BossServer`` on 127.0.0.1 and an ephemeral port by default."""
  server = BossServer(source, **kwargs)
  try:
    yield server
  finally:
    server.close()


def build_parser() -> ArgumentParser:
  ap = ArgumentParser(
    prog="mtneuro serve",
    description="Serve a Source (phantom, local:/path, ...) through the Boss v1 REST API that intern "
    "speaks, optionally with injected faults.",
  )
  ap.add_argument(
    "--source",
    default="phantom",
    help="source spec, as `mtneuro export --source` (default: phantom)",
  )
  ap.add_argument(
    "--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)"
  )
  ap.add_argument(
    "--port", type=int, default=0, help="port (0 = pick a free one; the URL is printed)"
  )
  ap.add_argument(
    "--token_env",
    default=None,
    help="require the token held in this environment variable (not on the command line, "
    "where ps shows it); default: accept any token",
  )
  ap.add_argument(
    "--faults", default="", help="fault plan, e.g. 'rate=0.2,kinds=5xx+429+drop,seed=0,delay=2'"
  )
  ap.add_argument(
    "--cache_mb", type=float, default=256, help="LRU cache of encoded cutouts, MiB (default 256)"
  )
  ap.add_argument(
    "--max_cutout_mb",
    type=float,
    default=MAX_CUTOUT_BYTES / 2**20,
    help="refuse larger cutouts with 413 (Boss: 500)",
  )
  ap.add_argument(
    "--latency_ms", type=float, default=0, help="added to every cutout reply (emulates a WAN)"
  )
  ap.add_argument(
    "--memo_mb",
    type=float,
    default=0,
    help="keep decoded cutouts of the source in memory (MiB); for slow sources like the phantom",
  )
  return ap


def _check_args(ap: ArgumentParser, args) -> None:
  """Usage errors for values argparse's types let through (all before the server starts)."""
  if not 0 <= args.port <= 65535:
    ap.error(f"--port must be in [0, 65535], got {args.port}")
  for name in ("cache_mb", "latency_ms", "memo_mb"):
    value = getattr(args, name)
    if not (value >= 0 and value != float("inf")):
      ap.error(f"--{name} must be a finite number >= 0, got {value}")
  if not args.max_cutout_mb > 0 or args.max_cutout_mb == float("inf"):
    ap.error(f"--max_cutout_mb must be a finite number > 0, got {args.max_cutout_mb}")


def run(argv: Sequence[str]) -> int:
  """``mtneuro serve`` without the error wrapper (raises UserError; ``main`` prints it)."""
  ap = build_parser()
  args = ap.parse_args(argv)
  _check_args(ap, args)
  try:
    faults = FaultPlan.parse(args.faults)
  except (TypeError, ValueError) as e:
    ap.error(f"--faults {args.faults!r}: {e}")
  token = None
  if args.token_env:
    import os

    token = os.environ.get(args.token_env)
    if not token:
      ap.error(f"--token_env {args.token_env}: that environment variable is empty or unset")
  source = make_source(args.source)
  if args.memo_mb > 0:
    source = MemoSource(
      source, max_bytes=int(args.memo_mb * 2**20), prefetch_channels=source.kind == "phantom"
    )
  try:
    server = BossServer(
      source,
      host=args.bind,
      port=args.port,
      token=token,
      faults=faults,
      cache_bytes=int(args.cache_mb * 2**20),
      max_cutout_bytes=int(args.max_cutout_mb * 2**20),
      latency_s=args.latency_ms / 1e3,
    )
  except OSError as e:
    raise UserError(
      f"cannot listen on {args.bind}:{args.port} ({e.strerror or e}); pick another "
      "--port (0 = any free one) or --bind address"
    ) from None
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  print(f"BOSS_SERVER_URL={server.url}", flush=True)
  print(
    f"serving --source {args.source} as Boss API v1; read it with "
    f"--source 'bossdb:host={server.host_port},protocol=http' (Ctrl-C stops)",
    flush=True,
  )
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  while not stop.wait(0.5):
    pass
  server.close()
  print(json.dumps({"boss_server_stats": server.stats()}), flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point: exit status 0, or 2 with one ``error: ...`` line for bad input."""
  return run_cli(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  sys.exit(main())
