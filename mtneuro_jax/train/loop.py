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

import contextlib
import functools
import json
import logging as std_logging
import math
import os
import re
import sys
import time
from typing import Any

import jax
from absl import logging

from mtneuro_jax import dirlock, host_malloc, sharding
from mtneuro_jax.errors import ConfigError, UsageError, UserError, one_line, run_cli
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
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ["MTNEURO_NUM_PROCESSES"]),
      process_id=int(os.environ["MTNEURO_PROCESS_ID"]),
    )
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
    return data.eval_batches(
      config.data, split, mesh=mesh, global_batch_size=int(config.data.eval_batch_size), task=task
    )

  def dataset_info(task: str | None = None) -> dict:
    if task not in infos:
      infos[task] = data.dataset_info(config.data, task)
    return infos[task]

  return EvalContext(predict_fn=predict_fn, open_batches=open_batches, dataset_info=dataset_info)


# Keys that may differ when a run resumes: they change logging, speed, evaluation or where
# files are, not the training maths. Everything else must match the saved config.json.
RESUME_FREE_KEYS = re.compile(
  r"^(log_every_steps|checkpoint_every_steps|keep_checkpoints|compilation_cache_dir|progress|"
  r"distributed|num_devices|data\.(eval_batch_size|read_threads|prefetch_batches)|evals(\..*)?|"
  r"init_from(\..*)?)$"
)


class ConfigChangedError(UserError):
  """A run resumed with a config whose training maths differ from the saved one."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def config_differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, current value)} for keys that change the maths (see RESUME_FREE_KEYS)."""
  a, b = _flatten(saved), _flatten(current)
  missing = object()
  return {
    k: (a.get(k, "<absent>"), b.get(k, "<absent>"))
    for k in sorted(set(a) | set(b))
    if not RESUME_FREE_KEYS.match(k) and a.get(k, missing) != b.get(k, missing)
  }


def validate_config(config) -> None:
  """One clear UserError for values the loop cannot run with (before anything is written)."""
  bs = config.data.get("batch_size", 0)
  ebs = config.data.get("eval_batch_size", bs)
  for key, v in (("data.batch_size", bs), ("data.eval_batch_size", ebs)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(
        f"config.{key}={v!r} must be a positive integer; set e.g. --config.{key}=32"
      )
  step_lib.check_compute_dtype(config.get("compute_dtype", "float32"))
  step_lib.check_conv_dw_groups(config.get("conv_dw_groups", 1))
  step_lib.check_conv_backend(config.get("conv_backend", "xla"))
  total = config.get("total_steps", 0) or 0
  if total < 0:
    raise ConfigError(
      f"config.total_steps={total} is negative; use a positive step count, or 0 to "
      "train for config.num_epochs"
    )
  if total == 0 and not float(config.get("num_epochs", 0) or 0) > 0:
    raise ConfigError(
      f"config.total_steps=0 and config.num_epochs={config.get('num_epochs', None)}: the run "
      "would not train; set --config.total_steps=N or --config.num_epochs=E > 0"
    )
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "num_devices"):
    v = config.get(key, 0) or 0
    if v < 0:
      raise ConfigError(f"config.{key}={v} is negative; use 0 or a positive integer")
  optim_lib.make_optimizer(
    config.optim, steps_per_epoch=1, total_steps=1, batch_size=1
  )  # raises ConfigError


def train_and_evaluate(
  config, workdir: str, *, data=None, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains per ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Args:
    config: ml_collections ConfigDict (see module docstring).
    workdir: output directory. Locked for the run (``<workdir>/.lock``): a second run in the
      same workdir fails at once with ``dirlock.LockedError``.
    data: a data module with ``train_iterator``, ``eval_batches`` and
      ``dataset_info`` (default ``mtneuro_jax.data.pipeline``); tests pass fakes.
    allow_config_change: resume even if keys that change the training maths differ from the
      saved ``config.json`` (the change is logged in metrics.jsonl); otherwise that raises
      ``ConfigChangedError`` listing them.

  Returns:
    Final eval metrics {'<eval name>/<metric>': value, 'step': total steps}, also
    written to ``<workdir>/results.json``.

  Raises:
    UserError subclasses for bad input (config values, data, checkpoints, a locked workdir).
    metrics.NonFiniteLossError: loss or gradient norm became NaN/Inf. Checkpoints
      written before that step are kept; the bad state is never saved.
  """
  maybe_initialize_distributed(config)
  validate_config(config)
  enable_compilation_cache(config.get("compilation_cache_dir", DEFAULT_CACHE_DIR))
  # Only process 0 writes the workdir's files, so it alone holds the lock.
  lock = (
    dirlock.exclusive_lock(workdir, what="training run")
    if jax.process_index() == 0
    else (contextlib.nullcontext())
  )
  with lock:
    return _train_and_evaluate(
      config, os.path.abspath(workdir), data or _default_data_module(), allow_config_change
    )


def _train_and_evaluate(config, workdir: str, data, allow_config_change: bool) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=int(config.get("keep_checkpoints", 2) or 0) or None
  )
  config_path = os.path.join(workdir, "config.json")
  changes = {}
  if ckpt.latest_step() is not None and os.path.exists(config_path):
    with open(config_path) as f:
      saved = json.load(f)
    saved.setdefault("compute_dtype", "float32")  # runs saved before these keys existed
    saved.setdefault("conv_dw_groups", 1)
    saved.setdefault("conv_backend", "xla")
    changes = config_differences(saved, json.loads(config.to_json_best_effort()))
    if changes and not allow_config_change:
      listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:8])
      more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
      raise ConfigChangedError(
        f"{workdir} holds a run with another config ({listed}{more}); resume it with "
        f"its own config ({config_path}), use a new workdir, or pass "
        "--allow_config_change"
      )

  mesh = sharding.make_mesh(config.get("num_devices", 0) or None)
  info = data.dataset_info(config.data)
  model_kwargs = dict(config.model)
  # A model with a classification head must match the dataset; an encoder-only model
  # (num_classes 0, e.g. for SSL or an objective that owns its head) has nothing to match.
  if (
    model_kwargs.get("num_classes")
    and info.get("num_classes")
    and model_kwargs["num_classes"] != info["num_classes"]
  ):
    raise ConfigError(
      f"config.model.num_classes={model_kwargs['num_classes']} but {info.get('task')} has "
      f"{info['num_classes']} classes; set --config.model.num_classes={info['num_classes']}"
    )
  try:
    model = MODELS[config.model_name](**model_kwargs)
  except TypeError as e:  # an unknown or missing model kwarg
    raise ConfigError(
      f"config.model does not fit model {config.model_name!r} ({e}); fix the config.model keys"
    ) from e
  objective = OBJECTIVES[config.objective_name]
  objective_cfg = config.get("objective", None)
  evals = {name: ecfg for name, ecfg in (config.get("evals", None) or {}).items()}
  check_kinds(evals)  # fail before training, not after it

  batch_size = int(config.data.batch_size)
  train_it = data.train_iterator(
    config.data, seed=int(config.seed), mesh=mesh, global_batch_size=batch_size
  )
  steps_per_epoch = int(train_it.steps_per_epoch)
  total_steps = int(config.get("total_steps", 0) or 0) or int(
    math.ceil(config.num_epochs * steps_per_epoch)
  )
  optimizer, schedule = optim_lib.make_optimizer(
    config.optim, steps_per_epoch=steps_per_epoch, total_steps=total_steps, batch_size=batch_size
  )

  # The first batch fixes the input shape for init; it is also step 0's batch
  # unless a checkpoint resets the iterator below.
  first_batch = next(train_it)
  example = jax.ShapeDtypeStruct(
    (1,) + tuple(first_batch["image"].shape[1:]), first_batch["image"].dtype
  )
  last_saved = ckpt.latest_step()
  initial = None
  init_from = config.get("init_from", None)
  if last_saved is None and init_from and init_from.get("workdir", ""):
    # Only a fresh run starts from another run's weights; a resumed one has its own.
    fresh = jax.eval_shape(
      lambda: model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(0)},
        jax.numpy.zeros(example.shape, example.dtype),
        train=False,
      )
    )
    initial = ckpt_lib.load_pretrained(init_from, fresh)
    logging.info("init_from %s: %s", init_from.workdir, ckpt_lib.describe_subtrees(initial))

  def init(initial_variables):
    return create_train_state(
      model,
      objective,
      optimizer,
      example,
      seed=int(config.seed),
      objective_config=objective_cfg,
      initial_variables=initial_variables,
    )

  state = jax.jit(init, out_shardings=sharding.replicated_sharding(mesh))(initial)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  restored = ckpt.restore_verified(state) if last_saved is not None else None
  if restored is not None:
    last_saved, state, data_state, _ = restored
    train_it.set_state(data_state)
    first_batch = None
    writer.truncate_after(last_saved)
    if changes:
      writer.write(last_saved, {"config_change": {k: list(v) for k, v in changes.items()}})
    logging.info("resumed from %s at step %d", ckpt.directory, last_saved)
  start = int(state.step)
  if is_main:  # written only once the resume check passed and everything was built
    with open(config_path, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  logging.info(
    "model %s: %d params; %d steps (%d/epoch, batch %d) on %d devices, %d processes",
    config.model_name,
    param_count(state.params),
    total_steps,
    steps_per_epoch,
    batch_size,
    mesh.devices.size,
    jax.process_count(),
  )

  p_step = step_lib.jit_train_step(
    mesh,
    model=model,
    objective=objective,
    optimizer=optimizer,
    config=objective_cfg,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    compute_dtype=str(config.get("compute_dtype", "float32")),
    conv_dw_groups=int(config.get("conv_dw_groups", 1)),
    conv_backend=str(config.get("conv_backend", "xla")),
  )
  p_predict = step_lib.jit_predict(model=model, objective=objective, config=objective_cfg)
  log_every = int(config.get("log_every_steps", 50) or 1)
  ckpt_every = int(config.get("checkpoint_every_steps", 0) or 0)

  acc = metrics_lib.MeanAccumulator()
  timer = {"t": time.perf_counter(), "steps": 0}

  def flush(done: int, device_metrics) -> None:
    """Pulls one step's metrics to host, guards NaN, and writes a line at log steps."""
    m = metrics_lib.scalar_items(jax.device_get(device_metrics))
    try:
      metrics_lib.check_finite(
        m,
        done,
        last_good=(f"step {last_saved} in {ckpt.directory}" if last_saved is not None else ""),
      )
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

    bar = tqdm(
      total=total_steps, initial=start, desc="train", unit="step", mininterval=1.0, smoothing=0.1
    )
  pending = None  # (steps done, metrics on device) not yet pulled to host
  t_start = time.perf_counter()
  try:
    for i in range(start, total_steps):
      batch = first_batch if first_batch is not None else next(train_it)
      first_batch = None
      if i == start:
        # Compile first (the call below reuses this executable) and hand the compiler's freed
        # memory back to the OS before the step maps its temporaries: -0.2 GiB of peak RSS at
        # ResNet18-xray 64² (host_malloc.release_free_memory).
        p_step.lower(state, batch).compile()
        host_malloc.release_free_memory()
      state, step_metrics = p_step(state, batch)
      if i == start:
        jax.block_until_ready(step_metrics)
        logging.info(
          "first step took %.1fs (compilation or cache load included)",
          time.perf_counter() - t_start,
        )
        timer.update(t=time.perf_counter(), steps=-1)  # steps/s from here on excludes compilation
      if pending is not None:
        flush(*pending)  # the previous step: by now done or nearly, so no stall
      pending = (i + 1, step_metrics)
      done = i + 1
      if bar is not None:
        bar.update(1)
      save_now = _is_due(done, ckpt_every) or done == total_steps
      due_evals = {
        n: e
        for n, e in evals.items()
        if _is_due(done, int(e.get("every_steps", 0) or 0)) and done != total_steps
      }
      if save_now or due_evals:
        # Never checkpoint or evaluate a state whose step went non-finite.
        flush(*pending)
        pending = None
      if save_now:
        try:
          ckpt.save(
            done,
            state,
            train_it.get_state(),
            meta={"total_steps": total_steps, "steps_per_epoch": steps_per_epoch},
          )
        except FloatingPointError as e:  # finite loss but diverged state: stop like the NaN guard
          raise metrics_lib.NonFiniteLossError(
            f"{e}; stopping the run. The last good checkpoint is kept "
            f"({f'step {last_saved} in {ckpt.directory}' if last_saved is not None else 'none written yet'})"
          ) from e
        last_saved = done
      if due_evals:
        res = run_evals(
          due_evals,
          make_eval_context(functools.partial(p_predict, state), data, config, mesh),
          workdir=workdir,
          step=done,
        )
        writer.write(done, res)
    if pending is not None:
      flush(*pending)
      pending = None
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()

  results = (
    run_evals(
      evals,
      make_eval_context(functools.partial(p_predict, state), data, config, mesh),
      workdir=workdir,
      step=total_steps,
    )
    if evals
    else {}
  )
  results = metrics_lib.to_jsonable({**results, "step": total_steps})
  writer.write(total_steps, results)
  if is_main:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
  return results


CONFIG_CLI_HELP = """usage: {prog} --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]{extra_usage}

  --config FILE[:ARG]     an experiment config file (configs/*.py); ARG picks its variants,
                          e.g. configs/task1_supervised.py:quick (see the file's docstring)
  --config.KEY=VALUE      override any key of the locked config, e.g. --config.seed=100,
                          --config.optim.learning_rate=0.01, --config.data.data_dir=out/data/x
                          (a key that does not exist is an error)
  --workdir DIR           {workdir_help}{extra_help}
  -h, --help              this help
  (`mtneuro --debug train ...` shows the traceback of an error)
"""


def parse_config_cli(
  argv, *, workdir_help: str = "Output directory.", allow_config_change: bool = False
) -> dict[str, Any] | None:
  """Parses ``[prog, --config FILE[:ARG], --config.key=value ..., --workdir DIR]``.

  Returns {'config': locked ConfigDict, 'workdir': str, 'allow_config_change': bool}, or None
  after printing the help for ``-h``/``--help``. Bad arguments (missing flags, a config file
  that does not load, an unknown or ill-typed override) raise ``UsageError`` (one line).
  """
  from absl import flags
  from ml_collections import config_flags

  argv = list(argv if argv is not None else sys.argv)
  prog = argv[0] if argv else "mtneuro train"
  if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv[1:]):
    extra = (
      "\n  --allow_config_change   resume although keys that change the training maths differ "
      "from\n                          the workdir's config.json"
      if allow_config_change
      else ""
    )
    print(
      CONFIG_CLI_HELP.format(
        prog=prog,
        workdir_help=workdir_help,
        extra_help=extra,
        extra_usage=" [--allow_config_change]" if allow_config_change else "",
      )
    )
    return None
  fv = flags.FlagValues()  # a private flag set: no clash with other absl users, callable twice
  # sys_argv: config_flags reads the --config.* overrides from it (by default from sys.argv).
  config_flag = config_flags.DEFINE_config_file(
    "config",
    None,
    "get_config() file[:arg].",
    flag_values=fv,
    lock_config=True,
    sys_argv=[prog, *argv[1:]],
  )
  workdir_flag = flags.DEFINE_string("workdir", None, workdir_help, flag_values=fv)
  allow_flag = (
    flags.DEFINE_boolean("allow_config_change", False, "resume with another config", flag_values=fv)
    if allow_config_change
    else None
  )
  try:
    rest = fv([prog, *argv[1:]])
    config = config_flag.value
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - absl wraps a config file's own errors in its flag errors
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      # ml_collections re-raises the config's error with the traceback in its text: keep the
      # original message (the last line, after "module.ErrorType: ").
      last = [x for x in str(cause).splitlines() if x.strip()][-1]
      raise type(cause)(last.split(f"{type(cause).__name__}: ", 1)[-1]) from e
    raise UsageError(f"{prog}: {one_line(e)}; see `{prog} --help`") from e
  if len(rest) > 1:
    raise UsageError(f"{prog}: unexpected arguments {rest[1:]}; see `{prog} --help`")
  missing = [
    f"--{n}" for n, v in (("config", config), ("workdir", workdir_flag.value)) if v is None
  ]
  if missing:
    raise UsageError(f"{prog}: {' and '.join(missing)} required; see `{prog} --help`")
  return {
    "config": config,
    "workdir": workdir_flag.value,
    "allow_config_change": bool(allow_flag.value) if allow_flag is not None else False,
  }


def quiet_logging() -> None:
  """INFO logs of our own; Orbax logs every save step at INFO, keep only its warnings."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_logger().addFilter(
    lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname
  )


def main(argv=None) -> int:
  """CLI: ``python -m mtneuro_jax.train.loop --config FILE[:ARG] --workdir DIR [--config.key=value]``.

  Raises UserError on bad input (``run_cli`` turns it into one line and exit 2).
  """
  args = parse_config_cli(
    argv,
    workdir_help="output directory (resumes if it holds checkpoints)",
    allow_config_change=True,
  )
  if args is None:
    return 0
  quiet_logging()
  train_and_evaluate(
    args["config"], args["workdir"], allow_config_change=args["allow_config_change"]
  )
  return 0


def _main_as_program(argv: list[str]) -> int:
  # Huge pages for XLA's temporaries (host_malloc says why); checks $MTNEURO_MALLOC first.
  host_malloc.reexec_with_hugepages()
  return main(argv)


if __name__ == "__main__":
  sys.exit(run_cli(_main_as_program, ["python -m mtneuro_jax.train.loop", *sys.argv[1:]]))
