"""Bad input: one clear stderr line naming problem and fix, exit 2, nothing existing overwritten."""

import json
import os
import shutil

import numpy as np
import pytest

from data_prep import export as export_lib
from mtneuro_jax.data import manifest as manifest_lib
from mtneuro_jax.data.manifest import DatasetError
from mtneuro_jax.data import pipeline
from mtneuro_jax import sharding
from mtneuro_jax.volumes import spec
from mtneuro_jax.volumes.sources import PhantomSource, SourceError, make_source


class CountingSource(PhantomSource):
  """The phantom, counting reads (these tests expect none)."""

  def __init__(self):
    super().__init__(seed=0)
    self.reads = 0

  def read(self, *a, **k):
    self.reads += 1
    return super().read(*a, **k)


def _error_lines(err: str) -> list[str]:
  return [ln for ln in err.splitlines() if ln.strip()]


def _run(argv, capsys):
  rc = export_lib.main(argv)
  out, err = capsys.readouterr()
  return rc, out, _error_lines(err)


def _snapshot(root):
  return {
    os.path.relpath(os.path.join(d, n), root): manifest_lib.sha256_file(os.path.join(d, n))
    for d, _, names in os.walk(root)
    for n in names
  }


@pytest.fixture
def dataset_copy(tiny_data_dir, tmp_path):
  """A private copy of the tiny task1_roi_c1 export (root, version folder)."""
  root = tmp_path / "data"
  shutil.copytree(os.path.join(tiny_data_dir, "task1_roi_c1"), root / "task1_roi_c1")
  return str(root), str(root / "task1_roi_c1" / "1.0.0")


def _shard(vdir, split="train"):
  return os.path.join(vdir, f"task1_roi_c1-{split}.array_record-00000-of-00001")


def test_box_outside_volume(tmp_path, capsys):
  # Source.read itself refuses, naming the axis and the valid range.
  with pytest.raises(SourceError, match=r"outside the volume on x: valid x range is \[0, 5805\)"):
    PhantomSource().read("image", spec.Box(0, 1, 0, 1, 5800, 5810))
  # A local volume too small for the task's cubes: refused before anything is written.
  vol = tmp_path / "vol"
  vol.mkdir()
  np.save(vol / "image.npy", np.zeros((200, 64, 64), np.uint8))
  rc, _, err = _run(
    ["--source", f"local:{vol}", "--tasks", "task1_roi_c1", "--out_dir", str(tmp_path / "o")],
    capsys,
  )
  assert rc == 2 and len(err) == 1
  assert "train-A-CTX-z110" in err[0] and "outside the volume on y" in err[0]
  assert "(200, 64, 64)" in err[0] and "MTNeuro extent" in err[0]
  assert not os.path.exists(tmp_path / "o")


def test_unknown_task_or_source(tmp_path, capsys):
  rc, _, err = _run(["--tasks", "task9", "--out_dir", str(tmp_path / "o")], capsys)
  assert (
    rc == 2 and len(err) == 1 and "unknown task(s) task9" in err[0] and "task1_roi_c1" in err[0]
  )
  rc, _, err = _run(
    ["--source", "s3bucket", "--tasks", "task1_roi_c1", "--out_dir", str(tmp_path / "o")], capsys
  )
  assert rc == 2 and len(err) == 1 and "unknown source 's3bucket'" in err[0] and "phantom" in err[0]
  with pytest.raises(SourceError):
    make_source("phantom:seed")
  assert not os.path.exists(tmp_path / "o")


def test_truncated_shard(dataset_copy, capsys, mesh):
  root, vdir = dataset_copy
  with open(_shard(vdir), "r+b") as f:
    f.truncate(os.path.getsize(_shard(vdir)) - 10)
  rc, _, err = _run(["verify", root], capsys)
  assert rc == 2 and len(err) == 1 and "truncated" in err[0] and "--overwrite" in err[0]
  with pytest.raises(DatasetError, match="truncated"):
    pipeline.train_iterator(
      {"data_dir": root, "task": "task1_roi_c1"}, seed=0, mesh=mesh, global_batch_size=8
    )


def test_flipped_byte_detected_by_verify_and_pipeline(dataset_copy, capsys, mesh):
  root, vdir = dataset_copy
  cfg = {"data_dir": root, "task": "task1_roi_c1"}
  assert pipeline.dataset_info(cfg)["num_examples"]["val"] == 16  # opens fine (and is memoised) ...
  path = _shard(vdir, "val")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0x01]))
  rc, _, err = _run(["verify", os.path.join(root, "task1_roi_c1")], capsys)
  assert rc == 2 and len(err) == 1 and "SHA-256" in err[0] and "task1_roi_c1-val" in err[0]
  with pytest.raises(DatasetError, match="SHA-256"):  # ... and is re-checked after the change
    pipeline.eval_batches(cfg, "val", mesh=mesh, global_batch_size=8)


def test_manifest_mismatch(dataset_copy, capsys):
  root, vdir = dataset_copy
  mpath = os.path.join(vdir, "manifest.json")
  m = json.load(open(mpath))
  m["splits"]["test"]["num_examples"] += 1
  json.dump(m, open(mpath, "w"))
  rc, _, err = _run(["verify", root], capsys)
  assert (
    rc == 2
    and len(err) == 1
    and "split 'test' has 16 examples in dataset_info.json but 17" in err[0]
  )
  # An extra shard that the manifest does not list.
  m["splits"]["test"]["num_examples"] -= 1
  json.dump(m, open(mpath, "w"))
  manifest_lib.verify_dataset(vdir)
  shutil.copy(_shard(vdir), os.path.join(vdir, "task1_roi_c1-train.array_record-00001-of-00002"))
  with pytest.raises(DatasetError, match="does not list"):
    manifest_lib.verify_dataset(vdir)
  # A manifest that is not JSON.
  open(mpath, "w").write("{not json")
  rc, _, err = _run(["verify", root], capsys)
  assert rc == 2 and len(err) == 1 and "unreadable" in err[0]


def test_missing_manifest_is_incomplete(dataset_copy, capsys):
  root, vdir = dataset_copy
  os.unlink(os.path.join(vdir, "manifest.json"))
  for target in (root, os.path.join(root, "task1_roi_c1"), vdir):
    rc, _, err = _run(["verify", target], capsys)
    assert rc == 2 and len(err) == 1 and "not a complete export" in err[0], target
  # The exporter refuses to build over it without --overwrite, and reads nothing.
  src = CountingSource()
  with pytest.raises(export_lib.ExportError, match="--overwrite"):
    export_lib.export_task(src, "task1_roi_c1", root, limit_per_split=4, progress=False)
  assert src.reads == 0


def test_unwritable_output_checked_before_fetching(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  src = CountingSource()
  with pytest.raises(export_lib.ExportError, match="not writable.*--out_dir"):
    export_lib.export_task(
      src, "task1_roi_c1", str(blocker / "out"), limit_per_split=1, progress=False
    )
  assert src.reads == 0
  rc, _, err = _run(
    ["--tasks", "task1_roi_c1", "--out_dir", str(blocker / "out"), "--limit_per_split", "1"], capsys
  )
  assert rc == 2 and len(err) == 1 and "not writable" in err[0]
  with pytest.raises(export_lib.ExportError, match="cache folder .* not writable.*--cache_dir"):
    export_lib.export_task(
      src,
      "task1_roi_c1",
      str(tmp_path / "o"),
      cache_dir=str(blocker / "c"),
      limit_per_split=1,
      progress=False,
    )
  assert src.reads == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir(tmp_path, capsys):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    rc, _, err = _run(
      ["--tasks", "task1_roi_c1", "--out_dir", str(ro), "--limit_per_split", "1"], capsys
    )
    assert rc == 2 and len(err) == 1 and "not writable" in err[0]
  finally:
    ro.chmod(0o700)


def test_failed_runs_overwrite_nothing(dataset_copy, capsys):
  root, _ = dataset_copy
  before = _snapshot(root)
  for argv in (
    [
      "--tasks",
      "task1_roi_c1",
      "--out_dir",
      root,
      "--limit_per_split",
      "2",
      "--cache_dir",
      os.path.join(os.path.dirname(root), "c"),
    ],
    ["--tasks", "task1_roi_c1", "--out_dir", root, "--min_guard_slices", "5"],
  ):
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and len(err) == 1
  assert (
    "other parameters"
    in _run(["--tasks", "task1_roi_c1", "--out_dir", root, "--limit_per_split", "3"], capsys)[2][0]
  )
  assert _snapshot(root) == before


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh()
