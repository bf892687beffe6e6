"""Unit tests of the resilient BossDB layer (no network): chunking, backoff,
fault classification, validation, the final error, config precedence."""

import logging
import threading
import time

import blosc
import numpy as np
import pytest
import requests

from mtneuro_jax.volumes import bossdb, spec
from mtneuro_jax.volumes.sources import (
  ArrayVolumeProvider,
  BossDBSource,
  SourceError,
  _channel_resource,
  make_source,
)

IMAGE = _channel_resource(spec.CHANNELS["image"])
ROI = _channel_resource(spec.CHANNELS["roi_labels"])
SHAPE = (64, 96, 96)  # a small ZYX truth volume; tissue z range [15, 680) covers z >= 15


def _truth():
  rng = np.random.default_rng(0)
  return {
    "image": rng.integers(1, 256, SHAPE, dtype=np.uint8),  # never 0: zeros are a fault here
    "roi_labels": rng.integers(0, 9, SHAPE).astype(np.uint64),
  }


class FakeProvider(ArrayVolumeProvider):
  """Truth volume; ``script[(channel, chunk tuple)]`` lists what the next calls do
  (an exception to raise, or a function of the true array returning a reply)."""

  def __init__(self, delay_s=0.0):
    self.truth = _truth()
    super().__init__("bossdb", lambda ch, box: self.truth[ch][box.slices].copy(), SHAPE)
    self.script = {}
    self.calls = []
    self.in_flight = 0
    self.max_in_flight = 0
    self.delay_s = delay_s
    self._lock = threading.Lock()

  def get_cutout(self, channel, resolution, xs, ys, zs):
    key = (channel.name, (zs[0], zs[1], ys[0], ys[1], xs[0], xs[1]))
    with self._lock:
      self.calls.append(key)
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)
      action = self.script.get(key, []).pop(0) if self.script.get(key) else None
    try:
      if self.delay_s:
        time.sleep(self.delay_s)
      data = super().get_cutout(channel, resolution, xs, ys, zs)
      if isinstance(action, BaseException):
        raise action
      return action(data) if action else data
    finally:
      with self._lock:
        self.in_flight -= 1


def _http_error(status, retry_after=None, text=""):
  r = requests.Response()
  r.status_code = status
  if retry_after is not None:
    r.headers["Retry-After"] = str(retry_after)
  return requests.HTTPError(
    f"Get cutout failed on image, got HTTP response: ({status}) - {text}", response=r
  )


def _blosc_error():
  try:
    blosc.decompress(b"definitely not blosc" * 4)
  except Exception as e:  # noqa: BLE001 - we want whatever blosc raises
    return e
  raise AssertionError("blosc accepted garbage")


def _value_error(fn):
  try:
    fn()
  except ValueError as e:
    return e
  raise AssertionError("no ValueError")


def _provider(fake, **kw):
  sleeps = []
  kw.setdefault("retry", bossdb.RetryPolicy(max_attempts=4, base_delay_s=0.1, max_delay_s=1.0))
  p = bossdb.ResilientVolumeProvider(fake, sleep=sleeps.append, seed=0, **kw)
  return p, sleeps


# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
  "box,chunk",
  [
    (spec.Box(110, 142, 900, 1156, 4600, 4856), (32, 512, 512)),
    (spec.Box(110, 142, 900, 1156, 4600, 4856), (8, 100, 128)),
    (spec.Box(0, 1, 0, 7, 0, 5), (1, 2, 3)),
  ],
)
def test_plan_chunks_tiles_box_exactly_with_fewest_requests(box, chunk):
  chunks = bossdb.plan_chunks(box, chunk)
  cover = np.zeros(box.shape, np.int32)
  for c in chunks:
    assert all(n <= m for n, m in zip(c.shape, chunk, strict=True))
    cover[
      c.z0 - box.z0 : c.z1 - box.z0, c.y0 - box.y0 : c.y1 - box.y0, c.x0 - box.x0 : c.x1 - box.x0
    ] += 1
  assert (cover == 1).all()
  assert len(chunks) == np.prod([-(-n // m) for n, m in zip(box.shape, chunk, strict=True)])


def test_exporter_chunk_is_one_request_by_default():
  assert bossdb.plan_chunks(spec.Box(96, 128, 900, 1156, 4600, 4856), bossdb.DEFAULT_CHUNK_ZYX) == [
    spec.Box(96, 128, 900, 1156, 4600, 4856)
  ]
  # The default request stays under the Boss 500 MB limit even for uint64 labels.
  assert np.prod(bossdb.DEFAULT_CHUNK_ZYX) * 8 < bossdb.BOSS_MAX_CUTOUT_BYTES


def test_parse_chunk():
  assert bossdb.parse_chunk("16x128x64") == (16, 128, 64)
  assert bossdb.parse_chunk(None) == bossdb.DEFAULT_CHUNK_ZYX
  for bad in ("16x128", "0x1x1", "ax1x1"):
    with pytest.raises(SourceError, match="chunk"):
      bossdb.parse_chunk(bad)


def test_backoff_is_exponential_jittered_and_capped():
  policy = bossdb.RetryPolicy(max_attempts=10, base_delay_s=1.0, max_delay_s=8.0)
  import random

  rng = random.Random(0)
  waits = {n: [policy.delay(n, rng) for _ in range(200)] for n in range(1, 7)}
  for n, w in waits.items():
    d = min(8.0, 2.0 ** (n - 1))
    assert d / 2 <= min(w) and max(w) <= d  # equal jitter: never below half the step
    assert np.std(w) > 0.05 * d  # and really jittered
  assert np.mean(waits[3]) > 1.8 * np.mean(waits[2]) > 3.2 * np.mean(waits[1])
  assert max(waits[6]) <= 8.0  # capped
  assert policy.delay(1, rng, retry_after=5) == 5.0  # Retry-After raises the wait...
  assert policy.delay(1, rng, retry_after=100) == 8.0  # ...but never past the cap


@pytest.mark.parametrize(
  "exc,kind",
  [
    (requests.exceptions.ConnectionError("refused"), "connection"),
    (requests.exceptions.ConnectTimeout("connect"), "timeout"),
    (requests.exceptions.ReadTimeout("read"), "timeout"),
    (requests.exceptions.ChunkedEncodingError("IncompleteRead"), "truncated"),
    (_http_error(500), "http_5xx"),
    (_http_error(503), "http_5xx"),
    (_http_error(429), "http_429"),
    (_blosc_error(), "undecodable"),
    (_value_error(lambda: np.frombuffer(b"\0" * 10, np.uint8).reshape(3, 3)), "wrong_size"),
    (_value_error(lambda: np.frombuffer(b"\0" * 10, np.uint64)), "wrong_size"),
    (_http_error(400), None),
    (_http_error(401), None),
    (_http_error(403), None),
    (_http_error(404), None),
    (_http_error(413), None),
    (RuntimeError("a bug"), None),
    (KeyError("datatype"), None),
  ],
)
def test_classify(exc, kind):
  assert bossdb.classify(exc)[0] == kind


def test_classify_reads_retry_after():
  assert bossdb.classify(_http_error(429, retry_after=3))[1] == 3.0
  assert bossdb.classify(_http_error(429, retry_after="Wed, 21 Oct 2015 07:28:00 GMT"))[1] is None


# What each fault looks like from the provider, and the kind it must be counted as.
FAULTS = {
  "connection": lambda: requests.exceptions.ConnectionError("Connection aborted."),
  "timeout": lambda: requests.exceptions.ReadTimeout("Read timed out."),
  "http_5xx": lambda: _http_error(502),
  "http_429": lambda: _http_error(429, retry_after=0),
  "truncated": lambda: requests.exceptions.ChunkedEncodingError("IncompleteRead(5 bytes read)"),
  "undecodable": _blosc_error,
  "wrong_size": lambda: _value_error(lambda: np.zeros(10).reshape(3, 3)),
  "wrong_shape": lambda: lambda d: d[:, :-1],
  "wrong_dtype": lambda: lambda d: d.astype(np.uint16),
  "all_zero": lambda: np.zeros_like,
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_each_fault_kind_is_detected_retried_and_recovered(kind):
  assert set(FAULTS) == set(bossdb.FAULT_KINDS)
  fake = FakeProvider()
  box = spec.Box(16, 48, 0, 96, 0, 96)
  p, sleeps = _provider(fake, chunk_zyx=(16, 48, 96))  # 4 requests
  bad = (16, 32, 48, 96, 0, 96)
  fake.script[("image", bad)] = [FAULTS[kind](), FAULTS[kind]()]
  out = p.get_cutout(IMAGE, 0, (0, 96), (0, 96), (16, 48))
  np.testing.assert_array_equal(out, fake.truth["image"][box.slices])
  st = p.stats.snapshot()
  assert st["faults_by_kind"] == {kind: 2} and st["retries_by_kind"] == {kind: 2}
  assert (
    st["retries"] == 2 and st["failures_by_kind"] == {} and st["requests"] == 6 and st["ok"] == 4
  )
  assert fake.calls.count(("image", bad)) == 3
  assert len(sleeps) == 2 and 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2  # backoff grows


def test_final_error_after_retry_limit_names_box_kind_and_attempts():
  fake = FakeProvider()
  p, sleeps = _provider(fake, chunk_zyx=(16, 48, 96), concurrency=1)
  bad = (16, 32, 48, 96, 0, 96)
  fake.script[("image", bad)] = [_http_error(503) for _ in range(10)]
  with pytest.raises(bossdb.BossFetchError) as ei:
    p.get_cutout(IMAGE, 0, (0, 96), (0, 96), (16, 48))
  e = ei.value
  assert e.kind == "http_5xx" and e.attempts == 4
  assert e.box == spec.Box(16, 48, 0, 96, 0, 96) and e.chunk == spec.Box(*bad)
  msg = str(e)
  assert "bossdb://prasad/prasad2020/image" in msg and "z[16:48] y[0:96] x[0:96]" in msg
  assert "after 4 attempts" in msg and "http_5xx x4" in msg and "retries=" in msg
  assert fake.calls.count(("image", bad)) == 4 and len(sleeps) == 3
  st = p.stats.snapshot()
  assert st["failures_by_kind"] == {"http_5xx": 1} and st["retries"] == 3
  assert isinstance(e, SourceError)  # the exporter reports SourceErrors as one clean line


def test_failure_stops_the_other_requests_and_returns_nothing():
  fake = FakeProvider(delay_s=0.01)
  p, _ = _provider(
    fake, chunk_zyx=(1, 96, 96), concurrency=2, retry=bossdb.RetryPolicy(max_attempts=1)
  )
  fake.script[("image", (16, 17, 0, 96, 0, 96))] = [_http_error(404)]
  with pytest.raises(bossdb.BossFetchError, match="no such collection"):
    p.get_cutouts(IMAGE, 0, [spec.Box(16, 64, 0, 96, 0, 96), spec.Box(0, 8, 0, 96, 0, 96)])
  assert len(fake.calls) < 20  # 56 requests were planned; the queue was cancelled


def test_fatal_status_is_not_retried_and_token_never_shows():
  fake = FakeProvider()
  secret = "s3cret-token-abcdef"
  p, sleeps = _provider(fake, secret=secret, describe_target="https://example.org")
  fake.script[("image", (16, 48, 0, 96, 0, 96))] = [_http_error(401, text=f"bad token {secret}")]
  with pytest.raises(bossdb.BossFetchError) as ei:
    p.get_cutout(IMAGE, 0, (0, 96), (0, 96), (16, 48))
  assert ei.value.kind == "fatal" and ei.value.attempts == 1 and sleeps == []
  assert secret not in str(ei.value) and "token" in str(ei.value)
  assert "https://example.org" in str(ei.value)


def test_all_zero_check_is_where_tissue_is_expected_and_pluggable():
  box_in = spec.Box(16, 32, 0, 96, 0, 96)
  box_out = spec.Box(0, 15, 0, 96, 0, 96)  # above spec.TISSUE_Z: empty in the real volume
  assert bossdb.tissue_expected(IMAGE, 0, box_in)
  assert not bossdb.tissue_expected(IMAGE, 0, box_out)
  assert not bossdb.tissue_expected(ROI, 0, box_in)  # labels may be all zero
  fake = FakeProvider()
  p, _ = _provider(fake)
  fake.script[("image", (0, 15, 0, 96, 0, 96))] = [np.zeros_like]
  fake.script[("roi_labels", (16, 32, 0, 96, 0, 96))] = [np.zeros_like]
  assert not p.get_cutout(IMAGE, 0, (0, 96), (0, 96), (0, 15)).any()
  assert not p.get_cutout(ROI, 0, (0, 96), (0, 96), (16, 32)).any()
  assert p.stats.snapshot()["faults_by_kind"] == {}
  # With the check off, an all-zero tissue image is accepted.
  p2, _ = _provider(fake, expect_nonzero=bossdb.never_expected)
  fake.script[("image", (16, 32, 0, 96, 0, 96))] = [np.zeros_like]
  assert not p2.get_cutout(IMAGE, 0, (0, 96), (0, 96), (16, 32)).any()
  # Persistent zeros under the default check end in a clear error.
  p3, _ = _provider(fake)
  fake.script[("image", (16, 32, 0, 96, 0, 96))] = [np.zeros_like] * 4
  with pytest.raises(bossdb.BossFetchError, match="all_zero x4"):
    p3.get_cutout(IMAGE, 0, (0, 96), (0, 96), (16, 32))


def test_concurrency_is_bounded_and_used():
  fake = FakeProvider(delay_s=0.02)
  p, _ = _provider(fake, chunk_zyx=(2, 96, 96), concurrency=3)
  out = p.get_cutout(ROI, 0, (0, 96), (0, 96), (0, 32))
  np.testing.assert_array_equal(out, fake.truth["roi_labels"][:32])
  assert len(fake.calls) == 16 and fake.max_in_flight == 3


def test_chunk_over_server_limit_is_refused_before_any_request():
  fake = FakeProvider()
  p, _ = _provider(fake, chunk_zyx=(16, 64, 64), max_request_bytes=64 * 64 * 16 * 4)
  p.get_cutout(IMAGE, 0, (0, 64), (0, 64), (16, 32))  # uint8 fits
  with pytest.raises(SourceError, match="lower chunk="):
    p.get_cutout(ROI, 0, (0, 64), (0, 64), (16, 32))  # uint64 does not
  assert len(fake.calls) == 1


def test_metadata_calls_are_retried():
  fake = FakeProvider()
  p, sleeps = _provider(fake)
  calls = []

  def flaky_shape(channel, resolution=0):
    calls.append(1)
    if len(calls) < 3:
      raise requests.exceptions.ConnectionError("reset")
    return SHAPE

  fake.get_shape = flaky_shape
  assert p.get_shape(IMAGE) == SHAPE and len(calls) == 3 and len(sleeps) == 2


# ---------------------------------------------------------------------------
# Configuration.
def _cfg(tmp_path, host="cfg.example.org", token="cfg-token-1234"):
  path = tmp_path / "intern.cfg"
  path.write_text(f"[Default]\nprotocol = https\nhost = {host}\ntoken = {token}\n")
  return str(path)


def test_config_defaults_to_public_bossdb(tmp_path):
  cfg, origins = bossdb.resolve_boss_config(environ={}, intern_cfg=str(tmp_path / "none.cfg"))
  assert cfg == {"host": "api.bossdb.io", "protocol": "https", "token": "public"}
  assert set(origins.values()) <= {"default", "default (public)"}


def test_config_precedence(tmp_path):
  env = {
    "MTNEURO_BOSS_HOST": "env.example.org",
    "MTNEURO_BOSS_TOKEN": "env-token-1234",
    "INTERN_HOST": "intern-env.example.org",
    "INTERN_TOKEN": "ienv-token",
    "INTERN_PROTOCOL": "http",
  }
  cfg_file = _cfg(tmp_path)
  # Arguments beat everything.
  cfg, o = bossdb.resolve_boss_config(
    "arg.example.org", "http", "arg-token", environ=env, intern_cfg=cfg_file
  )
  assert cfg == {"host": "arg.example.org", "protocol": "http", "token": "arg-token"}
  assert o == {"host": "argument", "protocol": "argument", "token": "argument"}
  # MTNEURO_BOSS_* beat intern's config; protocol falls through to intern.cfg.
  cfg, o = bossdb.resolve_boss_config(environ=env, intern_cfg=cfg_file)
  assert cfg == {"host": "env.example.org", "protocol": "https", "token": "env-token-1234"}
  assert o["protocol"] == cfg_file
  # intern.cfg beats INTERN_* (as in intern itself).
  cfg, o = bossdb.resolve_boss_config(
    environ={k: v for k, v in env.items() if k.startswith("INTERN")}, intern_cfg=cfg_file
  )
  assert cfg == {"host": "cfg.example.org", "protocol": "https", "token": "cfg-token-1234"}
  # Without a config file, INTERN_* are used.
  cfg, _ = bossdb.resolve_boss_config(
    environ={k: v for k, v in env.items() if k.startswith("INTERN")},
    intern_cfg=str(tmp_path / "none.cfg"),
  )
  assert cfg == {"host": "intern-env.example.org", "protocol": "http", "token": "ienv-token"}


def test_stored_token_only_goes_to_its_own_host(tmp_path):
  cfg_file = _cfg(tmp_path)
  env = {"MTNEURO_BOSS_TOKEN": "env-token-1234"}  # no MTNEURO_BOSS_HOST: meant for api.bossdb.io
  cfg, o = bossdb.resolve_boss_config("127.0.0.1:8123", "http", environ=env, intern_cfg=cfg_file)
  assert cfg["token"] == "public" and o["token"] == "default (public)"
  cfg, _ = bossdb.resolve_boss_config(environ=env, intern_cfg=str(tmp_path / "none.cfg"))
  assert cfg["token"] == "env-token-1234" and cfg["host"] == "api.bossdb.io"
  cfg, _ = bossdb.resolve_boss_config("cfg.example.org", environ={}, intern_cfg=cfg_file)
  assert cfg["token"] == "cfg-token-1234"


def test_token_file_and_bad_values(tmp_path):
  tok = tmp_path / "tok"
  tok.write_text("file-token-9876\n")
  cfg, o = bossdb.resolve_boss_config(
    "h.example.org", token_file=str(tok), environ={}, intern_cfg=str(tmp_path / "x")
  )
  assert cfg["token"] == "file-token-9876" and o["token"] == "argument"
  with pytest.raises(SourceError, match="protocol"):
    bossdb.resolve_boss_config(protocol="ftp", environ={}, intern_cfg=str(tmp_path / "x"))
  with pytest.raises(SourceError, match="without scheme"):
    bossdb.resolve_boss_config("https://api.bossdb.io", environ={}, intern_cfg=str(tmp_path / "x"))
  with pytest.raises(SourceError, match="token_file"):
    bossdb.resolve_boss_config(
      token_file=str(tmp_path / "missing"), environ={}, intern_cfg=str(tmp_path / "x")
    )


def test_boss_remote_provider_sets_timeouts_and_keeps_tls_verification():
  p = bossdb.BossRemoteProvider(
    {"protocol": "https", "host": "api.bossdb.io", "token": "public"},
    timeout_s=7,
    connect_timeout_s=3,
  )
  remote = p.boss
  for service in (remote.project_service, remote.metadata_service, remote.volume_service):
    assert service.session_send_opts["timeout"] == (3.0, 7.0)
    assert service.session_send_opts.get("verify", True) is not False
    assert service.url_prefix == "https://api.bossdb.io"
  assert p.boss is remote  # cached per thread...
  other = []
  t = threading.Thread(target=lambda: other.append(p.boss))
  t.start()
  t.join()
  assert other[0] is not remote  # ...and one per thread


def test_make_source_bossdb_options(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.intern/intern.cfg
  for k in (
    "MTNEURO_BOSS_HOST",
    "MTNEURO_BOSS_PROTOCOL",
    "MTNEURO_BOSS_TOKEN",
    "INTERN_HOST",
    "INTERN_PROTOCOL",
    "INTERN_TOKEN",
  ):
    monkeypatch.delenv(k, raising=False)
  secret = "tok-0123456789abcdef"
  with caplog.at_level(logging.DEBUG):
    src = make_source(
      f"bossdb:host=127.0.0.1:8123,protocol=http,token={secret},chunk=16x128x128,"
      "concurrency=2,retries=9,timeout=1.5,backoff=0.25,expect_tissue=none"
    )
  assert isinstance(src, BossDBSource)
  assert (src.host, src.protocol, src.chunk_zyx, src.concurrency) == (
    "127.0.0.1:8123",
    "http",
    (16, 128, 128),
    2,
  )
  assert src.retry == bossdb.RetryPolicy(10, 0.25, 30.0) and src.timeouts == (
    10.0,
    1.5,
  )  # 9 retries
  assert secret not in repr(src) and secret not in str(src.describe()) and secret not in caplog.text
  assert "over plain http" in caplog.text
  default = make_source("bossdb")
  assert default.describe()["host"] == "api.bossdb.io" and default.protocol == "https"
  with pytest.raises(SourceError, match="bad options"):
    make_source("bossdb:hots=x")
  with pytest.raises(SourceError, match="expect_tissue"):
    make_source("bossdb:expect_tissue=maybe")
