"""``python -m experiments.bench``: the benchmark suite (see experiments/bench/suite.py)."""

import sys

from experiments.bench.suite import main

if __name__ == "__main__":
  sys.exit(main())
