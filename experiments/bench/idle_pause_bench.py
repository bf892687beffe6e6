"""Does a step slow down after the process sat idle? Steps after pauses of several lengths.

Why: the suite (suite.py) interleaves its workers, so a worker's turn starts after seconds of
idling; training runs steps back to back. On this machine (a Firecracker VM whose kernel reports
freed memory to the host: ``page_reporting`` on the kernel command line, ``cat /proc/cmdline``)
memory freed and mapped again after ~1.5 s or more of idling costs far more system CPU to fault
in than memory reused at once (the host has taken the reported pages back; the counter
``/sys/module/page_reporting/parameters/reported_kib`` shows the reports, printed per pause
where it exists). A train step maps its temporaries afresh every step (XLA:CPU and
PyTorch alike), so it pays that after a pause.

``--framework jax|torch`` times one ResNet18-xray supervised step (B=32 1x``--size``²);
``--framework touch`` maps and touches a fresh ``--touch_mib`` MiB block (no framework: the
effect alone). Each round cycles through ``--pauses`` (seconds of sleep before each step), with
``--steps`` steps per pause; per pause the median wall and system-CPU seconds. Run it idle and
under the malloc mode in question (GLIBC_TUNABLES, mtneuro_jax/host_malloc.py).

  python -m experiments.bench.idle_pause_bench --framework jax --conv_backend onednn
  python -m experiments.bench.idle_pause_bench --framework torch
  python -m experiments.bench.idle_pause_bench --framework touch --pauses 0,0.5,1,1.5,2,3,5
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time


def touch_step(mib: int):
  """A step that maps ``mib`` MiB afresh and writes one byte per 4 KiB page; returns seconds."""
  import numpy as np

  def one() -> float:
    t = time.perf_counter()
    block = np.empty(mib * 2**20, np.uint8)
    block[::4096] = 1
    del block
    return time.perf_counter() - t

  return one


# This VM's kernel counts the memory it has reported to the host as free (absent elsewhere).
REPORTED_KIB = "/sys/module/page_reporting/parameters/reported_kib"


def reported_kib() -> int | None:
  """KiB of freed guest memory reported to the host so far (None where not exposed)."""
  try:
    with open(REPORTED_KIB) as f:
      return int(f.read())
  except (OSError, ValueError):
    return None


def main(argv=None) -> int:
  from mtneuro_jax.errors import ArgumentParser, UsageError

  p = ArgumentParser(prog="python -m experiments.bench.idle_pause_bench")
  p.add_argument("--framework", choices=("jax", "torch", "touch"), default="jax")
  p.add_argument("--conv_backend", default="xla", help="JAX only: xla or onednn")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--touch_mib", type=int, default=900, help="touch only: block size (MiB)")
  p.add_argument("--pauses", default="0,3", help="comma-separated seconds of sleep before a step")
  p.add_argument("--steps", type=int, default=4, help="steps per pause per round")
  p.add_argument("--rounds", type=int, default=2, help="passes over --pauses")
  args = p.parse_args(argv)
  try:
    pauses = [float(x) for x in args.pauses.split(",") if x]
  except ValueError:
    pauses = []
  if not pauses or min(pauses) < 0 or args.steps < 1 or args.rounds < 1:
    raise UsageError(
      f"--pauses={args.pauses!r} --steps={args.steps} --rounds={args.rounds}: expected "
      "non-negative seconds, comma-separated, and at least one step and round"
    )
  if args.framework == "jax":
    from experiments.bench import ssl_step_bench

    _, one = ssl_step_bench.build(
      "supervised", 32, 1.0, view=args.size, conv_backend=args.conv_backend
    )
  elif args.framework == "torch":
    from experiments.bench import resnet_step_bench

    _, one = resnet_step_bench.build_torch(args.size, 32, 2)
  else:
    one = touch_step(args.touch_mib)
  for _ in range(2):  # compile / warm up
    one()
  rows = []
  for _ in range(args.rounds):
    for pause in pauses:
      wall, sys_cpu, reported = [], [], []
      for _ in range(args.steps):
        r0 = reported_kib()
        time.sleep(pause)
        s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        wall.append(one())
        sys_cpu.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0)
        # Reported during the pause and the step (machine-wide, but this process is what frees).
        reported.append(None if r0 is None else (reported_kib() - r0) / 1024)
      rows.append({"pause_s": pause, "step_s": wall, "sys_s": sys_cpu, "reported_mib": reported})
      rep = (
        ""
        if reported[0] is None
        else f", reported to the host {statistics.median(reported):.0f} MiB"
      )
      print(
        f"pause {pause:.1f} s: median {statistics.median(wall):.3f} s, system CPU "
        f"{statistics.median(sys_cpu):.3f} s{rep} {[round(t, 2) for t in wall]}",
        flush=True,
      )
  print(json.dumps({"args": vars(args), "rounds": rows}))
  return 0


if __name__ == "__main__":
  from mtneuro_jax.errors import run_cli

  sys.exit(run_cli(main, sys.argv[1:]))
