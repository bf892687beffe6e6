"""Helpers the benchmarks share (memory probes, XLA buffer sizes, the PyTorch ResNet18-xray)."""

from __future__ import annotations

import json
import os
import sys


def _rss_mb() -> float:
  """Current resident set size in MiB (Linux)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def serve_steps(info: dict, one_step) -> int:
  """A bench worker's protocol: print ``info`` as a JSON line, then answer each ``step [N]`` line
  on stdin (N defaults to 1) with ``{"steps_s": [...]}``, the seconds of N steps run back to back
  (``one_step()`` runs one and returns its seconds), until another line or EOF; end with the peak
  RSS."""
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    words = line.split()
    if not words or words[0] != "step":
      break
    n = int(words[1]) if len(words) > 1 else 1
    print(json.dumps({"steps_s": [one_step() for _ in range(n)]}), flush=True)
  print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True)
  return 0


def xla_buffers_mb(compiled) -> float | None:
  """XLA's buffer assignment of a compiled step: arguments + outputs + temporaries, in MiB."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20


def _torch_resnet18_xray(num_classes: int = 4):
  """The reference resnet_xray classifier (torchvision resnet18 layout, 1-ch 3x3 stem, no max-pool)."""
  import torch.nn as tnn

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(cout)
      self.relu = tnn.ReLU(inplace=True)
      self.down = None
      if stride != 1 or cin != cout:
        self.down = tnn.Sequential(
          tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
        )

    def forward(self, x):
      y = self.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return self.relu(y + (x if self.down is None else self.down(x)))

  layers = [tnn.Conv2d(1, 64, 3, 1, 1, bias=False), tnn.BatchNorm2d(64), tnn.ReLU(inplace=True)]
  cin = 64
  for i, w in enumerate((64, 128, 256, 512)):
    for j in range(2):
      layers.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1))
      cin = w
  layers += [
    tnn.AdaptiveAvgPool2d(1),
    tnn.Flatten(),
    tnn.Dropout(0.2),
    tnn.Linear(512, num_classes),
  ]
  return tnn.Sequential(*layers)
