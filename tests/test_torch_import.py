"""PyTorch -> Flax weight import reproduces the reference model's eval-mode outputs.

torchvision is not installed, so the reference architecture is rebuilt from
``experiments/torch_reference/resnet.py`` (torchvision's resnet18 module names),
then turned into the reference ``resnet_xray`` /
``resnet_xray_classifier`` exactly as MTNeuro does (named_children, stem
replaced, max-pool and fc dropped, Sequential ``f``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from experiments.torch_reference.resnet import ResNet18 as TorchResNet18  # noqa: E402
from mtneuro_jax.models import resnet, torch_import  # noqa: E402


class Flatten(nn.Module):
  def forward(self, x):
    return x.view(x.size(0), -1)


def reference_trunk(width):
  """MTNeuro's construction: named_children minus max-pool and fc, 1-channel 3x3 stem."""
  f = []
  for name, module in TorchResNet18(width).named_children():
    if name == "conv1":
      module = nn.Conv2d(1, width, kernel_size=3, stride=1, padding=1, bias=False)
    if not isinstance(module, (nn.Linear, nn.MaxPool2d)):
      f.append(module)
  return f


class ResnetXray(nn.Module):  # reference resnet_xray
  def __init__(self, width=64):
    super().__init__()
    self.f = nn.Sequential(*reference_trunk(width))

  def forward(self, x):
    return self.f(x).flatten(1)


class ResnetXrayClassifier(nn.Module):  # reference resnet_xray_classifier
  def __init__(self, width=64, num_classes=4):
    super().__init__()
    self.f = nn.Sequential(*reference_trunk(width), Flatten(), nn.Linear(8 * width, num_classes))

  def forward(self, x):
    return self.f(x)


def _randomise(module, seed):
  """Random weights and non-trivial BN statistics so every tensor matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var"):
        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
      elif name.endswith("running_mean") or name.endswith("bias"):
        t.copy_(torch.randn(t.shape, generator=g) * 0.1)
      elif name.endswith("weight") and t.ndim == 1:  # BN gamma
        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
      else:
        fan_in = int(np.prod(t.shape[1:]))
        t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
  return module.eval()


def _input(seed, b=2, size=32):
  x = np.random.default_rng(seed).normal(size=(b, 1, size, size)).astype(np.float32)
  return x, jnp.asarray(x.transpose(0, 2, 3, 1))  # NCHW for torch, NHWC for flax


def _close(a, b, tol=1e-4):
  a, b = np.asarray(a), np.asarray(b)
  scale = max(1.0, float(np.abs(b).max()))
  np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0)


# Odd input size (33) checks the stride-2 padding matches PyTorch on both parities.
@pytest.mark.parametrize("size", [32, 33])
def test_classifier_import_matches_reference_logits(size):
  width = 16
  tmodel = _randomise(ResnetXrayClassifier(width, num_classes=4), seed=0)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  assert "f.9.weight" in sd and "f.4.0.downsample.1.running_var" in sd  # the reference key layout
  model = resnet.ResNetXray(num_classes=4, width_multiplier=width / 64, dropout=0.2)
  x_t, x_j = _input(1, size=size)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), x_j, train=False))
  variables = torch_import.import_resnet_xray(sd, template=template)
  out = model.apply(variables, x_j, train=False)
  with torch.no_grad():
    ref_logits = tmodel(torch.from_numpy(x_t)).numpy()
    ref_feats = tmodel.f[:8](torch.from_numpy(x_t)).flatten(1).numpy()  # up to avgpool
  _close(out["logits"], ref_logits)
  _close(out["features"], ref_feats)


def test_encoder_and_combine_model_import():
  """resnet_xray (no head) and combine_model's 'encoder.f.*' + 'classifier.*' keys."""
  width = 8
  enc = _randomise(ResnetXray(width), seed=2)
  head = _randomise(nn.Linear(8 * width, 4), seed=3)
  x_t, x_j = _input(4, size=16)
  with torch.no_grad():
    ref_feats = enc(torch.from_numpy(x_t)).numpy()
    ref_logits = head(enc(torch.from_numpy(x_t))).numpy()

  encoder_only = resnet.ResNetXray(num_classes=0, width_multiplier=width / 64)
  v = torch_import.import_resnet_xray({k: t.numpy() for k, t in enc.state_dict().items()})
  assert "head" not in v["params"]
  _close(encoder_only.apply(v, x_j, train=False)["features"], ref_feats)

  combined = {f"encoder.{k}": t.numpy() for k, t in enc.state_dict().items()}
  combined.update({f"classifier.{k}": t.numpy() for k, t in head.state_dict().items()})
  model = resnet.ResNetXray(num_classes=4, width_multiplier=width / 64)
  out = model.apply(torch_import.import_resnet_xray(combined), x_j, train=False)
  _close(out["logits"], ref_logits)


def test_full_width_reference_keys_and_param_count():
  """Width 64: the exact reference key set imports into the 11,169,732-param model."""
  tmodel = ResnetXrayClassifier(64, num_classes=4)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  model = resnet.ResNetXray(num_classes=4)
  template = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False)
  )
  v = torch_import.import_resnet_xray(sd, template=template)
  assert sum(x.size for x in jax.tree.leaves(v["params"])) == 11_169_732
  assert sum(p.numel() for p in tmodel.parameters()) == 11_169_732


def test_mismatched_model_is_rejected():
  sd = {k: v.numpy() for k, v in ResnetXrayClassifier(8, num_classes=4).state_dict().items()}
  model = resnet.ResNetXray(num_classes=3, width_multiplier=8 / 64)
  template = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False)
  )
  with pytest.raises(ValueError, match="do not fit"):
    torch_import.import_resnet_xray(sd, template=template)
  with pytest.raises(ValueError, match="unused keys|unexpected key"):
    torch_import.import_resnet_xray({**sd, "f.9.extra": np.zeros(1)})
