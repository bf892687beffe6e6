"""A thin Orbax wrapper: train state + data-iterator state (+ small JSON metadata).

Layout: ``<directory>/<step>/{state/, data/, meta/}``. ``state`` is the
TrainState pytree (params, model_state, opt_state, aux, rng key data, step);
``data`` holds every process's iterator state (each process reads its own data
shard, so each has its own position); ``meta`` is free-form JSON. Orbax writes
to a temporary directory and renames it on success, so a run killed mid-save
leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able ``obj``, in process order (identical list on all processes)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int64)).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:raw.size] = raw
  allraw = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  return [json.loads(bytes(allraw[i, :int(n)]).decode()) for i, n in enumerate(sizes)]


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of jax.Arrays: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """Saves and restores (state, per-process data state, meta) with orbax CheckpointManager.

  Saves are asynchronous: ``save`` returns once the arrays are copied off the
  device; call ``wait`` (or ``close``) before reading the files or exiting.
  """

  def __init__(self, directory: str, *, keep: int | None = 2, async_save: bool = True):
    # Orbax's tensorstore writer refuses relative paths (workdirs often are).
    self.directory = directory = os.path.abspath(directory)
    # cleanup_tmp_directories: drop half-written saves of a killed run before resuming.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self._mgr = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None) -> None:
    """Saves at ``step`` (all processes must call it). ``data_state``: this process's iterator state."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"per_process": gather_json(data_state)}),
        meta=ocp.args.JsonSave(meta or {}),
    )
    self._mgr.save(int(step), args=args, force=True)

  def restore(self, step: int | None, target: Any) -> tuple[Any, Any, dict]:
    """Returns (state laid out like ``target``, this process's data state, meta).

    ``target``: a TrainState of jax.Arrays or ShapeDtypeStructs with shardings.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    out = self._mgr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    per_process = (out.data or {}).get("per_process") or [None]
    if len(per_process) != jax.process_count():
      raise ValueError(f"checkpoint at step {step} holds data states of {len(per_process)} processes, "
                       f"this run has {jax.process_count()}")
    return out.state, per_process[jax.process_index()], dict(out.meta or {})

  def read_state(self, step: int | None = None) -> Any:
    """The saved train state as nested dicts of arrays, without a target (inspection, tests)."""
    step = self.latest_step() if step is None else step
    return self._mgr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
