"""Export integrity: value-checked sources, the export lock, byte-reproducible shards."""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

from data_prep import builder as builder_lib
from data_prep import export as export_lib
from experiments import cli
from mtneuro_jax.data import manifest as manifest_lib
from mtneuro_jax.volumes import spec
from mtneuro_jax.volumes.sources import SourceError, make_source, to_channel_dtype

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def make_zarr_volume(path, arrays) -> str:
  """A full-extent ZYX zarr group at ``path``: ``{channel: (dtype, fill_value)}``.

  Only chunks that are written take disk space, so a 720x1420x5805 volume costs
  nothing; unwritten voxels read as ``fill_value``. Returns ``path``.
  """
  import zarr

  g = zarr.open_group(str(path), mode="w")
  for name, (dtype, fill) in arrays.items():
    kw = dict(shape=spec.VOLUME_SHAPE_ZYX, chunks=(8, 256, 256), dtype=dtype, fill_value=fill)
    (g.create_array if hasattr(g, "create_array") else g.create_dataset)(name, **kw)
  return str(path)


def _stderr_lines(capfd) -> list[str]:
  out, err = capfd.readouterr()
  return [ln for ln in err.splitlines() if ln.strip()]


def _shard_hashes(vdir) -> dict[str, str]:
  return {
    n: manifest_lib.sha256_file(os.path.join(vdir, n))
    for n in sorted(os.listdir(vdir))
    if n != manifest_lib.MANIFEST_NAME
  }


# ---------------------------------------------------------------------------
# Value checks.
@pytest.mark.parametrize(
  "channel,data,scale,match",
  [
    (
      "image",
      np.full(4, 0.5, np.float32),
      None,
      r"image is float32 with values in \[0.5, 0.5\].*scale=",
    ),
    (
      "image",
      np.array([0, 300], np.int16),
      None,
      r"int16 with values in \[0, 300\], outside uint8",
    ),
    ("image", np.array([-1, 3], np.int64), None, r"int64 with values in \[-1, 3\]"),
    ("image", np.array([0.5, 1.01], np.float32), 255, r"scale=255 maps to \[128, 258\], outside"),
    ("image", np.array([np.nan, 1.0]), 255, "non-finite"),
    ("image", np.array(["a"]), None, "not a numeric array"),
    (
      "roi_labels",
      np.array([0, 8, 9, 12], np.uint64),
      None,
      r"ids 9, 12 that are not MTNeuro ROI ids",
    ),
    ("pixel_labels", np.array([-1, 0], np.int8), None, r"ids -1 that are not MTNeuro pixel ids"),
    ("pixel_labels", np.array([4], np.uint8), None, "pixel ids"),
    ("pixel_labels", np.array([1.5]), None, "non-integer"),
  ],
)
def test_values_that_would_clip_wrap_or_lose_precision_are_refused(channel, data, scale, match):
  with pytest.raises(SourceError, match=match) as e:
    to_channel_dtype(channel, data, where="vol", scale=scale)
  assert f"channel {channel}" in str(e.value) and "; " in str(e.value)


def test_values_that_fit_are_converted_exactly():
  a = np.arange(256, dtype=np.int64)
  assert to_channel_dtype("image", a).tolist() == a.tolist()
  u8 = np.arange(10, dtype=np.uint8)
  assert to_channel_dtype("image", u8) is u8  # the common case costs nothing
  f = np.array([0.0, 0.5, 1.0, 0.2], np.float32)
  assert to_channel_dtype("image", f, scale=255).tolist() == [0, 128, 255, 51]  # rint(x * 255)
  labels = to_channel_dtype("roi_labels", np.array([0, 8, 1], np.int32))
  assert labels.dtype == np.uint64 and labels.tolist() == [0, 8, 1]
  assert to_channel_dtype("pixel_labels", np.array([3.0, 0.0])).tolist() == [3, 0]


def test_float_image_export_with_and_without_the_scale_rule(tmp_path, capfd):
  vol = make_zarr_volume(
    tmp_path / "vol", {"image": (np.float32, 0.0), "roi_labels": (np.uint8, 1)}
  )
  import zarr

  image = zarr.open_group(vol, mode="r+")["image"]
  rng = np.random.default_rng(0)
  plan = export_lib.plan_samples(spec.get_task("task1_roi_c1"), 1)
  written = {}
  for samples in plan.values():
    for s in samples:
      written[(s.box.z0, s.box.y0, s.box.x0)] = v = rng.random(s.box.shape, dtype=np.float32)
      image[s.box.slices] = v
  args = [
    "export",
    "--tasks",
    "task1_roi_c1",
    "--limit_per_split",
    "1",
    "--chunk_z",
    "8",
    "--quiet",
  ]
  # Without the rule: refused at once, one line naming channel, dtype, range and fix; nothing written.
  out = str(tmp_path / "out")
  assert cli.main([*args, "--source", f"local:{vol}", "--out_dir", out]) == 2
  err = _stderr_lines(capfd)
  assert len(err) == 1 and err[0].startswith("error: ") and "channel image is float32" in err[0]
  assert "values in" in err[0] and "scale=255" in err[0] and not os.path.exists(out)
  # With scale=255: uint8 = rint(x * 255), exactly, and recorded in the manifest.
  assert cli.main([*args, "--source", f"local:{vol},scale=255", "--out_dir", out]) == 0
  m = manifest_lib.load_manifest(os.path.join(out, "task1_roi_c1"))
  assert m["source"]["image_scale"] == 255.0 and m["parameters"]["source"]["image_scale"] == 255.0
  ds = tfds.data_source("task1_roi_c1", split="train", data_dir=out, download=False)
  assert len(ds) == 4
  for rec in ds:
    want = np.rint(
      written[(int(rec["z"]), int(rec["y0"]), int(rec["x0"]))][0].astype(np.float64) * 255
    )
    np.testing.assert_array_equal(rec["image"], want.astype(np.uint8))
    assert rec["image"].max() > 200  # not the all-black image of a silent cast


# ---------------------------------------------------------------------------
# The lock.
_HELD_EXPORT = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
from test_export import HashSource
from data_prep.export import export_task
flag = sys.argv[2]
class Held(HashSource):
  def read(self, *a, **k):  # the first read waits for the test's go (the lock is held by then)
    if not os.path.exists(flag + ".go"):
      open(flag + ".started", "w").close()
      deadline = time.time() + 120
      while not os.path.exists(flag + ".go") and time.time() < deadline:
        time.sleep(0.02)
    return super().read(*a, **k)
export_task(Held(), "task1_roi_c1", sys.argv[1], limit_per_split=2, progress=False)
print("first export done", flush=True)
"""


def test_second_concurrent_export_fails_at_once_and_first_completes(tmp_path, capfd):
  out, flag = str(tmp_path / "d"), str(tmp_path / "flag")
  first = subprocess.Popen(
    [sys.executable, "-c", _HELD_EXPORT, out, flag, TESTS],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    deadline = time.time() + 120
    while not os.path.exists(flag + ".started") and first.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert os.path.exists(flag + ".started"), first.communicate()[0]
    t0 = time.monotonic()
    rc = cli.main(
      [
        "export",
        "--source",
        "phantom",
        "--tasks",
        "task1_roi_c1",
        "--out_dir",
        out,
        "--limit_per_split",
        "2",
        "--quiet",
      ]
    )
    took = time.monotonic() - t0
    err = _stderr_lines(capfd)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert f"is in use by `mtneuro export` of task1_roi_c1 (pid {first.pid} on host" in err[0]
    assert took < 5  # at once: no waiting, nothing read
  finally:
    open(flag + ".go", "w").close()
    log, _ = first.communicate(timeout=120)
  assert first.returncode == 0 and "first export done" in log, log
  assert cli.main(["verify", out]) == 0
  assert "OK " in capfd.readouterr().out
  assert sorted(os.listdir(out)) == ["task1_roi_c1"]  # no staging left
  assert sorted(os.listdir(os.path.join(out, "task1_roi_c1"))) == ["1.0.0"]  # the lock file is gone


# ---------------------------------------------------------------------------
# Byte reproducibility.
def test_canonical_example_fixes_the_feature_map_order():
  feats = {
    "b": tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=[2])),
    "a": tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[b"xyz"])),
  }

  def one(k):
    return tf_example_pb2.Example(
      features=tf_feature_pb2.Features(feature={k: feats[k]})
    ).SerializeToString()

  # Protobuf merges concatenated messages, so these are the same record with its map
  # entries in two orders (what two processes' serializers may write).
  ab, ba = one("a") + one("b"), one("b") + one("a")
  assert ab != ba
  assert tf_example_pb2.Example.FromString(ab) == tf_example_pb2.Example.FromString(ba)
  assert builder_lib.canonical_example(ab) == builder_lib.canonical_example(ba)
  decoded = tf_example_pb2.Example.FromString(builder_lib.canonical_example(ba))
  assert decoded == tf_example_pb2.Example.FromString(ab)


def test_same_export_twice_gives_identical_bytes(tiny_data_dir, tmp_path):
  """Identical SHA-256 for every shard, dataset_info.json and features.json: across processes
  (protobuf orders map entries differently in each), out_dirs, and after delete + re-export."""
  ref_dir = os.path.join(tiny_data_dir, "task1_roi_c1", "1.0.0")
  ref = _shard_hashes(ref_dir)
  ref_manifest = manifest_lib.load_manifest(ref_dir)
  assert sum(".array_record-" in n for n in ref) == 3 and {
    "dataset_info.json",
    "features.json",
  } <= set(ref)
  # The fixture's cache holds every chunk (same chunk grid): nothing is rendered again.
  cache = os.path.join(os.path.dirname(tiny_data_dir), "cache")
  args = [
    "--source",
    "phantom",
    "--tasks",
    "task1_roi_c1",
    "--limit_per_split",
    "4",
    "--chunk_z",
    "8",
    "--cache_dir",
    cache,
    "--quiet",
  ]
  a = str(tmp_path / "a")
  r = subprocess.run(
    [sys.executable, "-m", "data_prep.export", *args, "--out_dir", a],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr
  b = str(tmp_path / "b")
  assert export_lib.main([*args, "--out_dir", b]) == 0
  for root in (a, b):
    vdir = os.path.join(root, "task1_roi_c1", "1.0.0")
    assert _shard_hashes(vdir) == ref
    assert manifest_lib.load_manifest(vdir)["content_sha256"] == ref_manifest["content_sha256"]
  shutil.rmtree(b)
  assert export_lib.main([*args, "--out_dir", b]) == 0
  assert _shard_hashes(os.path.join(b, "task1_roi_c1", "1.0.0")) == ref


def test_manifest_content_digest_is_checked(tiny_data_dir, tmp_path):
  root = tmp_path / "d"
  shutil.copytree(os.path.join(tiny_data_dir, "task1_roi_c1"), root / "task1_roi_c1")
  vdir = str(root / "task1_roi_c1" / "1.0.0")
  m = manifest_lib.load_manifest(vdir)
  assert m["content_sha256"] == manifest_lib.content_digest(m["files"])
  assert {"protobuf", "zlib", "array-record"} <= set(m["versions"])
  m["content_sha256"] = "0" * 64
  manifest_lib.write_manifest(vdir, m)
  with pytest.raises(manifest_lib.DatasetError, match="content_sha256"):
    manifest_lib.verify_dataset(vdir)


def test_local_source_spec_options():
  with pytest.raises(SourceError, match="scale must be a positive number, got 'abc'"):
    make_source(f"local:{REPO},scale=abc")
  with pytest.raises(SourceError, match="unknown option.*colour.*known: scale"):
    make_source(f"local:{REPO},colour=red")
