"""Self-supervised train-step throughput on this CPU, beside the supervised step (benchmark, not a test).

Usage:
  python -m experiments.bench.ssl_step_bench                       # B=32, 1x64^2 views, full width
  python -m experiments.bench.ssl_step_bench --methods supervised,byol --width 0.25 --steps 3

What is timed: one optimizer step of the one train step (``train/step.py``) on a fixed batch,
after ``--warmup`` untimed steps (compilation excluded), each ended by ``block_until_ready``.
Every method uses its own config file at ``:paper`` (full-width ResNet18-xray, the paper's
heads), the batch is B tiles of 128^2 so the SSL views are 1x64^2 crops (half the side, as the
paper's 128 of 256); the supervised step sees whole 64^2 tiles, so every step processes
B images of 64^2 per view. MYOW's batch carries B queries plus a pool of B candidates (its
config's "one extra batch"). img/s = B / median step time. Each method runs in a fresh
subprocess so its peak RSS (``ru_maxrss``, interpreter included) is its own; the 1-minute load
average before and after is recorded (the machine may be shared).

Writes ``<out>/ssl_step_bench.{json,md}`` (default experiments/bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from experiments.bench.common import xla_buffers_mb

METHODS = ("supervised", "byol", "myow", "myow_merged", "vicreg")


def build(
  method: str,
  batch: int,
  width: float,
  view: int = 64,
  compute_dtype: str = "float32",
  conv_dw_groups: int = 1,
  conv_backend: str = "xla",
) -> tuple[dict, "callable"]:
  """Builds ``method``'s train step (``train/step.py``) on a fixed batch.

  Returns (info, one): ``one()`` runs one step to completion and returns its seconds; the
  first call compiles. SSL methods get tiles of 2 * ``view`` (their views are half-size
  crops), the supervised step whole ``view``^2 tiles.
  """
  import importlib

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mtneuro_jax import sharding
  from mtneuro_jax.models import MODELS
  from mtneuro_jax.objectives import OBJECTIVES
  from mtneuro_jax.train import optim
  from mtneuro_jax.train import step as step_lib
  from mtneuro_jax.train.state import create_train_state, param_count

  cfg = importlib.import_module(f"configs.task1_{method}").get_config("paper")
  cfg.unlock()
  cfg.model.width_multiplier = width
  model = MODELS[cfg.model_name](**dict(cfg.model))
  objective = OBJECTIVES[cfg.objective_name]
  mesh = sharding.make_mesh(1)
  side = view if method == "supervised" else 2 * view
  rows = batch * 2 if method.startswith("myow") else batch
  rng = np.random.default_rng(0)
  host = {
    "image": rng.normal(size=(rows, side, side, 1)).astype(np.float32),
    "label": rng.integers(0, 4, rows).astype(np.int32),
    "region": np.zeros(rows, np.int32),
    "valid": np.ones(rows, bool),
  }
  data = sharding.shard_batch(host, mesh)
  tx, _ = optim.make_optimizer(cfg.optim, steps_per_epoch=100, total_steps=1000, batch_size=rows)
  example = jax.ShapeDtypeStruct((1, side, side, 1), jnp.float32)
  state = jax.jit(
    lambda: create_train_state(
      model, objective, tx, example, seed=0, objective_config=cfg.objective
    ),
    out_shardings=sharding.replicated_sharding(mesh),
  )()
  p_step = step_lib.jit_train_step(
    mesh,
    model=model,
    objective=objective,
    optimizer=tx,
    config=cfg.objective,
    total_steps=1000,
    steps_per_epoch=100,
    compute_dtype=compute_dtype,
    conv_dw_groups=conv_dw_groups,
    conv_backend=conv_backend,
  )
  t0 = time.perf_counter()
  compiled = p_step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state, "loss": None}

  def one() -> float:
    t = time.perf_counter()
    box["state"], m = compiled(box["state"], data)
    jax.block_until_ready(m)
    box["loss"] = float(m["train/loss"])
    return time.perf_counter() - t

  info = {
    "method": method,
    "rows_per_step": rows,
    "view": f"1x{view}x{view}",
    "width": width,
    "num_params": param_count(state.params),
    "compile_s": compile_s,
    "xla_buffers_mb": xla_buffers_mb(compiled),
    "compute_dtype": compute_dtype,
    "conv_dw_groups": conv_dw_groups,
    "conv_backend": conv_backend,
    "version": f"jax {jax.__version__} ({jax.default_backend()})",
  }
  return info, one


def build_torch_byol(batch: int, view: int = 64, threads: int = 2) -> tuple[dict, "callable"]:
  """The PyTorch counterpart of our BYOL step at ``:paper`` (for the suite's side-by-side).

  ResNet18-xray encoder (``resnet_step_bench._torch_resnet18_xray`` without its head),
  projector 512->4096->256 and predictor 256->4096->256 (Linear, BatchNorm1d, ReLU, Linear),
  an EMA target (encoder + projector), the symmetric 2 - 2 cos loss, plus the online linear
  probe on detached features; SGD momentum 0.9, weight decay 5e-4. Views: two random
  half-size crops per sample of 2 * ``view`` tiles (one offset per sample, as ours),
  channels_last. Four encoder passes per step, like ours.
  """
  import copy

  import torch
  import torch.nn as tnn
  import torch.nn.functional as F

  from experiments.bench.common import _torch_resnet18_xray

  torch.set_num_threads(threads)
  torch.manual_seed(0)

  def mlp(cin, hidden, out):
    return tnn.Sequential(
      tnn.Linear(cin, hidden),
      tnn.BatchNorm1d(hidden),
      tnn.ReLU(inplace=True),
      tnn.Linear(hidden, out),
    )

  encoder = _torch_resnet18_xray()[:-2]  # up to the flattened 512-d features
  online = tnn.Sequential(encoder, mlp(512, 4096, 256)).to(memory_format=torch.channels_last)
  predictor = mlp(256, 4096, 256)
  probe = tnn.Linear(512, 4)
  target = copy.deepcopy(online)
  for p in target.parameters():
    p.requires_grad_(False)
  params = [*online.parameters(), *predictor.parameters(), *probe.parameters()]
  opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=5e-4)
  side = 2 * view
  tiles = torch.randn(batch, 1, side, side)
  labels = torch.randint(0, 4, (batch,))
  gen = torch.Generator().manual_seed(1)

  def crops() -> torch.Tensor:
    off = torch.randint(0, side - view + 1, (batch, 2), generator=gen).tolist()
    return torch.stack(
      [t[:, y : y + view, x : x + view] for t, (y, x) in zip(tiles, off, strict=True)]
    ).contiguous(memory_format=torch.channels_last)

  def one() -> float:
    t = time.perf_counter()
    v1, v2 = crops(), crops()
    opt.zero_grad(set_to_none=True)
    f1 = encoder(v1)
    f2 = encoder(v2)
    p1 = predictor(online[1](f1))
    p2 = predictor(online[1](f2))
    with torch.no_grad():
      z1, z2 = target(v1), target(v2)
    loss = (2 - 2 * F.cosine_similarity(p1, z2, dim=-1)).mean()
    loss = loss + (2 - 2 * F.cosine_similarity(p2, z1, dim=-1)).mean()
    loss = loss + F.cross_entropy(probe(f1.detach()), labels)
    loss.backward()
    opt.step()
    with torch.no_grad():
      for pt, po in zip(target.parameters(), online.parameters(), strict=True):
        pt.mul_(0.996).add_(po.detach(), alpha=0.004)
    return time.perf_counter() - t

  info = {
    "method": "byol",
    "num_params": int(sum(p.numel() for p in params)),
    "compile_s": None,
    "xla_buffers_mb": None,
    "version": f"torch {torch.__version__}, {threads} threads",
  }
  return info, one


def worker(method: str, batch: int, width: float, warmup: int, steps: int) -> dict:
  import resource

  info, one = build(method, batch, width)
  t0 = time.perf_counter()
  for _ in range(warmup):
    one()
  warm_s = time.perf_counter() - t0
  times = [one() for _ in range(steps)]
  med = statistics.median(times)
  return {
    "method": method,
    "batch": batch,
    "rows_per_step": info["rows_per_step"],
    "view": info["view"],
    "width": width,
    "params": info["num_params"],
    "warmup_s": round(warm_s + info["compile_s"], 2),
    "step_s": [round(t, 3) for t in times],
    "median_step_s": round(med, 3),
    "img_per_s": round(batch / med, 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }


def _markdown(rows: list[dict], meta: dict) -> str:
  lines = [
    "# SSL train-step throughput (CPU)",
    "",
    f"Machine: {meta['cpu']} ({meta['cpu_count']} cores), jax {meta['jax']}; batch {meta['batch']}, "
    f"width {meta['width']}, {meta['steps']} timed steps after {meta['warmup']} warm-up steps. "
    "Command: `python -m experiments.bench.ssl_step_bench`.",
    "",
    "| method | rows/step | params | median step (s) | img/s | vs supervised | peak RSS (MB) | load before/after |",
    "|---|---|---|---|---|---|---|---|",
  ]
  sup = next((r for r in rows if r["method"] == "supervised" and "img_per_s" in r), None)
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | | | |")
      continue
    rel = f"{r['img_per_s'] / sup['img_per_s']:.2f}x" if sup else "—"
    lines.append(
      f"| {r['method']} | {r['rows_per_step']} | {r['params']:,} | {r['median_step_s']} | "
      f"{r['img_per_s']} | {rel} | {r['peak_rss_mb']} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--width", type=float, default=1.0)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", default=os.path.join("experiments", "bench", "results"))
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(
      "RESULT " + json.dumps(worker(args.worker, args.batch, args.width, args.warmup, args.steps))
    )
    return 0
  rows = []
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one real CPU device, no fake devices
  for method in [m for m in args.methods.split(",") if m]:
    load0 = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "experiments.bench.ssl_step_bench", "--worker", method]
    cmd += ["--batch", str(args.batch), "--width", str(args.width)]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    row = json.loads(line[7:]) if line else {"method": method, "error": proc.stderr[-500:]}
    row["load"] = (load0, os.getloadavg()[0])
    rows.append(row)
    print(json.dumps(row), flush=True)
  import jax

  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
  except OSError:
    pass
  meta = {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "batch": args.batch,
    "width": args.width,
    "warmup": args.warmup,
    "steps": args.steps,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "ssl_step_bench.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  md = _markdown(rows, meta)
  with open(os.path.join(args.out, "ssl_step_bench.md"), "w") as f:
    f.write(md)
  print(md)
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
