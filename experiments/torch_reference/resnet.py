"""torchvision's ResNet-18 module layout in plain PyTorch (torchvision is not a dependency).

The same module names torchvision's ``resnet18`` has (conv1, bn1, relu, maxpool,
layer1..4 of BasicBlocks with ``downsample`` Sequential(conv, bn), avgpool, fc), so
state_dicts saved from it use torchvision's keys. Used by the weight-import tests
(the reference ``resnet_xray`` is built from these children, and smp's ResNet
encoder splits them into stages) and by ``experiments/check_smp_parity.py``.
"""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class ResNet18(nn.Module):
  """torchvision.models.resnet18's child layout at base width ``width`` (7x7 s2 stem)."""

  def __init__(self, width: int = 64, num_classes: int = 1000, in_channels: int = 3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = width
    for i in range(4):
      cout = width * 2**i
      stride = 1 if i == 0 else 2
      layer = nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
      setattr(self, f"layer{i + 1}", layer)
      cin = cout
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(cin, num_classes)


def smp_stages(m: ResNet18) -> list[nn.Module]:
  """smp's ResNetEncoder stages: [identity, stem, maxpool+layer1, layer2, layer3, layer4]."""
  return [
    nn.Identity(),
    nn.Sequential(m.conv1, m.bn1, m.relu),
    nn.Sequential(m.maxpool, m.layer1),
    m.layer2,
    m.layer3,
    m.layer4,
  ]


def smp_features(m: ResNet18, x, depth: int = 5) -> list:
  """smp ResNetEncoder.forward: the input and the output of each of the first ``depth`` stages."""
  out = []
  for stage in smp_stages(m)[: depth + 1]:
    x = stage(x)
    out.append(x)
  return out
