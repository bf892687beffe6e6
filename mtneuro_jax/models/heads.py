"""Small heads that objectives own: MLP projectors/predictors (BYOL, MYOW) and linear probes.

Inputs are feature vectors [B, D]; outputs [B, out]. PyTorch-default initialisation
(uniform +-1/sqrt(fan_in) for weights and biases) and BatchNorm1d's eps 1e-5 /
momentum 0.1 (flax momentum 0.9), as in the reference's MLP3, so imported weights and
training dynamics match.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_linear_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch.nn.Linear's default for weight and bias."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class MLP(nn.Module):
  """Linear(D -> hidden) -> BatchNorm -> ReLU -> Linear(hidden -> out) (the reference's MLP3).

  ``__call__(x [B, D], *, train) -> [B, out]``. ``last_bias``: the reference's projector and
  predictor have no bias on the last layer. BatchNorm uses batch statistics when ``train``
  (its 'batch_stats' collection must then be mutable).
  """

  hidden: int = 4096
  out: int = 256
  last_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(
      self.hidden,
      kernel_init=torch_linear_init(d),
      bias_init=torch_linear_init(d),
      dtype=self.dtype,
      name="fc1",
    )(x)
    x = nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn"
    )(x)
    x = nn.relu(x)
    return nn.Dense(
      self.out,
      use_bias=self.last_bias,
      kernel_init=torch_linear_init(self.hidden),
      bias_init=torch_linear_init(self.hidden),
      dtype=self.dtype,
      name="fc2",
    )(x).astype(jnp.float32)


class LinearHead(nn.Module):
  """Linear(D -> num_classes) with torch's default init: ``__call__(x [B, D]) -> [B, C]``."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    return nn.Dense(
      self.num_classes, kernel_init=torch_linear_init(d), bias_init=torch_linear_init(d)
    )(x.astype(jnp.float32))
