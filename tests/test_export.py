"""Export: cutout cache, records vs the source, manifest, idempotence, atomicity, resume, CLI."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import cache as cache_lib
from data_prep import export as export_lib
from mtneuro_jax.data import manifest as manifest_lib
from mtneuro_jax.volumes import spec
from mtneuro_jax.volumes.sources import (
  ArrayVolumeProvider,
  BossDBSource,
  PhantomSource,
  Source,
  SourceError,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HashSource(Source):
  """A cheap synthetic volume for exporter mechanics (the phantom renders slowly).

  Region-consistent ROI ids (by x, like the cubes), annotated on spec.ROI_ANNOTATED_Z
  only; image and pixel ids are coordinate hashes. Counts reads; ``zero_roi_below``
  blanks ROI labels of lower slices.
  """

  kind = "test-hash"

  def __init__(self, zero_roi_below: int = 0):
    self.reads = []
    self.zero_roi_below = zero_roi_below
    self._provider = ArrayVolumeProvider("test-hash", self._cutout)

  def volume_provider(self):
    return self._provider

  def describe(self):
    return {"kind": "test-hash", "zero_roi_below": self.zero_roi_below}

  def read(self, channel, box, resolution=0):
    self.reads.append((channel, box))
    return super().read(channel, box, resolution)

  def _cutout(self, channel, box):
    z, y, x = np.meshgrid(
      *(
        np.arange(a, b, dtype=np.uint64)
        for a, b in zip(box.as_tuple()[::2], box.as_tuple()[1::2], strict=True)
      ),
      indexing="ij",
    )
    if channel == "roi_labels":
      roi = np.select([x < 2100, x < 3330, x < 4150], [5, 4, 2], 1).astype(np.uint64)
      keep = (z >= max(spec.ROI_ANNOTATED_Z[0], self.zero_roi_below)) & (
        z < spec.ROI_ANNOTATED_Z[1]
      )
      return np.where(keep, roi, 0).astype(np.uint64)
    h = z * np.uint64(73856093) ^ y * np.uint64(19349663) ^ x * np.uint64(83492791)
    return (
      (h % np.uint64(4)) if channel == "pixel_labels" else (h % np.uint64(251)).astype(np.uint8)
    )


CountingSource = HashSource


class CountingPhantom(PhantomSource):
  """The phantom (same identity as the fixture's), counting reads."""

  def __init__(self):
    super().__init__(seed=0)
    self.reads = []

  def read(self, channel, box, resolution=0):
    self.reads.append((channel, box))
    return super().read(channel, box, resolution)


def _files_snapshot(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, manifest_lib.sha256_file(p))
  return out


# ---------------------------------------------------------------------------
# Cache.
def test_smallest_uint_checks_values():
  assert cache_lib.smallest_uint(np.array([0, 255], np.uint64)).dtype == np.uint8
  assert cache_lib.smallest_uint(np.array([0, 256], np.uint64)).dtype == np.uint16
  assert cache_lib.smallest_uint(np.array([70000], np.uint64)).dtype == np.uint32
  big = np.array([2**40], np.uint64)
  np.testing.assert_array_equal(cache_lib.smallest_uint(big), big)
  with pytest.raises(ValueError, match="negative"):
    cache_lib.smallest_uint(np.array([-1, 3]))


def test_cache_hit_miss_and_compaction(tmp_path):
  src = CountingSource()
  box = spec.Box(120, 124, 900, 964, 4600, 4664)
  c = cache_lib.CutoutCache(src, str(tmp_path))
  a = c.read("pixel_labels", box)
  assert a.dtype == np.uint8 and a.shape == box.shape  # uint64 ids stored as uint8
  np.testing.assert_array_equal(a, src.read("pixel_labels", box))
  assert (c.stats.hits, c.stats.misses) == (0, 1)
  assert c.stats.fetched_bytes == a.size * 8 and c.stats.stored_bytes == a.size
  # A new cache object (a new process) hits the file and does not touch the source.
  n_reads = len(src.reads)
  c2 = cache_lib.CutoutCache(src, str(tmp_path))
  np.testing.assert_array_equal(c2.read("pixel_labels", box), a)
  assert (c2.stats.hits, c2.stats.misses, len(src.reads)) == (1, 0, n_reads)
  # Key includes the source identity: another seed is another folder.
  p0, p1 = (
    cache_lib.CutoutCache(PhantomSource(seed=k), str(tmp_path)).path("image", box) for k in (0, 1)
  )
  assert len({p0, p1, c.path("image", box)}) == 3
  # A damaged file is detected and fetched again.
  with open(c.path("pixel_labels", box), "r+b") as f:
    f.truncate(40)
  c3 = cache_lib.CutoutCache(src, str(tmp_path))
  np.testing.assert_array_equal(c3.read("pixel_labels", box), a)
  assert c3.stats.corrupt_refetched == 1 and c3.stats.misses == 1


class _ShortSource(HashSource):
  """Its provider returns one slice too few: a partial cutout."""

  def __init__(self):
    super().__init__()
    self._provider = ArrayVolumeProvider(
      "test-hash",
      lambda ch, box: self._cutout(ch, spec.Box(box.z0, box.z1 - 1, *box.as_tuple()[2:])),
    )


def test_partial_cutout_is_never_cached(tmp_path):
  c = cache_lib.CutoutCache(_ShortSource(), str(tmp_path))
  box = spec.Box(120, 124, 900, 932, 4600, 4632)
  with pytest.raises(SourceError, match="expected"):
    c.read("image", box)
  assert not os.path.exists(c.path("image", box))
  assert [n for _, _, names in os.walk(tmp_path) for n in names if n.endswith(".npy")] == []


def test_chunk_grid_is_aligned_and_shared():
  xy = spec.CUBE_SETS["A"]["CTX"]
  train = cache_lib.chunk_boxes(spec.Z_SPLITS["train"], xy, 32)
  full = cache_lib.chunk_boxes(spec.Z_FULL, xy, 32)
  assert train[0].z0 == 96 and train[-1].z1 == 384 and all(b.shape[0] == 32 for b in train)
  assert set(train) <= set(full)  # task1 train chunks are task3 chunks: one read serves both
  assert cache_lib.chunk_boxes((700, 720), xy, 32)[-1].z1 == 720  # clipped to the volume


# ---------------------------------------------------------------------------
# Records.
def _records(data_dir, task, split):
  from data_prep.builder import tfds_split

  ds = tfds.data_source(task, split=tfds_split(split), data_dir=data_dir, download=False)
  return [ds[i] for i in range(len(ds))]


def test_task1_records_match_source(tiny_data_dir):
  src = PhantomSource()
  recs = _records(tiny_data_dir, "task1_roi_c1", "train")
  assert len(recs) == 16
  seen = set()
  for r in recs:
    region = spec.REGIONS[r["region"]]
    assert (int(r["x0"]), int(r["y0"])) == spec.CUBE_SETS["A"][region][::2]
    seen.add((region, int(r["z"])))
    if region in ("CTX", "ZI"):  # the phantom renders slowly: check two cubes voxel by voxel
      box = spec.Box(
        int(r["z"]),
        int(r["z"]) + 1,
        int(r["y0"]),
        int(r["y0"]) + 256,
        int(r["x0"]),
        int(r["x0"]) + 256,
      )
      np.testing.assert_array_equal(r["image"], src.read("image", box)[0])
      assert r["label"] == spec.task1_label(src.read("roi_labels", box))
  # First 4 candidates per region: z 110..113 of every region.
  assert seen == {(reg, z) for reg in spec.REGIONS for z in range(110, 114)}
  test = _records(tiny_data_dir, "task1_roi_c2", "test")
  # The limit keeps the first candidates of each region: all from cube set C (the first part).
  assert {list(spec.CUBE_SETS)[r["cube_set"]] for r in test} == {"C"} and len(test) == 16


def test_task2_3d_masks_are_remapped_windows(tiny_data_dir):
  src = PhantomSource()
  recs = _records(tiny_data_dir, "task2_3d_3class", "val")
  assert len(recs) == 12  # val z [380, 409) holds 3 whole 8-slice windows per region
  for r in recs[:3]:
    z, y0, x0 = int(r["z"]), int(r["y0"]), int(r["x0"])
    box = spec.Box(z, z + 8, y0, y0 + 256, x0, x0 + 256)
    assert r["image"].shape == r["mask"].shape == (8, 256, 256) and r["mask"].dtype == np.uint8
    np.testing.assert_array_equal(r["image"], src.read("image", box))
    np.testing.assert_array_equal(
      r["mask"], spec.remap(src.read("pixel_labels", box), spec.PIXEL_CLASS_MAPS["3class"])
    )
    assert (z - 380) % 8 == 0 and z + 8 <= 409


def test_task3_quadrants_and_tfds_split_name(tmp_path):
  src = HashSource()
  m = export_lib.export_task(
    src, "task3", str(tmp_path / "d"), limit_per_split=4, progress=False, chunk_z=8
  )
  assert m["splits"]["all"]["tfds_split"] == "full" and m["splits"]["all"]["num_examples"] == 16
  recs = _records(str(tmp_path / "d"), "task3", "all")
  for r in recs:
    q = int(r["quadrant"])
    x0, _, y0, _ = spec.CUBE_SETS["A"][spec.REGIONS[r["region"]]]
    assert (int(r["y0"]), int(r["x0"])) == (y0 + 128 * (q // 2), x0 + 128 * (q % 2))
    box = spec.Box(
      int(r["z"]),
      int(r["z"]) + 1,
      int(r["y0"]),
      int(r["y0"]) + 128,
      int(r["x0"]),
      int(r["x0"]) + 128,
    )
    np.testing.assert_array_equal(r["pixel_labels"], src.read("pixel_labels", box)[0])


def test_unannotated_tiles_are_excluded_and_counted(tmp_path):
  src = CountingSource(zero_roi_below=112)  # z 110, 111 unannotated
  m = export_lib.export_task(
    src, "task1_roi_c1", str(tmp_path / "d"), limit_per_split=4, progress=False
  )
  tr = m["splits"]["train"]
  assert (tr["candidates"], tr["num_examples"], tr["excluded_unannotated"]) == (16, 8, 8)
  assert tr["per_region"] == {r: 2 for r in spec.REGIONS}
  assert m["splits"]["val"]["excluded_unannotated"] == 0
  assert {int(r["z"]) for r in _records(str(tmp_path / "d"), "task1_roi_c1", "train")} == {112, 113}
  with pytest.raises(export_lib.ExportError, match="train: all 8 candidate tiles are unannotated"):
    export_lib.export_task(
      HashSource(zero_roi_below=500),
      "task1_roi_c1",
      str(tmp_path / "e"),
      limit_per_split=2,
      progress=False,
    )
  assert os.listdir(tmp_path / "e") == []  # no dataset, no staging left


# ---------------------------------------------------------------------------
# Manifest, idempotence, overwrite, cache sharing.
def test_manifest_contents(tiny_data_dir):
  vdir = os.path.join(tiny_data_dir, "task1_roi_c1", "1.0.0")
  manifest_lib.verify_dataset(vdir)
  m = manifest_lib.load_manifest(vdir)
  assert m["complete"] is True and m["parameters"]["limit_per_split"] == 4
  assert (
    m["source"]["kind"] == "phantom"
    and m["channels"]["roi_labels"] == spec.CHANNELS["roi_labels"].uri
  )
  assert m["task"]["splits"]["test"][0]["xy"]["VP"] == {"x": [3063, 3319], "y": [850, 1106]}
  assert {b["gap_slices"] for b in m["guard_bands"]} == {1, 11, 41}
  for name, entry in m["files"].items():
    assert entry["sha256"] == manifest_lib.sha256_file(os.path.join(vdir, name))
  assert sum(".array_record-" in n for n in m["files"]) == 3
  for k in ("numpy", "tensorflow-datasets", "array-record", "intern", "grain", "python"):
    assert m["versions"][k]
  assert set(m["export"]["cache"]) >= {"hits", "misses", "fetched_bytes"}


def test_parameters_never_hold_a_token():
  p = export_lib.export_parameters(BossDBSource(token="s3cr3t-token"), "task1_roi_c1", None)
  assert "s3cr3t-token" not in json.dumps(p) and p["source"]["host"] == "api.bossdb.io"


def test_rerun_is_noop_and_other_params_refused(tiny_data_dir, tmp_path, capsys):
  root = str(tmp_path / "d")
  shutil.copytree(os.path.join(tiny_data_dir, "task1_roi_c1"), os.path.join(root, "task1_roi_c1"))
  before = _files_snapshot(root)
  src = CountingPhantom()
  m = export_lib.export_task(src, "task1_roi_c1", root, limit_per_split=4, chunk_z=8)
  assert "nothing to do" in capsys.readouterr().out
  assert src.reads == [] and _files_snapshot(root) == before and m["complete"]
  with pytest.raises(
    export_lib.ExportError, match="other parameters.*limit_per_split: 4 -> 2.*--overwrite"
  ):
    export_lib.export_task(src, "task1_roi_c1", root, limit_per_split=2, progress=False)
  assert src.reads == [] and _files_snapshot(root) == before
  with pytest.raises(export_lib.ExportError, match="other parameters.*source: .*test-hash"):
    export_lib.export_task(HashSource(), "task1_roi_c1", root, limit_per_split=4, progress=False)
  m2 = export_lib.export_task(
    HashSource(), "task1_roi_c1", root, limit_per_split=2, progress=False, overwrite=True
  )
  assert m2["splits"]["train"]["num_examples"] == 8 and m2["source"]["kind"] == "test-hash"
  manifest_lib.verify_dataset(os.path.join(root, "task1_roi_c1"))
  assert os.listdir(root) == ["task1_roi_c1"]  # staging and the replaced version are gone


def test_tasks_share_cached_chunks_and_exports_are_deterministic(tmp_path):
  src = CountingSource()
  cache = str(tmp_path / "cache")
  a = export_lib.export_task(
    src, "task1_roi_c1", str(tmp_path / "a"), cache_dir=cache, limit_per_split=2, progress=False
  )
  n1 = len(src.reads)
  b = export_lib.export_task(
    src, "task2_2d_3class", str(tmp_path / "a"), cache_dir=cache, limit_per_split=2, progress=False
  )
  new = src.reads[n1:]
  assert new and {ch for ch, _ in new} == {"pixel_labels"}  # every image chunk came from the cache
  assert b["export"]["cache"]["hits"] == len(new) and b["export"]["cache"]["misses"] == len(new)
  c = export_lib.export_task(
    src, "task1_roi_c1", str(tmp_path / "c"), cache_dir=cache, limit_per_split=2, progress=False
  )
  assert len(src.reads) == n1 + len(new)  # all hits
  assert {k: v["sha256"] for k, v in a["files"].items()} == {
    k: v["sha256"] for k, v in c["files"].items()
  }


def test_companion_channels_fetch_each_chunk_once_for_all_tasks(tmp_path):
  tasks = ["task1_roi_c1", "task2_2d_4class"]
  comp = export_lib.companions_for(tasks)
  assert comp["A:CTX"] == ("image", "pixel_labels", "roi_labels") and "A:ZI" in comp
  assert export_lib.companions_for(["task2_2d_4class"]).get("A:ZI") is None  # 4-class has no ZI
  src = CountingSource()
  cache = str(tmp_path / "cache")
  a = export_lib.export_task(
    src,
    tasks[0],
    str(tmp_path / "d"),
    cache_dir=cache,
    limit_per_split=2,
    progress=False,
    companion_channels=comp,
  )
  assert {ch for ch, _ in src.reads} == {"image", "roi_labels", "pixel_labels"}
  n = len(src.reads)
  b = export_lib.export_task(
    src,
    tasks[1],
    str(tmp_path / "d"),
    cache_dir=cache,
    limit_per_split=2,
    progress=False,
    companion_channels=comp,
  )
  assert len(src.reads) == n and b["export"]["cache"]["misses"] == 0  # nothing left to fetch
  assert a["export"]["companion_channels"]["A:VP"] == list(comp["A:VP"])


def test_guard_band_minimum_refuses_before_reading(tmp_path):
  src = CountingSource()
  with pytest.raises(export_lib.ExportError, match="only 1 slice"):
    export_lib.export_task(
      src, "task1_roi_c1", str(tmp_path / "d"), min_guard_slices=spec.DECORRELATION_SLICES
    )
  assert src.reads == [] and not os.path.exists(tmp_path / "d")


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from data_prep.export import export_task
    sys.path.insert(0, sys.argv[4])
    from test_export import HashSource
    class Dying(HashSource):
      n = 0
      def read(self, *a, **k):
        Dying.n += 1
        if Dying.n > int(sys.argv[3]):
          os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like an OOM kill or a power cut
        return super().read(*a, **k)
    export_task(Dying(), "task2_2d_3class", sys.argv[1], cache_dir=sys.argv[2], limit_per_split=40,
                progress=False)
""")


def test_killed_export_leaves_nothing_complete_and_resumes_from_cache(tmp_path):
  out, cache = str(tmp_path / "d"), str(tmp_path / "cache")
  r = subprocess.run(
    [sys.executable, "-c", _KILL_SCRIPT, out, cache, "5", os.path.dirname(__file__)],
    cwd=REPO,
    capture_output=True,
  )
  assert r.returncode == -9
  assert not os.path.exists(os.path.join(out, "task2_2d_3class", "1.0.0"))
  assert os.listdir(os.path.join(out, export_lib.STAGING))  # the dead process's staging is left
  assert export_lib.main(["verify", out]) == 2
  src = CountingSource()
  m = export_lib.export_task(
    src, "task2_2d_3class", out, cache_dir=cache, limit_per_split=40, progress=False
  )
  assert m["export"]["cache"]["hits"] == 5  # the 5 chunks fetched before the kill
  assert m["export"]["cache"]["misses"] == len(src.reads) > 0
  assert not os.path.exists(os.path.join(out, export_lib.STAGING))  # stale staging cleaned
  manifest_lib.verify_dataset(os.path.join(out, "task2_2d_3class"))


# ---------------------------------------------------------------------------
# CLI.
def test_cli_summary_and_verify(tiny_data_dir, capsys):
  assert export_lib.main(["summary", tiny_data_dir]) == 0
  out = capsys.readouterr().out
  assert "task1_roi_c2" in out and "SYNTHETIC" in out
  line = next(
    ln for ln in out.splitlines() if ln.startswith("task2_3d_3class") and " val " in f" {ln} "
  )
  assert line.split()[2] == "12"
  assert export_lib.main(["verify", tiny_data_dir]) == 0
  assert capsys.readouterr().out.count("OK ") == 4


def test_cli_export_then_noop(tiny_data_dir, tmp_path, capsys):
  # The fixture's cache holds these chunks (same grid): the phantom renders nothing here.
  cache = os.path.join(os.path.dirname(tiny_data_dir), "cache")
  args = [
    "--source",
    "phantom",
    "--tasks",
    "task1_roi_c1",
    "--out_dir",
    str(tmp_path / "d"),
    "--limit_per_split",
    "1",
    "--chunk_z",
    "8",
    "--cache_dir",
    cache,
    "--quiet",
  ]
  assert export_lib.main(args) == 0
  out = capsys.readouterr().out
  assert "1 of 1 task(s) written" in out and "24 hits, 0 misses" in out
  manifest_lib.verify_dataset(str(tmp_path / "d" / "task1_roi_c1"))
  assert export_lib.main(args) == 0
  assert "0 of 1 task(s) written" in capsys.readouterr().out
