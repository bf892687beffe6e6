"""The ONE training loop: config -> mesh, data, model, objective, optimizer -> train, eval, checkpoint.

It knows no task. Everything task-specific comes from registries keyed by the
config: ``MODELS[config.model_name](**config.model)``,
``OBJECTIVES[config.objective_name]``, ``EVALUATORS[config.evals.<name>.kind]``,
and the data pipeline (``mtneuro_jax.data.pipeline``).

Run:
  python -m mtneuro_jax.train.loop --config configs/task1_supervised.py:quick --workdir out/runs/q
  (any key can be overridden: --config.optim.learning_rate=0.01)

Workdir: config.json, metrics.jsonl (one JSON object per log step; the loop
logs the *previous* step's metrics so host reads never stall async dispatch),
checkpoints/<step>/ (Orbax: train state + data-iterator state), eval/ (evaluator
files), results.json (final eval metrics). Rerunning on the same workdir resumes
from the latest checkpoint.

Top-level config keys read here (all but data/model/objective/optim optional):
  seed, data (pipeline data_cfg), model_name, model, objective_name, objective,
  optim (see optim.py), num_epochs or total_steps (> 0 overrides epochs),
  log_every_steps, checkpoint_every_steps (0 = only at the end), keep_checkpoints,
  evals.<name> {kind, split, task (optional), every_steps (optional; else only at
  the end), evaluator keys} (evaluators see an ``eval.common.EvalContext``),
  init_from {workdir, step, subtree, model_state} (a fresh run starts from another
  run's model weights; see ``checkpoint.load_pretrained``),
  compilation_cache_dir ('' = off), num_devices (0 = all),
  progress (tqdm bar), distributed (call jax.distributed.initialize() with cluster
  auto-detection).
Multi-host by environment: MTNEURO_COORDINATOR=host:port, MTNEURO_NUM_PROCESSES,
MTNEURO_PROCESS_ID -> jax.distributed.initialize(...) before anything touches JAX.
"""
from __future__ import annotations

import functools
import json
import logging as std_logging
import math
import os
import time
from typing import Any

import jax
from absl import logging

from mtneuro_jax import sharding
from mtneuro_jax.eval.common import EvalContext
from mtneuro_jax.eval.registry import check_kinds, run_evals
from mtneuro_jax.models import MODELS
from mtneuro_jax.objectives import OBJECTIVES
from mtneuro_jax.train import checkpoint as ckpt_lib
from mtneuro_jax.train import metrics as metrics_lib
from mtneuro_jax.train import optim as optim_lib
from mtneuro_jax.train import step as step_lib
from mtneuro_jax.train.state import create_train_state, param_count

DEFAULT_CACHE_DIR = "~/.cache/mtneuro_jax/jax_cache"
_DISTRIBUTED_DONE = False


def maybe_initialize_distributed(config=None) -> None:
  """Calls ``jax.distributed.initialize`` once if the environment or config asks for it.

  Env MTNEURO_COORDINATOR ('host:port') with MTNEURO_NUM_PROCESSES and
  MTNEURO_PROCESS_ID gives an explicit setup (e.g. several processes on one
  machine); ``config.distributed=True`` lets JAX detect the cluster (SLURM,
  Cloud TPU, ...). Must run before any JAX computation.
  """
  global _DISTRIBUTED_DONE
  if _DISTRIBUTED_DONE:
    return
  coordinator = os.environ.get("MTNEURO_COORDINATOR")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["MTNEURO_NUM_PROCESSES"]),
                               process_id=int(os.environ["MTNEURO_PROCESS_ID"]))
    _DISTRIBUTED_DONE = True
  elif config is not None and config.get("distributed", False):
    jax.distributed.initialize()
    _DISTRIBUTED_DONE = True


def enable_compilation_cache(path: str | None = DEFAULT_CACHE_DIR) -> None:
  """Turns on JAX's persistent compilation cache (many short runs compile the same nets).

  Leaves an already configured cache (e.g. JAX_COMPILATION_CACHE_DIR) alone.
  """
  if not path or getattr(jax.config, "jax_compilation_cache_dir", None):
    return
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache anything that took noticeable time: CPU compiles of a ResNet take seconds.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _default_data_module():
  from mtneuro_jax.data import pipeline  # lazy: tests pass fake data modules without TFDS
  return pipeline


def _is_due(step: int, every: int) -> bool:
  return bool(every) and step % every == 0


def make_eval_context(predict_fn, data, config, mesh) -> EvalContext:
  """The evaluators' view of a run: predictions, batches of any split/task, dataset info."""
  infos: dict[Any, dict] = {}

  def open_batches(split: str, task: str | None = None):
    return data.eval_batches(config.data, split, mesh=mesh, global_batch_size=int(config.data.eval_batch_size),
                             task=task)

  def dataset_info(task: str | None = None) -> dict:
    if task not in infos:
      infos[task] = data.dataset_info(config.data, task)
    return infos[task]

  return EvalContext(predict_fn=predict_fn, open_batches=open_batches, dataset_info=dataset_info)


def train_and_evaluate(config, workdir: str, *, data=None) -> dict[str, Any]:
  """Trains per ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Args:
    config: ml_collections ConfigDict (see module docstring).
    workdir: output directory.
    data: a data module with ``train_iterator``, ``eval_batches`` and
      ``dataset_info`` (default ``mtneuro_jax.data.pipeline``); tests pass fakes.

  Returns:
    Final eval metrics {'<eval name>/<metric>': value, 'step': total steps}, also
    written to ``<workdir>/results.json``.

  Raises:
    metrics.NonFiniteLossError: loss or gradient norm became NaN/Inf. Checkpoints
      written before that step are kept; the bad state is never saved.
  """
  maybe_initialize_distributed(config)
  enable_compilation_cache(config.get("compilation_cache_dir", DEFAULT_CACHE_DIR))
  data = data or _default_data_module()
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  mesh = sharding.make_mesh(config.get("num_devices", 0) or None)
  info = data.dataset_info(config.data)
  model_kwargs = dict(config.model)
  # A model with a classification head must match the dataset; an encoder-only model
  # (num_classes 0, e.g. for SSL or an objective that owns its head) has nothing to match.
  if model_kwargs.get("num_classes") and info.get("num_classes") and model_kwargs["num_classes"] != info[
      "num_classes"]:
    raise ValueError(f"config.model.num_classes={model_kwargs['num_classes']} but the dataset has "
                     f"{info['num_classes']} classes")
  model = MODELS[config.model_name](**model_kwargs)
  objective = OBJECTIVES[config.objective_name]
  objective_cfg = config.get("objective", None)
  evals = {name: ecfg for name, ecfg in (config.get("evals", None) or {}).items()}
  check_kinds(evals)  # fail before training, not after it

  batch_size = int(config.data.batch_size)
  train_it = data.train_iterator(config.data, seed=int(config.seed), mesh=mesh, global_batch_size=batch_size)
  steps_per_epoch = int(train_it.steps_per_epoch)
  total_steps = int(config.get("total_steps", 0) or 0) or int(math.ceil(config.num_epochs * steps_per_epoch))
  optimizer, schedule = optim_lib.make_optimizer(config.optim, steps_per_epoch=steps_per_epoch,
                                                 total_steps=total_steps, batch_size=batch_size)

  # The first batch fixes the input shape for init; it is also step 0's batch
  # unless a checkpoint resets the iterator below.
  first_batch = next(train_it)
  example = jax.ShapeDtypeStruct((1,) + tuple(first_batch["image"].shape[1:]), first_batch["image"].dtype)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=int(config.get("keep_checkpoints", 2) or 0) or None)
  last_saved = ckpt.latest_step()
  initial = None
  init_from = config.get("init_from", None)
  if last_saved is None and init_from and init_from.get("workdir", ""):
    # Only a fresh run starts from another run's weights; a resumed one has its own.
    fresh = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                              jax.numpy.zeros(example.shape, example.dtype), train=False))
    initial = ckpt_lib.load_pretrained(init_from, fresh)
    logging.info("init_from %s: %s", init_from.workdir, ckpt_lib.describe_subtrees(initial))

  def init(initial_variables):
    return create_train_state(model, objective, optimizer, example, seed=int(config.seed),
                              objective_config=objective_cfg, initial_variables=initial_variables)

  state = jax.jit(init, out_shardings=sharding.replicated_sharding(mesh))(initial)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  if last_saved is not None:
    state, data_state, _ = ckpt.restore(last_saved, state)
    train_it.set_state(data_state)
    first_batch = None
    writer.truncate_after(last_saved)
    logging.info("resumed from %s at step %d", ckpt.directory, last_saved)
  start = int(state.step)
  logging.info("model %s: %d params; %d steps (%d/epoch, batch %d) on %d devices, %d processes",
               config.model_name, param_count(state.params), total_steps, steps_per_epoch, batch_size,
               mesh.devices.size, jax.process_count())

  p_step = step_lib.jit_train_step(mesh, model=model, objective=objective, optimizer=optimizer,
                                   config=objective_cfg, total_steps=total_steps)
  p_predict = step_lib.jit_predict(model=model, objective=objective, config=objective_cfg)
  log_every = int(config.get("log_every_steps", 50) or 1)
  ckpt_every = int(config.get("checkpoint_every_steps", 0) or 0)

  acc = metrics_lib.MeanAccumulator()
  timer = {"t": time.perf_counter(), "steps": 0}

  def flush(done: int, device_metrics) -> None:
    """Pulls one step's metrics to host, guards NaN, and writes a line at log steps."""
    m = metrics_lib.scalar_items(jax.device_get(device_metrics))
    try:
      metrics_lib.check_finite(m, done, last_good=(f"step {last_saved} in {ckpt.directory}"
                                                   if last_saved is not None else ""))
    except metrics_lib.NonFiniteLossError as e:
      writer.write(done, {"error": str(e), **m})
      raise
    acc.add(m)
    timer["steps"] += 1
    if done % log_every == 0 or done == total_steps:
      now = time.perf_counter()
      line = acc.pop()
      line["train/lr"] = float(schedule(done - 1))
      if timer["steps"] > 0:  # (the window that holds the compiling first step has none)
        line["train/steps_per_sec"] = timer["steps"] / max(now - timer["t"], 1e-9)
      line["epoch"] = done / steps_per_epoch
      timer.update(t=now, steps=0)
      writer.write(done, line)
      if bar is not None:
        bar.set_postfix(loss=f"{line.get('train/loss', float('nan')):.4f}", refresh=False)

  bar = None
  if is_main and config.get("progress", True):
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", mininterval=1.0, smoothing=0.1)
  pending = None  # (steps done, metrics on device) not yet pulled to host
  t_start = time.perf_counter()
  try:
    for i in range(start, total_steps):
      batch = first_batch if first_batch is not None else next(train_it)
      first_batch = None
      state, step_metrics = p_step(state, batch)
      if i == start:
        jax.block_until_ready(step_metrics)
        logging.info("first step took %.1fs (compilation or cache load included)", time.perf_counter() - t_start)
        timer.update(t=time.perf_counter(), steps=-1)  # steps/s from here on excludes compilation
      if pending is not None:
        flush(*pending)  # the previous step: by now done or nearly, so no stall
      pending = (i + 1, step_metrics)
      done = i + 1
      if bar is not None:
        bar.update(1)
      save_now = _is_due(done, ckpt_every) or done == total_steps
      due_evals = {n: e for n, e in evals.items() if _is_due(done, int(e.get("every_steps", 0) or 0))
                   and done != total_steps}
      if save_now or due_evals:
        # Never checkpoint or evaluate a state whose step went non-finite.
        flush(*pending)
        pending = None
      if save_now:
        ckpt.save(done, state, train_it.get_state(), meta={"total_steps": total_steps,
                                                           "steps_per_epoch": steps_per_epoch})
        last_saved = done
      if due_evals:
        res = run_evals(due_evals, make_eval_context(functools.partial(p_predict, state), data, config, mesh),
                        workdir=workdir, step=done)
        writer.write(done, res)
    if pending is not None:
      flush(*pending)
      pending = None
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()

  results = run_evals(evals, make_eval_context(functools.partial(p_predict, state), data, config, mesh),
                      workdir=workdir, step=total_steps) if evals else {}
  results = metrics_lib.to_jsonable({**results, "step": total_steps})
  writer.write(total_steps, results)
  if is_main:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
  return results


def run_config_cli(run_fn, argv=None, *, workdir_help: str = "Output directory.") -> None:
  """absl CLI shared by every config-driven entry point.

  ``--config FILE[:ARG]`` (a locked ``get_config(arg)`` file; ``--config.key=value``
  overrides, a typo fails) and ``--workdir DIR``; calls ``run_fn(config, workdir)``.
  """
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file("config", None, "get_config() file[:arg].", lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run_fn(config_flag.value, workdir_flag.value)

  app.run(_main, argv)


def main(argv=None) -> None:
  """CLI: ``python -m mtneuro_jax.train.loop --config FILE[:ARG] --workdir DIR [--config.key=value]``."""

  def _run(config, workdir):
    logging.set_verbosity(logging.INFO)
    # Orbax logs every save step at INFO; keep its warnings, drop the chatter.
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)
    train_and_evaluate(config, workdir)

  run_config_cli(_run, argv, workdir_help="Output directory (resumes if it holds checkpoints).")


if __name__ == "__main__":
  main()
