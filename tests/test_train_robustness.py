"""Nothing silently wrong in training (issue 8): verified checkpoints, locked workdirs, config
checks on resume, and one-line errors for every bad input of `mtneuro train` / `mtneuro task1`.

Runs the real loop on the tiny exported dataset (conftest ``tiny_data_dir``) with the small
ResNet the other loop tests use.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mtneuro_jax import dirlock
from mtneuro_jax.train import checkpoint, loop
from mtneuro_jax.train.metrics import NonFiniteLossError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "task1_supervised.py")


def _config(data_dir, total_steps=4, **overrides):
  from configs.task1_supervised import get_config

  c = get_config("tiny")
  c.data.data_dir = data_dir
  c.total_steps = total_steps
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 3
  c.log_every_steps = 1
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _state(workdir, step=None):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  return jax.tree.map(np.asarray, ckpt.read_state(step))


def _tree_hashes(*folders) -> dict[str, str]:
  out = {}
  for folder in folders:
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
      if os.path.isfile(path):
        with open(path, "rb") as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def _flip_bytes(step_dir: str) -> str:
  """Flips two bytes in the middle of the largest array file of a saved state."""
  files = [
    p
    for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
    if os.path.isfile(p) and "/d/" in p
  ]
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    data[mid] ^= 0xFF
    data[mid + 1] ^= 0x5A
    f.seek(0)
    f.write(data)
  return target


@pytest.fixture(scope="module")
def finished_run(tiny_data_dir, tmp_path_factory):
  """A complete 4-step run (checkpoints 2 and 4) that the tests copy, never modify."""
  workdir = str(tmp_path_factory.mktemp("runs") / "base")
  results = loop.train_and_evaluate(_config(tiny_data_dir), workdir)
  return workdir, results


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_verified_one(
  finished_run, tmp_path, tiny_data_dir
):
  base, results = finished_run
  work = str(tmp_path / "w")
  shutil.copytree(base, work)
  os.remove(os.path.join(work, "results.json"))
  _flip_bytes(os.path.join(work, "checkpoints", "4"))
  got = loop.train_and_evaluate(_config(tiny_data_dir), work)
  # It resumed from step 2, redid steps 3-4 and ended bitwise where the clean run ended.
  assert got == results
  jax.tree.map(np.testing.assert_array_equal, _state(work), _state(base))
  moved = glob.glob(os.path.join(work, "corrupt_checkpoints", "4-*"))
  assert len(moved) == 1
  assert open(os.path.join(moved[0], "REASON.txt")).read().strip()  # why, for the user

  # Arrays that decode but differ from what was saved: caught by the recorded SHA-256.
  tampered = str(tmp_path / "tampered")
  shutil.copytree(base, tampered)
  os.remove(os.path.join(tampered, "results.json"))
  meta_path = os.path.join(tampered, "checkpoints", "4", "meta", "metadata")
  meta = json.load(open(meta_path))
  meta["state_sha256"] = "0" * 64
  json.dump(meta, open(meta_path, "w"))
  assert loop.train_and_evaluate(_config(tiny_data_dir), tampered) == results
  (moved,) = glob.glob(os.path.join(tampered, "corrupt_checkpoints", "4-*"))
  assert "SHA-256" in open(os.path.join(moved, "REASON.txt")).read()

  # Every checkpoint corrupt: refused with one line, nothing moved, nothing trained.
  both = str(tmp_path / "both")
  shutil.copytree(base, both)
  os.remove(os.path.join(both, "results.json"))
  for step in (2, 4):
    _flip_bytes(os.path.join(both, "checkpoints", str(step)))
  before = _tree_hashes(both)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* could be verified") as e:
    loop.train_and_evaluate(_config(tiny_data_dir), both)
  assert "\n" not in str(e.value)
  assert _tree_hashes(both) == before


def test_a_non_finite_state_is_never_saved(tmp_path, finished_run):
  base, _ = finished_run
  state = _state(base)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
  bad = jax.tree.map(np.array, state)  # writable copies
  leaf = bad["params"]["head"]["kernel"]
  leaf[0, 0] = np.nan
  with pytest.raises(FloatingPointError, match="non-finite"):
    ckpt.save(7, bad, {})
  ckpt.close()
  assert not os.path.exists(tmp_path / "ck" / "7")


def test_second_run_in_a_workdir_fails_at_once_and_the_first_completes(tmp_path, tiny_data_dir):
  work = str(tmp_path / "w")
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  first = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "mtneuro_jax.train.loop",
      f"--config={CONFIG}:tiny",
      f"--workdir={work}",
      f"--config.data.data_dir={tiny_data_dir}",
      "--config.total_steps=40",
      "--config.checkpoint_every_steps=20",
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    deadline = time.time() + 120
    while dirlock.read_holder(work) is None:
      assert first.poll() is None, first.communicate()[0][-3000:]
      assert time.time() < deadline, "the first run never took the lock"
      time.sleep(0.05)
    t0 = time.perf_counter()
    with pytest.raises(dirlock.LockedError, match="training run") as e:
      loop.train_and_evaluate(_config(tiny_data_dir, total_steps=40), work)
    assert time.perf_counter() - t0 < 10 and "\n" not in str(e.value)
    out, _ = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, out[-3000:]
  assert os.path.exists(os.path.join(work, "results.json"))
  # Its checkpoint verifies, and the lock is gone.
  target = _state(work)
  ckpt = checkpoint.Checkpointer(os.path.join(work, "checkpoints"))
  step, _, _, meta = ckpt.restore_verified(jax.tree.map(jax.numpy.asarray, target))
  assert step == 40 and "state_sha256" in meta
  assert dirlock.read_holder(work) is None


def test_resume_with_another_config_is_refused_unless_allowed(
  finished_run, tmp_path, tiny_data_dir
):
  base, _ = finished_run
  work = str(tmp_path / "w")
  shutil.copytree(base, work)
  cfg_path = os.path.join(work, "config.json")
  before = open(cfg_path).read()
  changed = _config(tiny_data_dir, total_steps=6, **{"optim.learning_rate": 0.5})
  with pytest.raises(loop.ConfigChangedError) as e:
    loop.train_and_evaluate(changed, work)
  msg = str(e.value)
  assert "optim.learning_rate" in msg and "total_steps" in msg and "--allow_config_change" in msg
  assert open(cfg_path).read() == before  # checked before config.json is written
  # Keys that do not change the maths may differ.
  loop.train_and_evaluate(_config(tiny_data_dir, log_every_steps=2, keep_checkpoints=5), work)
  res = loop.train_and_evaluate(changed, work, allow_config_change=True)
  assert res["step"] == 6
  lines = open(os.path.join(work, "metrics.jsonl")).read()
  assert '"config_change"' in lines and "learning_rate" in lines


def test_nan_guard_never_prunes_the_last_good_checkpoint(tmp_path, tiny_data_dir, monkeypatch):
  """A diverging run with keep_checkpoints=1: the one good checkpoint survives the divergence."""
  import jax.numpy as jnp

  from mtneuro_jax.objectives import OBJECTIVES, supervised
  from mtneuro_jax.objectives.base import Objective

  def loss(params, model_state, aux, batch, rng, *, ctx, model, config):
    value, (metrics, new_state, aux) = supervised.loss(
      params, model_state, aux, batch, rng, model=model, config=config
    )
    value = value + jnp.where(ctx.step >= 3, jnp.inf, 0.0)  # finite gradients, loss inf from step 4
    return value, ({**metrics, "train/loss": value}, new_state, aux)

  monkeypatch.setitem(
    OBJECTIVES,
    "diverging",
    Objective(
      "diverging",
      init=supervised.SUPERVISED.init,
      loss=loss,
      update=supervised.SUPERVISED.update,
      predict=supervised.predict,
    ),
  )
  work = str(tmp_path / "w")
  with pytest.raises(NonFiniteLossError):
    loop.train_and_evaluate(
      _config(tiny_data_dir, total_steps=6, objective_name="diverging", keep_checkpoints=1), work
    )
  ckpt = checkpoint.Checkpointer(os.path.join(work, "checkpoints"))
  assert ckpt.all_steps() == [2]
  assert ckpt.restore_verified(jax.tree.map(jnp.asarray, _state(work)))[0] == 2


# ---------------------------------------------------------------------------------------------
# One-line errors: `mtneuro train` and `mtneuro task1`, in-process through the real dispatcher.
def _train_cases(data_dir, tmp, base):
  cfg = f"--config={CONFIG}:tiny"
  data = f"--config.data.data_dir={data_dir}"
  w = f"--workdir={tmp}/new"
  return {
    "no arguments": (["train"], "required"),
    "no workdir": (["train", cfg], "--workdir"),
    "missing config file": (["train", f"--config={tmp}/nope.py", w], "nope.py"),
    "unknown config arg": (["train", f"--config={CONFIG}:tinyy", w], "tinyy"),
    "unknown override key": (["train", cfg, "--config.optim.learnin_rate=1", w], "learnin_rate"),
    "ill-typed override": (["train", cfg, "--config.seed=abc", w], "seed"),
    "unexpected argument": (["train", cfg, w, "extra"], "unexpected"),
    "batch size 0": (["train", cfg, data, "--config.data.batch_size=0", w], "batch_size"),
    "negative eval batch": (
      ["train", cfg, data, "--config.data.eval_batch_size=-4", w],
      "eval_batch_size",
    ),
    "negative total steps": (["train", cfg, data, "--config.total_steps=-1", w], "total_steps"),
    "zero epochs": (
      ["train", cfg, data, "--config.total_steps=0", "--config.num_epochs=0", w],
      "num_epochs",
    ),
    "negative log interval": (
      ["train", cfg, data, "--config.log_every_steps=-1", w],
      "log_every_steps",
    ),
    "missing data": (["train", cfg, f"--config.data.data_dir={tmp}/no_data", w], "no_data"),
    "wrong num_classes": (["train", cfg, data, "--config.model.num_classes=3", w], "num_classes"),
    "unknown model": (["train", cfg, data, "--config.model_name=resnet50", w], "resnet50"),
    "unknown objective": (["train", cfg, data, "--config.objective_name=byol2", w], "byol2"),
    "unknown eval kind": (["train", cfg, data, "--config.evals.test_whole.kind=segm", w], "segm"),
    "batch not divisible by devices": (
      ["train", cfg, data, "--config.data.batch_size=12", w],
      "divisible",
    ),
    "unknown optimizer": (["train", cfg, data, "--config.optim.name=lamb", w], "lamb"),
    "init_from nowhere": (
      ["train", cfg, data, f"--config.init_from.workdir={tmp}/nowhere", w],
      "nowhere",
    ),
    "init_from bad subtree": (
      [
        "train",
        cfg,
        data,
        f"--config.init_from.workdir={base}",
        "--config.init_from.subtree=decoder",
        w,
      ],
      "decoder",
    ),
    "resume with another config": (
      [
        "train",
        cfg,
        data,
        "--config.total_steps=4",
        "--config.checkpoint_every_steps=2",
        "--config.optim.learning_rate=0.5",
        f"--workdir={base}",
      ],
      "learning_rate",
    ),
    "checkpoint of another model": (
      [
        "train",
        cfg,
        data,
        "--config.total_steps=4",
        "--config.model.width_multiplier=0.125",
        "--allow_config_change",
        f"--workdir={base}",
      ],
      "another model",
    ),
    "task1 unknown preset": (["task1", "--preset", "bogus"], "bogus"),
    "task1 bad seeds": (["task1", "--seeds", "1,x"], "seeds"),
    "task1 empty seeds": (["task1", "--seeds", ","], "seeds"),
    "task1 unknown method": (["task1", "--methods", "supervised,byol9"], "byol9"),
    "task1 missing data": (
      ["task1", "--data_dir", f"{tmp}/no_data", "--out", f"{tmp}/t1"],
      "no_data",
    ),
  }


def test_every_bad_train_and_task1_input_is_one_line(finished_run, tmp_path, tiny_data_dir, capfd):
  from experiments import cli

  base, _ = finished_run
  work = str(tmp_path / "base")
  shutil.copytree(base, work)
  cases = _train_cases(tiny_data_dir, str(tmp_path), work)
  assert len(cases) >= 25
  before = _tree_hashes(work, tiny_data_dir)
  failures = []
  for name, (argv, needle) in cases.items():
    rc = cli.main(argv)
    out, err = capfd.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    ok = (
      rc == 2
      and len(lines) == 1
      and lines[0].startswith("error: ")
      and needle in lines[0]
      and "Traceback" not in out + err
    )
    if not ok:
      failures.append(f"{name}: rc={rc} stderr={err[-600:]!r}")
  assert not failures, "\n".join(failures)
  assert _tree_hashes(work, tiny_data_dir) == before
  assert not os.path.exists(tmp_path / "new" / "checkpoints")


def test_locked_workdir_is_one_line(finished_run, tmp_path, tiny_data_dir, capfd):
  from experiments import cli

  work = str(tmp_path / "w")
  with dirlock.exclusive_lock(work, what="training run"):
    rc = cli.main(
      [
        "train",
        f"--config={CONFIG}:tiny",
        f"--config.data.data_dir={tiny_data_dir}",
        f"--workdir={work}",
      ]
    )
    err = capfd.readouterr().err
  lines = [x for x in err.splitlines() if x.strip()]
  assert rc == 2 and len(lines) == 1 and "in use by" in lines[0] and "Traceback" not in err


def test_train_help_lists_the_flags(capsys):
  from experiments import cli

  assert cli.main(["train", "--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--config", "--config.KEY=VALUE", "--workdir", "--allow_config_change"):
    assert flag in out
  assert cli.main(["task1", "--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--preset", "--data_dir", "--methods", "--seeds"):
    assert flag in out
