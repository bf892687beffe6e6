"""Does a train step slow down after the process sat idle? Steps back to back vs after a pause.

Why: the suite (suite.py) interleaves its workers, so every worker's step follows several
seconds of idling; training runs steps back to back. This bench times one framework's
ResNet18-xray supervised step (B=32 1x``--size``²) alone, in rounds of ``--steps`` steps with
``--pause`` seconds of sleep before each step, alternating with rounds without (median per
round). Run it idle and under the same malloc mode as the suite (GLIBC_TUNABLES, see
mtneuro_jax/host_malloc.py).

  python -m experiments.bench.idle_pause_bench --framework jax --conv_backend onednn
  python -m experiments.bench.idle_pause_bench --framework torch
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.bench.idle_pause_bench")
  p.add_argument("--framework", choices=("jax", "torch"), default="jax")
  p.add_argument("--conv_backend", default="xla", help="JAX only: xla or onednn")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--pause", type=float, default=3.0, help="seconds of sleep before each step")
  p.add_argument("--steps", type=int, default=4, help="steps per round")
  p.add_argument("--rounds", type=int, default=4, help="rounds, alternating no pause / pause")
  args = p.parse_args(argv)
  if args.framework == "jax":
    from experiments.bench import ssl_step_bench

    _, one = ssl_step_bench.build(
      "supervised", 32, 1.0, view=args.size, conv_backend=args.conv_backend
    )
  else:
    from experiments.bench import resnet_step_bench

    _, one = resnet_step_bench.build_torch(args.size, 32, 2)
  for _ in range(2):  # compile / warm up
    one()
  rounds = []
  for r in range(args.rounds):
    pause = args.pause if r % 2 else 0.0
    times = []
    for _ in range(args.steps):
      time.sleep(pause)
      times.append(one())
    rounds.append({"pause_s": pause, "step_s": times, "median_s": statistics.median(times)})
    print(
      f"pause {pause:.1f} s: median {rounds[-1]['median_s']:.3f} s {[round(t, 2) for t in times]}",
      flush=True,
    )
  print(json.dumps({"args": vars(args), "rounds": rounds}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
