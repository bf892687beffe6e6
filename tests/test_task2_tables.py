"""Task 2 driver on the tiny fixture: runs the grid and seeds, writes Table 2 + overlays, resumes
without retraining; grid selection and diverged runs."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from experiments import task2_tables
from mtneuro_jax.train import loop
from mtneuro_jax.train.metrics import NonFiniteLossError


def test_tiny_preset_writes_tables_overlays_and_resumes(tiny_data_dir, tmp_path, monkeypatch):
  out = str(tmp_path / "t2")
  runs = str(tmp_path / "runs")
  argv = ["--preset", "tiny", "--data_dir", tiny_data_dir, "--out", out, "--runs", runs]
  assert task2_tables.main(argv) == 0
  table = json.load(open(os.path.join(out, "table2.json")))
  md = open(os.path.join(out, "table2.md")).read()
  assert "SYNTHETIC" in md and "Majority class (2D test" in md and "Majority class (3D test" in md
  assert "0.87 ± 0.012" in md  # the paper's 2D U-Net 3-class F1 beside ours
  assert "## Grid" in md  # two lr points
  rows = {r["model"]: r for r in table["rows"]}
  assert set(rows) == {"unet2d", "unet3d"}
  for r in rows.values():
    cell = r["cells"]["3class"]["ours"]
    assert cell["lr"] in (0.01, 0.001) and cell["batch"] == 8
    assert 0.0 <= cell["iou_fg"]["mean"] <= 1.0 and cell["seeds_done"] == [1]
    assert set(cell["grid_val"]) == {"lr0.01-b8", "lr0.001-b8"}
    assert list(cell["per_class"]["iou_dataset"]) == ["other", "vessel", "cell"]
  for m in table["majority"]:
    assert m["metrics"]["iou_fg"] == 0.0  # the majority class is the background ('other')
  for name in table["overlays"].values():
    assert os.path.getsize(os.path.join(out, name)) > 1000
  assert set(table["overlays"]) == {"unet2d 3class", "unet3d 3class"}

  # Rerun: everything is cached, nothing trains, the numbers are the same.
  calls = []
  real = loop.train_and_evaluate
  monkeypatch.setattr(loop, "train_and_evaluate", lambda *a, **k: calls.append(a) or real(*a, **k))
  assert task2_tables.main(argv) == 0
  assert calls == []
  again = json.load(open(os.path.join(out, "table2.json")))
  assert again["rows"] == table["rows"] and again["majority"] == table["majority"]
  assert open(os.path.join(out, "table2.md")).read().count("| model | other | vessel | cell |") == 1

  # An interrupted run (no results.json) trains again, alone.
  wd = os.path.join(runs, "unet2d", "3class", "lr0.01-b8", "seed1")
  os.remove(os.path.join(wd, "results.json"))
  shutil.rmtree(os.path.join(wd, "checkpoints"))
  assert task2_tables.main(argv) == 0
  assert len(calls) == 1 and calls[0][1] == wd
  again = json.load(open(os.path.join(out, "table2.json")))
  assert again["rows"] == table["rows"]


def test_select_point_best_val_ties_first_and_skips_failures():
  runs = [task2_tables.Run("unet2d", "3class", lr, 8, 1) for lr in (0.1, 0.01, 0.001)]
  key = task2_tables.SELECT_METRIC
  results = {runs[0]: {"failed": "diverged"}, runs[1]: {key: 0.5}, runs[2]: {key: 0.5}}
  point, scores = task2_tables.select_point(results, runs)
  assert point == (0.01, 8) and scores[(0.1, 8)] is None
  assert task2_tables.select_point({runs[0]: {"failed": "x"}}, runs[:1])[0] is None


def test_diverged_run_is_recorded_and_not_retried(tmp_path, monkeypatch):
  def diverge(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    raise NonFiniteLossError("train/loss is nan at step 3")

  monkeypatch.setattr(loop, "train_and_evaluate", diverge)
  preset = task2_tables.PRESETS["tiny"]
  run = task2_tables.Run("unet2d", "3class", 0.1, 8, 1)
  res = task2_tables.execute(run, preset, "unused", str(tmp_path))
  assert res["failed"].startswith("diverged")
  monkeypatch.setattr(loop, "train_and_evaluate", lambda *a: pytest.fail("retried"))
  assert task2_tables.execute(run, preset, "unused", str(tmp_path)) == res


def test_paper_preset_plans_the_full_grid(capsys):
  p = task2_tables.PRESETS["paper"]
  assert len(p.grid) == 25 and p.seeds == (1, 100, 350, 631, 872)
  assert set(p.models) == set(task2_tables.MODELS) and p.settings == ("3class", "4class")
  assert task2_tables.main(["--preset", "paper", "--models", "unet3d", "--dry_run"]) == 0
  text = capsys.readouterr().out
  assert text.count("unet3d 3class lr") == 25 and "lr 0.1 batch 2 seed 1" in text
  assert os.path.join("out", "task2_runs", "phantom-seed0", "full", "unet3d") in text


def test_config_arg_words_and_task2_quick_size():
  from mtneuro_jax import configlib

  a = configlib.parse_arg(
    "4class,quick,unet3d",
    methods=("unet2d", "unet3d"),
    settings=("3class", "4class"),
    sizes=configlib.TASK2_SIZES,
  )
  assert (a.recipe, a.size, a.method, a.setting) == (
    "paper",
    configlib.TASK2_QUICK,
    "unet3d",
    "4class",
  )
  with pytest.raises(ValueError, match="settings 3class, 4class"):
    configlib.parse_arg("5class", settings=("3class", "4class"))
  with pytest.raises(ValueError, match="more than one setting"):
    configlib.parse_arg("3class,4class", settings=("3class", "4class"))
  from configs import task2_segmentation

  c = task2_segmentation.get_config("unet3d,4class,quick")
  assert (c.data.task, c.model.dims, c.model.num_classes) == ("task2_3d_4class", 3, 4)
  assert (c.total_steps, c.data.batch_size, c.model.width_multiplier) == (
    configlib.TASK2_QUICK_STEPS,
    8,
    0.25,
  )
  ref = task2_segmentation.get_config("unet3d,ref")
  assert (ref.optim.name, ref.data.batch_size, ref.objective.augment.flip) == ("sgd", 1, False)
