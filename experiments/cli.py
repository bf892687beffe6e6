"""The ``mtneuro`` command: one entry point over the project's tools.

  mtneuro main      the quick benchmark on the embedded phantom (export + Task 1 quick)
  mtneuro export    export task datasets (TFDS ArrayRecord) from a source
  mtneuro verify    check a dataset's shards against its manifest
  mtneuro summary   per-task split sizes of an export folder
  mtneuro fidelity  phantom-vs-real fidelity report
  mtneuro serve     serve a volume over the Boss v1 API (for intern-based tools)
  mtneuro train     one training run from a config file
  mtneuro task1     Task 1 tables (methods x settings x seeds)

Each subcommand's ``--help`` lists its options. Imports are lazy so that
``mtneuro --help`` is instant.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

DEFAULT_PHANTOM_DATA_DIR = "out/data/phantom-seed0"


def _export(argv):
  from data_prep import export
  return export.main(argv)


def _verify(argv):
  from data_prep import export
  return export.main(["verify", *argv])


def _summary(argv):
  from data_prep import export
  return export.main(["summary", *argv])


def _fidelity(argv):
  from experiments import phantom_fidelity
  return phantom_fidelity.main(argv)


def _serve(argv):
  from mtneuro_jax.volumes import boss_server
  return boss_server.main(argv)


def _train(argv):
  from mtneuro_jax.train import loop
  return loop.main(["mtneuro train", *argv])


def _task1(argv):
  from experiments import task1_tables
  return task1_tables.main(argv)


def _main_job(argv):
  """Quick benchmark on the embedded phantom: export every task, summarise, run Task 1 quick."""
  import argparse
  parser = argparse.ArgumentParser(prog="mtneuro main", description=_main_job.__doc__)
  parser.add_argument("--data_dir", default=DEFAULT_PHANTOM_DATA_DIR)
  parser.add_argument("--out", default="out/task1_quick")
  parser.add_argument("--preset", default="quick", help="Task 1 preset (quick | paper | tiny)")
  parser.add_argument("--skip_task1", action="store_true", help="only export and summarise")
  args = parser.parse_args(argv)
  t0 = time.time()
  print("== mtneuro main: SYNTHETIC phantom data (not the paper's data; numbers are not comparable)")
  print(f"== [1/3] export all tasks from the phantom -> {args.data_dir}", flush=True)
  rc = _export(["--source", "phantom", "--tasks", "all", "--out_dir", args.data_dir])
  if rc:
    return rc
  print(f"== [2/3] data summary ({time.time() - t0:.0f}s)", flush=True)
  rc = _summary([args.data_dir])
  if rc or args.skip_task1:
    return rc
  print(f"== [3/3] Task 1 '{args.preset}' tables -> {args.out} ({time.time() - t0:.0f}s)", flush=True)
  rc = _task1(["--preset", args.preset, "--data_dir", args.data_dir, "--out", args.out])
  print(f"== done in {time.time() - t0:.0f}s", flush=True)
  return rc


COMMANDS: dict[str, Callable[[list[str]], int | None]] = {
    "main": _main_job,
    "export": _export,
    "verify": _verify,
    "summary": _summary,
    "fidelity": _fidelity,
    "serve": _serve,
    "train": _train,
    "task1": _task1,
}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(__doc__)
    return 0
  cmd, rest = argv[0], argv[1:]
  if cmd not in COMMANDS:
    print(f"mtneuro: unknown command {cmd!r}; run 'mtneuro --help' for the list", file=sys.stderr)
    return 2
  return int(COMMANDS[cmd](rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
