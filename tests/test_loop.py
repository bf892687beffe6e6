"""The training loop end to end on the tiny exported dataset (conftest ``tiny_data_dir``):
workdir files, SIGKILL + resume bitwise, NaN guard, the CLI with config overrides.

The loop runs in subprocesses (``python tests/test_loop.py --worker ...``) so it
can be killed with SIGKILL; they share one persistent compilation cache, so
only the first compiles the tiny ResNet.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


class SlowData:
  """The real pipeline, with a pause before each training batch so a kill lands mid-run."""

  def __init__(self, sleep=0.0):
    from mtneuro_jax.data import pipeline

    self._p, self.sleep = pipeline, sleep
    self.dataset_info, self.eval_batches = pipeline.dataset_info, pipeline.eval_batches

  def train_iterator(self, data_cfg, **kw):
    it, sleep = self._p.train_iterator(data_cfg, **kw), self.sleep

    class Slow:
      steps_per_epoch = it.steps_per_epoch
      get_state, set_state = it.get_state, it.set_state

      def __iter__(self):
        return self

      def __next__(self):
        time.sleep(sleep)
        return next(it)

    return Slow()


def tiny_config(data_dir, total_steps, cache_dir, ckpt_every=2):
  from configs.task1_supervised import get_config

  c = get_config("tiny")
  c.data.data_dir = data_dir
  c.total_steps = total_steps
  c.checkpoint_every_steps = ckpt_every
  c.keep_checkpoints = 2
  c.compilation_cache_dir = cache_dir
  c.log_every_steps = 1
  return c


def _worker(data_dir, workdir, total_steps, sleep, cache_dir):
  from mtneuro_jax.train import loop

  res = loop.train_and_evaluate(
    tiny_config(data_dir, total_steps, cache_dir), workdir, data=SlowData(sleep)
  )
  print("RESULTS", json.dumps(res))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spawn(data_dir, workdir, total_steps, cache_dir, sleep=0.0):
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  return subprocess.Popen(
    [
      sys.executable,
      os.path.abspath(__file__),
      "--worker",
      data_dir,
      workdir,
      str(total_steps),
      str(sleep),
      cache_dir,
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def _saved_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _final_state(workdir):
  """The latest checkpoint's train state as host numpy leaves (path, array)."""
  import jax

  from mtneuro_jax.train.checkpoint import Checkpointer

  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ck.latest_step()
  leaves = jax.tree_util.tree_leaves_with_path(ck.read_state(step))
  return step, [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in leaves]


@pytest.fixture(scope="module")
def loop_cache(tmp_path_factory):
  """One persistent compilation cache for all loop subprocesses of this module."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path_factory, tiny_data_dir, loop_cache):
  tmp = tmp_path_factory.mktemp("loop")
  cache = loop_cache
  total = 10
  ref_dir, kill_dir = str(tmp / "uninterrupted"), str(tmp / "killed")

  out = _finish(_spawn(tiny_data_dir, ref_dir, total, cache))
  # Workdir contract.
  for name in ("config.json", "metrics.jsonl", "results.json"):
    assert os.path.exists(os.path.join(ref_dir, name)), (name, out[-2000:])
  results = json.load(open(os.path.join(ref_dir, "results.json")))
  assert results["step"] == total and 0.0 <= results["test_whole/accuracy"] <= 1.0
  lines = [json.loads(x) for x in open(os.path.join(ref_dir, "metrics.jsonl"))]
  train_steps = [x["step"] for x in lines if "train/loss" in x]
  assert train_steps == list(range(1, total + 1))
  assert all(np.isfinite(x["train/loss"]) and "train/lr" in x for x in lines if "train/loss" in x)
  assert json.load(open(os.path.join(ref_dir, "config.json")))["model_name"] == "resnet18_xray"
  assert _saved_steps(ref_dir) == [total - 2, total]  # keep_checkpoints = 2

  # Kill at a random point after the first checkpoint, while training is still going.
  rng = np.random.default_rng(int(time.time()))
  kill_after = int(rng.choice([2, 4, 6]))
  proc = _spawn(tiny_data_dir, kill_dir, total, cache, sleep=0.15)
  deadline = time.time() + 240
  while not any(s >= kill_after for s in _saved_steps(kill_dir)):
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  time.sleep(float(rng.uniform(0.0, 0.3)))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(_saved_steps(kill_dir))
  assert killed_at < total, "the run finished before the kill; slow it down"

  _finish(_spawn(tiny_data_dir, kill_dir, total, cache))
  step_a, ref_leaves = _final_state(ref_dir)
  step_b, res_leaves = _final_state(kill_dir)
  assert step_a == step_b == total
  assert len(ref_leaves) == len(res_leaves)
  assert any("params" in p for p, _ in ref_leaves) and any("opt_state" in p for p, _ in ref_leaves)
  for (pa, a), (pb, b) in zip(ref_leaves, res_leaves, strict=True):
    assert pa == pb
    np.testing.assert_array_equal(a, b, err_msg=pa)  # bitwise: same data order, same RNG, same math
  # The resumed run re-logged the steps after its checkpoint exactly once.
  lines = [json.loads(x) for x in open(os.path.join(kill_dir, "metrics.jsonl"))]
  assert [x["step"] for x in lines if "train/loss" in x] == list(range(1, total + 1))
  assert json.load(open(os.path.join(kill_dir, "results.json"))) == results


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, tiny_data_dir):
  import jax.numpy as jnp

  from mtneuro_jax.models import MODELS, resnet
  from mtneuro_jax.objectives import OBJECTIVES, supervised
  from mtneuro_jax.objectives.base import Objective
  from mtneuro_jax.train import loop
  from mtneuro_jax.train.metrics import NonFiniteLossError

  bad_from = 5  # the 6th update (steps done = 6) sees a NaN loss

  def loss(params, model_state, aux, batch, rng, *, ctx, model, config):
    value, (metrics, new_state, aux) = supervised.loss(
      params, model_state, aux, batch, rng, model=model, config=config
    )
    value = jnp.where(aux["updates"] >= bad_from, jnp.nan, value)
    return value, ({**metrics, "train/loss": value}, new_state, aux)

  poisoned = Objective(
    name="poisoned",
    init=lambda rng, **kw: ({}, {"updates": jnp.int32(0)}),
    loss=loss,
    update=lambda aux, p, *, ctx, config: {"updates": aux["updates"] + 1},
    predict=supervised.predict,
  )
  monkeypatch.setitem(OBJECTIVES, "poisoned", poisoned)
  monkeypatch.setitem(
    MODELS, "small_xray", functools.partial(resnet.ResNetXray, stage_sizes=(1, 1))
  )
  c = tiny_config(
    tiny_data_dir, 12, "", ckpt_every=2
  )  # no cache: keep the session's jax config untouched
  c.objective_name, c.model_name = "poisoned", "small_xray"
  workdir = str(tmp_path / "w")
  with pytest.raises(NonFiniteLossError, match=r"non-finite training values at step 6.*step 4 in"):
    loop.train_and_evaluate(c, workdir)
  # The NaN state (steps 6+) was never saved; the good ones are intact and restorable.
  assert _saved_steps(workdir) == [2, 4]
  step, leaves = _final_state(workdir)
  assert step == 4 and all(np.all(np.isfinite(a)) for _, a in leaves if a.dtype.kind == "f")
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert "non-finite" in lines[-1]["error"] and lines[-1]["step"] == 6
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_cli_with_config_overrides(tmp_path, tiny_data_dir, loop_cache):
  """``python -m mtneuro_jax.train.loop --config FILE:tiny --config.x=y --workdir W``."""
  # A RELATIVE workdir with a checkpoint save: Orbax itself refuses relative paths.
  workdir = str(tmp_path / "cli")
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
  )
  cmd = [
    sys.executable,
    "-m",
    "mtneuro_jax.train.loop",
    "--config",
    os.path.join(ROOT, "configs", "task1_supervised.py") + ":tiny",
    f"--config.data.data_dir={tiny_data_dir}",
    "--config.total_steps=3",
    "--config.optim.learning_rate=0.01",
    "--config.evals.val_whole.every_steps=2",
    f"--config.compilation_cache_dir={loop_cache}",
    "--config.checkpoint_every_steps=2",
    "--workdir=cli",
  ]
  proc = subprocess.run(
    cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["total_steps"] == 3 and cfg["optim"]["learning_rate"] == 0.01
  assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 3
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [x["train/lr"] for x in lines if "train/lr" in x][0] == pytest.approx(0.01)
  # Periodic eval at step 2, final evals at step 3.
  assert [x["step"] for x in lines if "val_whole/accuracy" in x] == [2, 3]
  assert [x["step"] for x in lines if "test_whole/accuracy" in x] == [3]
  # A typo in an override fails loudly (the config is locked).
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  bad = subprocess.run(
    cmd[:-1] + ["--config.optim.learnin_rate=1", f"--workdir={workdir}2"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode != 0 and "learnin_rate" in bad.stderr


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
  _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6])


def test_step_compiles_once_and_the_heap_is_trimmed_before_it_runs(
  tmp_path, monkeypatch, caplog, tiny_data_dir
):
  """The loop compiles the step ahead of its first call (to trim the compiler's freed memory
  before the step's temporaries exist); the call must reuse that executable, not compile again."""
  import logging

  import jax

  from mtneuro_jax import host_malloc
  from mtneuro_jax.models import MODELS, resnet
  from mtneuro_jax.train import loop

  trims = []
  monkeypatch.setattr(host_malloc, "release_free_memory", lambda: trims.append(1) or True)
  monkeypatch.setitem(
    MODELS, "small_xray", functools.partial(resnet.ResNetXray, stage_sizes=(1, 1))
  )
  c = tiny_config(tiny_data_dir, 2, "", ckpt_every=0)  # no cache: a real compile
  c.model_name = "small_xray"
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    loop.train_and_evaluate(c, str(tmp_path / "w"))
  compiles = [
    r.getMessage() for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()
  ]
  assert len(compiles) == 1, compiles
  assert trims == [1]
