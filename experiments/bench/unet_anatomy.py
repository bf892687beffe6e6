"""Where the U-Net train step's time goes, JAX beside PyTorch, piece by piece.

Usage:
  python -m experiments.bench.unet_anatomy                      # 2D B=32 1x64^2
  python -m experiments.bench.unet_anatomy --case 2d256 --reps 3  # 2D B=8 1x256^2
  python -m experiments.bench.unet_anatomy --case 3d --reps 3 --steps fast,flax  # 3D B=1 1x8x256^2

Cases: ``2d64`` (B=32 [32, 64, 64, 1]), ``2d256`` (B=8 [8, 256, 256, 1]), ``3d`` (B=1
[1, 8, 256, 256, 1]); full-width reference U-Net (4 blocks, 32 start filters, BatchNorm in
train mode, 3 classes, softmax cross-entropy, Adam). Timed pieces (ms, median of
``--reps``):

* ``step``: one optimizer step (forward, backward, Adam), JAX jitted with donated state,
  as ``unet_step_bench``. JAX variants: ``step[fast]`` = the library as it is (dot-based
  transposed conv ``seg_blocks.up_conv``, reshape max-pool ``seg_blocks.pool``),
  ``step[flax]`` = both replaced by the flax ops they replaced (``nn.ConvTranspose``,
  ``nn.max_pool``: XLA's input-dilated convolution and ``reduce_window`` /
  ``select_and_scatter``), ``step[fast_up]`` / ``step[fast_pool]`` = only one of them new.
* ``forward``: forward + loss only (train mode, batch statistics).
* ``up_convs``: the decoder's transposed convs (k2 s2) at their shapes, forward + gradients
  w.r.t. input, kernel and bias; JAX ``[flax]`` and ``[fast]``.
* ``pools``: the encoder's 2x max-pools, forward + input gradient; ``[flax]``, ``[fast]``.
* ``norm_act``: every act -> BatchNorm (train mode) of the network, forward + gradients.
* ``convs3``: every 3x3(x3) convolution of the network, forward + input and weight gradients.

PyTorch (``experiments/torch_reference/unet.py``, NC* layout, as many threads as the
process may use) runs the same pieces with its own ops. Everything runs in ONE process,
pieces interleaved round-robin (JAX and PyTorch alternate within each round), so all see
the same background load; the machine is shared and the 1-minute load average before and
after each round is recorded. The pieces' sum is not the step: a step also has the
concatenations, crops, the 1x1 head, the loss, Adam, and XLA fuses across piece borders.

Writes ``<out>/unet_anatomy[_<case>].{json,md}`` (default experiments/bench/results;
``2d64`` writes the name without suffix).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from typing import Sequence

CASES = {
  "2d64": dict(dims=2, batch=32, spatial=(64, 64)),
  "2d256": dict(dims=2, batch=8, spatial=(256, 256)),
  "3d": dict(dims=3, batch=1, spatial=(8, 256, 256)),
}
NUM_CLASSES = 3
STEP_VARIANTS = ("fast", "flax", "fast_up", "fast_pool")
FILTERS = (32, 64, 128, 256)


def layer_shapes(dims: int, batch: int, spatial: tuple[int, ...]) -> dict[str, list]:
  """Shapes (channel-last, [B, *S, C]) of the U-Net's pieces for the default 4 blocks."""

  def at(level):
    return tuple(s // 2**level for s in spatial)

  convs, norms, pools, ups = [], [], [], []
  for i, f in enumerate(FILTERS):
    cin = 1 if i == 0 else FILTERS[i - 1]
    convs += [((batch, *at(i), cin), f), ((batch, *at(i), f), f)]
    norms += [(batch, *at(i), f)] * 2
    if i < len(FILTERS) - 1:
      pools.append((batch, *at(i), f))
  for j in range(len(FILTERS) - 1):
    lvl, f = len(FILTERS) - 2 - j, FILTERS[len(FILTERS) - 2 - j]
    ups.append(((batch, *at(lvl + 1), FILTERS[lvl + 1]), f))
    norms += [(batch, *at(lvl), f)] * 3
    convs += [((batch, *at(lvl), 2 * f), f), ((batch, *at(lvl), f), f)]
  return {"convs": convs, "norms": norms, "pools": pools, "ups": ups}


@contextlib.contextmanager
def legacy_ops(up: bool, pool: bool):
  """While active, ``seg_blocks.up_conv`` / ``pool`` are the flax ops they replaced."""
  import flax.linen as nn

  from mtneuro_jax.models import seg_blocks as sb

  saved = sb.up_conv, sb.pool

  def flax_up_conv(
    features,
    *,
    dims,
    factor=2,
    kernel_init=sb.xavier_uniform,
    bias_init=sb.zeros,
    dtype=None,
    name=None,
  ):
    k = (factor,) * dims
    return nn.ConvTranspose(
      features,
      k,
      strides=k,
      padding="VALID",
      kernel_init=kernel_init,
      bias_init=bias_init,
      dtype=dtype,
      name=name,
    )

  def flax_pool(x, *, dims, kind="max", window=2):
    w = (window,) * dims
    f = nn.max_pool if kind == "max" else nn.avg_pool
    return f(x, w, strides=w, padding="VALID")

  try:
    if up:
      sb.up_conv = flax_up_conv
    if pool:
      sb.pool = flax_pool
    yield
  finally:
    sb.up_conv, sb.pool = saved


def jax_pieces(
  dims: int, batch: int, spatial: tuple[int, ...], step_variants: Sequence[str] = STEP_VARIANTS
) -> dict:
  """name -> (callable running one timed repetition, compile seconds)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from mtneuro_jax.models import MODELS
  from mtneuro_jax.models import seg_blocks as sb

  key = jax.random.key(0)
  x = jax.random.normal(key, (batch, *spatial, 1), jnp.float32)
  y = jax.random.randint(jax.random.key(1), (batch, *spatial), 0, NUM_CLASSES)
  tx = optax.adam(1e-3)
  out = {}

  def timed(fn, *args):
    def one():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      return time.perf_counter() - t

    return one

  def build_step(legacy_up: bool, legacy_pool: bool):
    model = MODELS["unet"](num_classes=NUM_CLASSES, dims=dims)
    with legacy_ops(legacy_up, legacy_pool):
      variables = model.init(jax.random.key(2), x[:1], train=False)
      params, stats = variables["params"], {"batch_stats": variables["batch_stats"]}
      opt_state = tx.init(params)

      def loss_fn(params, stats, x, y):
        out, new = model.apply({"params": params, **stats}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out["logits"], y)), new

      def train_step(params, stats, opt_state, x, y):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), dict(new_stats), opt_state, loss

      t0 = time.perf_counter()
      step = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(params, stats, opt_state, x, y)
      step = step.compile()
      fwd = jax.jit(loss_fn).lower(params, stats, x, y).compile()
      compile_s = time.perf_counter() - t0
    state = [params, stats, opt_state]

    def one():
      t = time.perf_counter()
      p, s, o, loss = step(*state, x, y)
      jax.block_until_ready((p, loss))
      state[:] = [p, s, o]
      return time.perf_counter() - t

    # The step donates its state: the forward gets its own copies.
    fwd_args = jax.tree.map(jnp.copy, (params, stats))
    return one, timed(fwd, *fwd_args, x, y), compile_s

  for name, up, pool in [
    ("fast", False, False),
    ("flax", True, True),
    ("fast_up", False, True),
    ("fast_pool", True, False),
  ]:
    if name not in step_variants:
      continue
    one, fwd, c = build_step(up, pool)
    out[f"step[{name}]"] = (one, c)
    if name == "fast":
      out["forward[fast]"] = (fwd, None)

  shapes = layer_shapes(dims, batch, spatial)
  rng = iter(jax.random.split(jax.random.key(3), 1000))

  def rand(shape, scale=1.0):
    return scale * jax.random.normal(next(rng), shape, jnp.float32)

  def compiled(fn, *args):
    t0 = time.perf_counter()
    c = jax.jit(fn).lower(*args).compile()
    return timed(c, *args), time.perf_counter() - t0

  # Transposed convs: forward + gradients w.r.t. input, kernel, bias.
  ups = [(rand(s), rand((2,) * dims + (s[-1], f), 0.1), rand((f,), 0.1)) for s, f in shapes["ups"]]
  gs = [rand((s[0], *(2 * d for d in s[1:-1]), f)) for s, f in shapes["ups"]]

  def up_flax(x, k, b):
    w = (2,) * dims
    return jax.lax.conv_transpose(x, k, w, "VALID") + b

  for name, op in [("flax", up_flax), ("fast", sb.up_conv_apply)]:

    def f(ups, gs, op=op):
      return [jax.grad(lambda a, g=g: jnp.sum(op(*a) * g))(u) for u, g in zip(ups, gs, strict=True)]

    out[f"up_convs[{name}]"] = compiled(f, ups, gs)

  # Max pools: forward + input gradient.
  px = [rand(s) for s in shapes["pools"]]
  pg = [rand((s[0], *(d // 2 for d in s[1:-1]), s[-1])) for s in shapes["pools"]]
  w = (2,) * dims
  for name, op in [
    ("flax", lambda x: nn.max_pool(x, w, strides=w, padding="VALID")),
    ("fast", lambda x: sb.pool(x, dims=dims)),
  ]:

    def f(px, pg, op=op):
      return [jax.grad(lambda a, g=g: jnp.sum(op(a) * g))(p) for p, g in zip(px, pg, strict=True)]

    out[f"pools[{name}]"] = compiled(f, px, pg)

  # act -> BatchNorm (train mode), forward + gradients w.r.t. input, scale, bias.
  nx = [rand(s) for s in shapes["norms"]]
  ng = [rand(s) for s in shapes["norms"]]
  bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  nv = [bn.init(jax.random.key(0), a) for a in nx]

  def norm_act(nv, nx, ng):
    def one(v, a, g):
      def loss(v, a):
        o, _ = bn.apply(v, nn.relu(a), mutable=["batch_stats"])
        return jnp.sum(o * g)

      return jax.grad(loss, argnums=(0, 1))(v, a)

    return [one(*t) for t in zip(nv, nx, ng, strict=True)]

  out["norm_act[flax]"] = compiled(norm_act, nv, nx, ng)

  # 3x3 convs (same padding), forward + gradients w.r.t. input and kernel.
  cx = [rand(s) for s, _ in shapes["convs"]]
  ck = [rand((3,) * dims + (s[-1], f), 0.05) for s, f in shapes["convs"]]
  cg = [rand((*s[:-1], f)) for s, f in shapes["convs"]]
  dn = ("NHWC", "HWIO", "NHWC") if dims == 2 else ("NDHWC", "DHWIO", "NDHWC")

  def convs(cx, ck, cg):
    def conv(a, k):
      return jax.lax.conv_general_dilated(a, k, (1,) * dims, ((1, 1),) * dims, dimension_numbers=dn)

    return [
      jax.grad(lambda a, k, g=g: jnp.sum(conv(a, k) * g), argnums=(0, 1))(a, k)
      for a, k, g in zip(cx, ck, cg, strict=True)
    ]

  out["convs3[xla]"] = compiled(convs, cx, ck, cg)
  return out


def torch_pieces(dims: int, batch: int, spatial: tuple[int, ...]) -> dict:
  import torch
  import torch.nn.functional as F

  from experiments.torch_reference.unet import UNet

  torch.manual_seed(0)
  out = {}
  model = UNet(in_channels=1, out_channels=NUM_CLASSES, dim=dims).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.randn(batch, 1, *spatial)
  y = torch.randint(0, NUM_CLASSES, (batch, *spatial))
  ce = torch.nn.CrossEntropyLoss()

  def step():
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = ce(model(x), y)
    loss.backward()
    opt.step()
    return time.perf_counter() - t

  def fwd():
    t = time.perf_counter()
    with torch.no_grad():  # batch statistics still used (train mode), no graph kept
      ce(model(x), y)
    return time.perf_counter() - t

  out["step[torch]"] = (step, None)
  out["forward[torch]"] = (fwd, None)

  def nc(shape):  # channel-last [B, *S, C] -> PyTorch [B, C, *S]
    return (shape[0], shape[-1], *shape[1:-1])

  def timed_backward(make):
    def one():
      t = time.perf_counter()
      for leaves, yv, g in make():
        yv.backward(g)
        for leaf in leaves:  # as zero_grad(set_to_none=True): no accumulation
          leaf.grad = None
      return time.perf_counter() - t

    return one

  shapes = layer_shapes(dims, batch, spatial)
  convt = F.conv_transpose2d if dims == 2 else F.conv_transpose3d
  ups = []
  for s, f in shapes["ups"]:
    a = torch.randn(nc(s), requires_grad=True)
    k = (0.1 * torch.randn(s[-1], f, *(2,) * dims)).requires_grad_()
    b = (0.1 * torch.randn(f)).requires_grad_()
    ups.append((a, k, b, torch.randn(batch, f, *(2 * d for d in s[1:-1]))))
  out["up_convs[torch]"] = (
    timed_backward(lambda: [((a, k, b), convt(a, k, b, stride=2), g) for a, k, b, g in ups]),
    None,
  )

  mp = F.max_pool2d if dims == 2 else F.max_pool3d
  pools = [
    (torch.randn(nc(s), requires_grad=True), torch.randn(batch, s[-1], *(d // 2 for d in s[1:-1])))
    for s in shapes["pools"]
  ]
  out["pools[torch]"] = (timed_backward(lambda: [((a,), mp(a, 2), g) for a, g in pools]), None)

  bns = []
  for s in shapes["norms"]:
    m = (torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm3d)(s[-1]).train()
    bns.append((m, torch.randn(nc(s), requires_grad=True), torch.randn(nc(s))))
  out["norm_act[torch]"] = (
    timed_backward(lambda: [((a,), m(torch.relu(a)), g) for m, a, g in bns]),
    None,
  )

  conv = F.conv2d if dims == 2 else F.conv3d
  cs = []
  for s, f in shapes["convs"]:
    a = torch.randn(nc(s), requires_grad=True)
    k = (0.05 * torch.randn(f, s[-1], *(3,) * dims)).requires_grad_()
    cs.append((a, k, torch.randn(batch, f, *s[1:-1])))
  out["convs3[torch]"] = (
    timed_backward(lambda: [((a, k), conv(a, k, padding=1), g) for a, k, g in cs]),
    None,
  )
  return out


def run(case: str, reps: int, warmup: int, step_variants: Sequence[str] = STEP_VARIANTS) -> dict:
  import jax
  import torch

  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  cfg = CASES[case]
  dims, batch, spatial = cfg["dims"], cfg["batch"], cfg["spatial"]
  load_start = os.getloadavg()
  print(f"[anatomy] {case}: building + compiling (load {load_start[0]:.2f})", flush=True)
  jp = jax_pieces(dims, batch, spatial, step_variants)
  tp = torch_pieces(dims, batch, spatial)
  # Round-robin order: each JAX piece beside its PyTorch counterpart.
  names = []
  for base in ("step", "forward", "up_convs", "pools", "norm_act", "convs3"):
    names += [n for n in jp if n.startswith(base + "[")] + [
      n for n in tp if n.startswith(base + "[")
    ]
  fns = {**{n: f for n, (f, _) in jp.items()}, **{n: f for n, (f, _) in tp.items()}}
  times = {n: [] for n in names}
  loads = []
  for r in range(warmup + reps):
    l0 = os.getloadavg()[0]
    for n in names:
      t = fns[n]()
      if r >= warmup:
        times[n].append(t)
    l1 = os.getloadavg()[0]
    if r >= warmup:
      loads.append([round(l0, 2), round(l1, 2)])
    print(f"[anatomy] round {r} done (load {l0:.2f} -> {l1:.2f})", flush=True)
  rows = []
  for n in names:
    base, _, variant = n.partition("[")
    fw = "torch" if variant.startswith("torch") else "jax"
    med = statistics.median(times[n])
    rows.append(
      {
        "piece": base,
        "variant": variant[:-1],
        "framework": fw,
        "median_ms": 1000 * med,
        "min_ms": 1000 * min(times[n]),
        "max_ms": 1000 * max(times[n]),
        "compile_s": jp.get(n, (None, None))[1],
      }
    )
    if base == "step":
      rows[-1]["img_per_s"] = batch / med
  return {
    "case": case,
    "dims": dims,
    "batch": batch,
    "input": [batch, *spatial, 1],
    "reps": reps,
    "warmup": warmup,
    "machine": {
      "cpu": platform.processor() or platform.machine(),
      "cores": os.cpu_count(),
      "usable_cores": threads,
      "python": platform.python_version(),
      "jax": f"{jax.__version__} ({jax.default_backend()})",
      "torch": f"{torch.__version__}, {torch.get_num_threads()} threads",
    },
    "load1_start": round(load_start[0], 2),
    "load1_per_round": loads,
    "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    "rows": rows,
  }


def to_markdown(res: dict) -> str:
  lines = [
    f"# U-Net anatomy, {res['case']}: input {res['input']} (B, *spatial, C)",
    "",
    f"{res['utc']} UTC; {res['machine']}; median of {res['reps']} interleaved rounds after "
    f"{res['warmup']} warm-up. The machine is shared: 1-minute load at start "
    f"{res['load1_start']}, per round (before, after) {res['load1_per_round']} (this bench "
    "itself adds ~2 on 2 cores).",
    "",
    "| piece | variant | median ms | min-max ms | img/s | JAX / PyTorch time |",
    "|---|---|---|---|---|---|",
  ]
  torch_ms = {r["piece"]: r["median_ms"] for r in res["rows"] if r["framework"] == "torch"}
  for r in res["rows"]:
    ratio = ""
    if r["framework"] == "jax" and r["piece"] in torch_ms:
      ratio = f"{r['median_ms'] / torch_ms[r['piece']]:.2f}"
    ips = f"{r['img_per_s']:.1f}" if "img_per_s" in r else ""
    lines.append(
      f"| {r['piece']} | {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f}"
      f" | {ips} | {ratio} |"
    )
  lines += ["", "Pieces: see the module docstring of `experiments/bench/unet_anatomy.py`.", ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--case", choices=sorted(CASES), default="2d64")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument(
    "--steps", default=",".join(STEP_VARIANTS), help="JAX step variants to time (comma list)"
  )
  p.add_argument("--out", default="experiments/bench/results")
  a = p.parse_args(argv)
  res = run(a.case, a.reps, a.warmup, a.steps.split(","))
  os.makedirs(a.out, exist_ok=True)
  stem = os.path.join(a.out, "unet_anatomy" + ("" if a.case == "2d64" else f"_{a.case}"))
  with open(stem + ".json", "w") as f:
    json.dump(res, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(to_markdown(res))
  print(to_markdown(res))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
