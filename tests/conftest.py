"""Test setup: 8 fake CPU devices for sharded code (must be set before jax imports)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# Tasks exported by `tiny_data_dir` (the first 4 candidates per region per split).
TINY_TASKS = ("task1_roi_c1", "task1_roi_c2", "task2_2d_3class", "task2_3d_3class")
TINY_LIMIT = 4


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """Export root (a TFDS data_dir) with tiny phantom exports of TINY_TASKS.

  Per task: 4 candidates per region per split (Task 2 3D: 3 windows fit in val), so
  task1_roi_c1 has train/val/test = 16/16/16 and task1_roi_c2's test holds cube set C.
  Use it as `config.data.data_dir`. Read-only for tests: copy it before modifying.
  """
  from data_prep.export import companions_for, export_task
  from mtneuro_jax.volumes.sources import make_source

  root = tmp_path_factory.mktemp("tiny_data")
  source = make_source("phantom")
  for task in TINY_TASKS:
    # chunk_z=8: the tiny plans touch few slices; small chunks avoid reading unused ones.
    # Companions: each chunk is fetched once for all four tasks, like `--tasks a,b,c`.
    export_task(
      source,
      task,
      str(root / "data"),
      cache_dir=str(root / "cache"),
      limit_per_split=TINY_LIMIT,
      progress=False,
      chunk_z=8,
      companion_channels=companions_for(TINY_TASKS),
    )
  return str(root / "data")
