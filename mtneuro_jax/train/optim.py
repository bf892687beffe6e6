"""Optimizers and learning-rate schedules from ``config.optim``.

Keys (all but ``name`` and ``learning_rate`` optional):
  name:              'sgd' | 'adam' | 'adamw' | 'lars'
  learning_rate:     peak LR (after warmup)
  lr_base_batch_size: if > 0, LR is scaled by batch_size / lr_base_batch_size
                     (the "LARS scaling rule" of the reference SSL trainer)
  momentum:          SGD momentum (default 0.9); 0 = plain SGD
  nesterov:          SGD Nesterov (default False)
  b1, b2, eps:       Adam(W) moments (defaults 0.9, 0.999, 1e-8, PyTorch's)
  weight_decay:      decay coefficient (default 0)
  weight_decay_mode: 'coupled' (default for sgd and adam) adds wd * param to the
                     gradient before momentum / Adam moments, exactly like
                     ``torch.optim.SGD/Adam(weight_decay=...)`` (L2 regularisation);
                     'decoupled' applies -lr * wd * param after the update
                     (AdamW / SGDW). 'adamw' is always decoupled.
  decay_bias_and_norm: also decay 1-D params (biases, BN scale/shift); default
                     True, as the reference (``exclude_bias_and_bn=False``)
  trust_coefficient: LARS only (default 0.001, BYOL's eta). 'lars' = ``optax.lars``: the
                     decay is added to the gradient (LARS's own coupling; 'decoupled' is
                     refused), then the layer-wise trust ratio, the LR, then momentum
                     (``momentum``, ``nesterov``). 1-D params (biases, BN scale/shift) get
                     neither weight decay nor trust-ratio adaptation, whatever
                     ``decay_bias_and_norm`` says (as BYOL's LARS).
  schedule:          'cosine' (to 0 at the last step) | 'constant'
  warmup_epochs:     linear warmup from 0 (float epochs; default 0)
  grad_clip_norm:    clip by global norm if > 0 (default 0 = off)
  freeze:            regexes over '/'-joined param paths (e.g. '^encoder/'); matching
                     params get exactly zero update (no decay, no momentum)
  param_groups:      named groups of parameters with their own settings, e.g.
                     ``param_groups.probe = {'pattern': '^probe/', 'learning_rate': 0.1,
                     'weight_decay': 0.0}``: ``pattern`` is a regex over '/'-joined param
                     paths; every other key overrides the same key above for that group
                     (learning_rate, momentum, weight_decay, decay_bias_and_norm, schedule,
                     warmup_epochs, ...; ``freeze: True`` freezes the group). A param
                     belongs to the first group (in config order) whose pattern matches;
                     ``freeze`` wins over groups; the rest use the top-level settings.
                     Gradient clipping (grad_clip_norm) stays global over all trained params.

Derived values (steps per epoch, warmup steps, total steps) are computed by the
caller (the loop) from the dataset size and passed in here, never stored in
the config.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import optax

from mtneuro_jax.errors import ConfigError


def _get(cfg, key, default):
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def peak_learning_rate(cfg, batch_size: int) -> float:
  lr = float(_get(cfg, "learning_rate", 0.1))
  base = int(_get(cfg, "lr_base_batch_size", 0) or 0)
  return lr * batch_size / base if base > 0 else lr


def make_schedule(
  cfg, *, steps_per_epoch: int, total_steps: int, batch_size: int
) -> optax.Schedule:
  """LR as a function of the update index (0-based)."""
  peak = peak_learning_rate(cfg, batch_size)
  warmup = int(round(float(_get(cfg, "warmup_epochs", 0.0)) * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  kind = _get(cfg, "schedule", "constant")
  if kind == "cosine":
    if warmup:
      return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(total_steps, warmup + 1), 0.0
      )
    return optax.cosine_decay_schedule(peak, max(total_steps, 1), alpha=0.0)
  if kind == "constant":
    if warmup:
      return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
      )
    return optax.constant_schedule(peak)
  raise ConfigError(f"unknown schedule {kind!r}; known: 'cosine', 'constant'")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_labels(params: Any, freeze: Sequence[str], groups: Sequence[tuple[str, str]] = ()) -> Any:
  """Per param: 'frozen' if its '/'-joined path matches a regex in ``freeze``, else the name of
  the first ``(name, pattern)`` group whose pattern matches, else 'train'."""
  frozen = [re.compile(p) for p in freeze]
  compiled = [(name, re.compile(pattern)) for name, pattern in groups]

  def label(path, _):
    key = _path_str(path)
    if any(p.search(key) for p in frozen):
      return "frozen"
    return next((name for name, p in compiled if p.search(key)), "train")

  return jax.tree_util.tree_map_with_path(label, params)


class _Overlay:
  """``cfg`` with some keys overridden (a param group's settings over the top-level ones)."""

  def __init__(self, cfg, overrides: dict):
    self._cfg, self._over = cfg, overrides

  def get(self, key, default=None):
    return self._over[key] if key in self._over else _get(self._cfg, key, default)


def _update_chain(
  cfg, *, steps_per_epoch: int, total_steps: int, batch_size: int, clip: bool
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """(clip) -> coupled decay -> SGD momentum | Adam -> decoupled decay -> -lr: one group's update."""
  name = _get(cfg, "name", "sgd")
  schedule = make_schedule(
    cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps, batch_size=batch_size
  )
  wd = float(_get(cfg, "weight_decay", 0.0))
  mode = _get(cfg, "weight_decay_mode", "decoupled" if name == "adamw" else "coupled")
  if mode not in ("coupled", "decoupled"):
    raise ConfigError(f"weight_decay_mode must be 'coupled' or 'decoupled', got {mode!r}")
  if name == "adamw" and mode != "decoupled":
    raise ConfigError("adamw is decoupled weight decay by definition; use 'adam' for coupled L2")
  decay_all = bool(_get(cfg, "decay_bias_and_norm", True))
  # Mask: True where weight decay applies (all params, or only >= 2-D kernels).
  mask = None if decay_all else (lambda p: jax.tree.map(lambda x: x.ndim > 1, p))

  chain = []
  clip_norm = float(_get(cfg, "grad_clip_norm", 0.0) or 0.0)
  if clip and clip_norm > 0:
    chain.append(optax.clip_by_global_norm(clip_norm))
  if name == "lars":
    if wd and mode != "coupled":
      raise ConfigError(
        "lars adds its weight decay to the gradient before the trust ratio; "
        "set optim.weight_decay_mode='coupled' (or use sgd for decoupled decay)"
      )
    # Kernels only (ndim > 1): BN scale/shift and biases are neither decayed nor adapted.
    kernels = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    chain.append(
      optax.lars(
        schedule,
        weight_decay=wd,
        weight_decay_mask=kernels,
        trust_coefficient=float(_get(cfg, "trust_coefficient", 0.001)),
        trust_ratio_mask=kernels,
        momentum=float(_get(cfg, "momentum", 0.9)),
        nesterov=bool(_get(cfg, "nesterov", False)),
      )
    )
    return optax.chain(*chain), schedule
  if wd and mode == "coupled":
    chain.append(optax.add_decayed_weights(wd, mask))
  if name == "sgd":
    momentum = float(_get(cfg, "momentum", 0.9))
    # optax.trace == torch SGD momentum with dampening 0 (buf = m * buf + g).
    if momentum:
      chain.append(optax.trace(decay=momentum, nesterov=bool(_get(cfg, "nesterov", False))))
  elif name in ("adam", "adamw"):
    chain.append(
      optax.scale_by_adam(
        b1=float(_get(cfg, "b1", 0.9)),
        b2=float(_get(cfg, "b2", 0.999)),
        eps=float(_get(cfg, "eps", 1e-8)),
      )
    )
  else:
    raise ConfigError(f"unknown optimizer {name!r}; known: 'sgd', 'adam', 'adamw', 'lars'")
  if wd and mode == "decoupled":
    chain.append(optax.add_decayed_weights(wd, mask))
  chain.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*chain), schedule


def make_optimizer(
  cfg, *, steps_per_epoch: int, total_steps: int, batch_size: int
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """Returns (optax optimizer, the top-level LR schedule). See the module docstring for keys."""
  sizes = dict(steps_per_epoch=steps_per_epoch, total_steps=total_steps, batch_size=batch_size)
  freeze = list(_get(cfg, "freeze", ()) or ())
  groups_cfg = _get(cfg, "param_groups", None) or {}
  groups = []
  for gname, gcfg in groups_cfg.items():
    gcfg = dict(gcfg)
    if "pattern" not in gcfg:
      raise ConfigError(f"optim.param_groups.{gname} has no 'pattern' (a regex over param paths)")
    if gname in ("train", "frozen"):
      raise ConfigError(
        f"optim.param_groups.{gname}: 'train' and 'frozen' are reserved group names"
      )
    groups.append((gname, gcfg))
  if not groups:
    tx, schedule = _update_chain(cfg, clip=True, **sizes)
    if freeze:
      tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()}, lambda params: param_labels(params, freeze)
      )
    return tx, schedule

  tx, schedule = _update_chain(cfg, clip=False, **sizes)
  transforms = {"train": tx, "frozen": optax.set_to_zero()}
  for gname, gcfg in groups:
    over = {k: v for k, v in gcfg.items() if k not in ("pattern", "freeze")}
    transforms[gname] = (
      optax.set_to_zero()
      if gcfg.get("freeze", False)
      else _update_chain(_Overlay(cfg, over), clip=False, **sizes)[0]
    )
  patterns = [(gname, gcfg["pattern"]) for gname, gcfg in groups]

  def labels(params):
    return param_labels(params, freeze, patterns)

  update = optax.multi_transform(transforms, labels)
  clip_norm = float(_get(cfg, "grad_clip_norm", 0.0) or 0.0)
  if clip_norm > 0:  # one global norm over every trained param, whatever its group
    trained = lambda params: jax.tree.map(lambda lab: lab != "frozen", labels(params))  # noqa: E731
    update = optax.chain(optax.masked(optax.clip_by_global_norm(clip_norm), trained), update)
  return update, schedule
