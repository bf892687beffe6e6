"""A trained run -> model + variables + the preprocessing it was trained with.

A run is a train-loop workdir (``config.json`` + ``checkpoints/``). ``load_run`` rebuilds
``MODELS[config.model_name](**config.model)``, reads the newest checkpoint whose arrays match
the SHA-256 recorded at save (``train.checkpoint.state_digest``; corrupt newer steps are
skipped with a warning, never moved: deployment only reads a run), and keeps the model's own
variables (``params`` sub-trees the model has + its ``model_state`` collections; an
objective's own heads are left out).

Preprocessing is the pipeline's (``data.transforms``): xy ``area_downsample`` by
``config.data.downsample``, then ``normalize(x, image_mean, image_std)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mtneuro_jax.data import transforms
from mtneuro_jax.errors import UserError
from mtneuro_jax.models import MODELS
from mtneuro_jax.train import checkpoint as ckpt_lib
from mtneuro_jax.volumes import spec


class RunError(UserError):
  """A run directory that cannot be deployed (no config.json, no verified checkpoint...)."""


@dataclasses.dataclass
class LoadedRun:
  """What deployment needs from a run.

  dims: 2 (input ``[B, Y, X, 1]``) or 3 (``[B, Z, Y, X, 1]``); window: the training input size,
  ZYX in model-input voxels (z = 1 for 2D); downsample: xy factor; mean/std: normalisation.
  """

  run_dir: str
  model_name: str
  model: Any
  variables: Any
  step: int
  dims: int
  window: tuple[int, int, int]
  downsample: int
  mean: float
  std: float
  config: dict

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """uint8 ZYX full-res -> float32 ZYX model input (the pipeline's transforms)."""
    x = transforms.area_downsample(image, self.downsample)
    return transforms.normalize(x, self.mean, self.std)

  def describe(self) -> dict:
    return {
      "run": os.path.abspath(self.run_dir),
      "model_name": self.model_name,
      "model": self.config.get("model", {}),
      "step": self.step,
      "dims": self.dims,
      "downsample": self.downsample,
      "image_mean": self.mean,
      "image_std": self.std,
    }


def _training_window(config: dict, dims: int, downsample: int) -> tuple[int, int, int]:
  data = config.get("data", {})
  task_name = data.get("task", "")
  try:
    task = spec.get_task(task_name)
  except Exception:  # noqa: BLE001 - an unknown task only loses the default window
    task = None
  crop = int(data.get("random_crop", 0) or 0)
  if crop:
    yx = crop
  else:
    tile = spec.QUADRANT if task is not None and task.kind == "task3" else spec.TILE
    yx = tile // downsample
  z = (task.window if task is not None and task.window > 1 else spec.WINDOW_3D) if dims == 3 else 1
  return (int(z), int(yx), int(yx))


def _model_dims(config: dict) -> int:
  model_cfg = config.get("model", {})
  if "dims" in model_cfg:
    return int(model_cfg["dims"])
  try:
    task = spec.get_task(config.get("data", {}).get("task", ""))
    return 3 if task.window > 1 else 2
  except Exception:  # noqa: BLE001
    return 2


def _newest_verified(ckpt_dir: str) -> tuple[int, dict]:
  import orbax.checkpoint as ocp

  mgr = ckpt_lib.Checkpointer(ckpt_dir, keep=None, async_save=False, read_only=True)
  problems = []
  try:
    steps = sorted(mgr.all_steps(), reverse=True)
    for step in steps:
      try:
        out = mgr._mgr.restore(  # noqa: SLF001 - state + meta without a TrainState target
          int(step),
          args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
        state = jax.tree.map(np.asarray, out["state"])
        meta = dict(out["meta"] or {})
      except Exception as e:  # noqa: BLE001 - unreadable: try the previous one
        problems.append(f"step {step}: {type(e).__name__}")
        continue
      digest, bad = ckpt_lib.state_digest(state)
      recorded = meta.get("state_sha256")
      if bad or (recorded is not None and recorded != digest):
        problems.append(f"step {step}: {'non-finite' if bad else 'SHA-256 mismatch'}")
        continue
      if problems:
        logging.warning("skipped corrupt checkpoints of %s: %s", ckpt_dir, problems)
      return int(step), state
  finally:
    mgr.close()
  raise RunError(
    f"no verified checkpoint in {ckpt_dir} ({'; '.join(problems) or 'none saved'}); "
    "point --run at a run that finished at least one checkpoint"
  )


def load_run(run_dir: str) -> LoadedRun:
  """Rebuilds the model of a train-loop workdir and restores its newest verified checkpoint."""
  run_dir = os.path.abspath(os.path.expanduser(run_dir))
  cfg_path = os.path.join(run_dir, "config.json")
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isfile(cfg_path) or not os.path.isdir(ckpt_dir):
    raise RunError(
      f"{run_dir} is not a trained run (needs config.json and checkpoints/); "
      "pass the workdir of a `mtneuro train` run"
    )
  with open(cfg_path) as f:
    config = json.load(f)
  name = config.get("model_name")
  try:
    model = MODELS[name](**dict(config.get("model", {})))
  except TypeError as e:
    raise RunError(f"{cfg_path}: config.model does not fit model {name!r} ({e}); fix it") from e
  step, state = _newest_verified(ckpt_dir)
  dims = _model_dims(config)
  data = config.get("data", {})
  downsample = int(data.get("downsample", 1) or 1)
  window = _training_window(config, dims, downsample)
  example = jnp.zeros((1,) + (window if dims == 3 else window[1:]) + (1,), jnp.float32)
  fresh = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)}, example, train=False
    )
  )
  variables = {}
  for coll, tree in fresh.items():
    saved = state.get("params") if coll == "params" else (state.get("model_state") or {}).get(coll)
    if not isinstance(saved, dict) or any(k not in saved for k in tree):
      raise RunError(
        f"the checkpoint at step {step} of {run_dir} holds no {coll} {sorted(tree)} of model "
        f"{name!r}; is config.json the one that trained it?"
      )
    variables[coll] = {k: saved[k] for k in tree}
  try:
    ckpt_lib.check_compatible(
      variables, jax.tree.map(lambda x: x, dict(fresh)), "variables", run_dir
    )
  except ckpt_lib.InitFromError as e:
    raise RunError(str(e)) from None
  return LoadedRun(
    run_dir=run_dir,
    model_name=name,
    model=model,
    variables=variables,
    step=step,
    dims=dims,
    window=window,
    downsample=downsample,
    mean=float(data.get("image_mean", 0.0)),
    std=float(data.get("image_std", 1.0)),
    config=config,
  )
