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
* ``up_conv``: transposed conv, kernel k, stride k (no overlap, output size k * input).
* initialisers: ``xavier_uniform`` weights (PyTorch ``xavier_uniform_``: fans from the
  in/out channels times the receptive field) and ``zeros`` biases.
"""

from __future__ import annotations

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
) -> nn.ConvTranspose:
  """Transposed conv, kernel ``factor``, stride ``factor``: spatial size x ``factor``.

  Kernel layout ``[k..., C_in, C_out]``, applied without flipping; a PyTorch
  ``ConvTranspose`` weight ``[C_in, C_out, k...]`` maps to it by moving the channel axes
  last and flipping every spatial axis (see ``unet_torch_import``).
  """
  k = (factor,) * dims
  return nn.ConvTranspose(
    features,
    k,
    strides=k,
    padding="VALID",
    kernel_init=kernel_init,
    bias_init=bias_init,
    dtype=dtype,
    name=name,
  )


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

  Spatial sizes are floored (PyTorch ``ceil_mode=False``).
  """
  w = (window,) * dims
  if kind == "max":
    return nn.max_pool(x, w, strides=w, padding="VALID")
  if kind == "avg":
    return nn.avg_pool(x, w, strides=w, padding="VALID")
  raise ConfigError(f"unknown pooling {kind!r}; use 'max' or 'avg'")


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
