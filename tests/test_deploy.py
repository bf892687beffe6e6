"""Deployment (mtneuro_jax/deploy): blending, sharding, blockwise resume, processes, clean-up, errors.

Stand-in runs are built here (a tiny U-Net and a tiny ResNet classifier, random weights saved
through the train checkpointer), so these tests need no training and no exported data.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtneuro_jax import sharding
from mtneuro_jax.deploy import blockwise, cleanup, maps, zarr_io
from mtneuro_jax.deploy import model as model_lib
from mtneuro_jax.deploy import sliding_window as sw
from mtneuro_jax.errors import UserError
from mtneuro_jax.models import MODELS
from mtneuro_jax.train import checkpoint as ckpt_lib
from mtneuro_jax.volumes import sources, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOX = "200:203,600:700,1500:1622"  # odd output shape at downsample 2: (3, 50, 61)
BLOCK = "2,24,32"  # 2 x 3 x 2 = 12 blocks


def make_run(workdir, model_name, model_kwargs, data, example_shape):
  """A train-loop-like workdir: config.json + one verified checkpoint of random weights."""
  m = MODELS[model_name](**model_kwargs)
  v = m.init(
    {"params": jax.random.key(0), "dropout": jax.random.key(0)},
    jnp.zeros(example_shape),
    train=False,
  )
  state = {
    "params": dict(v["params"]),
    "model_state": {k: v[k] for k in v if k != "params"},
    "step": np.int32(3),
  }
  c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  c.save(3, state)
  c.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"model_name": model_name, "model": model_kwargs, "data": data}, f)
  return str(workdir)


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
  return make_run(
    tmp_path_factory.mktemp("unet_run"),
    "unet",
    {"num_classes": 3, "dims": 2, "width_multiplier": 0.125, "n_blocks": 2},
    {
      "task": "task2_2d_3class",
      "downsample": 2,
      "random_crop": 32,
      "image_mean": 0.5,
      "image_std": 0.25,
    },
    (1, 32, 32, 1),
  )


@pytest.fixture(scope="module")
def reference(unet_run, tmp_path_factory):
  """One uninterrupted single-process prediction of BOX (the byte reference)."""
  out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
  proc = _cli(["--run", unet_run, "--box", BOX, "--out", out, "--block", BLOCK])
  stdout, stderr = proc.communicate(timeout=180)
  assert proc.returncode == 0, stderr[-2000:]
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary["complete"] and summary["blocks"] == 12
  return out


def chunk_bytes(root):
  """{relative path: bytes} of every array file of a zarr group: .zarray/.zattrs as stored,
  chunks decompressed (every byte of the full chunk, padding included).

  Chunks are compared decoded because the same chunk content can be stored as different
  gzip streams: TensorStore encodes a chunk written whole and one completed by a later
  read-modify-write (another block, a rerun after kill -9) along different paths (seen:
  same 1345 bytes, same decoded chunk, different deflate blocks). The decoded bytes are
  what a reader gets.
  """
  import gzip
  import zlib

  out = {}
  for name in zarr_io.array_names(root):
    with open(os.path.join(root, name, ".zarray")) as f:
      codec = (json.load(f).get("compressor") or {}).get("id")
    for path in glob.glob(os.path.join(root, name, "*")) + glob.glob(
      os.path.join(root, name, ".z*")
    ):
      with open(path, "rb") as f:
        data = f.read()
      if not os.path.basename(path).startswith(".z"):
        data = {"gzip": gzip.decompress, "zlib": zlib.decompress}.get(codec, bytes)(data)
      out[os.path.relpath(path, root)] = data
  return out


def assert_same_bytes(out, reference):
  """Every array file identical; on failure, name the files and the largest value difference."""
  a, b = chunk_bytes(out), chunk_bytes(reference)
  bad = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  detail = []
  for name in sorted({k.split("/")[0] for k in bad}):
    try:
      x = zarr_io.read_array(out, name).astype(int)
      y = zarr_io.read_array(reference, name).astype(int)
      detail.append(f"{name}: {(x != y).sum()} values differ, max |diff| {np.abs(x - y).max()}")
    except Exception as e:  # noqa: BLE001 - diagnostics only
      detail.append(f"{name}: {e}")
  assert not bad, f"{len(bad)} files differ: {bad[:6]}; {detail}"


def _cli(args, env_extra=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MTNEURO_")}
  env.update(env_extra or {})
  env["PYTHONPATH"] = ROOT
  return subprocess.Popen(
    [sys.executable, "-m", "experiments.predict", *args, "--no_progress"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


# ---------------------------------------------------------------------------- sliding window
def test_window_grid_and_importance():
  assert sw.window_starts(10, 4, 3) == [0, 3, 6]
  assert sw.window_starts(11, 4, 3) == [0, 3, 6, 7]  # last window flush with the edge
  assert sw.window_starts(3, 8, 6) == [0]  # window larger than the axis: one (padded) window
  w = sw.gaussian_importance((1, 16, 9))
  assert w.shape == (1, 16, 9) and w.max() == pytest.approx(1.0) and w.min() >= sw.MIN_WEIGHT
  assert sw.default_stride((1, 128, 128)) == (1, 96, 96)


@pytest.mark.parametrize(
  "shape,window,stride",
  [
    ((5, 37, 53), (3, 16, 16), (2, 11, 7)),
    ((2, 10, 9), (3, 16, 16), (3, 12, 12)),
    ((1, 16, 16), (1, 16, 16), (1, 16, 16)),
  ],
)
def test_constant_output_blends_to_constant(shape, window, stride):
  """Weights normalise: a model whose probabilities are constant gives that constant everywhere."""
  micro = np.array([0.2, 0.5, 0.3], np.float32)
  region = np.array([0.1, 0.6, 0.2, 0.1], np.float32)

  def predictor(windows):
    n = windows.shape[0]
    return {
      "micro": np.broadcast_to(micro, windows.shape + (3,)),
      "region": np.tile(region, (n, 1)),
    }

  vol = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  out = sw.blend(vol, predictor, sw.Tiling(window, stride), max_windows=5)
  assert out["micro"].shape == shape + (3,) and out["region"].shape == shape + (4,)
  np.testing.assert_allclose(out["micro"], np.broadcast_to(micro, shape + (3,)), rtol=1e-5)
  np.testing.assert_allclose(out["region"], np.broadcast_to(region, shape + (4,)), rtol=1e-5)


def test_sharded_and_single_device_agree(unet_run):
  run = model_lib.load_run(unet_run)
  assert run.dims == 2 and run.window == (1, 32, 32) and run.step == 3
  vol = np.random.default_rng(1).normal(size=(2, 45, 70)).astype(np.float32)
  tiling = sw.Tiling((1, 32, 32), (1, 24, 24))
  results = []
  for n in (8, 1):
    assert jax.device_count() >= n
    pred = sw.WindowPredictor(
      sw.apply_fn_for(run.model), run.variables, dims=2, batch=8, mesh=sharding.make_mesh(n)
    )
    results.append(sw.blend(vol, pred, tiling)["micro"])
  np.testing.assert_allclose(results[0], results[1], atol=2e-5)
  np.testing.assert_allclose(results[0].sum(-1), 1.0, atol=1e-5)


def test_classifier_region_map(tmp_path):
  """A [B, C] classifier fills the region outputs; window larger than the box is padded."""
  run_dir = make_run(
    tmp_path / "cls",
    "resnet18_xray",
    {"num_classes": 4, "width_multiplier": 0.125},
    {"task": "task1_roi_c1", "downsample": 4, "image_mean": 0.5, "image_std": 0.25},
    (1, 64, 64, 1),
  )
  run = model_lib.load_run(run_dir)
  assert run.window == (1, 64, 64)
  out = str(tmp_path / "cls.zarr")
  src = sources.make_source("phantom")
  s = blockwise.predict_volume(
    src, run, spec.Box(300, 302, 800, 1000, 3000, 3123), out, progress=False
  )
  assert s["complete"] and s["out_shape_zyx"] == [2, 50, 30]  # 123 // 4 = 30: far edge dropped
  assert set(zarr_io.array_names(out)) == {"image", "region_label", "region_prob"}
  lab = zarr_io.read_array(out, "region_label")
  assert lab.shape == (2, 50, 30) and lab.min() >= 1 and lab.max() <= 4
  prob = zarr_io.read_array(out, "region_prob").astype(int)
  assert prob.shape == (4, 2, 50, 30) and np.all(np.abs(prob.sum(0) - 255) <= 3)


# ---------------------------------------------------------------------------- blockwise
def test_predict_cli_outputs(reference, tmp_path):
  attrs = zarr_io.read_attrs(reference)
  assert attrs["window_zyx"] == [1, 32, 32] and attrs["stride_zyx"] == [1, 24, 24]
  assert attrs["source"]["generator_version"] and attrs["model"]["model_name"] == "unet"
  assert zarr_io.read_array(reference, "micro_label").shape == (3, 50, 61)
  assert zarr_io.read_array(reference, "micro_prob").shape == (3, 3, 50, 61)
  assert len(os.listdir(os.path.join(reference, "_blocks"))) == 12
  state = maps.neuroglancer_state(reference)
  assert {layer["name"] for layer in state["layers"]} == {"image", "micro_label"}
  assert state["layers"][0]["source"]["url"].startswith("zarr://http")
  png = maps.overlay_png(
    str(tmp_path / "m.png"),
    zarr_io.read_array(reference, "image")[:2],
    None,
    zarr_io.read_array(reference, "micro_label")[:2],
  )
  assert os.path.getsize(png) > 1000


def test_kill9_and_rerun_is_byte_identical(unet_run, reference, tmp_path):
  out = str(tmp_path / "killed.zarr")
  args = ["--run", unet_run, "--box", BOX, "--out", out, "--block", BLOCK]
  proc = _cli(args, {"MTNEURO_DEPLOY_TEST_DELAY": "0.5"})
  markers = os.path.join(out, "_blocks")
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(markers) and len([f for f in os.listdir(markers) if f.endswith(".json")]) >= 1:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[1][-2000:]
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  done = len([f for f in os.listdir(markers) if f.endswith(".json")])
  assert 1 <= done < 12
  proc = _cli(args)
  stdout, stderr = proc.communicate(timeout=180)
  assert proc.returncode == 0, stderr[-2000:]
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary["skipped"] >= done and summary["complete"]
  assert_same_bytes(out, reference)


def test_two_processes_write_the_same_zarr(unet_run, reference, tmp_path):
  out = str(tmp_path / "two.zarr")
  args = ["--run", unet_run, "--box", BOX, "--out", out, "--block", BLOCK]
  procs = [_cli(args + ["--process", f"{i}/2"]) for i in range(2)]
  results = [p.communicate(timeout=180) for p in procs]
  for p, (_, err) in zip(procs, results, strict=True):
    assert p.returncode == 0, err[-2000:]
  parts = [json.loads(o.strip().splitlines()[-1]) for o, _ in results]
  assert sorted(p["my_blocks"] for p in parts) == [6, 6]
  assert_same_bytes(out, reference)


# ---------------------------------------------------------------------------- clean-up
def test_knn_cleanup_known_answer():
  truth = np.zeros((6, 30, 40), np.int64)
  truth[:, :, 20:] = 1
  truth[:, 20:, :10] = 2
  noisy = truth.copy()
  noisy[1, 3:5, 3:5] = 3  # region 3's largest component: kept (it is its own seed)
  noisy[3, 8, 8] = 3  # islands of a wrong region: relabelled from their neighbours
  noisy[4, 10:12, 30:33] = 0
  noisy[2, 25:27, 2:4] = 1
  noisy[0, 0, 39] = 2
  clean = cleanup.knn_cleanup(
    noisy, keep=1, k=3, spacing=(2.0, 1.0, 1.0), max_seeds=3000, min_seeds_per_region=200
  )
  expected = truth.copy()
  expected[1, 3:5, 3:5] = 3
  np.testing.assert_array_equal(clean, expected)
  assert clean.dtype == noisy.dtype
  # Deterministic (seed subsampling included) and a no-op on a clean volume.
  again = cleanup.knn_cleanup(
    noisy, keep=1, k=3, spacing=(2.0, 1.0, 1.0), max_seeds=3000, min_seeds_per_region=200
  )
  np.testing.assert_array_equal(clean, again)
  np.testing.assert_array_equal(cleanup.knn_cleanup(truth, keep=1), truth)
  roi = np.full(truth.shape, cleanup.UNANNOTATED, np.uint8)
  roi[:, :, :30] = truth[:, :, :30]
  before, after = cleanup.region_accuracy(noisy, roi), cleanup.region_accuracy(clean, roi)
  assert after["overall"] > before["overall"] and after["ZI"] is None
  assert after["VP"] == 1.0 and before["VP"] < 1.0 and before["voxels"] == 6 * 30 * 30


def test_roi_classes_map():
  ids = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8])
  np.testing.assert_array_equal(cleanup.roi_classes(ids), [255, 0, 1, 2, 2, 3, 3, 3, 1])


# ---------------------------------------------------------------------------- bad input
def test_bad_input_is_one_user_error(unet_run, tmp_path):
  from experiments import predict

  base = ["--run", unet_run, "--out", str(tmp_path / "x.zarr"), "--no_progress"]
  with pytest.raises(UserError, match="must lie in"):
    predict.run(base + ["--box", "200:100,0:64,0:64"])
  with pytest.raises(UserError, match="three ranges"):
    predict.run(base + ["--box", "200:201,0:64"])
  with pytest.raises(UserError, match="smaller than the downsampling"):
    predict.run(base + ["--box", "200:201,0:1,0:64"])
  with pytest.raises(UserError, match="stride"):
    predict.run(base + ["--box", "200:201,0:64,0:64", "--window", "16,16", "--stride", "24,24"])
  os.makedirs(tmp_path / "empty")
  with pytest.raises(UserError, match="not a trained run"):
    predict.run(
      [
        "--run",
        str(tmp_path / "empty"),
        "--box",
        "200:201,0:64,0:64",
        "--out",
        str(tmp_path / "y.zarr"),
      ]
    )
  os.makedirs(tmp_path / "nockpt" / "checkpoints")
  with open(tmp_path / "nockpt" / "config.json", "w") as f:
    json.dump({"model_name": "unet", "model": {"num_classes": 3, "dims": 2}, "data": {}}, f)
  with pytest.raises(UserError, match="no verified checkpoint"):
    predict.run(
      [
        "--run",
        str(tmp_path / "nockpt"),
        "--box",
        "200:201,0:64,0:64",
        "--out",
        str(tmp_path / "y.zarr"),
      ]
    )
  predict.run(base + ["--box", "200:201,0:64,0:64"])
  with pytest.raises(blockwise.PredictionExistsError, match="another plan"):
    predict.run(base + ["--box", "200:201,0:64,0:64", "--stride", "8,8"])
  with pytest.raises(UserError, match="i/n"):
    predict.run(base + ["--box", "200:201,0:64,0:64", "--process", "2"])
  status = predict.main(base + ["--box", "nonsense"])
  assert status == 2


def test_predict_help_documents_outputs(capsys):
  from experiments import predict

  assert predict.main(["--help"]) == 0
  text = capsys.readouterr().out
  assert "--box" in text and "zarr" in text and "--process" in text and "Neuroglancer" in text


def test_pixel_and_region_outputs_together():
  """A Double-U-Net-like output dict (pixel logits + region logits + extras) fills both maps."""

  def apply_fn(variables, x):  # x [B, Y, X, 1]
    b = x.shape[0]
    logits = jnp.concatenate([x, -x, jnp.zeros_like(x)], axis=-1)
    region = jnp.tile(jnp.array([[0.0, 3.0, 0.0, 0.0]]), (b, 1))
    return {"logits": logits, "region_logits": region, "reconstruction": x}

  pred = sw.WindowPredictor(apply_fn, {}, dims=2, batch=3)
  assert pred.batch == 8  # rounded up to the 8 devices
  vol = np.random.default_rng(2).normal(size=(2, 20, 27)).astype(np.float32)
  out = sw.blend(vol, pred, sw.Tiling((1, 16, 16), (1, 8, 8)))
  assert out["micro"].shape == (2, 20, 27, 3) and out["region"].shape == (2, 20, 27, 4)
  np.testing.assert_array_equal(out["micro"].argmax(-1), np.where(vol > 0, 0, 1))
  np.testing.assert_allclose(out["region"][..., 1], np.exp(3) / (np.exp(3) + 3), rtol=1e-5)


def test_3d_model_odd_box(tmp_path):
  """A 3D U-Net: z windows, z margins, a last block thinner than the window (edge-padded)."""
  run_dir = make_run(
    tmp_path / "u3",
    "unet",
    {"num_classes": 3, "dims": 3, "width_multiplier": 0.125, "n_blocks": 2},
    {"task": "task2_3d_3class", "downsample": 2, "random_crop": 16},
    (1, 8, 16, 16, 1),
  )
  run = model_lib.load_run(run_dir)
  assert run.dims == 3 and run.window == (8, 16, 16)
  out = str(tmp_path / "u3.zarr")
  src = sources.make_source("phantom")
  s = blockwise.predict_volume(
    src, run, spec.Box(200, 210, 600, 640, 1500, 1531), out, block=(8, 12, 8), progress=False
  )
  assert s["complete"] and s["out_shape_zyx"] == [10, 20, 15] and s["blocks"] == 2 * 2 * 2
  assert zarr_io.read_attrs(out)["margin_zyx"] == [4, 8, 8]
  prob = zarr_io.read_array(out, "micro_prob").astype(int)
  assert prob.shape == (3, 10, 20, 15) and np.all(np.abs(prob.sum(0) - 255) <= 3)


def test_neuroglancer_state_keeps_dimension_order(reference, tmp_path):
  path = str(tmp_path / "ng.json")
  maps.write_neuroglancer_state(reference, path, url="http://localhost:9000/")
  with open(path) as f:
    state = json.load(f)
  assert list(state["dimensions"]) == ["x", "y", "z"]
  src = state["layers"][0]["source"]
  assert list(src["transform"]["outputDimensions"]) == ["z", "y", "x"]  # the zarr's axis order
  assert src["url"] == "zarr://http://localhost:9000/image"
