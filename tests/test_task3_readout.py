"""Task 3 readout: z-block folds, R^2 on known data, encoder embeddings and the driver end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mtneuro_jax.readout import regression as G


def _rows(n_groups=4, z0=110, nz=60, quads=4):
  z = np.tile(np.repeat(np.arange(z0, z0 + nz), quads), n_groups)
  group = np.repeat(np.arange(n_groups), nz * quads)
  return z, group


@pytest.mark.parametrize("block,k,gap", [(36, 5, 8), (7, 3, 0), (5, 4, 2)])
def test_folds_never_split_a_z_block_and_keep_the_gap(block, k, gap):
  z, group = _rows()
  cfg = G.HeldOutConfig(block_size=block, folds=k, gap=gap)
  blocks = G.z_blocks(z, group, block)
  folds = G.folds(z, group, cfg)
  tested = np.zeros(len(z), int)
  for train, test in folds:
    tested[test] += 1
    assert not set(train) & set(test)
    for g in np.unique(group):
      tr = train[group[train] == g]
      te = test[group[test] == g]
      assert not set(blocks[tr]) & set(blocks[te])  # a z-block is wholly train or test
      if tr.size and te.size:
        assert np.abs(z[tr][:, None] - z[te][None, :]).min() > gap
  assert np.all(tested == 1)  # every row is tested exactly once


def test_readout_r2_exact_noise_nan_and_constant():
  rng = np.random.default_rng(0)
  z, group = _rows()
  n = len(z)
  x = rng.normal(size=(n, 6))
  exact = x @ rng.normal(size=6) + 3.0
  noise = rng.normal(size=n)
  partial = exact.copy()
  partial[::5] = np.nan
  res = G.readout(
    x,
    {"exact": exact, "noise": noise, "partial": partial, "const": np.ones(n)},
    z=z,
    group=group,
    config=G.HeldOutConfig(block_size=10, folds=3, gap=2),
  )
  assert res["exact"]["in_sample"] == pytest.approx(1.0)
  assert res["exact"]["held_out"] == pytest.approx(1.0)
  assert res["noise"]["held_out"] < 0.02 and res["noise"]["held_out"] < res["noise"]["in_sample"]
  assert res["partial"]["n_rows"] == n - len(range(0, n, 5))
  assert res["partial"]["n_dropped"] == len(range(0, n, 5))
  assert res["partial"]["held_out"] == pytest.approx(1.0)
  assert np.isnan(res["const"]["in_sample"]) and len(res["exact"]["held_out_folds"]) == 3


def test_readout_matches_sklearn_in_sample():
  from sklearn.linear_model import LinearRegression

  rng = np.random.default_rng(1)
  z, group = _rows(nz=30)
  x = rng.normal(size=(len(z), 20))
  y = np.sin(x[:, 0]) + 0.3 * rng.normal(size=len(z))
  got = G.readout(x, {"y": y}, z=z, group=group, config=G.HeldOutConfig(10, 3, 0))
  assert got["y"]["in_sample"] == pytest.approx(LinearRegression().fit(x, y).score(x, y), abs=1e-9)


# ---------------------------------------------------------------------------
# Driver end to end (tiny): a Task 3 export of 12 slices per region + a tiny Task 1 encoder.
@pytest.fixture(scope="module")
def t3_setup(tiny_data_dir, tmp_path_factory):
  from configs import task1_supervised
  from data_prep.export import export_task
  from experiments import task3_tables
  from mtneuro_jax.train import loop
  from mtneuro_jax.volumes.sources import make_source

  root = tmp_path_factory.mktemp("t3")
  data = str(root / "data")
  # 48 candidates per region = 12 consecutive slices x 4 quadrants: enough z for 3 folds.
  export_task(
    make_source("phantom"),
    "task3",
    data,
    cache_dir=str(root / "cache"),
    limit_per_split=48,
    progress=False,
    chunk_z=8,
  )
  t1 = str(root / "t1")
  ds = task3_tables.t1_downsample(task3_tables.PRESETS["tiny"])
  wd = task3_tables.run_dir(t1, "supervised", ds, 1)
  c = task1_supervised.get_config("tiny")
  c.unlock()
  c.data.data_dir = tiny_data_dir
  c.data.downsample = ds
  c.lock()
  loop.train_and_evaluate(c, wd)
  return data, t1, str(root / "out")


def test_encoder_embeddings_use_the_runs_scale_and_normalisation(t3_setup):
  from mtneuro_jax.readout import embeddings as E

  _, t1, _ = t3_setup
  run = os.path.join(t1, "runs", "supervised", "c12-ds4", "seed1")
  images = np.random.default_rng(0).integers(0, 256, (5, 128, 128), dtype=np.uint8)
  z, info = E.encoder_embeddings(run, images, batch_size=4)  # 4 + 1 padded
  cfg = json.load(open(os.path.join(run, "config.json")))
  assert info["downsample"] == cfg["data"]["downsample"] == 4
  assert info["image_mean"] == cfg["data"]["image_mean"]
  assert z.shape == (5, info["dim"]) and np.all(np.isfinite(z))
  z1, _ = E.encoder_embeddings(run, images[:1], batch_size=4)
  np.testing.assert_allclose(z1[0], z[0], rtol=1e-5, atol=1e-5)  # padding does not leak
  with pytest.raises(E.EmbeddingError, match="checkpoints"):
    E.encoder_workdir(os.path.join(t1, "nowhere"))


def test_driver_end_to_end_and_resume(t3_setup):
  from experiments import task3_tables

  data, t1, out = t3_setup
  argv = ["--preset", "tiny", "--data_dir", data, "--t1_dir", t1, "--out", out]
  argv += ["--methods", "supervised,byol,pca,nmf"]
  assert task3_tables.main(argv) == 0
  t = json.load(open(os.path.join(out, "table3.json")))
  md = open(os.path.join(out, "table3.md")).read()
  assert "SYNTHETIC" in md and "held out" in md and "paper protocol (in-sample)" in md
  assert t["n_rows"] == 192 and t["synthetic"] and not t["comparable_to_paper"]
  rows = {r["method"]: r for r in t["rows"]}
  assert "not run" in rows["byol"]["note"]
  for m in ("supervised", "pca", "nmf"):
    for k, c in rows[m]["cells"].items():
      assert c["in_sample"]["mean"] is not None, (m, k)
      assert "held_out" in c and c["paper"] is not None
  assert set(t["feature_means"]["CTX"]) == {"phantom (3D)", "phantom (2D)", "real masks (2D)"}
  assert os.path.getsize(os.path.join(out, "umap_supervised.png")) > 1000
  cache = sorted(os.listdir(os.path.join(out, "cache")))
  mtimes = {f: os.path.getmtime(os.path.join(out, "cache", f)) for f in cache}
  # Rerun: everything comes from the cache, numbers identical.
  assert task3_tables.main(argv) == 0
  t2 = json.load(open(os.path.join(out, "table3.json")))
  assert [r["cells"] for r in t2["rows"]] == [r["cells"] for r in t["rows"]]
  assert {f: os.path.getmtime(os.path.join(out, "cache", f)) for f in cache} == mtimes


@pytest.mark.parametrize(
  "argv,needle",
  [
    (["--methods", "byol,resnet"], "unknown or no --methods"),
    (["--t1_dir", "/nonexistent/t1"], "does not exist"),
    (["--methods", "pca", "--seeds", "1,x"], "comma-separated integers"),
    (["--methods", "pca", "--data_dir", "/nonexistent/data"], "mtneuro export --tasks task3"),
  ],
)
def test_bad_input_is_one_line_and_status_2(argv, needle, tmp_path, capfd):
  from experiments import cli

  assert cli.main(["task3", "--out", str(tmp_path / "o"), *argv]) == 2
  err = capfd.readouterr().err
  assert needle in err and "Traceback" not in err
