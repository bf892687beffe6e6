"""``python -m experiments.bench``: the benchmark suite (see experiments/bench/suite.py)."""

import sys

from experiments.bench.suite import main
from mtneuro_jax.errors import run_cli

if __name__ == "__main__":
  sys.exit(run_cli(main, sys.argv[1:]))
