"""Import PyTorch weights of the reference ResNet xray models into ``resnet.ResNetXray`` variables.

Supported state_dict layouts (numpy arrays or torch tensors as values; any
common key prefix such as ``module.``, ``encoder.``, ``online_encoder.`` is
found and stripped):

* ``resnet_xray`` (reference ``MTNeuro/models/resnet_xray.py``): the trunk is
  ``nn.Sequential f`` of torchvision children minus max-pool and fc:
  f.0 conv1, f.1 bn1, f.2 relu, f.3..f.6 layer1..layer4, f.7 avgpool.
  Keys ``f.0.weight``, ``f.1.{weight,bias,running_mean,running_var}``,
  ``f.3.0.conv1.weight`` ... ``f.6.1.bn2.*``, ``f.4.0.downsample.{0,1}.*``.
  No head (encoder only).
* ``resnet_xray_classifier``: the same ``f`` plus f.8 Flatten and f.9
  ``Linear(512, num_classes)`` -> head from ``f.9.{weight,bias}``.
* ``combine_model(encoder, classifier)`` (what the reference's linear eval
  saves): ``encoder.f.*`` + ``classifier.{weight,bias}``.
* torchvision-style names (``conv1``, ``bn1``, ``layer1.0...``, ``fc``), for
  checkpoints saved from an unwrapped torchvision ResNet with the xray stem.

Layout conversion: conv OIHW -> HWIO, linear [out, in] -> [in, out]; BN weight,
bias, running_mean, running_var -> scale, bias, mean, var.
``num_batches_tracked`` is ignored (only used by momentum=None BN).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mtneuro_jax.errors import UserError


class TorchWeightsError(UserError, ValueError):
  """A state_dict that does not fit the model (missing/unexpected keys, wrong shapes)."""


# Sequential index in the reference ``f`` -> torchvision child name.
_SEQ_TO_NAME = {
  "0": "conv1",
  "1": "bn1",
  "3": "layer1",
  "4": "layer2",
  "5": "layer3",
  "6": "layer4",
  "9": "fc",
}


def _np(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch tensor, without importing torch
    x = x.detach().cpu().numpy()
  return np.asarray(x)


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Reads a ``.pt``/``.pth`` state_dict (or {'state_dict': ...}) into numpy arrays. Needs torch."""
  import torch

  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model_state_dict", "model"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  return {k: _np(v) for k, v in obj.items()}


def canonical_names(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Maps any supported layout to torchvision names (conv1, bn1, layerL.B..., fc)."""
  sd = {k: _np(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}

  # The trunk prefix: whatever precedes the stem conv ('f.0.weight' or 'conv1.weight', 4-D).
  def is_stem(k: str) -> bool:
    if k == "f.0.weight" or k.endswith(".f.0.weight"):
      return True
    # torchvision naming: a conv1 not inside a residual block (whose parent is a block index).
    parts = k.split(".")
    return parts[-2:] == ["conv1", "weight"] and (len(parts) == 2 or not parts[-3].isdigit())

  stems = [k for k, v in sd.items() if v.ndim == 4 and is_stem(k)]
  if len(stems) != 1:
    raise TorchWeightsError(
      f"cannot find a unique stem conv ('[prefix]f.0.weight' or '[prefix]conv1.weight') "
      f"among the keys; candidates: {stems}"
    )
  stem = stems[0]
  sequential = stem.endswith("f.0.weight")
  prefix = stem[: -len("f.0.weight")] if sequential else stem[: -len("conv1.weight")]
  out = {}
  for k, v in sd.items():
    if k.startswith(prefix):
      rest = k[len(prefix) :]
      if sequential:
        if not rest.startswith("f."):
          raise TorchWeightsError(f"unexpected key {k!r} next to the reference 'f' trunk")
        idx, _, tail = rest[2:].partition(".")
        if idx not in _SEQ_TO_NAME:
          raise TorchWeightsError(
            f"unexpected Sequential index in {k!r} (parameters only at f.0,1,3-6,9)"
          )
        out[f"{_SEQ_TO_NAME[idx]}.{tail}"] = v
      else:
        out[rest] = v
    elif k.startswith("classifier.") or k.startswith("fc."):
      # combine_model: head outside the encoder's prefix.
      out["fc." + k.split(".", 1)[1]] = v
    else:
      raise TorchWeightsError(f"unexpected key {k!r} (trunk prefix {prefix!r})")
  return out


def _conv(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO


def _bn(sd, name, params, stats):
  params["scale"] = sd.pop(f"{name}.weight")
  params["bias"] = sd.pop(f"{name}.bias")
  stats["mean"] = sd.pop(f"{name}.running_mean")
  stats["var"] = sd.pop(f"{name}.running_var")


def import_resnet_xray(
  state_dict: Mapping[str, Any], *, template: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """Converts a reference PyTorch state_dict to ResNetXray variables.

  Args:
    state_dict: key -> array (numpy or torch), any supported layout (module doc).
    template: optional variables of the target model (e.g. ``model.init`` output or
      its ``jax.eval_shape``); if given, every leaf must be present with the same
      shape, else ValueError (catches width / class-count / depth mismatches).

  Returns:
    {'params': {'encoder': ..., ['head': ...]}, 'batch_stats': {'encoder': ...}} of
    float32 numpy arrays.
  """
  sd = canonical_names(state_dict)
  enc_p: dict[str, Any] = {}
  enc_s: dict[str, Any] = {}
  enc_p["conv1"] = {"kernel": _conv(sd.pop("conv1.weight"))}
  enc_p["bn1"], enc_s["bn1"] = {}, {}
  _bn(sd, "bn1", enc_p["bn1"], enc_s["bn1"])
  blocks = sorted(
    {(int(k.split(".")[0][5:]), int(k.split(".")[1])) for k in sd if k.startswith("layer")}
  )
  for layer, b in blocks:
    src, dst = f"layer{layer}.{b}", f"layer{layer}_{b}"
    p, s = {}, {}
    for conv in ("conv1", "conv2"):
      p[conv] = {"kernel": _conv(sd.pop(f"{src}.{conv}.weight"))}
    for bn in ("bn1", "bn2"):
      p[bn], s[bn] = {}, {}
      _bn(sd, f"{src}.{bn}", p[bn], s[bn])
    if f"{src}.downsample.0.weight" in sd:
      p["downsample_conv"] = {"kernel": _conv(sd.pop(f"{src}.downsample.0.weight"))}
      p["downsample_bn"], s["downsample_bn"] = {}, {}
      _bn(sd, f"{src}.downsample.1", p["downsample_bn"], s["downsample_bn"])
    enc_p[dst], enc_s[dst] = p, s
  params: dict[str, Any] = {"encoder": enc_p}
  if "fc.weight" in sd:
    params["head"] = {
      "kernel": np.ascontiguousarray(sd.pop("fc.weight").T),
      "bias": sd.pop("fc.bias"),
    }
  if sd:
    raise TorchWeightsError(f"unused keys in the state_dict: {sorted(sd)}")
  variables = {"params": params, "batch_stats": {"encoder": enc_s}}
  variables = _tree_map(lambda x: np.asarray(x, np.float32), variables)
  if template is not None:
    check_fits(variables, template)
  return variables


def _tree_map(fn, tree):
  if isinstance(tree, Mapping):
    return {k: _tree_map(fn, v) for k, v in tree.items()}
  return fn(tree)


def flat_paths(tree, prefix: str = "") -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested mapping (the param paths the fit check and its message use)."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(flat_paths(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def check_fits(
  variables: Mapping[str, Any],
  template: Mapping[str, Any],
  *,
  what: str = "imported weights",
  fix: str = "use a state_dict of the same architecture and sizes as config.model",
  error: type[Exception] = TorchWeightsError,
) -> None:
  """Raises ``error`` (one line) unless ``variables`` has exactly the params/batch_stats paths
  and shapes of ``template`` (e.g. ``jax.eval_shape(model.init, ...)``)."""
  got = flat_paths(variables)
  want = flat_paths({c: template[c] for c in ("params", "batch_stats") if c in template})
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  bad = sorted(k for k in set(got) & set(want) if tuple(got[k].shape) != tuple(want[k].shape))
  if missing or extra or bad:
    shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(want[k].shape)}" for k in bad[:3]]
    raise error(
      f"{what} do not fit the model: {len(missing)} missing {missing[:3]}, "
      f"{len(extra)} unexpected {extra[:3]}, {len(bad)} mis-shaped {shapes}; {fix}"
    )
