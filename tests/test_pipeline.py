"""grain pipeline: transforms, epochs, determinism, resume, per-process slicing, eval padding."""

import json

import jax
import numpy as np
import pytest

from mtneuro_jax.data.manifest import DatasetError
from mtneuro_jax.data import pipeline, transforms
from mtneuro_jax import sharding
from mtneuro_jax.volumes import spec


def _cfg(data_dir, task="task1_roi_c1", **kw):
  return {
    "data_dir": data_dir,
    "task": task,
    "downsample": 1,
    "image_mean": 0.0,
    "image_std": 1.0,
    "random_crop": 0,
    "batch_size": 8,
    "eval_batch_size": 8,
    **kw,
  }


def _np(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def _ids(batch):
  b = _np(batch)
  return [
    (int(r), int(c), int(z)) for r, c, z in zip(b["region"], b["cube_set"], b["z"], strict=True)
  ]


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh()


# ---------------------------------------------------------------------------
# Transforms.
def test_area_and_majority_downsampling_closed_forms():
  x = np.arange(16, dtype=np.uint8).reshape(4, 4)
  np.testing.assert_allclose(transforms.area_downsample(x, 2), [[2.5, 4.5], [10.5, 12.5]])
  assert transforms.area_downsample(x, 4).item() == 7.5
  m = np.array([[1, 1, 2, 0], [1, 0, 2, 0], [0, 2, 1, 1], [2, 0, 2, 1]])
  # blocks: {1,1,1,0}->1, {2,0,2,0} tie->0, {0,2,2,0} tie->0, {1,1,2,1}->1
  np.testing.assert_array_equal(transforms.majority_downsample(m, 2, 3), [[1, 0], [0, 1]])
  np.testing.assert_allclose(transforms.normalize(np.array([0, 255]), 0.5, 0.25), [-2.0, 2.0])


def test_record_transform_shapes_and_crop_alignment():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (8, 256, 256), dtype=np.uint8)
  rec = {"image": img, "mask": (img % 3).astype(np.uint8), "region": 2, "cube_set": 0, "z": 120}
  t = transforms.RecordTransform("task2", "3class", downsample=1, random_crop=64)
  out = t(rec, np.random.default_rng(5))
  assert out["image"].shape == (8, 64, 64, 1) and out["image"].dtype == np.float32
  assert out["mask"].shape == (8, 64, 64) and out["mask"].dtype == np.int32
  # Image and mask are cut at the same window: the mask is still image % 3.
  np.testing.assert_array_equal(np.rint(out["image"][..., 0] * 255).astype(int) % 3, out["mask"])
  assert t(rec, np.random.default_rng(5))["image"].tobytes() == out["image"].tobytes()
  t4 = transforms.RecordTransform("task2", "3class", downsample=4)
  assert t4(rec)["image"].shape == (8, 64, 64, 1)
  with pytest.raises(ValueError, match="downsample"):
    transforms.RecordTransform("task1", downsample=3)


# ---------------------------------------------------------------------------
# Pipeline.
def test_dataset_info(tiny_data_dir):
  info = pipeline.dataset_info(_cfg(tiny_data_dir, downsample=2))
  assert info["num_examples"] == {"train": 16, "val": 16, "test": 16}
  assert info["image_shape"] == (128, 128, 1) and info["num_classes"] == 4
  assert info["class_names"] == spec.REGIONS and info["synthetic"] is True
  import ml_collections  # the loop passes config.data as a locked ConfigDict

  cd = ml_collections.ConfigDict(_cfg(tiny_data_dir, downsample=4))
  cd.lock()
  info3 = pipeline.dataset_info(cd, task="task2_3d_3class")
  assert info3["image_shape"] == (8, 64, 64, 1) and info3["class_names"] == (
    "other",
    "vessel",
    "cell",
  )
  assert info3["num_examples"]["val"] == 12


def test_train_epochs_cover_every_example_once(tiny_data_dir, mesh):
  it = pipeline.train_iterator(
    _cfg(tiny_data_dir, downsample=2), seed=3, mesh=mesh, global_batch_size=8
  )
  assert it.steps_per_epoch == 2
  b = next(it)
  assert b["image"].shape == (8, 128, 128, 1) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and bool(np.all(np.asarray(b["valid"])))
  assert b["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  epoch0 = _ids(b) + _ids(next(it))
  epoch1 = _ids(next(it)) + _ids(next(it))
  everything = {(r, 0, z) for r in range(4) for z in range(110, 114)}
  assert sorted(epoch0) == sorted(epoch1) == sorted(everything)
  assert epoch0 != epoch1  # reshuffled per epoch
  lab = np.asarray(b["label"])
  assert lab.shape == (8,) and lab.min() >= 0 and lab.max() < 4


def test_same_seed_same_batches_other_seed_other_order(tiny_data_dir, mesh):
  cfg = _cfg(tiny_data_dir, random_crop=64)
  a = [_np(next(pipeline.train_iterator(cfg, seed=1, mesh=mesh, global_batch_size=8)))]
  b = [_np(next(pipeline.train_iterator(cfg, seed=1, mesh=mesh, global_batch_size=8)))]
  c = _np(next(pipeline.train_iterator(cfg, seed=2, mesh=mesh, global_batch_size=8)))
  assert a[0]["image"].shape == (8, 64, 64, 1)
  assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
  assert not np.array_equal(a[0]["z"] * 10 + a[0]["region"], c["z"] * 10 + c["region"])


def test_resume_mid_epoch_gives_identical_batches(tiny_data_dir, mesh):
  cfg = _cfg(tiny_data_dir, task="task2_2d_3class", downsample=2, random_crop=32)
  it = pipeline.train_iterator(cfg, seed=7, mesh=mesh, global_batch_size=8)
  for _ in range(3):  # mid-epoch 1 (2 steps per epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [_np(next(it)) for _ in range(3)]
  # Another reader thread count must not change anything either.
  it2 = pipeline.train_iterator({**cfg, "read_threads": 0}, seed=7, mesh=mesh, global_batch_size=8)
  it2.set_state(state)
  assert it2.step == 3
  got = [_np(next(it2)) for _ in range(3)]
  for w, g in zip(want, got, strict=True):
    assert set(w) == set(g) == {"image", "mask", "region", "cube_set", "z", "valid"}
    for k in w:
      assert np.array_equal(w[k], g[k]), k
  it3 = pipeline.train_iterator(cfg, seed=8, mesh=mesh, global_batch_size=8)
  with pytest.raises(ValueError, match="another input pipeline"):
    it3.set_state(state)


def test_each_process_takes_its_slice_of_the_global_batch(tiny_data_dir, mesh, monkeypatch):
  cfg = _cfg(tiny_data_dir, random_crop=32)
  want = _np(next(pipeline.train_iterator(cfg, seed=0, mesh=mesh, global_batch_size=8)))
  monkeypatch.setattr(pipeline.sharding, "shard_batch", lambda b, mesh: b)
  monkeypatch.setattr(pipeline.sharding, "process_batch_size", lambda g, mesh: g // 2)
  parts = []
  for pid in (0, 1):
    monkeypatch.setattr(pipeline.jax, "process_index", lambda pid=pid: pid)
    parts.append(next(pipeline.train_iterator(cfg, seed=0, mesh=mesh, global_batch_size=8)))
  for k in want:
    assert np.array_equal(np.concatenate([parts[0][k], parts[1][k]]), want[k]), k


def test_eval_batches_pad_with_invalid_rows(tiny_data_dir, mesh):
  cfg = _cfg(tiny_data_dir, random_crop=64)
  batches = [
    _np(b)
    for b in pipeline.eval_batches(
      cfg, "val", mesh=mesh, global_batch_size=8, task="task2_3d_3class"
    )
  ]
  assert len(batches) == 2  # 12 examples
  assert batches[0]["image"].shape == (8, 8, 256, 256, 1)  # no crop at evaluation
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.tolist() == [True] * 12 + [False] * 4
  ids = [i for b in batches for i, v in zip(_ids(b), b["valid"], strict=True) if v]
  assert len(set(ids)) == 12
  again = [
    _np(b)
    for b in pipeline.eval_batches(
      cfg, "val", mesh=mesh, global_batch_size=8, task="task2_3d_3class"
    )
  ]
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, again, strict=True))


def test_missing_dataset_names_the_exporter(tmp_path, mesh):
  with pytest.raises(DatasetError, match=r"mtneuro export --tasks task1_roi_c3"):
    pipeline.train_iterator(
      _cfg(str(tmp_path), task="task1_roi_c3"), seed=0, mesh=mesh, global_batch_size=8
    )
