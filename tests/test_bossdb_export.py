"""data_prep export from ``bossdb:`` sources pointed at the local Boss server.

The exports read through the real client path: ``make_source("bossdb:host=...")``
-> ResilientVolumeProvider -> intern BossRemote -> HTTP -> boss_server -> phantom.
Shards must be byte-identical to the export straight from the phantom, with and
without injected faults, and an export killed mid-way must resume from its
cutout cache without fetching cached boxes again.

The phantom is wrapped in ``boss_server.MemoSource``: a transparent in-memory
memo (same ``describe()``, same bytes) so the slow realistic renderer runs once
per box for the whole module instead of once per export.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mtneuro_jax.volumes import boss_server, bossdb, spec
from mtneuro_jax.volumes.sources import make_source

export = pytest.importorskip("data_prep.export")

TASKS = ("task1_roi_c1", "task2_2d_3class")
LIMIT = 1  # samples per region per split: 12 per task, 24 cube chunks read


def _shards(manifest: dict) -> dict[str, str]:
  return {k: v["sha256"] for k, v in manifest["files"].items() if ".array_record-" in k}


def _cached_boxes(cache_dir: str) -> set[tuple[str, tuple]]:
  """(channel, box tuple) of every cutout in an exporter cache folder."""
  out = set()
  rx = re.compile(r"z(\d+)-(\d+)_y(\d+)-(\d+)_x(\d+)-(\d+)\.npy$")
  uri_to_name = {c.uri.split("://")[1]: n for n, c in spec.CHANNELS.items()}
  for root, _, files in os.walk(cache_dir):
    for f in files:
      m = rx.match(f)
      if m:
        uri = "/".join(root.split(os.sep)[-4:-1])  # <collection>/<experiment>/<channel>/r0
        out.add((uri_to_name[uri], tuple(int(g) for g in m.groups())))
  return out


@pytest.fixture(scope="module")
def phantom():
  return boss_server.MemoSource(make_source("phantom"), prefetch_channels=True)


@pytest.fixture(scope="module")
def direct(phantom, tmp_path_factory):
  """The reference: each task exported straight from the phantom source."""
  out = tmp_path_factory.mktemp("direct")
  return {
    t: export.export_task(
      phantom, t, str(out), cache_dir=str(out / "cache"), limit_per_split=LIMIT, progress=False
    )
    for t in TASKS
  }


@pytest.fixture(scope="module")
def server(phantom):
  with boss_server.serve(phantom) as srv:
    yield srv


@pytest.fixture
def clean(server):
  server.reset()
  yield server
  server.reset()


def test_export_through_boss_server_is_byte_identical(clean, direct, tmp_path):
  src = make_source(clean.source_spec())
  for task in TASKS:
    m = export.export_task(
      src,
      task,
      str(tmp_path / "out"),
      cache_dir=str(tmp_path / "cache"),
      limit_per_split=LIMIT,
      progress=False,
    )
    assert _shards(m) == _shards(direct[task]) and len(_shards(m)) == 3
    assert m["source"]["kind"] == "bossdb" and m["source"]["host"] == clean.host_port
    assert m["splits"] == direct[task]["splits"]
  # task2 reuses task1's image chunks from the cache: 12 image + 12 ROI + 12 pixel boxes.
  assert clean.stats()["cutout_requests"] == 36 and src.fetch_stats()["retries"] == 0


def test_export_with_20_percent_faults_of_every_kind_is_byte_identical(clean, direct, tmp_path):
  plan = boss_server.FaultPlan(rate=0.2, seed=0, delay_s=1.0, retry_after_s=0.02, max_per_path=3)
  clean.set_faults(plan)
  # Small requests (16 per cube chunk) so that every fault kind occurs; a short
  # read timeout so that "delay" costs little; enough retries for bad luck.
  src = make_source(
    clean.source_spec(
      chunk="8x128x128", timeout=0.5, retries=8, backoff=0.01, max_backoff=0.05, concurrency=4
    )
  )
  for task in TASKS:
    m = export.export_task(
      src,
      task,
      str(tmp_path / "out"),
      cache_dir=str(tmp_path / "cache"),
      limit_per_split=LIMIT,
      progress=False,
    )
    assert _shards(m) == _shards(direct[task])
  st, server_st = src.fetch_stats(), clean.stats()
  injected = server_st["injected"]
  assert set(injected) == set(boss_server.FAULT_KINDS), injected
  assert 0.15 < server_st["injected_total"] / server_st["cutout_requests"] < 0.3
  assert st["retries"] >= server_st["injected_total"] > 0 and st["failures_by_kind"] == {}
  assert {
    "timeout",
    "http_5xx",
    "http_429",
    "connection",
    "truncated",
    "wrong_size",
    "undecodable",
    "all_zero",
  } <= set(st["retries_by_kind"])
  assert st["ok"] == 36 * 16  # every request was finally served once, completely


def test_resume_after_injected_fatal_failure_refetches_nothing_cached(clean, direct, tmp_path):
  task, cache = TASKS[0], str(tmp_path / "cache")
  clean.set_faults(boss_server.FaultPlan(fail_after=10))  # then every cutout gets 403
  src = make_source(clean.source_spec())
  with pytest.raises(bossdb.BossFetchError, match="Permission denied"):
    export.export_task(
      src, task, str(tmp_path / "out"), cache_dir=cache, limit_per_split=LIMIT, progress=False
    )
  assert not os.path.exists(tmp_path / "out" / task)  # nothing half-written is published
  cached = _cached_boxes(cache)
  assert len(cached) == 10 and cached == set(clean.state.served)
  clean.reset()
  m = export.export_task(
    make_source(clean.source_spec()),
    task,
    str(tmp_path / "out"),
    cache_dir=cache,
    limit_per_split=LIMIT,
    progress=False,
  )
  assert _shards(m) == _shards(direct[task])
  again = set(clean.state.requested)
  assert not again & cached and len(again) == 24 - 10 and sum(clean.state.requested.values()) == 14
  assert m["export"]["cache"]["hits"] == 10


def test_resume_after_killed_export_process(clean, direct, tmp_path):
  task, cache, out = TASKS[0], str(tmp_path / "cache"), str(tmp_path / "out")
  clean.state.latency_s = 0.1  # >= 2.4 s for 24 cutouts: room to kill the run mid-way
  cmd = [
    sys.executable,
    "-m",
    "data_prep.export",
    "--source",
    clean.source_spec(),
    "--tasks",
    task,
    "--limit_per_split",
    str(LIMIT),
    "--out_dir",
    out,
    "--cache_dir",
    cache,
    "--quiet",
  ]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 90
    while clean.stats()["cutouts_ok"] < 8 and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    assert proc.poll() is None, "the export finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait(timeout=30)
  served_before = set(clean.state.served)
  cached = _cached_boxes(cache)
  # The box in flight at the kill may be served but not cached: it is fetched again.
  assert 6 <= len(cached) < 24 and cached <= served_before
  clean.reset()
  m = export.export_task(
    make_source(clean.source_spec()),
    task,
    out,
    cache_dir=cache,
    limit_per_split=LIMIT,
    progress=False,
  )
  assert _shards(m) == _shards(direct[task])
  again = set(clean.state.requested)
  assert not again & cached and len(again) == 24 - len(cached)
  assert m["export"]["cache"]["hits"] == len(cached)
  assert not os.path.exists(
    os.path.join(out, export.STAGING)
  )  # the killed run's staging was cleaned


def test_token_never_leaks(phantom, tmp_path, monkeypatch, caplog, capfd):
  token = "T0k3n-d1e5c0ffee-77aa"
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  with boss_server.serve(
    phantom,
    token=token,
    faults=boss_server.FaultPlan(rate=0.2, kinds=("5xx", "drop", "corrupt"), max_per_path=2),
  ) as srv:
    monkeypatch.setenv("MTNEURO_BOSS_HOST", srv.host_port)
    monkeypatch.setenv("MTNEURO_BOSS_PROTOCOL", "http")
    monkeypatch.setenv("MTNEURO_BOSS_TOKEN", token)
    caplog.set_level(logging.DEBUG)  # everything: ours, intern's, urllib3's, the server's
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = export.main(
      [
        "--source",
        "bossdb:backoff=0.01,max_backoff=0.02",
        "--tasks",
        TASKS[0],
        "--limit_per_split",
        str(LIMIT),
        "--out_dir",
        str(out),
        "--cache_dir",
        str(cache),
      ]
    )
    assert rc == 0
    src = make_source("bossdb")
    texts = [
      caplog.text,
      repr(src),
      json.dumps(src.describe()),
      json.dumps(src.fetch_stats()),
      json.dumps(src.config_origins),
    ]
    assert srv.stats()["injected_total"] > 0
    # A refused request: the error names the problem, not the token.
    monkeypatch.setenv("MTNEURO_BOSS_TOKEN", token[::-1])
    rc = export.main(
      [
        "--source",
        "bossdb",
        "--tasks",
        TASKS[1],
        "--limit_per_split",
        "1",
        "--out_dir",
        str(tmp_path / "out2"),
        "--quiet",
      ]
    )
    assert rc == 2
  captured = capfd.readouterr()
  assert "token was refused" in captured.err
  texts += [captured.out, captured.err, caplog.text]
  for root, _, files in os.walk(tmp_path):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        texts.append(fh.read().decode("latin-1"))
  assert any('"complete": true' in t for t in texts)  # the manifest was among the files
  for t in texts:
    assert token not in t and token[::-1] not in t
