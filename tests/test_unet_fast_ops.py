"""The dot-based transposed conv and the reshape-based pools of ``seg_blocks`` against the
flax / lax ops they replace (``nn.ConvTranspose``, ``nn.max_pool``, ``nn.avg_pool``):
same parameters (names, shapes, initial values), same outputs, same gradients w.r.t.
parameters and inputs, including odd spatial sizes (floored pooling) and tied maxima."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtneuro_jax.models import seg_blocks as sb


def _flax_up_conv(features, dims, factor=2):
  k = (factor,) * dims
  return nn.ConvTranspose(
    features, k, strides=k, padding="VALID", kernel_init=sb.xavier_uniform, bias_init=sb.zeros
  )


def _close(a, b, rtol):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(b).max(), 1e-30)
  assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


@pytest.mark.parametrize(
  "dims,shape,features,factor",
  [
    (2, (3, 5, 6, 7), 4, 2),
    (2, (2, 4, 4, 16), 8, 3),
    (3, (2, 3, 4, 5, 6), 5, 2),
    (3, (1, 1, 2, 3, 4), 3, 2),
  ],
)
def test_up_conv_matches_flax_conv_transpose(dims, shape, features, factor):
  x = jax.random.normal(jax.random.key(0), shape)
  old, new = _flax_up_conv(features, dims, factor), sb.up_conv(features, dims=dims, factor=factor)
  p_old, p_new = old.init(jax.random.key(1), x), new.init(jax.random.key(1), x)
  # Same pytree, shapes and initial values: checkpoints and the PyTorch import carry over.
  assert jax.tree.structure(p_old) == jax.tree.structure(p_new)
  jax.tree.map(np.testing.assert_array_equal, p_old, p_new)
  # A non-zero bias, so the bias path is exercised.
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p_old)
  y_old, y_new = old.apply(params, x), new.apply(params, x)
  assert y_new.shape == (shape[0], *(s * factor for s in shape[1:-1]), features)
  _close(y_new, y_old, 1e-6)
  g = jax.random.normal(jax.random.key(3), y_old.shape)

  def loss(m):
    return lambda p, x: jnp.sum(m.apply(p, x) * g)

  gp_old, gx_old = jax.grad(loss(old), argnums=(0, 1))(params, x)
  gp_new, gx_new = jax.grad(loss(new), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: _close(a, b, 1e-5), gp_new, gp_old)
  _close(gx_new, gx_old, 1e-5)


def test_up_conv_bfloat16_and_bad_input():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  old = nn.ConvTranspose(
    4, (2, 2), strides=(2, 2), padding="VALID", kernel_init=sb.xavier_uniform, dtype=jnp.bfloat16
  )
  new = sb.up_conv(4, dims=2, dtype=jnp.bfloat16)
  p = old.init(jax.random.key(1), x)
  y_old, y_new = old.apply(p, x), new.apply(p, x)
  assert y_new.dtype == y_old.dtype == jnp.bfloat16
  _close(y_new, y_old, 1e-2)
  with pytest.raises(ValueError, match="spatial axes"):
    new.apply(p, x[0])


def _flax_pool(x, dims, kind, window=2):
  w = (window,) * dims
  f = nn.max_pool if kind == "max" else nn.avg_pool
  return f(x, w, strides=w, padding="VALID")


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(
  "dims,shape,window",
  [
    (2, (2, 8, 6, 3), 2),
    (2, (2, 7, 9, 3), 2),  # odd sizes: floored, the last row / column gets no gradient
    (2, (1, 9, 7, 2), 3),
    (3, (2, 4, 6, 8, 3), 2),
    (3, (1, 5, 3, 7, 2), 2),
  ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_pool_matches_reduce_window(kind, dims, shape, window, ties):
  x = jax.random.normal(jax.random.key(0), shape)
  if ties:
    # Many tied maxima, as ReLU zeros after BatchNorm give: the gradient must still go
    # to the first maximum of each window (row-major), as reduce_window / PyTorch do.
    x = jnp.maximum(jnp.round(x), 0.0)
  y_old = _flax_pool(x, dims, kind, window)
  y_new = sb.pool(x, dims=dims, kind=kind, window=window)
  assert y_new.shape == y_old.shape
  _close(y_new, y_old, 1e-6)
  g = jax.random.normal(jax.random.key(1), y_old.shape)
  gx_old = jax.grad(lambda x: jnp.sum(_flax_pool(x, dims, kind, window) * g))(x)
  gx_new = jax.grad(lambda x: jnp.sum(sb.pool(x, dims=dims, kind=kind, window=window) * g))(x)
  _close(gx_new, gx_old, 1e-5)
  if kind == "max":
    # Each window passes its whole gradient to one voxel.
    assert int(jnp.sum(gx_new != 0)) == int(jnp.sum(g != 0))


def test_max_pool_tie_goes_to_first_in_row_major_order():
  x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 0, 0].set(1.0).at[0, 1, 1, 0].set(1.0)
  gx = jax.grad(lambda x: jnp.sum(sb.pool(x, dims=2)))(x)
  np.testing.assert_array_equal(gx[0, :, :, 0], [[0.0, 0.0], [1.0, 0.0]])
  x3 = jnp.ones((1, 2, 2, 2, 1))
  gx3 = jax.grad(lambda x: jnp.sum(sb.pool(x, dims=3)))(x3)
  assert float(gx3[0, 0, 0, 0, 0]) == 1.0 and float(jnp.sum(gx3)) == 1.0


def test_pool_unknown_kind():
  with pytest.raises(Exception, match="unknown pooling"):
    sb.pool(jnp.zeros((1, 4, 4, 1)), dims=2, kind="median")
