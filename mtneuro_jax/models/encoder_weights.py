"""Load converted PyTorch encoder weights (ImageNet etc.) into the 2D zoo's encoders.

The weights file is a numpy ``.npz`` keyed by PyTorch state_dict names, written by
``python -m experiments.convert_encoder_weights model.pth out.npz`` from a checkpoint a user
downloaded elsewhere (nothing is downloaded here):

* ResNet (torchvision names): ``conv1.weight``, ``bn1.{weight,bias,running_mean,running_var}``,
  ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``, ``layer2.0.downsample.1.*`` ...
* EfficientNet (lukemelas efficientnet-pytorch names): ``_conv_stem.weight``, ``_bn0.*``,
  ``_blocks.3._expand_conv.weight``, ``_blocks.3._depthwise_conv.weight``,
  ``_blocks.3._se_reduce.{weight,bias}``, ``_blocks.3._project_conv.weight``, ``_blocks.3._bn2.*``.

Conversion: conv OIHW -> HWIO (depthwise [C, 1, k, k] -> [k, k, 1, C]); BN weight/bias ->
params scale/bias, running_mean/running_var -> batch_stats mean/var. The stem conv of an
RGB checkpoint is summed over its 3 input channels for the 1-channel encoder, as smp does
(``patch_first_conv``). Keys only the classifier uses (``fc.*``, ``_fc.*``, ``_conv_head.*``,
``_bn1.*`` of EfficientNet) and ``num_batches_tracked`` are ignored; any other extra key,
a missing key or a shape mismatch raises ``EncoderWeightsError`` (one line naming the key).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from mtneuro_jax.errors import UserError
from mtneuro_jax.models.seg_encoders import EFFNET_PARAMS

_IGNORED = re.compile(r"^(fc\.|_fc\.|_conv_head\.|_bn1\.)|num_batches_tracked$")
_STEMS = ("conv1.weight", "_conv_stem.weight")


class EncoderWeightsError(UserError):
  """An encoder weights file that cannot be read or does not fit the encoder."""


def _torch_module_name(path: tuple[str, ...], family: str) -> str:
  """Flax module path (('layer1_0', 'conv1')) -> PyTorch module name ('layer1.0.conv1')."""
  parts = []
  for p in path:
    if family == "efficientnet":
      m = re.fullmatch(r"blocks_(\d+)", p)
      parts.append(f"_blocks.{m.group(1)}" if m else f"_{p}")
    else:
      m = re.fullmatch(r"(layer\d+|downsample)_(\d+)", p)
      parts.append(f"{m.group(1)}.{m.group(2)}" if m else p)
  return ".".join(parts)


# (collection, flax leaf name) -> PyTorch tensor suffix.
_LEAF = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _plain(tree: Mapping[str, Any]) -> dict:
  return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The npz's arrays by name; EncoderWeightsError if it is missing or not an npz."""
  if not os.path.isfile(path):
    raise EncoderWeightsError(
      f"encoder weights file {path!r} does not exist; set encoder_weights to '' (random init) "
      "or to an .npz written by experiments/convert_encoder_weights.py"
    )
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: np.asarray(z[k]) for k in z.files}
  except Exception as e:  # zipfile/pickle/format errors all mean "not our npz"
    raise EncoderWeightsError(
      f"encoder weights file {path!r} is not a readable .npz ({type(e).__name__}: {e}); "
      "write it with experiments/convert_encoder_weights.py"
    ) from None


def _stage(key: str, encoder_name: str) -> int:
  """smp stage (1..5) a PyTorch key belongs to (0 if unknown)."""
  m = re.match(r"layer(\d+)\.", key)
  if m:
    return int(m.group(1)) + 1
  m = re.match(r"_blocks\.(\d+)\.", key)
  if m and encoder_name in EFFNET_PARAMS:
    idx = int(m.group(1))
    return 2 + sum(idx >= e for e in EFFNET_PARAMS[encoder_name][3])
  return 1 if re.match(r"(conv1|bn1|_conv_stem|_bn0)\.", key) else 0


def load_encoder_weights(
  variables: Mapping[str, Any],
  weights: Mapping[str, np.ndarray],
  encoder_name: str,
  *,
  depth: int = 5,
  where: str = "encoder weights",
) -> dict:
  """Returns ``variables`` (the encoder's {'params': ..., 'batch_stats': ...}) with every leaf
  replaced by the converted tensor of ``weights`` (PyTorch names -> arrays).

  Keys of stages deeper than ``depth`` (the encoder's ``encoder_depth``; smp keeps them but
  never runs them) are ignored. Raises EncoderWeightsError (one line) on a missing key, a
  shape mismatch or any other extra key.
  """
  family = "efficientnet" if encoder_name.startswith("efficientnet") else "resnet"
  out = _plain(variables)
  used = set()
  for coll in ("params", "batch_stats"):
    for path, leaf in _leaves(out.get(coll, {})):
      suffix = _LEAF.get((coll, path[-1]))
      if suffix is None:
        raise EncoderWeightsError(f"{where}: no PyTorch name for {coll}/{'/'.join(path)}")
      key = f"{_torch_module_name(path[:-1], family)}.{suffix}"
      if key not in weights:
        raise EncoderWeightsError(
          f"{where}: key {key!r} is missing (encoder {encoder_name!r} needs it); convert a "
          f"checkpoint of {encoder_name} with experiments/convert_encoder_weights.py"
        )
      w = np.asarray(weights[key], np.float32)
      if path[-1] == "kernel":
        if w.ndim != 4:
          raise EncoderWeightsError(
            f"{where}: key {key!r} has shape {w.shape}, a conv weight [O, I, kh, kw] was "
            f"expected; convert a checkpoint of {encoder_name}"
          )
        if key in _STEMS and w.shape[1] != leaf.shape[2] and leaf.shape[2] == 1:
          w = w.sum(axis=1, keepdims=True)  # smp: 1-channel stem = sum of the RGB filters
        w = np.transpose(w, (2, 3, 1, 0))
      if tuple(w.shape) != tuple(leaf.shape):
        raise EncoderWeightsError(
          f"{where}: key {key!r} has shape {tuple(weights[key].shape)}, encoder "
          f"{encoder_name!r} needs {tuple(leaf.shape)} (layout converted); use weights of "
          "the same encoder at width_multiplier 1"
        )
      _set(out[coll], path, np.ascontiguousarray(w))
      used.add(key)
  extra = sorted(
    k
    for k in weights
    if k not in used and not _IGNORED.search(k) and _stage(k, encoder_name) <= depth
  )
  if extra:
    raise EncoderWeightsError(
      f"{where}: key {extra[0]!r} ({len(extra)} unexpected in all) does not belong to encoder "
      f"{encoder_name!r}; convert a checkpoint of that encoder (or strip its prefix with "
      "--prefix)"
    )
  return out


def init_loader(
  path: str, encoder_name: str, depth: int = 5
) -> Callable[[Mapping[str, Any]], dict]:
  """``variables -> variables`` replacing the encoder's fresh variables by the file's (read once)."""
  cache: dict[str, Any] = {}

  def load(variables):
    if "w" not in cache:
      cache["w"] = read_npz(path)
    return load_encoder_weights(
      variables, cache["w"], encoder_name, depth=depth, where=f"encoder weights {path!r}"
    )

  return load
