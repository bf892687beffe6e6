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


def create_train_state(model, objective, optimizer, example_image: Any, *, seed: int,
                       objective_config) -> TrainState:
  """Initialises model variables, objective aux and optimizer state (pure; jit it).

  Args:
    example_image: array or ShapeDtypeStruct [1, Y, X, C] (or [1, Z, Y, X, C]); only its
      shape and dtype matter.
  """
  base = jax.random.key(seed)
  # Distinct streams for init / aux / training by folding in fixed tags.
  init_rng, aux_rng, train_rng = (jax.random.fold_in(base, i) for i in (0, 1, 2))
  image = jnp.zeros(example_image.shape, example_image.dtype)
  variables = dict(model.init({"params": init_rng, "dropout": init_rng}, image, train=False))
  params = variables.pop("params")
  aux = objective.init_aux(aux_rng, {"params": params, **variables}, model=model, config=objective_config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                    opt_state=optimizer.init(params), aux=aux, rng=jax.random.key_data(train_rng))


def param_count(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
