"""Every config file in configs/ (found by glob, so a new one is covered): every documented arg
builds a locked ConfigDict, and the config runs at ``:tiny`` through its real entry point on the
tiny exported dataset, then resumes once to bitwise-identical parameters and results.

A config file declares ``RUNNER`` ('loop': mtneuro_jax.train.loop.train_and_evaluate;
'baseline': mtneuro_jax.baselines.pca_nmf.fit_and_evaluate) and ``ARGS`` (its documented args).
"""

from __future__ import annotations

import ast
import glob
import importlib
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from mtneuro_jax import configlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
  if not os.path.basename(p).startswith("_")
)
RUNNERS = ("loop", "baseline")
# Wall-clock facts a baseline writes into its results; everything else must be reproducible.
TIMING_KEYS = ("baseline/embed_fit_s", "baseline/total_s")


def _module(name):
  return importlib.import_module(f"configs.{name}")


def test_configs_found():
  assert {"task1_supervised", "task1_mixup", "task1_pca_nmf"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_documented_arg_builds_a_locked_config(name):
  mod = _module(name)
  assert getattr(mod, "RUNNER", None) in RUNNERS, f"configs/{name}.py: set RUNNER, one of {RUNNERS}"
  assert getattr(mod, "ARGS", None), f"configs/{name}.py must list its documented args in ARGS"
  for arg in (None, *mod.ARGS):
    c = mod.get_config(arg)
    assert isinstance(c, ml_collections.ConfigDict) and c.is_locked, arg
    with pytest.raises(AttributeError):
      c.no_such_key = 1  # a typo in an override fails
    # Words in any order: the recipe is applied before the size.
    if arg and "," in arg:
      assert mod.get_config(",".join(reversed(arg.split(",")))) == c, arg
  with pytest.raises(ValueError, match="known: recipes"):
    mod.get_config("no_such_variant")
  with pytest.raises(ValueError, match="more than one size"):
    mod.get_config("quick,tiny")
  doc = mod.__doc__ or ""
  for needed in ("Run:", "quick", "paper", "configlib"):
    assert needed in doc, f"configs/{name}.py's docstring lacks {needed!r}"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_imports_only_configlib(name):
  tree = ast.parse(open(os.path.join(ROOT, "configs", f"{name}.py")).read())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported |= {
        f"{node.module}.{a.name}" if node.module == "mtneuro_jax" else node.module
        for a in node.names
      }
  assert imported <= {"__future__", "ml_collections", "mtneuro_jax.configlib"}, imported


def test_quick_is_the_task1_tables_quick():
  """`quick` means one thing: what the Task 1 quick tables have always run (pinned here)."""
  c = _module("task1_supervised").get_config("quick")
  assert (
    c.data.downsample,
    c.model.width_multiplier,
    c.total_steps,
    c.data.batch_size,
    c.data.eval_batch_size,
    c.log_every_steps,
    c.checkpoint_every_steps,
  ) == (4, 0.125, 96, 32, 128, 8, 0)
  assert c.optim.weight_decay == 5e-4  # the paper's 0.3, capped
  assert _module("task1_pca_nmf").get_config("nmf,quick").baseline.nmf_max_iter == 50
  from experiments import task1_tables

  assert task1_tables.PRESETS["quick"].config_arg == "quick"
  quick = task1_tables.PRESETS["quick"]
  assert quick.overrides == quick.baseline_overrides == ()


def test_parse_arg():
  a = configlib.parse_arg("tiny,ref")
  assert (a.recipe, a.size, a.method) == ("ref", configlib.TINY, None)
  a = configlib.parse_arg(None, methods=("pca", "nmf"))
  assert (a.recipe, a.size, a.method) == ("paper", None, "pca")
  known = r"\['bogus'\].*recipes paper, ref; sizes quick, tiny; methods pca, nmf"
  with pytest.raises(ValueError, match=known):
    configlib.parse_arg("quick,bogus", methods=("pca", "nmf"))
  with pytest.raises(ValueError, match="more than one recipe"):
    configlib.parse_arg("paper,ref")


@pytest.mark.parametrize("arg", [None, *_module("task1_supervised").ARGS])
def test_task1_configs_agree(arg):
  """Mixup = supervised but the objective; PCA/NMF see the networks' data and are scored alike."""
  sup = _module("task1_supervised").get_config(arg).to_dict()
  mix = _module("task1_mixup").get_config(arg).to_dict()
  assert {k: v for k, v in mix.items() if not k.startswith("objective")} == {
    k: v for k, v in sup.items() if not k.startswith("objective")
  }
  base = _module("task1_pca_nmf").get_config(arg).to_dict()
  assert base["data"] == sup["data"] and base["seed"] == sup["seed"]
  assert base["evals"] == {
    n: {k: v for k, v in e.items() if k != "every_steps"} for n, e in sup["evals"].items()
  }


# ---------------------------------------------------------------------------
# Every config at :tiny, through its real entry point, then resumed once.
def _final_state(workdir):
  import jax

  from mtneuro_jax.train.checkpoint import Checkpointer

  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  leaves = jax.tree_util.tree_leaves_with_path(ck.read_state(step))
  ck.close()
  return step, [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in leaves]


def _train_steps_logged(workdir):
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  return [x["step"] for x in lines if "train/loss" in x]


def _run_loop_and_resume(c, workdir):
  from mtneuro_jax.train import loop

  c.checkpoint_every_steps = 1
  c.keep_checkpoints = 0  # keep all
  total = int(c.total_steps)
  assert total >= 2, "a :tiny loop config must run at least 2 steps (to resume from the first)"
  res = loop.train_and_evaluate(c, workdir)
  assert res["step"] == total
  step, ref_leaves = _final_state(workdir)
  assert step == total and any("params" in p for p, _ in ref_leaves)
  ref_results = open(os.path.join(workdir, "results.json")).read()
  assert _train_steps_logged(workdir) == list(range(1, total + 1))

  # A kill after checkpoint total-1: the last checkpoint and results.json never got written.
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(total)))
  os.remove(os.path.join(workdir, "results.json"))
  res2 = loop.train_and_evaluate(c, workdir)
  # Resumed at total-1: metrics after it were dropped and re-logged once (a fresh start
  # would have logged every step a second time).
  assert _train_steps_logged(workdir) == list(range(1, total + 1))
  step2, leaves = _final_state(workdir)
  assert step2 == total
  for (pa, a), (pb, b) in zip(ref_leaves, leaves, strict=True):
    assert pa == pb
    np.testing.assert_array_equal(a, b, err_msg=pa)
  assert open(os.path.join(workdir, "results.json")).read() == ref_results
  assert res2 == res


def _run_baseline_twice(c, workdir):
  from mtneuro_jax.baselines import pca_nmf

  def results():
    d = json.load(open(os.path.join(workdir, "results.json")))
    return {k: v for k, v in d.items() if k not in TIMING_KEYS}

  pca_nmf.fit_and_evaluate(c, workdir)
  first = results()
  assert 0.0 <= first["test_whole/accuracy"] <= 1.0
  pca_nmf.fit_and_evaluate(c, workdir)
  assert results() == first


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_tiny_runs_and_resumes(name, tiny_data_dir, tmp_path):
  mod = _module(name)
  c = mod.get_config("tiny")
  c.data.data_dir = tiny_data_dir
  if mod.RUNNER == "loop":
    _run_loop_and_resume(c, str(tmp_path / "w"))
  else:
    _run_baseline_twice(c, str(tmp_path / "w"))
