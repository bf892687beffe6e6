"""The ``mtneuro`` command: one entry point over the project's tools.

  mtneuro main      the quick benchmark on the embedded phantom (export + Tasks 1-3 quick)
  mtneuro export    export task datasets (TFDS ArrayRecord) from a source
  mtneuro verify    check a dataset's shards against its manifest
  mtneuro summary   per-task split sizes of an export folder (verified first)
  mtneuro fidelity  phantom-vs-real fidelity report
  mtneuro serve     serve a volume over the Boss v1 API (for intern-based tools)
  mtneuro train     one training run from a config file
  mtneuro task1     Task 1 tables (methods x settings x seeds)
  mtneuro task2     Task 2 tables (segmentation models x settings, lr x batch grid, seeds)
  mtneuro task3     Task 3 table (semantic features, frozen embeddings, linear readout, UMAP)
  mtneuro icip      ICIP 2021 tables (Double U-Net two steps + baselines; micro/macro F1)
  mtneuro predict   sliding-window prediction of a volume box into a zarr (resumable, multi-process)
  mtneuro deploy    region/microstructure maps + region accuracy before/after kNN clean-up
  mtneuro bench     benchmark suite: JAX vs the PyTorch reference, pipeline, export, inference

Each subcommand's ``--help`` lists its options. Bad input of any subcommand is one
line ``error: <problem>; <fix>`` on stderr and exit status 2 (no traceback);
``mtneuro --debug <command> ...`` (or ``MTNEURO_DEBUG=1``) also shows the traceback.
Imports are lazy so that ``mtneuro --help`` is instant. Before a command runs, the
executable re-executes itself once with glibc's ``glibc.malloc.hugetlb=1`` (huge pages for
XLA's per-step temporaries: steps run back to back 9-17 % faster;
``mtneuro_jax/host_malloc.py``);
``MTNEURO_MALLOC=system`` skips that.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Callable

from mtneuro_jax import host_malloc
from mtneuro_jax.errors import ArgumentParser, UsageError, run_cli

DEFAULT_PHANTOM_DATA_DIR = "out/data/phantom-seed0"


def _export(argv):
  from data_prep import export

  return export.run(argv)


def _verify(argv):
  from data_prep import export

  return export.run(["verify", *argv])


def _summary(argv):
  from data_prep import export

  return export.run(["summary", *argv])


def _fidelity(argv):
  from experiments import phantom_fidelity

  return phantom_fidelity.main(argv)


def _serve(argv):
  from mtneuro_jax.volumes import boss_server

  return boss_server.run(argv)


def _train(argv):
  from mtneuro_jax.train import loop

  return loop.main(["mtneuro train", *argv])


def _task1(argv):
  from experiments import task1_tables

  return task1_tables.main(argv)


def _task2(argv):
  from experiments import task2_tables

  return task2_tables.main(argv)


def _task3(argv):
  from experiments import task3_tables

  return task3_tables.main(argv)


def _icip(argv):
  from experiments import icip_tables

  return icip_tables.main(argv)


def _predict(argv):
  from experiments import predict

  return predict.main(argv)


def _deploy(argv):
  from experiments import deploy_tables

  return deploy_tables.main(argv)


def _bench(argv):
  from experiments.bench import suite

  return suite.main(argv)


def _check_folder_arg(parser: ArgumentParser, flag: str, path: str) -> None:
  if not path.strip():
    parser.error(f"{flag} is empty; give a folder")
  if os.path.exists(path) and not os.path.isdir(path):
    parser.error(f"{flag} {path} is a file, not a folder")


MAIN_TASKS = ("1", "2", "3", "icip")


def _icip_and_deploy(preset: str, data_dir: str, out: str, out_root: str) -> int:
  """``mtneuro icip`` at ``preset``, then ``mtneuro deploy`` of its seed-1 Double U-Net."""
  import json

  rc = _icip(["--preset", preset, "--data_dir", data_dir, "--out", out])
  if rc:
    return rc
  with open(os.path.join(out, "icip_tables.json")) as f:
    runs = json.load(f)["final_runs"].get("double_unet", {})
  if not runs:
    print("== no Double U-Net run in the ICIP tables: deployment skipped", flush=True)
    return 0
  run = runs[sorted(runs, key=int)[0]]
  deploy_preset = "quick" if preset != "paper" else "full"
  deploy_out = os.path.join(out_root, f"deploy_{preset}")
  print(f"== deploy the Double U-Net {run} -> {deploy_out}", flush=True)
  return _deploy(["--preset", deploy_preset, "--run", run, "--out", deploy_out])


def _main_job(argv):
  """Quick benchmark on the embedded phantom: export every task, summarise, then the quick
  tables of Task 1 (region classification), Task 2 (segmentation) and Task 3 (readouts of the
  Task 1 encoders) into <out>/task{1,2,3}_<preset>, and the ICIP 2021 multi-scale tables
  (<out>/icip_<preset>) followed by whole-volume deployment of its Double U-Net
  (<out>/deploy_<preset>: region maps, accuracy before/after kNN clean-up)."""
  from experiments.task1_tables import PRESETS  # light: the heavy imports of task1 are lazy

  parser = ArgumentParser(prog="mtneuro main", description=_main_job.__doc__)
  parser.add_argument(
    "--data_dir",
    default=DEFAULT_PHANTOM_DATA_DIR,
    help="export root for the phantom datasets (default: %(default)s)",
  )
  parser.add_argument(
    "--out",
    default="out",
    help="root of the tables folders <out>/task{1,2,3}_<preset> (default: %(default)s)",
  )
  parser.add_argument(
    "--preset",
    default="quick",
    help=f"preset of every task: {' | '.join(sorted(PRESETS))} (default: quick)",
  )
  parser.add_argument(
    "--tasks",
    default=",".join(MAIN_TASKS),
    help="which tasks' tables to run after the export, e.g. 1,3 (default: %(default)s; "
    "Task 3 reads the Task 1 encoders; icip = the ICIP tables + deployment)",
  )
  parser.add_argument("--skip_task1", action="store_true", help="only export and summarise")
  args = parser.parse_args(argv)
  # Every argument is checked before the (minutes-long) export starts.
  if args.preset not in PRESETS:
    parser.error(f"unknown --preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if not tasks or any(t not in MAIN_TASKS for t in tasks):
    parser.error(f"--tasks {args.tasks!r}: give task numbers from {','.join(MAIN_TASKS)}")
  if args.skip_task1:
    tasks = []
  _check_folder_arg(parser, "--data_dir", args.data_dir)
  _check_folder_arg(parser, "--out", args.out)
  outs = {t: os.path.join(args.out, f"task{t}_{args.preset}") for t in MAIN_TASKS}
  outs["icip"] = os.path.join(args.out, f"icip_{args.preset}")
  runners = {
    "1": lambda: _task1(["--preset", args.preset, "--data_dir", args.data_dir, "--out", outs["1"]]),
    "2": lambda: _task2(["--preset", args.preset, "--data_dir", args.data_dir, "--out", outs["2"]]),
    "3": lambda: _task3(
      ["--preset", args.preset, "--data_dir", args.data_dir, "--t1_dir", outs["1"]]
      + ["--out", outs["3"]]
    ),
    "icip": lambda: _icip_and_deploy(args.preset, args.data_dir, outs["icip"], args.out),
  }
  t0 = time.time()
  print(
    "== mtneuro main: SYNTHETIC phantom data (not the paper's data; numbers are not comparable)"
  )
  stages = 2 + len(tasks)
  print(f"== [1/{stages}] export all tasks from the phantom -> {args.data_dir}", flush=True)
  rc = _export(["--source", "phantom", "--tasks", "all", "--out_dir", args.data_dir])
  if rc:
    return rc
  print(f"== [2/{stages}] data summary ({time.time() - t0:.0f}s)", flush=True)
  rc = _summary([args.data_dir])
  for i, task in enumerate(tasks, start=3):
    if rc:
      return rc
    print(
      f"== [{i}/{stages}] Task {task} '{args.preset}' tables -> {outs[task]} "
      f"({time.time() - t0:.0f}s)",
      flush=True,
    )
    t_task = time.time()
    rc = runners[task]()
    print(f"== Task {task} took {time.time() - t_task:.0f}s", flush=True)
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
  "task2": _task2,
  "task3": _task3,
  "icip": _icip,
  "predict": _predict,
  "deploy": _deploy,
  "bench": _bench,
}


def _dispatch(argv: list[str], as_program: bool = False) -> int:
  if as_program:
    # Huge pages for XLA's per-step temporaries: glibc reads the setting only at process start.
    host_malloc.reexec_with_hugepages()
  else:
    host_malloc.mode()  # a bad $MTNEURO_MALLOC is one error line, called from Python too
  cmd, rest = argv[0], argv[1:]
  if cmd not in COMMANDS:
    raise UsageError(
      f"unknown command {cmd!r}; run `mtneuro --help` for the list ({', '.join(COMMANDS)})"
    )
  return int(COMMANDS[cmd](rest) or 0)


def main(argv: list[str] | None = None) -> int:
  """``mtneuro [--debug] <command> [options]``; returns the exit status.

  Every command runs through ``mtneuro_jax.errors.run_cli``: a UserError (or an
  argparse/absl usage error) becomes one ``error: ...`` line and status 2.
  """
  as_program = argv is None  # the `mtneuro` executable itself, not a call from Python
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = None
  if argv and argv[0] == "--debug":
    debug, argv = True, argv[1:]
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(__doc__)
    return 0
  return run_cli(functools.partial(_dispatch, as_program=as_program), argv, debug=debug)


if __name__ == "__main__":
  sys.exit(main())
