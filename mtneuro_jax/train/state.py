"""The train state: everything a step reads and writes, and all a checkpoint holds
besides the data iterator's position."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


class TrainState(flax.struct.PyTreeNode):
  """A pytree of arrays (no functions: model/objective/optimizer are bound to the step).

  step: int32 [] number of optimizer updates applied so far.
  params: the trained parameters ('params' collection).
  model_state: the model's other collections, e.g. {'batch_stats': ...}.
  opt_state: optax state.
  aux: the objective's extra state (EMA target, ...), {} if none.
  rng: uint32 [2] raw key data of the run's base key; the step's key is
    ``fold_in(base, step)``, so randomness depends on the step alone, not on
    how many devices or restarts produced it.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  aux: Any
  rng: jax.Array

  def step_rng(self) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def create_train_state(
  model,
  objective,
  optimizer,
  example_image: Any,
  *,
  seed: int,
  objective_config,
  initial_variables: Any = None,
) -> TrainState:
  """Initialises model variables, the objective's own params and aux, and the optimizer (pure; jit it).

  Args:
    example_image: array or ShapeDtypeStruct [1, Y, X, C] (or [1, Z, Y, X, C]); only its
      shape and dtype matter.
    initial_variables: optional partial variables tree ({'params': {'encoder': ...},
      'batch_stats': {'encoder': ...}}) that replaces the matching sub-trees of the fresh
      model variables before the objective and optimizer are initialised (``init_from``);
      shapes must already have been checked (``checkpoint.check_compatible``).

  Returns:
    TrainState whose ``params`` are the model's params plus the objective's own
    sub-trees (top-level names must not clash).
  """
  base = jax.random.key(seed)
  # Distinct streams for init / aux / training by folding in fixed tags.
  init_rng, aux_rng, train_rng = (jax.random.fold_in(base, i) for i in (0, 1, 2))
  image = jnp.zeros(example_image.shape, example_image.dtype)
  variables = dict(model.init({"params": init_rng, "dropout": init_rng}, image, train=False))
  if initial_variables:
    variables = merge_subtrees(variables, initial_variables)
  own_params, aux = objective.init(
    aux_rng, model=model, variables=variables, example_image=image, config=objective_config
  )
  params = dict(variables.pop("params"))
  clash = sorted(set(own_params) & set(params))
  if clash:
    raise ValueError(
      f"objective {objective.name!r} creates params {clash} that the model already has; "
      "give the objective's sub-trees other names"
    )
  params.update(own_params)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=variables,
    opt_state=optimizer.init(params),
    aux=aux,
    rng=jax.random.key_data(train_rng),
  )


def merge_subtrees(tree: Any, update: Any) -> Any:
  """``tree`` (nested dicts) with every leaf present in ``update`` replaced by ``update``'s."""
  if not isinstance(update, dict):
    return update
  out = dict(tree)
  for k, v in update.items():
    out[k] = merge_subtrees(tree[k], v) if k in tree and isinstance(tree[k], dict) else v
  return out


def param_count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
