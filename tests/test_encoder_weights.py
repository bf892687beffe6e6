"""Converted PyTorch encoder weights reproduce the PyTorch encoder's feature maps; bad files fail in one line.

torchvision is not installed, so the ResNet-18 comes from experiments/torch_reference/resnet.py
(torchvision's module names, smp's stage split); width 16 instead of 64 keeps the test fast (the
names and the conversion are the same at any width).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn

from experiments.convert_encoder_weights import convert  # noqa: E402
from experiments.torch_reference.resnet import ResNet18 as TorchResNet18  # noqa: E402
from experiments.torch_reference.resnet import smp_features  # noqa: E402
from mtneuro_jax.models import encoder_weights as ew  # noqa: E402
from mtneuro_jax.models import seg2d  # noqa: E402
from mtneuro_jax.models.seg_encoders import ENCODERS  # noqa: E402
from mtneuro_jax.train.state import param_count  # noqa: E402

WIDTH = 16  # torch base width; our width_multiplier = WIDTH / 64


def _random_torch_resnet(seed=0):
  torch.manual_seed(seed)
  m = TorchResNet18(WIDTH)
  return _randomize_bn(m)


def _randomize_bn(m):
  """Non-trivial BN affine and running stats (torch's RNG), then eval mode; returns ``m``."""
  with torch.no_grad():
    for mod in m.modules():
      if isinstance(mod, tnn.BatchNorm2d):
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.uniform_(-0.2, 0.2)
        mod.running_mean.uniform_(-0.2, 0.2)
        mod.running_var.uniform_(0.5, 1.5)
  return m.eval()


@pytest.fixture(scope="module")
def resnet_npz(tmp_path_factory):
  m = _random_torch_resnet()
  path = tmp_path_factory.mktemp("w") / "resnet18.npz"
  np.savez(path, **convert(m.state_dict()))
  return m, str(path)


def _encoder_variables(name, wm, image):
  enc = ENCODERS[name](width_multiplier=wm)
  return enc, jax.eval_shape(lambda im: enc.init(jax.random.key(0), im, train=False), image)


def _make_dilated(stage):
  """smp replace_strides_with_dilation(stage, 2): every conv stride 1, dilation 2."""
  for mod in stage.modules():
    if isinstance(mod, tnn.Conv2d):
      mod.stride, mod.dilation = (1, 1), (2, 2)
      kh = mod.kernel_size[0]
      mod.padding = ((kh // 2) * 2, (kh // 2) * 2)


@pytest.mark.parametrize("output_stride", [32, 16])
def test_resnet18_import_reproduces_torch_features(resnet_npz, output_stride):
  m, path = resnet_npz
  if output_stride == 16:
    m = copy.deepcopy(m)
    _make_dilated(m.layer4)
  x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
  with torch.no_grad():
    # smp's 1-channel stem sums the RGB filters == the RGB stem on a grey image repeated 3x.
    ref = [t.numpy() for t in smp_features(m, torch.from_numpy(np.repeat(x, 3, axis=1)))]
  image = jnp.asarray(x.transpose(0, 2, 3, 1))
  enc = ENCODERS["resnet18"](width_multiplier=WIDTH / 64, output_stride=output_stride)
  shapes = jax.eval_shape(lambda im: enc.init(jax.random.key(0), im, train=False), image)
  variables = ew.load_encoder_weights(shapes, ew.read_npz(path), "resnet18")
  feats = jax.jit(lambda v, im: enc.apply(v, im, train=False))(variables, image)
  assert [f.shape[1] for f in feats] == [64, 32, 16, 8, 4, 4 if output_stride == 16 else 2]
  for i, (ours, theirs) in enumerate(zip(feats[1:], ref[1:], strict=True)):
    np.testing.assert_allclose(
      np.asarray(ours), theirs.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4, err_msg=f"f{i + 1}"
    )


def test_model_init_loads_encoder_weights(resnet_npz):
  m, path = resnet_npz
  model = seg2d.pspnet(
    num_classes=3, encoder_name="resnet18", width_multiplier=WIDTH / 64, encoder_weights=path
  )
  image = jnp.zeros((1, 32, 32, 1))
  v = jax.jit(lambda im: model.init({"params": jax.random.key(1)}, im, train=False))(image)
  stem = m.conv1.weight.detach().numpy().sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)
  np.testing.assert_allclose(v["params"]["encoder"]["conv1"]["kernel"], stem, rtol=1e-6)
  np.testing.assert_allclose(
    v["batch_stats"]["encoder"]["layer2_0"]["downsample_1"]["var"],
    m.layer2[0].downsample[1].running_var.numpy(),
  )


def _one_line_error(fn, match):
  with pytest.raises(ew.EncoderWeightsError, match=match) as e:
    fn()
  assert "\n" not in str(e.value) and ";" in str(e.value)


def test_bad_weight_files_fail_in_one_line(resnet_npz, tmp_path):
  _, path = resnet_npz
  weights = ew.read_npz(path)
  image = jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32)
  _, shapes = _encoder_variables("resnet18", WIDTH / 64, image)
  missing = dict(weights)
  del missing["layer3.1.bn2.running_var"]
  _one_line_error(
    lambda: ew.load_encoder_weights(shapes, missing, "resnet18"), "'layer3.1.bn2.running_var'"
  )
  # Full-width encoder, width-16 weights: shape mismatch names the first key it meets.
  _, full = _encoder_variables("resnet18", 1.0, image)
  _one_line_error(lambda: ew.load_encoder_weights(full, weights, "resnet18"), "has shape")
  # ResNet-34 needs layer1.2 that a ResNet-18 file lacks; an EfficientNet, other names.
  _, r34 = _encoder_variables("resnet34", WIDTH / 64, image)
  _one_line_error(lambda: ew.load_encoder_weights(r34, weights, "resnet34"), "'layer1.2.")
  extra = dict(weights, **{"layer2.9.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
  _one_line_error(lambda: ew.load_encoder_weights(shapes, extra, "resnet18"), "'layer2.9")
  # Not a file / not an npz.
  _one_line_error(lambda: ew.read_npz(str(tmp_path / "nope.npz")), "does not exist")
  junk = tmp_path / "junk.npz"
  junk.write_text("not a zip")
  _one_line_error(lambda: ew.read_npz(str(junk)), "not a readable .npz")
  # Through the model: the error surfaces at init.
  model = seg2d.fpn(
    num_classes=3, encoder_name="resnet34", width_multiplier=WIDTH / 64, encoder_weights=path
  )
  _one_line_error(
    lambda: jax.eval_shape(lambda im: model.init(jax.random.key(0), im, train=False), image),
    "is missing",
  )


def test_converter_strips_prefix_and_batch_counter():
  m = _random_torch_resnet()
  sd = {f"encoder.{k}": v for k, v in m.state_dict().items()}
  sd["decoder.x.weight"] = torch.zeros(3)
  out = convert(sd, prefix="encoder.")
  assert "conv1.weight" in out and "decoder.x.weight" not in out
  assert not any(k.endswith("num_batches_tracked") for k in out)
  assert all(v.dtype == np.float32 for v in out.values())


def test_resnet18_encoder_param_count_matches_torch():
  """Our full-width encoder = torchvision resnet18 minus fc, with a 1-channel stem."""
  m = TorchResNet18(64)
  torch_count = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("fc."))
  torch_count -= 64 * 2 * 7 * 7  # smp's 1-channel stem drops two RGB input channels
  image = jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32)
  _, shapes = _encoder_variables("resnet18", 1.0, image)
  assert param_count(shapes["params"]) == torch_count == 11_170_240


# ----------------------------------------------------------------------------------------------
# EfficientNet: a PyTorch rebuild with lukemelas/EfficientNet-PyTorch 0.7.1's module names and
# its static "same" padding (computed for the nominal image size), smp's stage split and smp's
# make_dilated for output stride 16.


class TorchSameConv(tnn.Conv2d):
  """lukemelas Conv2dStaticSamePadding: TF 'same' padding fixed for ``image_size``."""

  def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, image_size=None):
    super().__init__(cin, cout, k, stride, 0, 1, groups, bias)
    ih = image_size
    oh = -(-ih // stride)
    pad = max((oh - 1) * stride + k - ih, 0)
    self.static_padding = tnn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

  def forward(self, x):
    return torch.nn.functional.conv2d(
      self.static_padding(x),
      self.weight,
      self.bias,
      self.stride,
      self.padding,
      self.dilation,
      self.groups,
    )


class TorchMBConv(tnn.Module):
  def __init__(self, k, s, cin, cout, e, image_size, skip):
    super().__init__()
    oup = cin * e
    self.e, self.s, self.skip, self.cin, self.cout = e, s, skip, cin, cout
    bn = lambda c: tnn.BatchNorm2d(c, momentum=0.01, eps=1e-3)  # noqa: E731
    if e != 1:
      self._expand_conv = TorchSameConv(cin, oup, 1, image_size=image_size)
      self._bn0 = bn(oup)
    self._depthwise_conv = TorchSameConv(oup, oup, k, s, groups=oup, image_size=image_size)
    self._bn1 = bn(oup)
    sq = max(1, int(cin * 0.25))
    self._se_reduce = TorchSameConv(oup, sq, 1, bias=True, image_size=1)
    self._se_expand = TorchSameConv(sq, oup, 1, bias=True, image_size=1)
    self._project_conv = TorchSameConv(oup, cout, 1, image_size=-(-image_size // s))
    self._bn2 = bn(cout)

  def forward(self, inputs):
    sw = torch.nn.functional.silu
    x = inputs
    if self.e != 1:
      x = sw(self._bn0(self._expand_conv(x)))
    x = sw(self._bn1(self._depthwise_conv(x)))
    z = torch.nn.functional.adaptive_avg_pool2d(x, 1)
    x = torch.sigmoid(self._se_expand(sw(self._se_reduce(z)))) * x
    x = self._bn2(self._project_conv(x))
    if self.skip and self.s == 1 and self.cin == self.cout:
      x = x + inputs
    return x


class TorchEfficientNetB0(tnn.Module):
  STAGES = [(3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2),
            (3, 3, 40, 80, 6, 2), (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2),
            (3, 1, 192, 320, 6, 1)]  # fmt: skip

  def __init__(self, image_size=224, stage_idxs=(3, 5, 9)):
    super().__init__()
    self._conv_stem = TorchSameConv(3, 32, 3, 2, image_size=image_size)
    self._bn0 = tnn.BatchNorm2d(32, momentum=0.01, eps=1e-3)
    size = -(-image_size // 2)
    blocks = []
    for k, r, cin, cout, e, s in self.STAGES:
      for j in range(r):
        blocks.append(TorchMBConv(k, s if j == 0 else 1, cin if j == 0 else cout, cout, e,
                                  size, skip=j > 0))  # fmt: skip
        size = -(-size // (s if j == 0 else 1))
    self._blocks = tnn.ModuleList(blocks)
    self._conv_head = TorchSameConv(320, 1280, 1, image_size=size)
    self._bn1 = tnn.BatchNorm2d(1280, momentum=0.01, eps=1e-3)
    self._fc = tnn.Linear(1280, 1000)
    self.ends = list(stage_idxs) + [len(blocks)]

  def make_dilated(self):
    """smp make_dilated(16): stage 5 convs -> stride 1, dilation 2, symmetric padding."""
    for block in self._blocks[self.ends[2] :]:
      for mod in block.modules():
        if isinstance(mod, tnn.Conv2d):
          mod.stride, mod.dilation = (1, 1), (2, 2)
          kh = mod.kernel_size[0]
          mod.padding = ((kh // 2) * 2, (kh // 2) * 2)
          mod.static_padding = tnn.Identity()

  def features(self, x):
    x = torch.nn.functional.silu(self._bn0(self._conv_stem(x)))
    out = [x]
    for i, b in enumerate(self._blocks):
      x = b(x)
      if i + 1 in self.ends:
        out.append(x)
    return out


@pytest.mark.parametrize("output_stride", [32, 16])
def test_efficientnet_b0_import_reproduces_torch_features(output_stride, tmp_path):
  torch.manual_seed(0)
  m = TorchEfficientNetB0()
  _randomize_bn(m)
  if output_stride == 16:
    m.make_dilated()
  x = np.random.default_rng(1).normal(size=(2, 1, 64, 64)).astype(np.float32)
  with torch.no_grad():
    ref = [t.numpy() for t in m.features(torch.from_numpy(np.repeat(x, 3, axis=1)))]
  path = tmp_path / "b0.npz"
  np.savez(path, **convert(m.state_dict()))
  image = jnp.asarray(x.transpose(0, 2, 3, 1))
  enc = ENCODERS["efficientnet-b0"](output_stride=output_stride)
  shapes = jax.eval_shape(lambda im: enc.init(jax.random.key(0), im, train=False), image)
  variables = ew.load_encoder_weights(shapes, ew.read_npz(str(path)), "efficientnet-b0")
  feats = jax.jit(lambda v, im: enc.apply(v, im, train=False))(variables, image)
  assert [f.shape[1] for f in feats] == [64, 32, 16, 8, 4, 4 if output_stride == 16 else 2]
  for i, (ours, theirs) in enumerate(zip(feats[1:], ref, strict=True)):
    np.testing.assert_allclose(
      np.asarray(ours), theirs.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4, err_msg=f"f{i + 1}"
    )
  # Same count as the PyTorch model minus the classifier-only tensors and two stem channels.
  n = sum(
    p.numel() for k, p in m.named_parameters() if not k.startswith(("_fc.", "_conv_head.", "_bn1."))
  )
  assert param_count(shapes["params"]) == n - 32 * 2 * 9
