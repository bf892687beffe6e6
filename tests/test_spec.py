"""Task specs and the source layer (intern path), independent of the phantom's content."""

import numpy as np
import pytest

from mtneuro_jax.volumes import sources, spec


def test_cubes_are_256_tiles_inside_the_volume():
  for cube_set, regions in spec.CUBE_SETS.items():
    assert set(regions) == set(spec.REGIONS), cube_set
    for region in regions:
      box = spec.cube_box(cube_set, region, spec.Z_FULL)
      assert box.shape == (360, spec.TILE, spec.TILE)
      box.check_inside()


@pytest.mark.parametrize(
  "task_name,expected",
  [
    ("task1_roi_c1", {"train": 1076, "val": 116, "test": 200}),
    ("task1_roi_c2", {"train": 1076, "val": 116, "test": 2880}),
    ("task1_roi_c3", {"train": 1076 + 1440, "val": 116, "test": 2880}),
    ("task2_2d_3class", {"train": 1076, "val": 116, "test": 200}),
    ("task2_2d_4class", {"train": 807, "val": 87, "test": 150}),
    # 269 // 8, 29 // 8, 50 // 8 windows per region: remainders dropped, never truncated.
    ("task2_3d_3class", {"train": 4 * 33, "val": 4 * 3, "test": 4 * 6}),
    ("task2_3d_4class", {"train": 3 * 33, "val": 3 * 3, "test": 3 * 6}),
    ("task3", {"all": 4 * 360 * 4}),
  ],
)
def test_candidate_counts(task_name, expected):
  task = spec.get_task(task_name)
  assert {s: sum(1 for _ in spec.iter_samples(task, s)) for s in task.splits} == expected


def test_3d_windows_stay_inside_their_split_and_are_full():
  task = spec.get_task("task2_3d_3class")
  for split, parts in task.splits.items():
    ((z0, z1),) = {p.z_range for p in parts}
    for ref in spec.iter_samples(task, split):
      assert ref.box.shape[0] == spec.WINDOW_3D
      assert z0 <= ref.box.z0 and ref.box.z1 <= z1


def test_task3_quadrants_tile_the_cube():
  task = spec.get_task("task3")
  refs = [r for r in spec.iter_samples(task, "all") if r.region == "VP" and r.box.z0 == 200]
  assert [r.quadrant for r in refs] == [0, 1, 2, 3]
  x0, x1, y0, y1 = spec.CUBE_SETS["A"]["VP"]
  covered = np.zeros((spec.TILE, spec.TILE), int)
  for r in refs:
    covered[r.box.y0 - y0 : r.box.y1 - y0, r.box.x0 - x0 : r.box.x1 - x0] += 1
  assert (covered == 1).all()


def test_sample_keys_are_unique():
  for task in spec.TASKS.values():
    for split in task.splits:
      keys = [r.key for r in spec.iter_samples(task, split)]
      assert len(keys) == len(set(keys)), (task.name, split)


def test_task1_label_excludes_unannotated_and_maps_rois():
  assert spec.task1_label(np.zeros((4, 4), np.uint64)) is None
  tile = np.full((4, 4), 4, np.uint64)  # VP
  tile[0, :3] = 0
  assert spec.task1_label(tile) == spec.REGION_INDEX["VP"]
  assert spec.task1_label(np.full((2, 2), 8)) == spec.REGION_INDEX["STR"]  # corpus callosum
  assert spec.task1_label(np.full((2, 2), 7)) == spec.REGION_INDEX["ZI"]  # hypothalamus
  with pytest.raises(ValueError, match="ROI id 9"):
    spec.task1_label(np.full((2, 2), 9))


def test_pixel_class_maps_and_real_mask_remap():
  ids = np.array([[0, 1], [2, 3]], np.uint64)
  np.testing.assert_array_equal(spec.remap(ids, spec.PIXEL_CLASS_MAPS["3class"]), [[0, 1], [2, 0]])
  np.testing.assert_array_equal(spec.remap(ids, spec.PIXEL_CLASS_MAPS["4class"]), ids)
  # xray-thc masks: 1 axon, 2 vessel, 3 cell -> BossDB 3 axon, 1 vessel, 2 cell.
  np.testing.assert_array_equal(spec.remap(ids, spec.XRAY_THC_MASK_TO_PIXEL), [[0, 3], [1, 2]])
  with pytest.raises(ValueError, match=r"\[7\]"):
    spec.remap(np.array([7]), spec.PIXEL_CLASS_MAPS["4class"])


def test_guard_bands_reported_and_enforced():
  task = spec.get_task("task1_roi_c1")
  gaps = {b["splits"]: b["gap_slices"] for b in spec.check_guard_bands(task)}
  assert gaps == {("train", "val"): 1, ("train", "test"): 41, ("val", "test"): 11}
  with pytest.raises(ValueError, match="only 1 slice"):
    spec.check_guard_bands(task, min_guard_slices=spec.DECORRELATION_SLICES)
  # ROI-C2 tests on other cubes: only train/val share a cube.
  assert len(spec.check_guard_bands(spec.get_task("task1_roi_c2"))) == 1


def test_box_validation():
  with pytest.raises(ValueError, match="empty Box"):
    spec.Box(5, 5, 0, 1, 0, 1)
  with pytest.raises(ValueError, match="outside the volume on x"):
    spec.Box(0, 1, 0, 1, 5800, 5810).check_inside()
  parts = spec.Box(0, 9, 0, 7, 0, 5).split((2, 3, 2))
  assert sum(int(np.prod(p.shape)) for p in parts) == 9 * 7 * 5


def test_unknown_task_and_source_fail_clearly():
  with pytest.raises(KeyError, match="known tasks"):
    spec.get_task("task9")
  with pytest.raises(sources.SourceError, match="unknown source"):
    sources.make_source("s3bucket")
  with pytest.raises(sources.SourceError, match="needs a path"):
    sources.make_source("local")
  with pytest.raises(sources.SourceError, match="key=value"):
    sources.make_source("phantom:seed")


def _write_local_volume(path, shape=(6, 10, 12)):
  rng = np.random.default_rng(0)
  vol = {
    "image": rng.integers(0, 256, shape, dtype=np.uint8),
    "roi_labels": rng.integers(0, 9, shape).astype(np.uint64),
    "pixel_labels": rng.integers(0, 4, shape).astype(np.uint64),
  }
  for name, arr in vol.items():
    np.save(path / f"{name}.npy", arr)
  return vol


def test_local_source_reads_through_intern(tmp_path):
  vol = _write_local_volume(tmp_path)
  src = sources.make_source(f"local:{tmp_path}")
  arr = src.open("image")
  assert type(arr).__module__.startswith("intern.")  # the one path: intern.array
  box = spec.Box(1, 2, 2, 7, 3, 11)  # a single slice: intern squeezes it, we restore 3D
  np.testing.assert_array_equal(src.read("image", box), vol["image"][box.slices])
  got = src.read("roi_labels", spec.Box(0, 6, 0, 10, 0, 12))
  assert got.dtype == np.uint64
  np.testing.assert_array_equal(got, vol["roi_labels"])
  with pytest.raises(sources.SourceError, match="outside the volume on z"):
    src.read("image", spec.Box(5, 7, 0, 1, 0, 1))
  with pytest.raises(sources.SourceError, match="unknown channel"):
    src.read("em", spec.Box(0, 1, 0, 1, 0, 1))
  assert src.describe()["kind"] == "local"


def test_local_source_zarr(tmp_path):
  zarr = pytest.importorskip("zarr")
  group = zarr.open_group(str(tmp_path / "vol.zarr"), mode="w")
  img = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
  group.create_array("image", data=img) if hasattr(group, "create_array") else group.array(
    "image", img
  )
  src = sources.make_source(f"local:{tmp_path / 'vol.zarr'}")
  box = spec.Box(1, 3, 0, 5, 2, 6)
  np.testing.assert_array_equal(src.read("image", box), img[box.slices])


def test_reads_with_several_length_one_axes(tmp_path):
  """intern's squeeze fails on boxes with two or more length-1 axes; Source.read must not."""
  vol = _write_local_volume(tmp_path)
  src = sources.make_source(f"local:{tmp_path}")
  for box in (
    spec.Box(2, 3, 4, 5, 0, 12),
    spec.Box(0, 6, 9, 10, 11, 12),
    spec.Box(5, 6, 9, 10, 11, 12),
    spec.Box(0, 1, 0, 1, 0, 1),
  ):
    got = src.read("image", box)
    assert got.shape == box.shape
    np.testing.assert_array_equal(got, vol["image"][box.slices])
