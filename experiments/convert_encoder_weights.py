"""Convert a PyTorch encoder checkpoint (e.g. ImageNet ResNet / EfficientNet) into the zoo's ``.npz``.

  python -m experiments.convert_encoder_weights model.pth out.npz [--prefix encoder.]

Input: a ``.pth``/``.pt`` state_dict (or a dict holding one under 'state_dict' / 'model'),
e.g. torchvision's ``resnet18-f37072fd.pth`` or lukemelas' ``efficientnet-b7-dcc49843.pth``,
downloaded by the user elsewhere. ``--prefix`` keeps only the keys that start with it and
strips it (``encoder.`` for a whole smp model's checkpoint); ``num_batches_tracked`` is
dropped. Output: ``np.savez`` of float32 arrays under the PyTorch names, which
``encoder_weights='out.npz'`` of any 2D zoo model (``mtneuro_jax/models/seg2d.py``) loads.
Needs torch (``requirements-test.txt``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from mtneuro_jax.errors import ArgumentParser, UserError, run_cli


def convert(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """PyTorch state_dict (tensors or arrays) -> {name: float32 numpy array}, prefix stripped."""
  out = {}
  for k, v in state_dict.items():
    if prefix and not k.startswith(prefix):
      continue
    name = k[len(prefix) :]
    if name.endswith("num_batches_tracked"):
      continue
    if hasattr(v, "detach"):
      v = v.detach().cpu().float().numpy()
    out[name] = np.asarray(v, np.float32)
  if not out:
    raise UserError(
      f"no tensors left after --prefix {prefix!r} (keys start like {next(iter(state_dict), '')!r})"
      "; pass the prefix the encoder's keys have, or none"
    )
  return out


def load_checkpoint(path: str) -> dict[str, Any]:
  """Reads a torch checkpoint's state_dict (weights only)."""
  import torch  # optional dependency: only this tool needs it

  if not os.path.isfile(path):
    raise UserError(f"checkpoint {path!r} does not exist; give the path of a .pth state_dict")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise UserError(
      f"cannot read {path!r} as a torch checkpoint ({type(e).__name__}); save a state_dict "
      "with torch.save(model.state_dict(), path)"
    ) from None
  for key in ("state_dict", "model_state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise UserError(f"{path!r} holds a {type(obj).__name__}, not a state_dict; save one")
  return dict(obj)


def run(argv: Sequence[str]) -> int:
  parser = ArgumentParser(
    prog="python -m experiments.convert_encoder_weights",
    description="PyTorch encoder checkpoint -> .npz for encoder_weights",
  )
  parser.add_argument("checkpoint", help="input .pth / .pt state_dict")
  parser.add_argument("out", help="output .npz")
  parser.add_argument("--prefix", default="", help="keep keys with this prefix, stripped")
  args = parser.parse_args(list(argv))
  arrays = convert(load_checkpoint(args.checkpoint), args.prefix)
  np.savez(args.out, **arrays)
  print(f"wrote {len(arrays)} tensors to {args.out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  raise SystemExit(main())
