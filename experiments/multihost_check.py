"""Local multi-host check: 2 processes x 4 CPU devices on 127.0.0.1 vs 1 process x 8 devices.

Each worker process joins via ``jax.distributed.initialize`` (through the
loop's MTNEURO_COORDINATOR / MTNEURO_NUM_PROCESSES / MTNEURO_PROCESS_ID
environment path), builds the global ('data',) mesh over all 8 devices, feeds
*its own half* of every global batch (``sharding.shard_batch`` assembles the
global array), runs a few sharded train steps of a small ResNet xray, then
saves and restores an Orbax checkpoint holding per-process data-iterator
states. The launcher checks that:

* both processes report the same losses and bitwise-identical parameters;
* they match a single-process 8-device run of the same global batches (float
  tolerance: the reduction order across processes may differ);
* each process gets its own data state back from the shared checkpoint.

Run: ``python experiments/multihost_check.py`` (about a minute on 2 CPU cores);
exits 0 on success and prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, SIZE, STEPS = 16, 16, 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker(ckpt_dir: str) -> dict:
  """One process: distributed init (if env asks), sharded steps, checkpoint round trip."""
  import functools

  from mtneuro_jax.train import loop

  loop.maybe_initialize_distributed()  # MTNEURO_* env -> jax.distributed.initialize
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from mtneuro_jax.models import resnet
  from mtneuro_jax.objectives import OBJECTIVES
  from mtneuro_jax import sharding
  from mtneuro_jax.train import checkpoint, optim
  from mtneuro_jax.train import step as step_lib
  from mtneuro_jax.train.state import create_train_state

  mesh = sharding.make_mesh()
  pid, nproc = jax.process_index(), jax.process_count()
  model = functools.partial(resnet.ResNetXray, stage_sizes=(1, 1))(
    num_classes=4, width_multiplier=1 / 16, dropout=0.1
  )
  objective = OBJECTIVES["supervised"]
  obj_cfg = ml_collections.ConfigDict({"label_smoothing": 0.0})
  tx, _ = optim.make_optimizer(
    ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.05}),
    steps_per_epoch=10,
    total_steps=10,
    batch_size=GLOBAL_BATCH,
  )
  example = jax.ShapeDtypeStruct((1, SIZE, SIZE, 1), jnp.float32)
  state = jax.jit(
    lambda: create_train_state(model, objective, tx, example, seed=0, objective_config=obj_cfg),
    out_shardings=sharding.replicated_sharding(mesh),
  )()
  p_step = step_lib.jit_train_step(
    mesh, model=model, objective=objective, optimizer=tx, config=obj_cfg, total_steps=10
  )
  local = sharding.process_batch_size(GLOBAL_BATCH, mesh)
  losses = []
  for i in range(STEPS):
    # Every process could build the global batch; each feeds only its own rows.
    rng = np.random.default_rng(i)
    label = rng.integers(0, 4, GLOBAL_BATCH).astype(np.int32)
    image = (rng.normal(size=(GLOBAL_BATCH, SIZE, SIZE, 1)) + label[:, None, None, None]).astype(
      np.float32
    )
    rows = slice(pid * local, (pid + 1) * local)
    batch = sharding.shard_batch(
      {"image": image[rows], "label": label[rows], "valid": np.ones(local, bool)}, mesh
    )
    state, m = p_step(state, batch)
    losses.append(float(m["train/loss"]))  # replicated scalar: readable on every process

  def local_copy(x):
    return np.asarray(x.addressable_data(0))  # replicated: every device holds the whole array

  leaves = [local_copy(x) for x in jax.tree.leaves(state.params)]
  digest = hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest()
  total = float(sum(np.abs(x.astype(np.float64)).sum() for x in leaves))

  data_ok = None
  if ckpt_dir:
    ck = checkpoint.Checkpointer(ckpt_dir, keep=1)
    ck.save(STEPS, state, {"process": pid, "pos": STEPS * 10 + pid})
    ck.wait()
    restored, data_state, _ = ck.restore(None, state)
    ck.close()
    same = all(
      np.array_equal(local_copy(a), local_copy(b))
      for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
    )
    data_ok = bool(same and data_state == {"process": pid, "pos": STEPS * 10 + pid})
  return {
    "process_index": pid,
    "process_count": nproc,
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "losses": losses,
    "params_sha256": digest,
    "params_abs_sum": total,
    "checkpoint_ok": data_ok,
  }


def _launch(n_processes: int, devices_per_process: int, ckpt_dir: str, timeout: float):
  port = _free_port()
  procs = []
  for i in range(n_processes):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
      PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    for k in ("MTNEURO_COORDINATOR", "MTNEURO_NUM_PROCESSES", "MTNEURO_PROCESS_ID"):
      env.pop(k, None)
    if n_processes > 1:
      env.update(
        MTNEURO_COORDINATOR=f"127.0.0.1:{port}",
        MTNEURO_NUM_PROCESSES=str(n_processes),
        MTNEURO_PROCESS_ID=str(i),
      )
    procs.append(
      subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", "--ckpt_dir", ckpt_dir],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  results = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
      if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed (rc {p.returncode}):\n{out[-4000:]}")
      results.append(json.loads(lines[-1][len("RESULT ") :]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return results


def check(timeout: float = 300.0) -> dict:
  """Runs both setups and compares them; raises AssertionError on disagreement."""
  import numpy as np

  with tempfile.TemporaryDirectory() as tmp:
    multi = _launch(2, 4, os.path.join(tmp, "ckpt_multi"), timeout)
    single = _launch(1, 8, "", timeout)[0]
  a, b = sorted(multi, key=lambda r: r["process_index"])
  assert (a["process_count"], a["devices"], a["local_devices"]) == (2, 8, 4), a
  assert [a["process_index"], b["process_index"]] == [0, 1]
  assert a["losses"] == b["losses"], (a["losses"], b["losses"])
  assert a["params_sha256"] == b["params_sha256"], "processes hold different parameters"
  assert a["checkpoint_ok"] and b["checkpoint_ok"], "per-process data state did not round-trip"
  assert single["devices"] == 8 and single["process_count"] == 1
  np.testing.assert_allclose(a["losses"], single["losses"], rtol=1e-5)
  np.testing.assert_allclose(a["params_abs_sum"], single["params_abs_sum"], rtol=1e-5)
  return {
    "ok": True,
    "losses_2x4": a["losses"],
    "losses_1x8": single["losses"],
    "params_bitwise_equal_across_processes": True,
    "params_bitwise_equal_to_1x8": a["params_sha256"] == single["params_sha256"],
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--ckpt_dir", default="", help=argparse.SUPPRESS)
  ap.add_argument("--timeout", type=float, default=300.0)
  args = ap.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(worker(args.ckpt_dir)), flush=True)
    return
  print(json.dumps(check(args.timeout)))


if __name__ == "__main__":
  main()
