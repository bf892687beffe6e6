"""The local Boss-API server: intern reads it like BossDB, and every injected
fault is detected and recovered by the resilient client over real HTTP."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from intern.convenience.array import _BossDBVolumeProvider
from intern.convenience.array import array as intern_array
from intern.remote.boss import BossRemote

from mtneuro_jax.volumes import boss_server, bossdb, spec
from mtneuro_jax.volumes.sources import ArrayVolumeProvider, Source, SourceError, make_source

BOX = spec.Box(200, 204, 900, 1156, 4600, 4856)  # in tissue, inside cube A / CTX


@pytest.fixture(scope="module")
def phantom():
  # Rendered once up front: the fault tests time transfers, not the renderer.
  src = boss_server.MemoSource(make_source("phantom"), prefetch_channels=True)
  src.read("image", BOX)
  return src


@pytest.fixture(scope="module")
def server(phantom):
  with boss_server.serve(phantom) as srv:
    yield srv


@pytest.fixture
def clean(server):
  server.reset()
  yield server
  server.reset()


def test_intern_array_reads_metadata_and_cutouts(clean, phantom):
  vp = _BossDBVolumeProvider(
    BossRemote({"protocol": "http", "host": clean.host_port, "token": "public"})
  )
  for name, ch in spec.CHANNELS.items():
    arr = intern_array(
      ch.uri, volume_provider=vp
    )  # a URI string: intern fetches the channel itself
    assert arr.shape == spec.VOLUME_SHAPE_ZYX and arr.dtype == ch.dtype
    assert arr.voxel_size == (spec.VOXEL_SIZE_UM,) * 3 and arr.available_resolutions == [0]
    got = arr[BOX.z0 : BOX.z1, BOX.y0 : BOX.y1, BOX.x0 : BOX.x1]
    np.testing.assert_array_equal(got, phantom.read(name, BOX))
    assert got.dtype == np.dtype(ch.dtype)
  st = clean.stats()
  assert (
    st["cutout_requests"] == 3 and st["requests"]["channel"] == 3 and st["requests"]["coord"] >= 3
  )


def test_plain_intern_configured_by_environment(clean, phantom, tmp_path, monkeypatch):
  # Any intern-based tool: no provider, no config dict, just INTERN_* (and no ~/.intern).
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("INTERN_PROTOCOL", "http")
  monkeypatch.setenv("INTERN_HOST", clean.host_port)
  monkeypatch.setenv("INTERN_TOKEN", "public")
  with pytest.warns(ImportWarning):  # intern notes that CloudVolume is absent
    arr = intern_array("bossdb://prasad/prasad_analysis/pixel_labels")
  np.testing.assert_array_equal(
    arr[BOX.z0 : BOX.z1, BOX.y0 : BOX.y1, BOX.x0 : BOX.x1], phantom.read("pixel_labels", BOX)
  )


# Server fault -> what the client must count it as.
CLIENT_KIND = {
  "delay": "timeout",
  "5xx": "http_5xx",
  "429": "http_429",
  "drop": "connection",
  "truncate": "truncated",
  "wrong_size": "wrong_size",
  "wrong_dtype": "wrong_size",
  "corrupt": "undecodable",
  "zeros": "all_zero",
}


@pytest.mark.parametrize("kind", boss_server.FAULT_KINDS)
def test_each_injected_fault_is_detected_and_recovered(clean, phantom, kind):
  assert set(CLIENT_KIND) == set(boss_server.FAULT_KINDS)
  clean.set_faults(
    boss_server.FaultPlan(rate=1.0, kinds=(kind,), max_per_path=2, delay_s=1.5, retry_after_s=0.01)
  )
  src = make_source(
    clean.source_spec(timeout=1.0, backoff=0.01, max_backoff=0.05, chunk="4x128x256")
  )
  channel = "image" if kind != "wrong_dtype" else "roi_labels"  # both dtypes exercised
  got = src.read(channel, BOX)
  np.testing.assert_array_equal(got, phantom.read(channel, BOX))
  st = src.fetch_stats()
  # Two requests (y halves), each faulted twice, then served.
  assert clean.stats()["injected"] == {kind: 4}
  assert (
    st["faults_by_kind"] == {CLIENT_KIND[kind]: 4}
    and st["retries"] == 4
    and st["failures_by_kind"] == {}
  )
  assert sum(clean.state.served.values()) == 2


def test_persistent_fault_ends_in_clear_error(clean):
  clean.set_faults(boss_server.FaultPlan(rate=1.0, kinds=("drop",)))
  src = make_source(clean.source_spec(retries=2, backoff=0.01, max_backoff=0.02))
  with pytest.raises(bossdb.BossFetchError) as ei:
    src.read("image", BOX)
  msg = str(ei.value)
  assert (
    "after 3 attempts" in msg
    and "connection x3" in msg
    and str(BOX) in msg
    and clean.host_port in msg
  )
  assert clean.stats()["injected"] == {"drop": 3}


def test_metadata_faults_are_retried(clean):
  clean.set_faults(
    boss_server.FaultPlan(
      rate=1.0, kinds=("5xx", "drop", "truncate"), max_per_path=2, cutouts_only=False
    )
  )
  src = make_source(clean.source_spec(backoff=0.01, max_backoff=0.02))
  assert src.shape() == spec.VOLUME_SHAPE_ZYX
  assert src.fetch_stats()["retries"] >= 2 and clean.stats()["injected_total"] >= 2


def test_fault_plan_is_deterministic_and_respects_rate():
  plan = boss_server.FaultPlan(rate=0.2, seed=7)
  paths = [f"/v1/cutout/prasad/prasad2020/image/0/0:{i}/0:8/0:8/" for i in range(1, 3001)]
  first = [plan.decide(p, 0) for p in paths]
  assert first == [boss_server.FaultPlan(rate=0.2, seed=7).decide(p, 0) for p in paths]
  assert first != [boss_server.FaultPlan(rate=0.2, seed=8).decide(p, 0) for p in paths]
  hit = [k for k in first if k]
  assert 0.17 < len(hit) / len(paths) < 0.23
  assert set(hit) == set(boss_server.FAULT_KINDS)  # every kind drawn
  capped = boss_server.FaultPlan(rate=1.0, max_per_path=2)
  assert [capped.decide("/p", n) is not None for n in range(4)] == [True, True, False, False]
  assert boss_server.FaultPlan().decide("/p", 0) is None


def test_fault_plan_parse():
  plan = boss_server.FaultPlan.parse(
    "rate=0.25,kinds=5xx+drop,seed=3,delay=1.5,max_per_path=2,fail_after=9"
  )
  assert plan == boss_server.FaultPlan(
    rate=0.25, kinds=("5xx", "drop"), seed=3, delay_s=1.5, max_per_path=2, fail_after=9
  )
  for bad in ("rate=2", "kinds=nope", "speed=1", "rate"):
    with pytest.raises(ValueError):
      boss_server.FaultPlan.parse(bad)


def test_cutout_size_limit_and_client_chunking(phantom):
  with boss_server.serve(phantom, max_cutout_bytes=1 << 20) as srv:  # 1 MiB, like a tiny Boss
    big = make_source(srv.source_spec(chunk="32x256x256"))  # 16 MiB of uint64 per request
    with pytest.raises(bossdb.BossFetchError, match="lower chunk=") as ei:
      big.read("roi_labels", BOX)
    assert ei.value.attempts == 1  # a 413 is not retried
    small = make_source(srv.source_spec(chunk="1x128x128", max_request_mb=1))  # 128 KiB requests
    np.testing.assert_array_equal(small.read("roi_labels", BOX), phantom.read("roi_labels", BOX))
    assert srv.stats()["statuses"]["413"] == 1


def test_errors_for_bad_requests(clean):
  base = clean.url + "/v1/cutout/prasad/prasad2020"
  r = requests.get(base + "/image/0/5800:5810/0:8/0:8/", timeout=5)
  assert r.status_code == 400 and "outside the volume" in r.json()["message"]
  r = requests.get(base + "/nochannel/0/0:8/0:8/0:8/", timeout=5)
  assert r.status_code == 404
  r = requests.get(base + "/image/1/0:8/0:8/0:8/", timeout=5)
  assert r.status_code == 400 and "resolution 0" in r.json()["message"]
  r = requests.get(clean.url + "/v1/collection/", timeout=5)
  assert r.json() == {"collections": ["prasad"]}
  src = make_source(clean.source_spec())
  with pytest.raises(SourceError, match="outside the volume"):
    src.read("image", spec.Box(0, 1, 0, 1, 5800, 5810))


def test_token_is_required_when_set(phantom):
  token = "srv-token-5f3a9c"
  with boss_server.serve(phantom, token=token) as srv:
    wrong = make_source(srv.source_spec(token="wrong-token-77"))
    with pytest.raises(bossdb.BossFetchError) as ei:
      wrong.read("image", BOX)
    assert ei.value.attempts == 1 and "token was refused" in str(ei.value)
    assert "wrong-token-77" not in str(ei.value)
    ok = make_source(srv.source_spec(token=token))
    assert ok.read("image", BOX).shape == BOX.shape


def test_cli_serves_until_terminated(tmp_path):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
    [sys.executable, "-m", "mtneuro_jax.volumes.boss_server", "--source", "phantom", "--port", "0"],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=env,
  )
  try:
    url = None
    deadline = time.time() + 60
    while url is None and time.time() < deadline:  # bounded: the process prints the URL first
      line = proc.stdout.readline()
      if not line:
        break
      if line.startswith("BOSS_SERVER_URL="):
        url = line.strip().split("=", 1)[1]
    assert url and url.startswith("http://127.0.0.1:")
    r = requests.get(url + "/v1/collection/prasad/experiment/prasad2020/channel/image", timeout=10)
    assert r.json()["datatype"] == "uint8" and r.json()["storage_type"] == "spdb"
    src = make_source(f"bossdb:host={url.split('//')[1]},protocol=http")
    assert src.read("image", BOX).shape == BOX.shape
  finally:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0
  stats = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])["boss_server_stats"]
  assert stats["cutouts_ok"] == 1


class _CountingSource(Source):
  """A tiny in-memory volume that counts how often each channel is read."""

  kind = "counting"

  def __init__(self):
    rng = np.random.default_rng(1)
    self.vol = {
      "image": rng.integers(0, 256, (40, 64, 64), dtype=np.uint8),
      "roi_labels": rng.integers(0, 9, (40, 64, 64)).astype(np.uint64),
      "pixel_labels": rng.integers(0, 4, (40, 64, 64)).astype(np.uint64),
    }
    self.reads = []
    self._vp = ArrayVolumeProvider("counting", self._read, (40, 64, 64))

  def _read(self, channel, box):
    self.reads.append((channel, box))
    return self.vol[channel][box.slices]

  def volume_provider(self):
    return self._vp

  def describe(self):
    return {"kind": "counting"}

  def shape(self):
    return (40, 64, 64)


def test_memo_source_is_transparent_and_bounded():
  inner = _CountingSource()
  memo = boss_server.MemoSource(inner, prefetch_channels=True, max_bytes=3 * 32 * 64 * 64)
  big = spec.Box(0, 32, 0, 64, 0, 64)
  for box in (big, spec.Box(3, 9, 10, 20, 0, 64), spec.Box(31, 32, 60, 64, 5, 9)):
    for ch in spec.CHANNELS:
      got = memo.read(ch, box)
      np.testing.assert_array_equal(got, inner.vol[ch][box.slices])
      assert got.dtype == np.dtype(spec.CHANNELS[ch].dtype)
  assert len(inner.reads) == 3 and memo.describe() == inner.describe()  # one read per channel, once
  memo.read("image", spec.Box(32, 40, 0, 64, 0, 64))  # over the byte bound: the oldest box goes
  memo.read("image", spec.Box(0, 2, 0, 2, 0, 2))
  assert len(inner.reads) == 9


def test_concurrent_requests_for_one_box_render_it_once():
  # What a client retry after a timeout does: ask again while the first render runs.
  inner = _CountingSource()
  inner_read = inner._read

  def slow_read(channel, box):
    time.sleep(0.3)
    return inner_read(channel, box)

  inner._vp = ArrayVolumeProvider("counting", slow_read, (40, 64, 64))
  box = spec.Box(0, 8, 0, 64, 0, 64)
  got = []
  with boss_server.serve(boss_server.MemoSource(inner)) as srv:

    def fetch():
      got.append(make_source(srv.source_spec(expect_tissue="none")).read("image", box))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=30)
    assert srv.stats()["cutout_requests"] == 3
  assert len(got) == 3 and all(np.array_equal(g, inner.vol["image"][box.slices]) for g in got)
  assert len(inner.reads) == 1  # the other two waited for the first render
