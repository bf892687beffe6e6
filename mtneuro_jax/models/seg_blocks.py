"""Building blocks shared by the segmentation models, 2D or 3D by one ``dims`` field.

Arrays are channel-last: 2D ``[B, Y, X, C]``, 3D ``[B, Z, Y, X, C]``; ``dims`` is the
number of spatial axes (2 or 3). Everything here follows PyTorch's defaults where the
reference models (MTNeuro U-Net, MedicalZooPytorch) rely on them, so weights imported
from PyTorch give the same outputs:

* ``conv``: symmetric explicit padding (PyTorch ``padding=k//2`` for 'same'); 'SAME'
  would pad strided convs asymmetrically.
* ``Norm``: BatchNorm with PyTorch momentum 0.1 (== Flax 0.9) and eps 1e-5; InstanceNorm
  without affine parameters (PyTorch's ``affine=False`` default); ``group<N>`` is
  ``GroupNorm(num_groups=N)`` with affine parameters.
* ``activation``: relu, leaky (slope 0.1, as the reference U-Net), elu; ``prelu`` is a
  Module (``PReLU``) because it has a parameter.
* ``up_conv``: transposed conv, kernel k, stride k (no overlap, output size k * input),
  computed as a dot + depth-to-space (``UpConv``); ``pool``: max/avg pool by reshape.
* initialisers: ``xavier_uniform`` weights (PyTorch ``xavier_uniform_``: fans from the
  in/out channels times the receptive field) and ``zeros`` biases.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtneuro_jax.errors import ConfigError

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros

NORMALIZATIONS = ("batch", "instance", "group<N>", "none")
ACTIVATIONS = ("relu", "leaky", "elu")


def check_dims(dims: int, supported: Sequence[int], model: str) -> int:
  """Returns ``dims`` if the model supports it, else raises ConfigError naming the choices."""
  if dims not in tuple(supported):
    raise ConfigError(
      f"model {model!r} does not support dims={dims!r}; set config.model.dims to one of "
      f"{', '.join(str(d) for d in supported)}"
    )
  return int(dims)


def scaled(channels: int, width_multiplier: float) -> int:
  """``channels`` scaled by ``width_multiplier``, rounded, at least 1."""
  return max(1, int(round(channels * width_multiplier)))


def _tuple(v: int | Sequence[int], dims: int) -> tuple[int, ...]:
  return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * dims


def conv(
  features: int,
  kernel_size: int | Sequence[int] = 3,
  *,
  dims: int,
  padding: str | int = "same",
  strides: int | Sequence[int] = 1,
  dilation: int | Sequence[int] = 1,
  use_bias: bool = True,
  kernel_init=xavier_uniform,
  bias_init=zeros,
  dtype: Any = jnp.float32,
  name: str | None = None,
) -> nn.Conv:
  """A ``dims``-D convolution (not yet applied).

  ``padding``: 'same' pads ``dilation * (k - 1) // 2`` on both sides (PyTorch
  ``padding=k//2``: same size at stride 1 for odd k), 'valid' pads nothing, an int pads
  that much on both sides.
  """
  k = _tuple(kernel_size, dims)
  d = _tuple(dilation, dims)
  if padding == "same":
    pad = tuple((di * (ki - 1) // 2, di * (ki - 1) // 2) for ki, di in zip(k, d, strict=True))
  elif padding == "valid":
    pad = "VALID"
  elif isinstance(padding, int):
    pad = ((padding, padding),) * dims
  else:
    raise ConfigError(f"unknown conv padding {padding!r}; use 'same', 'valid' or an int")
  return nn.Conv(
    features,
    k,
    strides=_tuple(strides, dims),
    padding=pad,
    kernel_dilation=d,
    use_bias=use_bias,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    name=name,
  )


def up_conv(
  features: int,
  *,
  dims: int,
  factor: int = 2,
  kernel_init=xavier_uniform,
  bias_init=zeros,
  dtype: Any = jnp.float32,
  name: str | None = None,
) -> UpConv:
  """Transposed conv, kernel ``factor``, stride ``factor``: spatial size x ``factor``.

  Kernel layout ``[k..., C_in, C_out]``, applied without flipping; a PyTorch
  ``ConvTranspose`` weight ``[C_in, C_out, k...]`` maps to it by moving the channel axes
  last and flipping every spatial axis (see ``unet_torch_import``). Same parameters
  (names, shapes, init) and outputs as ``flax.linen.ConvTranspose(features, k, strides=k,
  padding='VALID')``, computed as one dot (``UpConv``).
  """
  return UpConv(
    features,
    (factor,) * dims,
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    name=name,
  )


def up_conv_apply(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """``lax.conv_transpose(x, kernel, strides=k, 'VALID')`` (+ bias) as a dot + depth-to-space.

  ``x [B, *S, C_in]``, ``kernel [*k, C_in, C_out]`` -> ``[B, *(S * k), C_out]``. With
  stride == kernel size the taps do not overlap: output voxel ``S_i * k_i + r_i`` is
  ``x[S_i] . kernel[k_i - 1 - r_i]`` (lax pads the input-dilated x by k - 1 and does not
  flip the kernel, so the offsets read the taps in reverse). XLA:CPU runs the conv form
  as an input-dilated convolution in which (k-1)/k of the products per axis hit inserted
  zeros (3/4 in 2D, 7/8 in 3D), in the forward pass and in both gradients; here the
  forward is one ``[B*prod(S), C_in] @ [C_in, prod(k)*C_out]`` dot, and its gradients
  are dots as well.
  """
  dims = kernel.ndim - 2
  k = kernel.shape[:dims]
  c_in, c_out = kernel.shape[-2:]
  b, *spatial, c = x.shape
  if len(spatial) != dims or c != c_in:
    raise ValueError(
      f"up_conv_apply: x {tuple(x.shape)} does not match kernel {tuple(kernel.shape)}"
    )
  w = jnp.flip(kernel, axis=tuple(range(dims)))
  w = jnp.moveaxis(w, -2, 0).reshape(c_in, -1)  # [C_in, (*k, C_out)]
  y = jnp.dot(x.reshape(-1, c_in), w).reshape(b, *spatial, *k, c_out)
  if bias is not None:
    y = y + bias
  # [B, S_0.., k_0.., C] -> [B, S_0, k_0, S_1, k_1, ..., C] (depth-to-space).
  perm = (0,) + tuple(a for i in range(dims) for a in (1 + i, 1 + dims + i)) + (1 + 2 * dims,)
  return y.transpose(perm).reshape(b, *(s * f for s, f in zip(spatial, k, strict=True)), c_out)


class UpConv(nn.Module):
  """Non-overlapping transposed conv (stride == ``kernel_size``) through ``up_conv_apply``.

  ``__call__(x [B, *S, C_in]) -> [B, *(S * k), features]``. Parameters as
  ``flax.linen.ConvTranspose``: 'kernel' ``[*k, C_in, features]`` and 'bias'
  ``[features]``, float32, created in that order by the same initialisers (so the same
  keys give the same values), cast to ``dtype`` at apply time.
  """

  features: int
  kernel_size: tuple[int, ...]
  kernel_init: Any = xavier_uniform
  bias_init: Any = zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = tuple(self.kernel_size)
    if x.ndim != len(k) + 2:
      raise ValueError(
        f"up_conv with a {len(k)}-D kernel needs x [B, {len(k)} spatial axes, C]; got "
        f"shape {tuple(x.shape)}"
      )
    kernel = self.param("kernel", self.kernel_init, k + (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return up_conv_apply(x, kernel, bias)


class Norm(nn.Module):
  """Normalisation by name: 'batch' | 'instance' | 'group<N>' | 'none' (or '' / None).

  ``__call__(x [B, *spatial, C], *, train)``; BatchNorm keeps its running stats in the
  'batch_stats' collection and uses them when ``train`` is False.
  """

  kind: str | None = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kind = (self.kind or "none").lower()
    if kind == "none":
      return x
    if kind == "batch":
      return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn"
      )(x)
    if kind == "instance":
      # PyTorch InstanceNorm{2,3}d default: affine=False, no running stats.
      return nn.InstanceNorm(
        epsilon=1e-5, use_scale=False, use_bias=False, dtype=self.dtype, name="instance"
      )(x)
    if kind.startswith("group"):
      try:
        groups = int(kind[len("group") :])
      except ValueError:
        groups = 0
      if groups < 1 or x.shape[-1] % groups:
        raise ConfigError(
          f"normalization {self.kind!r} needs a group count dividing {x.shape[-1]} channels; "
          "use e.g. 'group8'"
        )
      return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, name="group")(x)
    raise ConfigError(
      f"unknown normalization {self.kind!r}; use one of {', '.join(NORMALIZATIONS)}"
    )


def activation(kind: str):
  """The activation function named ``kind``: 'relu' | 'leaky' (slope 0.1) | 'elu'."""
  if kind == "relu":
    return nn.relu
  if kind == "leaky":
    return lambda x: nn.leaky_relu(x, negative_slope=0.1)
  if kind == "elu":
    return nn.elu
  raise ConfigError(f"unknown activation {kind!r}; use one of {', '.join(ACTIVATIONS)}")


class PReLU(nn.Module):
  """PyTorch ``nn.PReLU(num_parameters)``: one slope per channel (or one shared), init 0.25."""

  num_parameters: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.param("alpha", nn.initializers.constant(0.25), (self.num_parameters,), jnp.float32)
    return jnp.where(x >= 0, x, a.astype(x.dtype) * x)


def pool(x: jax.Array, *, dims: int, kind: str = "max", window: int = 2) -> jax.Array:
  """Max or average pool, window = stride = ``window``, no padding (PyTorch defaults).

  ``x [B, *S, C]`` -> ``[B, *(S // window), C]``: spatial sizes are floored (PyTorch
  ``ceil_mode=False``; the trailing rows are dropped and get zero gradient). Computed as
  a reshape to ``[B, S_0 // w, w, S_1 // w, w, ..., C]`` and a max / mean over the window
  axes instead of ``reduce_window`` (whose max gradient, ``select_and_scatter``, is slow
  on XLA:CPU). Same values as ``nn.max_pool`` / ``nn.avg_pool`` (the mean up to
  summation order); the max's gradient goes, as ``reduce_window``'s and PyTorch's, to the
  first maximum of each window in row-major order (``_max_pool``), so ties are resolved
  as before.
  """
  if kind not in ("max", "avg"):
    raise ConfigError(f"unknown pooling {kind!r}; use 'max' or 'avg'")
  w = (window,) * dims
  x = _crop_to_windows(x, w)
  if kind == "max":
    return _max_pool(x, w)
  return jnp.mean(_split_windows(x, w), axis=_window_axes(dims))


def _crop_to_windows(x: jax.Array, w: tuple[int, ...]) -> jax.Array:
  """``x [B, *S, C]`` cropped to ``S // w * w`` (a no-op when every ``S`` divides)."""
  keep = tuple(s // wi * wi for s, wi in zip(x.shape[1:-1], w, strict=True))
  if keep == x.shape[1:-1]:
    return x
  return x[(slice(None),) + tuple(slice(0, k) for k in keep)]


def _split_windows(x: jax.Array, w: tuple[int, ...]) -> jax.Array:
  """``[B, *S, C]`` (each ``S_i`` divisible by ``w_i``) -> ``[B, S_0/w_0, w_0, ..., C]``."""
  shape = [x.shape[0]]
  for s, wi in zip(x.shape[1:-1], w, strict=True):
    shape += [s // wi, wi]
  return x.reshape(*shape, x.shape[-1])


def _window_axes(dims: int) -> tuple[int, ...]:
  return tuple(2 + 2 * i for i in range(dims))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, w: tuple[int, ...]) -> jax.Array:
  """Non-overlapping max pool of ``x [B, *S, C]`` (``S_i`` divisible by ``w_i``).

  The gradient is custom because ``jnp.max``'s own splits it evenly between tied maxima,
  while ``reduce_window`` (``nn.max_pool``) and PyTorch give all of it to the first one.
  Ties are not rare in the U-Net: its blocks run conv -> act -> norm -> pool, so a window
  whose four pre-activations are all negative holds four ReLU zeros, which BatchNorm maps
  to one shared value (and bfloat16 rounds nearby values together). For BatchNorm with a
  non-zero scale the even split would give the same parameter and input gradients (tied
  voxels share one normalised value, and ReLU passes no gradient to them), but not with a
  zero scale or other inputs; taking the first maximum keeps the old gradient exactly.
  """
  return jnp.max(_split_windows(x, w), axis=_window_axes(len(w)))


def _max_pool_fwd(x, w):
  y = _max_pool(x, w)
  return y, (x, y)


def _max_pool_bwd(w, res, g):
  x, y = res
  axes = _window_axes(len(w))
  xs = _split_windows(x, w)
  first = xs == jnp.expand_dims(y, axes)
  # Keep the first True in row-major window order: along each window axis (outer to
  # inner) drop the voxels with a maximum in an earlier slice of the same sub-window.
  for i, ax in enumerate(axes):
    hit = jnp.any(first, axis=axes[i + 1 :], keepdims=True) if i + 1 < len(axes) else first
    earlier = [jnp.zeros_like(jax.lax.index_in_dim(hit, 0, ax))]
    for j in range(1, w[i]):
      earlier.append(earlier[-1] | jax.lax.index_in_dim(hit, j - 1, ax))
    first = first & ~jnp.concatenate(earlier, axis=ax)
  dx = jnp.where(first, jnp.expand_dims(g, axes), jnp.zeros((), g.dtype))
  return (dx.reshape(x.shape),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def center_crop(x: jax.Array, spatial: Sequence[int]) -> jax.Array:
  """Centre-crops ``x [B, *spatial_in, C]`` to ``spatial`` (each <= the input's).

  Start ``(d - e) // 2``, as the reference U-Net's ``autocrop``; no-op when equal.
  """
  dims = x.ndim - 2
  if len(spatial) != dims:
    raise ValueError(f"center_crop: target {tuple(spatial)} has not {dims} spatial axes")
  idx = [slice(None)]
  for d, e in zip(x.shape[1:-1], spatial, strict=True):
    if e > d:
      raise ValueError(f"center_crop: target {tuple(spatial)} larger than {x.shape[1:-1]}")
    idx.append(slice((d - e) // 2, (d - e) // 2 + e))
  idx.append(slice(None))
  return x[tuple(idx)]


def torch_default_inits(fan_in: int, *, transposed: bool = False):
  """(kernel_init, bias_init) of PyTorch's default conv init, for a layer with ``fan_in``.

  PyTorch: ``kaiming_uniform_(a=sqrt(5))`` == U(+-1/sqrt(fan_in)) weights and
  U(+-1/sqrt(fan_in)) biases, with fan_in = ``C_in * prod(k)`` for a conv and (PyTorch's
  quirk) ``C_out * prod(k)`` for a transposed conv; pass that number. ``transposed``
  reads the fan from the kernel's last axis (Flax ``ConvTranspose`` kernel ``[k..., I, O]``).
  """
  axes = {"in_axis": -1, "out_axis": -2} if transposed else {}
  kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", **axes)
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return kernel_init, bias_init
