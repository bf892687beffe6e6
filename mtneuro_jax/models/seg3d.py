"""3D segmentation models of MedicalZooPytorch (MIT): VNet-light and HighResNet, channel-last.

Sources: black0017/MedicalZooPytorch ``lib/medzoo/Vnet.py`` (``VNetLight``, itself
from Dawn90/V-Net.pytorch) and ``lib/medzoo/HighResNet3D.py`` (``HighResNet3D``,
Li et al. 2017, arXiv:1707.01992). The MTNeuro website lists both for Task 2 3D;
the reference repository does not ship them. Structure, widths, residual wiring,
dropout placement and PyTorch's default initialisation follow those files; inputs
are ``[B, Z, Y, X, C_in]`` and logits ``[B, Z, Y, X, num_classes]`` (same size).

VNetLight (default widths 16/32/64/128, ELU):
  in_tr: conv5 -> BN, + the input tiled to 16 channels, act;
  down_tr32/64/128: conv k2 s2 (x2 channels) -> BN -> act, then 1/2/3 LUConvs
    (conv5 -> BN -> act), + residual, act;
  up_tr128/64/32: transposed conv k2 s2 -> BN -> act, concat [up, skip], 2/1/1
    LUConvs, + residual (the concat), act;
  out_tr: conv5 -> BN -> act, then the 1x1 conv (our ``head``).
  Dropout as the original: channel dropout (``Dropout3d``, p=``dropout``, default 0.5)
  on the input of down_tr128's LUConvs and of up_tr128, and on every decoder skip;
  it needs a 'dropout' rng in train mode (``dropout=0`` switches it off).
  The light version has 3 stride-2 down-convs (the full V-Net's 4th is the one it
  skips), so every spatial size must be divisible by 8: an 8-slice window reaches depth
  1 at the bottom. Other sizes raise ConfigError (no padding; crop or pad the tiles).

HighResNet (widths 16/32/64, 80 before the classifier, ReLU, no down-sampling, so any
size works): conv_init (conv3; its BN+ReLU output is the first residual), three
residual pairs of pre-activation (BN -> ReLU -> conv3) blocks at dilation 1, 2, 4,
channel increases by zero-padding the shortcut (``shortcut_type='A'``, the default;
'B' uses a BN-ReLU-1x1-conv projection), then conv1x1 to 80, channel dropout 0.5,
and BN -> ReLU -> 1x1 conv (``head``). With an 8-slice depth the dilation-4 convs
mostly see padding along Z (as the original would).

Deviations: ``width_multiplier`` scales every width (round, >= 1); with odd channel
differences HighResNet's zero-padded shortcut puts the extra channel at the end (the
original assumes even). BatchNorm as PyTorch (eps 1e-5, momentum 0.1); Flax's running
variance uses the biased batch variance (PyTorch: unbiased).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtneuro_jax.errors import ConfigError
from mtneuro_jax.models import seg_blocks as sb

_DIMS = 3


def _conv(features: int, k: int, cin: int, *, padding="same", strides=1, dilation=1, name=None):
  """PyTorch-default-initialised 3D conv (the MedicalZoo models keep PyTorch's init)."""
  kinit, binit = sb.torch_default_inits(cin * k**_DIMS)
  return sb.conv(
    features,
    k,
    dims=_DIMS,
    padding=padding,
    strides=strides,
    dilation=dilation,
    kernel_init=kinit,
    bias_init=binit,
    name=name,
  )


def _bn(train: bool, name: str):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _channel_dropout(rate: float, train: bool):
  """PyTorch ``Dropout3d``: zeroes whole channels per sample ([B, Z, Y, X, C] -> drop over C)."""
  return nn.Dropout(rate, broadcast_dims=(1, 2, 3), deterministic=not train or rate == 0)


def _check_input(image: jax.Array, name: str, multiple: int = 1) -> None:
  if image.ndim != 5:
    raise ConfigError(
      f"{name} is 3D and needs images [B, Z, Y, X, C]; got shape {tuple(image.shape)}: "
      "use a task2_3d_* dataset"
    )
  if any(s % multiple for s in image.shape[1:-1]):
    raise ConfigError(
      f"{name} input spatial size {tuple(image.shape[1:-1])} is not divisible by {multiple} "
      f"(its stride-2 down-convs); crop or pad the volumes to a multiple of {multiple}"
    )


class _Act(nn.Module):
  """VNet's ``ELUCons``: ELU, or a per-channel PReLU when ``elu`` is False."""

  elu: bool = True

  @nn.compact
  def __call__(self, x):
    return nn.elu(x) if self.elu else sb.PReLU(x.shape[-1], name="prelu")(x)


class LUConv(nn.Module):
  """conv5 (same size) -> BN -> act; channels unchanged."""

  elu: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    c = x.shape[-1]
    y = _bn(train, "bn1")(_conv(c, 5, c, name="conv1")(x))
    return _Act(self.elu, name="relu1")(y)


class InputTransition(nn.Module):
  """conv5 -> BN, + the input tiled to ``features`` channels, act."""

  features: int
  elu: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    cin = x.shape[-1]
    if self.features % cin:
      raise ConfigError(
        f"vnet_light's first width {self.features} is not a multiple of the {cin} input "
        "channels (the input is tiled onto it); choose a width_multiplier that makes it one"
      )
    out = _bn(train, "bn1")(_conv(self.features, 5, cin, name="conv1")(x))
    return _Act(self.elu, name="relu1")(out + jnp.tile(x, (1, 1, 1, 1, self.features // cin)))


class DownTransition(nn.Module):
  """conv k2 s2 (x2 channels) -> BN -> act -> [dropout] -> n LUConvs, + residual, act."""

  n_convs: int
  elu: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    cin = x.shape[-1]
    down = _conv(2 * cin, 2, cin, padding="valid", strides=2, name="down_conv")(x)
    down = _Act(self.elu, name="relu1")(_bn(train, "bn1")(down))
    out = _channel_dropout(self.dropout, train)(down)
    for i in range(self.n_convs):
      out = LUConv(self.elu, name=f"ops_{i}")(out, train=train)
    return _Act(self.elu, name="relu2")(out + down)


class UpTransition(nn.Module):
  """[dropout] -> transposed conv k2 s2 (``features // 2``) -> BN -> act, concat with the
  channel-dropped skip, n LUConvs, + residual (the concat), act -> ``features`` channels."""

  features: int
  n_convs: int
  elu: bool = True
  dropout: float = 0.0
  skip_dropout: float = 0.5

  @nn.compact
  def __call__(self, x, skip, *, train: bool):
    half = self.features // 2
    if skip.shape[-1] != half:
      raise ValueError(f"UpTransition: skip has {skip.shape[-1]} channels, expected {half}")
    out = _channel_dropout(self.dropout, train)(x)
    skip = _channel_dropout(self.skip_dropout, train)(skip)
    # PyTorch's ConvTranspose fan_in is C_out * prod(k).
    kinit, binit = sb.torch_default_inits(half * 2**_DIMS, transposed=True)
    out = sb.up_conv(half, dims=_DIMS, kernel_init=kinit, bias_init=binit, name="up_conv")(out)
    out = _Act(self.elu, name="relu1")(_bn(train, "bn1")(out))
    xcat = jnp.concatenate([out, skip], axis=-1)
    out = xcat
    for i in range(self.n_convs):
      out = LUConv(self.elu, name=f"ops_{i}")(out, train=train)
    return _Act(self.elu, name="relu2")(out + xcat)


class VNetLightEncoder(nn.Module):
  base: int
  elu: bool = True
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, *, train: bool):
    out16 = InputTransition(self.base, self.elu, name="in_tr")(x, train=train)
    out32 = DownTransition(1, self.elu, name="down_tr32")(out16, train=train)
    out64 = DownTransition(2, self.elu, name="down_tr64")(out32, train=train)
    out128 = DownTransition(3, self.elu, self.dropout, name="down_tr128")(out64, train=train)
    return out16, out32, out64, out128


class VNetLightDecoder(nn.Module):
  base: int
  num_classes: int
  elu: bool = True
  dropout: float = 0.5

  @nn.compact
  def __call__(self, skips, *, train: bool):
    out16, out32, out64, out128 = skips
    b, p = self.base, self.dropout
    out = UpTransition(8 * b, 2, self.elu, p, p, name="up_tr128")(out128, out64, train=train)
    out = UpTransition(4 * b, 1, self.elu, 0.0, p, name="up_tr64")(out, out32, train=train)
    out = UpTransition(2 * b, 1, self.elu, 0.0, p, name="up_tr32")(out, out16, train=train)
    # OutputTransition up to (not including) its final 1x1 conv, which is the model's head.
    out = _conv(self.num_classes, 5, out.shape[-1], name="out_conv1")(out)
    return _Act(self.elu, name="out_relu1")(_bn(train, "out_bn1")(out))


class VNetLight(nn.Module):
  """VNet-light: ``__call__(image [B, Z, Y, X, C_in], *, train) -> {'logits': [B, Z, Y, X,
  num_classes]}``. Z, Y, X must be divisible by 8 (ConfigError otherwise; module doc).

  Params {'encoder', 'decoder', 'head'}; batch_stats {'encoder', 'decoder'}. Train mode
  needs a 'dropout' rng unless ``dropout=0``. ``elu=False`` uses per-channel PReLU.
  """

  num_classes: int
  dims: int = 3
  width_multiplier: float = 1.0
  elu: bool = True
  dropout: float = 0.5

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    sb.check_dims(self.dims, (3,), "vnet_light")
    _check_input(image, "vnet_light", 8)
    base = sb.scaled(16, self.width_multiplier)
    skips = VNetLightEncoder(base, self.elu, self.dropout, name="encoder")(image, train=train)
    x = VNetLightDecoder(base, self.num_classes, self.elu, self.dropout, name="decoder")(
      skips, train=train
    )
    logits = _conv(self.num_classes, 1, x.shape[-1], name="head")(x)
    return {"logits": logits.astype(jnp.float32)}


class _PreActConv(nn.Module):
  """BN -> ReLU -> conv (k, dilation d, same size): HighResNet's ConvRed/DilatedConv/Conv1x1x1."""

  features: int
  kernel: int = 3
  dilation: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = nn.relu(_bn(train, "bn1")(x))
    return _conv(self.features, self.kernel, x.shape[-1], dilation=self.dilation, name="conv1")(y)


class HighResNetTrunk(nn.Module):
  """HighResNet up to the classifier's BN -> ReLU (the head's 1x1 conv is outside)."""

  widths: tuple[int, int, int, int]  # init/red, dil2, dil4, conv_out
  shortcut_type: str = "A"
  dropout: float = 0.5

  def _block(self, name, features, dilation, x, train):
    # create_red / create_dil2 / create_dil4: two pre-activation convs.
    x = _PreActConv(features, 3, dilation, name=f"{name}_0")(x, train=train)
    return _PreActConv(features, 3, dilation, name=f"{name}_1")(x, train=train)

  def _pad(self, x, features, name, train):
    if self.shortcut_type == "B":
      return _PreActConv(features, 1, name=name)(x, train=train)
    extra = features - x.shape[-1]
    lo = extra // 2
    return jnp.pad(x, ((0, 0),) * 4 + ((lo, extra - lo),))

  @nn.compact
  def __call__(self, x, *, train: bool):
    c_red, c_dil2, c_dil4, c_out = self.widths
    y1 = _conv(c_red, 3, x.shape[-1], name="conv_init")(x)
    y2 = nn.relu(_bn(train, "conv_init_bn")(y1))
    # red_forward: the raw conv output feeds the blocks, its BN-ReLU the first residual.
    r1 = self._block("red_blocks1", c_red, 1, y1, train)
    r2 = self._block("red_blocks2", c_red, 1, r1 + y2, train)
    r3 = self._block("red_blocks3", c_red, 1, r2 + r1, train)
    d1 = self._block("dil2block1", c_dil2, 2, r3 + r2, train)
    d2 = self._block("dil2block2", c_dil2, 2, d1 + self._pad(r3, c_dil2, "res_pad_1", train), train)
    d3 = self._block("dil2block3", c_dil2, 2, d2 + d1, train)
    e1 = self._block("dil4block1", c_dil4, 4, d3 + d2, train)
    e2 = self._block("dil4block2", c_dil4, 4, e1 + self._pad(d3, c_dil4, "res_pad_2", train), train)
    e3 = self._block("dil4block3", c_dil4, 4, e2 + e1, train)
    x = e3 + e2
    x = _conv(c_out, 1, x.shape[-1], name="conv_out")(x)
    x = _channel_dropout(self.dropout, train)(x)
    return nn.relu(_bn(train, "out_bn")(x))


class HighResNet(nn.Module):
  """HighResNet3D: ``__call__(image [B, Z, Y, X, C_in], *, train) -> {'logits': [B, Z, Y, X,
  num_classes]}``, any spatial size (no down-sampling).

  Params {'encoder' (the trunk), 'head' (final 1x1 conv)}; batch_stats {'encoder'}.
  Train mode needs a 'dropout' rng unless ``dropout=0``.
  """

  num_classes: int
  dims: int = 3
  width_multiplier: float = 1.0
  shortcut_type: str = "A"
  dropout: float = 0.5

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    sb.check_dims(self.dims, (3,), "highresnet")
    if self.shortcut_type not in ("A", "B"):
      raise ConfigError(f"highresnet shortcut_type {self.shortcut_type!r}; use 'A' or 'B'")
    _check_input(image, "highresnet")
    widths = tuple(sb.scaled(c, self.width_multiplier) for c in (16, 32, 64, 80))
    x = HighResNetTrunk(widths, self.shortcut_type, self.dropout, name="encoder")(
      image, train=train
    )
    logits = _conv(self.num_classes, 1, x.shape[-1], name="head")(x)
    return {"logits": logits.astype(jnp.float32)}


def vnet_light(**kwargs) -> VNetLight:
  """``VNetLight(**kwargs)``: num_classes, dims (3 only), width_multiplier, elu, dropout.

  Raises ConfigError at construction for dims other than 3."""
  sb.check_dims(kwargs.get("dims", 3), (3,), "vnet_light")
  return VNetLight(**kwargs)


def highresnet(**kwargs) -> HighResNet:
  """``HighResNet(**kwargs)``: num_classes, dims (3 only), width_multiplier, shortcut_type,
  dropout. Raises ConfigError at construction for dims other than 3."""
  sb.check_dims(kwargs.get("dims", 3), (3,), "highresnet")
  return HighResNet(**kwargs)


__all__ = ["VNetLight", "HighResNet", "vnet_light", "highresnet"]
