"""Check the 2D zoo against segmentation_models.pytorch (smp) itself: same weights -> same logits.

  python -m experiments.check_smp_parity --smp_src DIR --effnet_src DIR [--size 64]

``--smp_src``: an unpacked smp wheel (the folder holding ``segmentation_models_pytorch/``,
e.g. ``pip download segmentation-models-pytorch==0.3.3 --no-deps`` then unzip);
``--effnet_src``: an unpacked efficientnet-pytorch 0.7.1 sdist (holding
``efficientnet_pytorch/``). Only smp's decoders, heads, ``_base``/``_utils`` and its
EfficientNet encoder are imported (its package ``__init__`` files, which need torchvision /
timm, are bypassed). torchvision is not needed: the ResNet-18 encoder is rebuilt with
torchvision's module names and smp's ``ResNetEncoder`` stages.

For each model x encoder (resnet18, efficientnet-b0; full width, 3 classes, smp's default
decoder arguments) it builds the smp model in PyTorch (random init, random BatchNorm
statistics, 1-channel stem as smp's ``set_in_channels(1)``), converts its state_dict into our
variables (encoder via ``encoder_weights``, decoder/head by name), runs both in eval mode on
the same random batch and prints the largest absolute logit difference. Needs torch. Not a
test (smp is not a dependency); a dev check whose output is quoted in docs/task2_models.md.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import types
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtneuro_jax.errors import ArgumentParser, UserError, run_cli
from mtneuro_jax.models import MODELS
from mtneuro_jax.models import encoder_weights as ew
from mtneuro_jax.train.state import param_count

# smp model -> (decoder module, decoder class, decoder kwargs, head kernel, head upsampling),
# as smp 0.3.x's model classes build them.
SPECS = {
  "unet_plusplus": ("unetplusplus", "UnetPlusPlusDecoder", "unetpp", 3, 1),
  "manet": ("manet", "MAnetDecoder", "manet", 3, 1),
  "fpn": ("fpn", "FPNDecoder", "fpn", 1, 4),
  "pan": ("pan", "PANDecoder", "pan", 3, 4),
  "pspnet": ("pspnet", "PSPDecoder", "psp", 3, 8),
}

# torch decoder/head name -> our path, per model (applied in order, then '.' -> '/').
_RULES = {
  "unet_plusplus": [(r"^decoder\.blocks\.(x_\d+_\d+)\.(conv\d)\.", r"decoder.\1_\2.")],
  "manet": [
    (r"\.hl_conv\.(\d)\.", r".hl_conv_\1."),
    (r"\.(SE_ll|SE_hl)\.1\.", r".\1.conv1."),
    (r"\.(SE_ll|SE_hl)\.3\.", r".\1.conv2."),
    (r"^decoder\.blocks\.(\d+)\.", r"decoder.blocks_\1."),
  ],
  "fpn": [
    (r"^decoder\.(p\d)\.skip_conv\.", r"decoder.\1_skip_conv."),
    (r"^decoder\.seg_blocks\.(\d)\.block\.(\d)\.block\.0\.", r"decoder.seg_blocks_\1_\2_conv."),
    (r"^decoder\.seg_blocks\.(\d)\.block\.(\d)\.block\.1\.", r"decoder.seg_blocks_\1_\2_gn."),
  ],
  "pan": [
    (r"\.(branch1|down1|down2)\.1\.", r".\1."),
    (r"\.mid\.0\.", r".mid."),
    (r"\.down3\.1\.", r".down3_0."),
    (r"\.down3\.2\.", r".down3_1."),
    (r"\.(gau\d)\.conv1\.1\.", r".\1.conv1."),
  ],
  "pspnet": [(r"^decoder\.psp\.blocks\.(\d)\.pool\.1\.", r"decoder.psp_blocks_\1.")],
}


def _stub_package(name: str, path: str) -> None:
  """Registers ``name`` as a package at ``path`` without running its ``__init__``."""
  mod = types.ModuleType(name)
  mod.__path__ = [path]
  sys.modules[name] = mod


def import_smp(smp_src: str, effnet_src: str):
  root = os.path.join(smp_src, "segmentation_models_pytorch")
  if not os.path.isdir(root) or not os.path.isdir(os.path.join(effnet_src, "efficientnet_pytorch")):
    raise UserError(
      f"--smp_src {smp_src!r} / --effnet_src {effnet_src!r} do not hold segmentation_models_pytorch/ "
      "and efficientnet_pytorch/; unpack the smp wheel and the efficientnet-pytorch sdist"
    )
  sys.path.insert(0, effnet_src)
  _stub_package("segmentation_models_pytorch", root)
  _stub_package("segmentation_models_pytorch.encoders", os.path.join(root, "encoders"))
  _stub_package("segmentation_models_pytorch.decoders", os.path.join(root, "decoders"))
  for sub in set(s[0] for s in SPECS.values()):
    _stub_package(
      f"segmentation_models_pytorch.decoders.{sub}", os.path.join(root, "decoders", sub)
    )
  smp = types.SimpleNamespace(
    base=importlib.import_module("segmentation_models_pytorch.base"),
    init=importlib.import_module("segmentation_models_pytorch.base.initialization"),
    utils=importlib.import_module("segmentation_models_pytorch.encoders._utils"),
    effnet=importlib.import_module("segmentation_models_pytorch.encoders.efficientnet"),
    decoders={
      sub: importlib.import_module(f"segmentation_models_pytorch.decoders.{sub}.decoder")
      for sub in set(s[0] for s in SPECS.values())
    },
  )
  return smp


def torch_resnet18_encoder(smp):
  """torchvision resnet18's modules + smp ResNetEncoder's stages/forward, 1-channel stem."""
  from experiments.torch_reference.resnet import ResNet18, smp_features, smp_stages

  class Encoder(ResNet18, smp.effnet.EncoderMixin):
    def __init__(self):
      super().__init__(64, in_channels=1)
      del self.fc, self.avgpool  # smp's ResNetEncoder drops them
      self._depth, self._out_channels, self._in_channels = 5, (1, 64, 64, 128, 256, 512), 1

    def get_stages(self):
      return smp_stages(self)

    def forward(self, x):
      return smp_features(self, x, self._depth)

  return Encoder()


def torch_model(smp, name: str, encoder_name: str, num_classes: int):
  """(encoder, decoder, head) as smp builds ``name`` with ``encoder_name`` (in_channels=1)."""
  sub, cls, kind, head_k, up = SPECS[name]
  depth = 3 if name == "pspnet" else 5
  if encoder_name == "resnet18":
    enc = torch_resnet18_encoder(smp)
  else:
    params = smp.effnet.efficient_net_encoders[encoder_name]["params"]
    enc = smp.effnet.EfficientNetEncoder(**params)
    enc.set_in_channels(1, pretrained=True)  # smp: stem summed over RGB
  enc._depth = depth
  if name == "pan":
    enc.make_dilated(16)
  ch = enc.out_channels
  dec_cls = getattr(smp.decoders[sub], cls)
  if kind in ("unetpp", "manet"):
    dec = dec_cls(encoder_channels=ch, decoder_channels=(256, 128, 64, 32, 16), n_blocks=5)
    head_in = 16
  elif kind == "fpn":
    dec = dec_cls(encoder_channels=ch, encoder_depth=5)
    head_in = dec.out_channels
  elif kind == "pan":
    dec = dec_cls(encoder_channels=ch, decoder_channels=32)
    head_in = 32
  else:
    dec = dec_cls(encoder_channels=ch, out_channels=512, dropout=0.2)
    head_in = 512
  head = smp.base.SegmentationHead(head_in, num_classes, kernel_size=head_k, upsampling=up)
  smp.init.initialize_decoder(dec)
  smp.init.initialize_head(head)
  return enc, dec, head


def _randomize_bn(*modules, seed: int = 0):
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in modules:
      for mod in m.modules():
        if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
          mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
          mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) * 0.4 - 0.2)
          if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=g) * 0.4 - 0.2)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)


def convert_decoder(name: str, state_dict: dict, template: dict) -> dict:
  """smp decoder/head state_dict ('decoder.*', 'segmentation_head.*') -> our variables."""
  out = {"params": {}, "batch_stats": {}}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    k = key.replace("segmentation_head.0.", "head.conv.")
    for pat, rep in _RULES[name]:
      k = re.sub(pat, rep, k)
    module, leaf = k.rsplit(".", 1)
    parts = module.split(".")
    # smp Conv2dReLU = Sequential(conv, bn, relu) and PAN ConvBnRelu(conv, bn).
    if parts[-1] == "0":
      parts[-1] = "conv"
    elif parts[-1] == "1":
      parts[-1] = "bn"
    w = value.detach().cpu().numpy().astype(np.float32)
    if leaf in ("running_mean", "running_var"):
      coll, leaf = "batch_stats", {"running_mean": "mean", "running_var": "var"}[leaf]
    else:
      coll = "params"
      if leaf == "weight":
        leaf = "kernel" if w.ndim == 4 else "scale"
      if w.ndim == 4:
        w = w.transpose(2, 3, 1, 0)
    path = tuple(parts) + (leaf,)
    # MA-Net's last block (no skip) is a plain DecoderBlock: decoder/blocks_4_conv1/...
    if name == "manet" and not _has(template[coll], path):
      path = (path[0], f"{path[1]}_{path[2]}") + path[3:]
    if not _has(template[coll], path):
      raise KeyError(f"{key} -> {coll}/{'/'.join(path)} not in our {name}")
    tgt = _get(template[coll], path)
    if tuple(tgt.shape) != w.shape:
      raise ValueError(f"{key}: shape {w.shape} != ours {tuple(tgt.shape)}")
    _put(out[coll], path, w)
  return out


def _has(tree, path):
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return False
    tree = tree[p]
  return True


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _put(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def check(smp, name: str, encoder_name: str, size: int, num_classes: int = 3) -> dict[str, Any]:
  import torch

  torch.manual_seed(0)
  depth = 3 if name == "pspnet" else 5
  enc, dec, head = torch_model(smp, name, encoder_name, num_classes)
  _randomize_bn(enc, dec, head)
  for m in (enc, dec, head):
    m.eval()
  x = np.random.default_rng(0).normal(size=(2, 1, size, size)).astype(np.float32)
  with torch.no_grad():
    ref = head(dec(*enc(torch.from_numpy(x)))).numpy().transpose(0, 2, 3, 1)
  model = MODELS[name](num_classes=num_classes, encoder_name=encoder_name)
  image = jnp.asarray(x.transpose(0, 2, 3, 1))
  shapes = jax.eval_shape(lambda im: model.init(jax.random.key(0), im, train=False), image)
  enc_sd = {k: v.detach().cpu().numpy() for k, v in enc.state_dict().items()}
  enc_vars = ew.load_encoder_weights(
    {c: shapes[c]["encoder"] for c in ("params", "batch_stats")},
    enc_sd,
    encoder_name,
    depth=depth,
  )
  dec_sd = {f"decoder.{k}": v for k, v in dec.state_dict().items()}
  dec_sd.update({f"segmentation_head.{k}": v for k, v in head.state_dict().items()})
  rest = convert_decoder(name, dec_sd, {c: dict(shapes[c]) for c in ("params", "batch_stats")})
  variables = {c: {"encoder": enc_vars[c], **rest[c]} for c in ("params", "batch_stats")}
  n_ours = param_count(shapes["params"])
  n_conv = param_count(variables["params"])
  if n_ours != n_conv:
    raise ValueError(f"{name}/{encoder_name}: converted {n_conv} params, ours has {n_ours}")
  ours = np.asarray(
    jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, image)["logits"]
  )
  # smp keeps (never runs) the classifier's conv_head/bn1 and stages deeper than the depth.
  n_torch = sum(p.numel() for m in (dec, head) for p in m.parameters()) + sum(
    p.numel()
    for k, p in enc.named_parameters()
    if not ew._IGNORED.search(k) and ew._stage(k, encoder_name) <= depth
  )
  return {
    "model": name,
    "encoder": encoder_name,
    "max_abs_diff": float(np.abs(ours - ref).max()),
    "max_abs_logit": float(np.abs(ref).max()),
    "params_ours": n_ours,
    "params_smp": int(n_torch),
  }


def run(argv: Sequence[str]) -> int:
  parser = ArgumentParser(prog="python -m experiments.check_smp_parity")
  parser.add_argument("--smp_src", required=True)
  parser.add_argument("--effnet_src", required=True)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--models", default=",".join(SPECS))
  parser.add_argument("--encoders", default="resnet18,efficientnet-b0")
  args = parser.parse_args(list(argv))
  encoders = args.encoders.split(",")
  bad = [e for e in encoders if e != "resnet18" and not e.startswith("efficientnet-b")]
  if bad:
    raise UserError(f"--encoders {bad[0]!r} is not checked here; use resnet18 or efficientnet-bN")
  smp = import_smp(args.smp_src, args.effnet_src)
  print("| model | encoder | max abs logit diff | max abs logit | params (ours) | params (smp) |")
  print("|---|---|---|---|---|---|")
  for name in args.models.split(","):
    for enc in encoders:
      size = max(args.size, 128) if name == "pan" else args.size  # smp's PAN needs >= 128
      r = check(smp, name, enc, size)
      print(
        f"| {r['model']} | {r['encoder']} | {r['max_abs_diff']:.2e} | {r['max_abs_logit']:.2f} "
        f"| {r['params_ours']:,} | {r['params_smp']:,} |",
        flush=True,
      )
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  raise SystemExit(main())
