"""Import PyTorch weights of the reference U-Net (``MTNeuro/models/unet.py``) into ``unet.UNet``.

State_dict naming (values numpy arrays or torch tensors; any common key prefix
such as ``module.`` or ``model.`` is stripped):

* ``down_blocks.<i>.conv{1,2}.{weight,bias}``, ``down_blocks.<i>.norm{1,2}.*``
  -> ``params/encoder/block<i>/conv{1,2}``, ``.../norm{1,2}``;
* ``up_blocks.<i>.up.{weight,bias}`` (transposed conv), ``up_blocks.<i>.conv{0,1,2}.*``,
  ``up_blocks.<i>.norm{0,1,2}.*`` -> ``params/decoder/block<i>/...``;
* ``conv_final.{weight,bias}`` -> ``params/head``.

Norm layers: BatchNorm ``weight, bias, running_mean, running_var`` -> ``bn/{scale,
bias}`` + ``batch_stats .../bn/{mean,var}``; GroupNorm ``weight, bias`` ->
``group/{scale,bias}``; InstanceNorm (PyTorch default affine=False) has no keys.
``num_batches_tracked`` is ignored.

Layouts: conv ``[O, I, k...]`` -> ``[k..., I, O]``; transposed conv ``[I, O, k...]`` ->
``[k..., I, O]`` with every spatial axis flipped (Flax's ``ConvTranspose`` applies
its kernel unflipped; PyTorch's is the adjoint of a convolution).

Any missing, unexpected or mis-shaped entry raises ``UNetWeightsError`` (a
UserError) in one line.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mtneuro_jax.models.torch_import import TorchWeightsError, check_fits, load_torch_file

_FIX = "use a state_dict of MTNeuro's UNet built with the same dims, n_blocks, start_filters, "


class UNetWeightsError(TorchWeightsError):
  """A state_dict that does not fit the U-Net (missing/unexpected keys, wrong shapes)."""


def _np(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch tensor, without importing torch
    x = x.detach().cpu().numpy()
  return np.asarray(x, np.float32)


def _conv(w: np.ndarray) -> np.ndarray:
  nd = w.ndim - 2
  return np.ascontiguousarray(np.transpose(w, (*range(2, 2 + nd), 1, 0)))


def _conv_transpose(w: np.ndarray) -> np.ndarray:
  nd = w.ndim - 2
  k = np.transpose(w, (*range(2, 2 + nd), 0, 1))
  return np.ascontiguousarray(k[(slice(None, None, -1),) * nd])


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _strip_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
  anchors = [k for k in sd if k.endswith("down_blocks.0.conv1.weight")]
  if len(anchors) != 1:
    raise UNetWeightsError(
      f"no unique '[prefix]down_blocks.0.conv1.weight' among {len(sd)} keys (found {anchors}); "
      "pass a state_dict of MTNeuro's models/unet.py UNet"
    )
  prefix = anchors[0][: -len("down_blocks.0.conv1.weight")]
  out = {}
  for k, v in sd.items():
    if k.endswith("num_batches_tracked"):
      continue
    if not k.startswith(prefix):
      raise UNetWeightsError(f"unexpected key {k!r} (others start with {prefix!r}); {_FIX}")
    out[k[len(prefix) :]] = v
  return out


def import_unet(
  state_dict: Mapping[str, Any], *, template: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """Converts a reference U-Net state_dict to ``UNet`` variables.

  Args:
    state_dict: key -> array (numpy or torch), names as the module doc.
    template: variables of the target model (``model.init`` output or its
      ``jax.eval_shape``); when given, every leaf must be present with the same shape.

  Returns:
    ``{'params': {'encoder', 'decoder', 'head'}, 'batch_stats': {'encoder', 'decoder'}}``
    of float32 numpy arrays ('batch_stats' only with BatchNorm).

  Raises:
    UNetWeightsError: an unknown key, or (with ``template``) a missing or mis-shaped entry.
  """
  sd = _strip_prefix(state_dict)
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  for key, value in sd.items():
    v = _np(value)
    parts = key.split(".")
    if parts[0] == "conv_final" and len(parts) == 2:
      path, layer, leaf = ("head",), "conv_final", parts[1]
    elif parts[0] in ("down_blocks", "up_blocks") and len(parts) == 4 and parts[1].isdigit():
      side = "encoder" if parts[0] == "down_blocks" else "decoder"
      path, layer, leaf = (side, f"block{parts[1]}", parts[2]), parts[2], parts[3]
    else:
      raise UNetWeightsError(f"unexpected key {key!r} in a U-Net state_dict; {_FIX}")
    if layer.startswith("norm"):
      is_bn = f"{key.rsplit('.', 1)[0]}.running_mean" in sd
      sub = "bn" if is_bn else "group"
      name = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
      if leaf not in name:
        raise UNetWeightsError(f"unexpected key {key!r} in a U-Net state_dict; {_FIX}")
      tree = stats if leaf.startswith("running_") else params
      _set(tree, (*path, sub, name[leaf]), v)
    elif layer in ("conv0", "conv1", "conv2", "conv_final", "up") and leaf in ("weight", "bias"):
      if leaf == "bias":
        _set(params, (*path, "bias"), v)
      else:
        _set(params, (*path, "kernel"), _conv_transpose(v) if layer == "up" else _conv(v))
    else:
      raise UNetWeightsError(f"unexpected key {key!r} in a U-Net state_dict; {_FIX}")
  variables = {"params": params}
  if stats:
    variables["batch_stats"] = stats
  if template is not None:
    check_fits(
      variables,
      template,
      what="U-Net weights",
      fix=f"{_FIX}num_classes and normalization as config.model",
      error=UNetWeightsError,
    )
  return variables


def load_unet_torch(path: str, *, template: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """``import_unet`` of a ``.pt``/``.pth`` file (needs torch)."""
  return import_unet(load_torch_file(path), template=template)
