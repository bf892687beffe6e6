"""2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) agree with each other and
with 1 process x 8 devices; per-process data states round-trip through one checkpoint."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_run_agrees():
  env = {k: v for k, v in os.environ.items() if not k.startswith("MTNEURO_")}
  env.pop("XLA_FLAGS", None)  # the script sets each worker's device count
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", "multihost_check.py"), "--timeout", "240"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["ok"] and summary["params_bitwise_equal_across_processes"]
  assert len(summary["losses_2x4"]) == 3
