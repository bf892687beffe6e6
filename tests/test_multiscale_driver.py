"""The ICIP driver end to end at ``tiny`` (Double U-Net step 1 -> step 2 on the real loop): both
tables written, step 2's class branch bitwise equal to step 1's, a rerun skips finished runs."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from configs import icip_multiscale
from experiments import icip_tables


def _state(workdir):
  from mtneuro_jax.train.checkpoint import Checkpointer

  ck = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    return jax.tree.map(np.asarray, ck.read_state())
  finally:
    ck.close()


def _leaves(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_config_words():
  c = icip_multiscale.get_config("double_unet,step2,quick")
  assert c.optim.freeze == ("^class_branch/",) and c.model.freeze_class_branch
  assert c.init_from.subtree == "class_branch" and c.data.task == "task2_2d_4class"
  assert icip_multiscale.get_config("tiny").objective_name == "region_recon"
  assert icip_multiscale.get_config("unet,tiny").model_name == "res_unet"
  with pytest.raises(ValueError, match="step"):
    icip_multiscale.get_config("unet,step1")
  with pytest.raises(ValueError, match="step"):
    icip_multiscale.get_config("double_unet,joint")


def test_tiny_driver_end_to_end(tiny_data_dir, tmp_path, capsys):
  out, runs = str(tmp_path / "tables"), str(tmp_path / "runs")
  argv = ["--preset", "tiny", "--data_dir", tiny_data_dir, "--out", out, "--runs", runs]
  argv += ["--models", "double_unet"]
  assert icip_tables.main(argv) == 0
  for name in ("icip_micro.md", "icip_macro.md", "icip_tables.json", "overlay_double_unet.png"):
    assert os.path.exists(os.path.join(out, name)), name
  t = json.load(open(os.path.join(out, "icip_tables.json")))
  step1 = os.path.join(runs, "double_unet", "seed1", "step1")
  step2 = os.path.join(runs, "double_unet", "seed1", "step2")
  assert t["final_runs"] == {"double_unet": {"1": step2}}
  assert t["synthetic"] and not t["comparable_to_paper"]
  row = t["rows"][0]
  assert row["ours"]["micro"]["avg"]["n"] == 1 and row["ours"]["macro"]["avg"]["n"] == 1
  assert row["step1_equals_step2"]  # the frozen branch predicts the regions as in step 1
  micro = open(os.path.join(out, "icip_micro.md")).read()
  assert "SYNTHETIC" in micro and "0.75" in micro  # ours beside the paper's avg
  assert "0.92" in open(os.path.join(out, "icip_macro.md")).read()

  # Step 2 ran real train steps; its class branch (params and BatchNorm stats) is step 1's, bit
  # for bit, while the U-Net branch moved.
  s1, s2 = _state(step1), _state(step2)
  assert int(s2["step"]) == 2
  for coll, key in (("params", "params"), ("batch_stats", "model_state")):
    a = _leaves(s1[key] if coll == "params" else s1[key][coll])
    b = _leaves(s2[key] if coll == "params" else s2[key][coll])
    branch = [k for k in a if k.startswith("['class_branch']")]
    assert branch
    for k in branch:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  u1, u2 = _leaves(s1["params"]["decoder"]), _leaves(s2["params"]["decoder"])
  assert any(not np.array_equal(u1[k], u2[k]) for k in u1)
  cfg2 = json.load(open(os.path.join(step2, "config.json")))
  assert cfg2["init_from"]["workdir"] == step1

  # Resumable: a rerun skips both finished runs and writes the same tables.
  before = open(os.path.join(out, "icip_micro.md")).read()
  capsys.readouterr()
  assert icip_tables.main(argv) == 0
  log = capsys.readouterr().out
  assert log.count(": cached;") == 2
  assert (
    open(os.path.join(out, "icip_micro.md")).read().split("Made on")[0]
    == before.split("Made on")[0]
  )
