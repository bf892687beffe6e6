"""The pure train step and its jit binding (shardings come from ``sharding.py``)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mtneuro_jax import sharding
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.objectives.base import StepContext
from mtneuro_jax.train.state import TrainState

# ``config.compute_dtype``: the dtype the model's convolutions and dots run in. Params,
# optimizer state, BatchNorm statistics, the loss and the gradients stay float32.
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(compute_dtype: str) -> str:
  """Returns ``compute_dtype`` if known, else raises ConfigError."""
  if compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(
      f"config.compute_dtype={compute_dtype!r} is not one of {COMPUTE_DTYPES}; "
      "use --config.compute_dtype=float32 (the default) or bfloat16"
    )
  return compute_dtype


def _cast_floating(tree, dtype):
  """``tree`` with every floating array leaf cast to ``dtype`` (other leaves unchanged)."""

  def cast(x):
    if isinstance(x, (jax.Array, jnp.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  return jax.tree.map(cast, tree)


class MixedPrecisionModel:
  """A Linen model run in a lower precision, with float32 master weights.

  ``apply(variables, *args, **kwargs)`` casts the floating leaves of ``variables['params']``
  and of the positional inputs (e.g. the image ``[B, (Z,) Y, X, C]``) to ``compute_dtype``,
  so every Linen layer whose ``dtype`` is None computes in it (flax promotes to the inputs'
  and params' dtype; BatchNorm still reduces its statistics in float32), and casts every
  floating output (outputs and mutated collections) back to float32, so losses, metrics,
  BatchNorm running statistics and gradients w.r.t. the float32 params are float32.
  Everything else (``init``, attributes) is the wrapped model's. Works for every model
  without editing the model files.
  """

  def __init__(self, model, compute_dtype: str):
    self.model = model
    self.compute_dtype = jnp.dtype(check_compute_dtype(compute_dtype))

  def apply(self, variables, *args, **kwargs):
    variables = dict(variables)
    if "params" in variables:
      variables["params"] = _cast_floating(variables["params"], self.compute_dtype)
    out = self.model.apply(variables, *_cast_floating(args, self.compute_dtype), **kwargs)
    return _cast_floating(out, jnp.float32)

  def __getattr__(self, name):
    return getattr(self.model, name)


def with_compute_dtype(model, compute_dtype: str = "float32"):
  """``model`` itself for float32 (the default path is untouched), else a MixedPrecisionModel."""
  if check_compute_dtype(compute_dtype) == "float32":
    return model
  return MixedPrecisionModel(model, compute_dtype)


def global_norm(tree) -> jax.Array:
  """sqrt(sum of squares) over all leaves (float32)."""
  leaves = jax.tree.leaves(tree)
  return (
    jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
    if leaves
    else jnp.zeros(())
  )


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model,
  objective,
  optimizer,
  config,
  total_steps: int,
  steps_per_epoch: int = 0,
  compute_dtype: str = "float32",
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update.

  Args:
    state: the TrainState (step counts updates done so far).
    batch: dict of [B, ...] arrays (see objectives/base.py).
    model, objective, optimizer: bound with functools.partial (static).
    config: the objective's ConfigDict (``config.objective``).
    total_steps, steps_per_epoch: the run's length and epoch size (static), for the
      objective's StepContext (steps_per_epoch 0 = unknown).
    compute_dtype: 'float32' (default) or 'bfloat16': the model runs in it with float32
      params, loss, gradients and optimizer state (see MixedPrecisionModel).

  Returns:
    (new state, metrics: dict of float32 scalars). Metrics are the objective's
    plus 'train/grad_norm'; 'train/loss' is the scalar loss if the objective did
    not name it (the loop's NaN guard reads both).
  """
  model = with_compute_dtype(model, compute_dtype)
  rng = state.step_rng()
  ctx = StepContext(
    step=state.step, total_steps=int(total_steps), steps_per_epoch=int(steps_per_epoch)
  )

  def loss_fn(params):
    return objective.loss(
      params, state.model_state, state.aux, batch, rng, ctx=ctx, model=model, config=config
    )

  (loss, (metrics, model_state, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  aux = objective.update(aux, params, ctx=ctx, config=config)
  metrics = dict(metrics)
  metrics.setdefault("train/loss", loss)
  metrics["train/grad_norm"] = global_norm(grads)
  new_state = state.replace(
    step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state, aux=aux
  )
  return new_state, metrics


def jit_train_step(
  mesh: Mesh,
  *,
  model,
  objective,
  optimizer,
  config,
  total_steps: int,
  steps_per_epoch: int = 0,
  donate: bool = True,
  compute_dtype: str = "float32",
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``train_step`` bound to its statics and jitted for ``mesh``.

  State in/out replicated, batch split on 'data' (P('data') on the leading axis),
  metrics replicated. The state is donated: never reuse the state you pass in.
  Under jit, BatchNorm statistics are over the global batch, so the result does
  not depend on the number of devices. ``compute_dtype``: see ``train_step``.
  """
  check_compute_dtype(compute_dtype)
  fn = functools.partial(
    train_step,
    model=model,
    objective=objective,
    optimizer=optimizer,
    config=config,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    compute_dtype=compute_dtype,
  )
  rep, data = sharding.replicated_sharding(mesh), sharding.data_sharding(mesh)
  return jax.jit(
    fn, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,) if donate else ()
  )


def jit_predict(*, model, objective, config) -> Callable[[TrainState, dict], dict[str, Any]]:
  """Jitted ``objective.predict`` taking (state, batch).

  No explicit shardings: the state is already replicated and eval batches arrive
  sharded on 'data' (also slices of them, e.g. the corners protocol), so the
  outputs stay batch-sharded and evaluators gather what they need.
  """

  @jax.jit
  def predict(state: TrainState, batch: dict[str, jax.Array]):
    return objective.predict(
      state.params, state.model_state, state.aux, batch, model=model, config=config
    )

  return predict
