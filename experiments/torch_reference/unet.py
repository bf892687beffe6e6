"""The MTNeuro reference U-Net in PyTorch (``MTNeuro/models/unet.py``), for tests and benchmarks.

Attribution: the architecture is Johannes Schmidt's PyTorch-2D-3D-UNet-Tutorial
(https://github.com/johschmidt42/PyTorch-2D-3D-UNet-Tutorial, MIT License,
Copyright (c) 2020 Johannes Schmidt), which MTNeuro ships as ``models/unet.py``.
This file re-states it compactly with the same module names, so its
``state_dict`` keys are the reference's (``down_blocks.<i>.conv1.weight``,
``down_blocks.<i>.norm1.running_mean``, ``up_blocks.<i>.up.weight``,
``up_blocks.<i>.conv0.weight``, ``conv_final.weight``, ...) and its forward pass
is the reference's: conv -> act -> norm (activation before normalisation),
transposed-conv up-sampling -> act -> norm, centre-cropped skip, concat
[up, skip], xavier-uniform weights and zero biases. ``conv0`` exists in every
up-block (as in the reference) but is used only when ``up_mode != 'transposed'``.

Not part of the library (the library never imports torch); used by
``tests/test_unet_torch_import.py`` and ``experiments/bench/unet_step_bench.py``.
"""

from __future__ import annotations

import torch
from torch import nn


def autocrop(encoder_layer: torch.Tensor, decoder_layer: torch.Tensor):
  """Centre-crops the encoder tensor [B, C, *s] to the decoder tensor's spatial size."""
  es, ds = encoder_layer.shape[2:], decoder_layer.shape[2:]
  if es != ds:
    idx = [slice(None), slice(None)]
    idx += [slice((e - d) // 2, (e + d) // 2) for e, d in zip(es, ds, strict=True)]
    encoder_layer = encoder_layer[tuple(idx)]
  return encoder_layer, decoder_layer


def _conv(dim, cin, cout, k, padding):
  return (nn.Conv2d if dim == 2 else nn.Conv3d)(cin, cout, kernel_size=k, padding=padding)


def _norm(kind, channels, dim):
  if kind == "batch":
    return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(channels)
  if kind == "instance":
    return (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(channels)
  if kind and "group" in kind:
    return nn.GroupNorm(int(kind.partition("group")[-1]), channels)
  raise ValueError(f"normalization {kind!r}")


def _act(kind):
  return {"relu": nn.ReLU, "elu": nn.ELU}.get(kind, lambda: nn.LeakyReLU(0.1))()


class DownBlock(nn.Module):
  def __init__(self, cin, cout, pooling, activation, normalization, dim, conv_mode):
    super().__init__()
    pad = 1 if conv_mode == "same" else 0
    self.pooling, self.normalization = pooling, normalization
    self.conv1 = _conv(dim, cin, cout, 3, pad)
    self.conv2 = _conv(dim, cout, cout, 3, pad)
    if pooling:
      self.pool = (nn.MaxPool2d if dim == 2 else nn.MaxPool3d)(kernel_size=2, stride=2)
    self.act1, self.act2 = _act(activation), _act(activation)
    if normalization:
      self.norm1 = _norm(normalization, cout, dim)
      self.norm2 = _norm(normalization, cout, dim)

  def forward(self, x):
    y = self.act1(self.conv1(x))
    if self.normalization:
      y = self.norm1(y)
    y = self.act2(self.conv2(y))
    if self.normalization:
      y = self.norm2(y)
    skip = y
    if self.pooling:
      y = self.pool(y)
    return y, skip


class UpBlock(nn.Module):
  def __init__(self, cin, cout, activation, normalization, dim, conv_mode, up_mode):
    super().__init__()
    pad = 1 if conv_mode == "same" else 0
    self.normalization, self.up_mode = normalization, up_mode
    if up_mode == "transposed":
      self.up = (nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d)(cin, cout, 2, stride=2)
    else:
      self.up = nn.Upsample(scale_factor=2.0, mode=up_mode)
    self.conv0 = _conv(dim, cin, cout, 1, 0)
    self.conv1 = _conv(dim, 2 * cout, cout, 3, pad)
    self.conv2 = _conv(dim, cout, cout, 3, pad)
    self.act0, self.act1, self.act2 = _act(activation), _act(activation), _act(activation)
    if normalization:
      self.norm0 = _norm(normalization, cout, dim)
      self.norm1 = _norm(normalization, cout, dim)
      self.norm2 = _norm(normalization, cout, dim)

  def forward(self, encoder_layer, decoder_layer):
    up = self.up(decoder_layer)
    skip, _ = autocrop(encoder_layer, up)
    if self.up_mode != "transposed":
      up = self.conv0(up)
    up = self.act0(up)
    if self.normalization:
      up = self.norm0(up)
    y = self.act1(self.conv1(torch.cat((up, skip), 1)))
    if self.normalization:
      y = self.norm1(y)
    y = self.act2(self.conv2(y))
    if self.normalization:
      y = self.norm2(y)
    return y


class UNet(nn.Module):
  """``UNet(in_channels=1, out_channels=2, n_blocks=4, start_filters=32, activation='relu',
  normalization='batch', conv_mode='same', dim=2, up_mode='transposed')``; input [B, C, *s]."""

  def __init__(
    self,
    in_channels: int = 1,
    out_channels: int = 2,
    n_blocks: int = 4,
    start_filters: int = 32,
    activation: str = "relu",
    normalization: str = "batch",
    conv_mode: str = "same",
    dim: int = 2,
    up_mode: str = "transposed",
  ):
    super().__init__()
    widths = [start_filters * 2**i for i in range(n_blocks)]
    self.down_blocks = nn.ModuleList(
      DownBlock(cin, cout, i < n_blocks - 1, activation, normalization, dim, conv_mode)
      for i, (cin, cout) in enumerate(zip([in_channels] + widths[:-1], widths, strict=True))
    )
    self.up_blocks = nn.ModuleList(
      UpBlock(widths[i + 1], widths[i], activation, normalization, dim, conv_mode, up_mode)
      for i in reversed(range(n_blocks - 1))
    )
    self.conv_final = _conv(dim, widths[0], out_channels, 1, 0)
    for m in self.modules():
      if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x):
    skips = []
    for block in self.down_blocks:
      x, skip = block(x)
      skips.append(skip)
    for i, block in enumerate(self.up_blocks):
      x = block(skips[-(i + 2)], x)
    return self.conv_final(x)
