"""A thin Orbax wrapper: train state + data-iterator state (+ small JSON metadata), verified.

Layout: ``<directory>/<step>/{state/, data/, meta/}``. ``state`` is the
TrainState pytree (params, model_state, opt_state, aux, rng key data, step);
``data`` holds every process's iterator state (each process reads its own data
shard, so each has its own position); ``meta`` is JSON: the caller's keys plus
the integrity record. Orbax writes to a temporary directory and renames it on
success, so a run killed mid-save leaves the previous checkpoint as the latest
complete one.

Integrity: ``save`` refuses a state with a NaN/Inf float leaf and records
``meta['state_sha256']``, the SHA-256 over every leaf's path, dtype, shape and
bytes as saved. ``restore_verified`` recomputes it on the restored arrays (and
re-checks finiteness), so flipped bytes in any array file, a truncated file or
undecodable JSON are caught; the corrupt step is moved to
``<directory>/../corrupt_checkpoints/<step>-<n>`` (kept for inspection, out of
Orbax's way) and the previous verified checkpoint is used instead. A checkpoint
written before this record existed restores with a warning (finiteness only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from absl import logging

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtneuro_jax.errors import UserError


class InitFromError(UserError):
  """``init_from`` points at nothing usable, or its weights do not fit this model."""


class CheckpointError(UserError):
  """No checkpoint of a workdir can be restored and verified for this run."""


def _host(x) -> np.ndarray:
  """A leaf as numpy; a replicated multi-process array is read from this process's copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_digest(state: Any) -> tuple[str, list[str]]:
  """(SHA-256 over every leaf's path, dtype, shape and bytes, paths of non-finite float leaves)."""
  h = hashlib.sha256()
  bad = []
  # Sorted by path: the same arrays give the same digest whether they sit in a TrainState
  # (field order) or in the nested dicts a checkpoint reads back as (key order).
  leaves = sorted((_path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0])
  for key, leaf in leaves:
    a = np.ascontiguousarray(_host(leaf))
    h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
      bad.append(key)
  return h.hexdigest(), bad


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able ``obj``, in process order (identical list on all processes)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int64)).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[: raw.size] = raw
  allraw = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  return [json.loads(bytes(allraw[i, : int(n)]).decode()) for i, n in enumerate(sizes)]


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of jax.Arrays: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """Saves and restores (state, per-process data state, meta) with orbax CheckpointManager.

  Saves are asynchronous: ``save`` returns once the arrays are copied off the
  device; call ``wait`` (or ``close``) before reading the files or exiting.
  """

  def __init__(
    self, directory: str, *, keep: int | None = 2, async_save: bool = True, read_only: bool = False
  ):
    # Orbax's tensorstore writer refuses relative paths (workdirs often are).
    self.directory = directory = os.path.abspath(directory)
    # cleanup_tmp_directories: drop half-written saves of a killed run before resuming
    # (never in another run's folder, which ``read_only`` opens for init_from).
    # create=False: the folder appears with the first save, so a run refused at start-up
    # leaves nothing behind.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=False,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
    )
    self._mgr = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None) -> None:
    """Saves at ``step`` (all processes must call it). ``data_state``: this process's iterator state.

    Raises FloatingPointError (and saves nothing) if a float leaf of ``state`` is NaN/Inf, so a
    diverged state never replaces (or, through ``keep``, prunes) a good checkpoint.
    """
    digest, bad = state_digest(state)
    if bad:
      raise FloatingPointError(
        f"refusing to checkpoint step {step}: non-finite values in {bad[:5]}"
      )
    os.makedirs(self.directory, exist_ok=True)
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({"per_process": gather_json(data_state)}),
      meta=ocp.args.JsonSave({**(meta or {}), "state_sha256": digest}),
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
      lambda x: (
        x
        if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      ),
      target,
    )
    out = self._mgr.restore(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    per_process = (out.data or {}).get("per_process") or [None]
    if len(per_process) != jax.process_count():
      raise ValueError(
        f"checkpoint at step {step} holds data states of {len(per_process)} processes, "
        f"this run has {jax.process_count()}"
      )
    return out.state, per_process[jax.process_index()], dict(out.meta or {})

  def saved_layout(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'/'-joined leaf path: (shape, dtype)} of the state saved at ``step``, from its metadata."""
    md = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
    tree = getattr(md, "item_metadata", md)
    return {
      _path_str(p): (tuple(leaf.shape), np.dtype(leaf.dtype).str)
      for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

  def restore_verified(self, target: Any) -> tuple[int, Any, Any, dict] | None:
    """The newest checkpoint that fits ``target`` and passes its integrity check.

    Returns (step, state, this process's data state, meta), or None if the directory holds
    no checkpoint. A corrupt checkpoint (unreadable, digest mismatch, non-finite values) newer
    than the verified one is logged and moved aside. Raises CheckpointError (and moves
    nothing) when checkpoints exist but none verifies; if none even fits ``target``'s tree
    (another model, objective or optimizer), the message says so.
    """
    want = {
      _path_str(p): (tuple(x.shape), np.dtype(x.dtype).str)
      for p, x in jax.tree_util.tree_flatten_with_path(target)[0]
    }
    problems, misfits, corrupt = [], [], []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        have = self.saved_layout(step)
      except Exception as e:  # noqa: BLE001 - unreadable metadata: corrupt
        have, reason = None, f"unreadable metadata ({type(e).__name__})"
      if have is not None and have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))[:2]
        misfits.append(f"step {step}: {diff}")
        continue
      if have is not None:
        try:
          state, data_state, meta = self.restore(step, target)
        except Exception as e:  # noqa: BLE001 - any failure to read it back means: not usable
          reason = f"{type(e).__name__}: {_first_line(e)}"[:300]
        else:
          digest, bad = state_digest(state)
          recorded = meta.get("state_sha256")
          if bad:
            reason = f"non-finite values in {bad[:3]}"
          elif recorded is not None and recorded != digest:
            reason = "its arrays do not match the SHA-256 recorded at save (corrupted on disk)"
          else:
            if recorded is None:
              logging.warning(
                "checkpoint %d in %s has no integrity record (older format); only "
                "finiteness was checked",
                step,
                self.directory,
              )
            if misfits:
              logging.warning("checkpoints that do not fit this run were skipped: %s", misfits)
            for bad_step, why in corrupt:  # out of the way, so this run can save those steps again
              self._quarantine(bad_step, why)
            return step, state, data_state, meta
      problems.append(f"step {step}: {reason}")
      corrupt.append((step, reason))
    if misfits and not problems:
      raise CheckpointError(
        f"the checkpoints in {self.directory} were written by another model, objective or "
        f"optimizer (first differences: {misfits[0]}); use a new workdir, or rerun with "
        "the config that wrote them"
      )
    if problems or misfits:
      raise CheckpointError(
        f"no checkpoint in {self.directory} could be verified ({'; '.join(problems + misfits)}); "
        "use a new workdir, or delete that checkpoints folder to train this one from scratch"
      )
    return None

  def _quarantine_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")

  def _quarantine(self, step: int, reason: str) -> None:
    """Moves a corrupt step out of Orbax's directory (so a later save of the same step works)."""
    self._mgr.wait_until_finished()
    if jax.process_index() == 0:
      qdir = self._quarantine_dir()
      os.makedirs(qdir, exist_ok=True)
      n = 0
      while os.path.exists(os.path.join(qdir, f"{step}-{n}")):
        n += 1
      dest = os.path.join(qdir, f"{step}-{n}")
      shutil.move(os.path.join(self.directory, str(step)), dest)
      with open(os.path.join(dest, "REASON.txt"), "w") as f:
        f.write(reason + "\n")
      logging.warning(
        "checkpoint %d in %s is corrupt (%s); moved to %s, falling back to the previous one",
        step,
        self.directory,
        reason,
        dest,
      )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"quarantine {step}")
    self._mgr.reload()

  def read_state(self, step: int | None = None) -> Any:
    """The saved train state as nested dicts of arrays, without a target (inspection, tests)."""
    step = self.latest_step() if step is None else step
    return self._mgr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
      "state"
    ]

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else ""


def load_pretrained(init_from, fresh_variables: Any) -> dict:
  """The part of another run's checkpoint that ``init_from`` asks for, checked against this model.

  Args:
    init_from: ConfigDict/dict with ``workdir`` (another run's workdir), ``step``
      (0 or absent = its latest checkpoint), ``subtree`` ('' = every model
      parameter; 'encoder' = only ``params['encoder']`` and the same sub-tree of
      each model-state collection, e.g. ``batch_stats['encoder']``; '/'-separated
      for deeper ones) and ``model_state`` (default True: also load BatchNorm
      statistics etc.).
    fresh_variables: this run's model variables (arrays or ShapeDtypeStructs),
      {'params': ..., 'batch_stats': ...}.

  Returns:
    A partial variables tree ({'params': {...}, 'batch_stats': {...}}) of numpy
    arrays to merge over the fresh ones (``state.merge_subtrees``). Only model
    variables are taken: the other run's optimizer state, its objective's own
    parameters and aux are left behind.

  Raises:
    InitFromError: no checkpoint there, a missing sub-tree, or a structure / shape /
      dtype that does not fit (the message names the first offending path).
  """
  get = init_from.get
  workdir = str(get("workdir", "") or "")
  src = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
  if not os.path.isdir(src):
    raise InitFromError(
      f"init_from.workdir={workdir!r} holds no checkpoints/ folder; "
      "point it at the workdir of a run that saved a checkpoint"
    )
  mgr = Checkpointer(src, keep=None, async_save=False, read_only=True)
  try:
    step = int(get("step", 0) or 0) or mgr.latest_step()
    if step is None or step not in mgr.all_steps():
      raise InitFromError(
        f"init_from: no checkpoint {'at step ' + str(step) + ' ' if step else ''}in {src} "
        f"(saved steps: {mgr.all_steps()}); pick one of those or run it first"
      )
    saved = jax.tree.map(np.asarray, mgr.read_state(step))
  finally:
    mgr.close()
  path = [p for p in str(get("subtree", "") or "").split("/") if p]
  where = f"{src} step {step}"
  out: dict[str, Any] = {}
  collections = ["params"] + (
    [c for c in fresh_variables if c != "params"] if get("model_state", True) else []
  )
  for coll in collections:
    have = saved.get("params") if coll == "params" else (saved.get("model_state") or {}).get(coll)
    want = fresh_variables[coll]
    for key in path:
      if not isinstance(want, dict) or key not in want:
        if coll == "params":
          raise InitFromError(
            f"init_from.subtree={'/'.join(path)!r}: this model has no params/{key} "
            f"(it has {sorted(want) if isinstance(want, dict) else 'no sub-trees'})"
          )
        want = None  # this collection has nothing under the sub-tree (e.g. no BN in a head)
        break
      if not isinstance(have, dict) or key not in have:
        raise InitFromError(
          f"init_from: {coll}/{'/'.join(path)} is not in {where} (its {coll} has "
          f"{sorted(have) if isinstance(have, dict) else 'no sub-trees'}); "
          "fix init_from.subtree"
        )
      have, want = have[key], want[key]
    if want is None:
      continue
    if (
      not path
    ):  # the whole model: only the names this model has (the other run's objective heads stay)
      missing = sorted(set(want) - set(have or {}))
      if missing:
        raise InitFromError(
          f"init_from: {where} has no {coll} {missing}; it is not a run of this model "
          "(or set init_from.subtree)"
        )
      have = {k: have[k] for k in want}
    check_compatible(have, want, f"{coll}/{'/'.join(path)}".rstrip("/"), where)
    node = out.setdefault(coll, {})
    for key in path[:-1]:
      node = node.setdefault(key, {})
    if path:
      node[path[-1]] = have
    else:
      out[coll] = have
  return out


def check_compatible(have: Any, want: Any, prefix: str, where: str) -> None:
  """Raises InitFromError naming the first path where ``have`` differs from ``want`` in structure/shape/dtype."""
  if isinstance(want, dict) or isinstance(have, dict):
    if not (isinstance(want, dict) and isinstance(have, dict)) or set(want) != set(have):
      extra = (
        sorted(set(have) - set(want)) if isinstance(have, dict) and isinstance(want, dict) else []
      )
      lack = (
        sorted(set(want) - set(have)) if isinstance(have, dict) and isinstance(want, dict) else []
      )
      raise InitFromError(
        f"init_from: {prefix} in {where} does not fit this model (saved has extra "
        f"{extra}, lacks {lack}); use a run of the same model or another init_from.subtree"
      )
    for k in want:
      check_compatible(have[k], want[k], f"{prefix}/{k}", where)
    return
  if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
    raise InitFromError(
      f"init_from: {prefix} is {have.dtype}{list(have.shape)} in {where} but "
      f"{np.dtype(want.dtype)}{list(want.shape)} in this model; use a run of the same "
      "architecture and width, or another init_from.subtree"
    )


def describe_subtrees(variables: dict) -> str:
  """'params/encoder (62 arrays), batch_stats/encoder (40 arrays)': what init_from loaded."""
  parts = []
  for coll, tree in variables.items():
    for k, v in tree.items():
      parts.append(f"{coll}/{k} ({len(jax.tree.leaves(v))} arrays)")
  return ", ".join(parts)
