"""Train-step throughput and peak memory of ResNet18-xray on this CPU: ours (JAX) vs PyTorch.

Usage:
  python -m experiments.bench.resnet_step_bench                      # B=32, 64^2 and 128^2
  python -m experiments.bench.resnet_step_bench --variants default,onednn --sizes 64
  python -m experiments.bench.resnet_step_bench --no_torch --out /tmp/bench

What is timed: one optimizer step (forward, backward, SGD-momentum update) of
the full-width ResNet18-xray (11.2 M params, 1 input channel, 4 classes) on a
fixed batch of B float32 images [B, S, S, 1], after ``--warmup`` untimed steps
(compilation and first-touch excluded); ``--steps`` timed steps, each ended by
``block_until_ready`` (JAX) or a completed ``optimizer.step()`` (PyTorch eager
is synchronous on CPU). img/s = B / median step time.

Every (framework, variant, size) runs in a fresh subprocess, so the peak RSS
(``ru_maxrss``) belongs to that configuration alone; it includes the
interpreter and library baseline (reported separately as ``base_rss_mb``).
For JAX we also report XLA's own estimate of the step's buffers
(``memory_analysis``: arguments + outputs + temporaries).

PyTorch reference: the same architecture (torchvision-style BasicBlocks, 3x3
stride-1 stem, no max-pool; written out here because torchvision is not
installed), ``torch.set_num_threads(2)``, channels_last. XLA variants are sets
of ``XLA_FLAGS`` (see ``VARIANTS``). The machine is shared, so the 1-minute
load average before and after each run is recorded; compare numbers taken at
similar load only.

Writes ``<out>/resnet_step_bench.json`` and ``.md``.
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

from experiments.bench.common import (  # noqa: F401  (re-exported for older callers)
  _peak_rss_mb,
  _rss_mb,
  _torch_resnet18_xray,
  xla_buffers_mb,
)

# XLA_FLAGS per variant (appended to whatever the environment sets).
VARIANTS = {
  "default": "",
  "onednn": "--xla_cpu_use_onednn=true",
  "xnnpack": "--xla_cpu_use_xnnpack=true",
  "no_thunk": "--xla_cpu_use_thunk_runtime=false",
  "fast_math": "--xla_cpu_enable_fast_math=true",
  # Not a flag: every conv's weight gradient as GEMMs (see gemm_dw_conv); default XLA flags.
  "gemm_dw": "",
}
ISSUE_TORCH_IMG_S = {64: 24.9, 128: 5.3}

# What the investigation found (kept with the generated tables; update when the numbers change).
FINDINGS = """## Findings (what was tried for the JAX gap)

* The gap is XLA:CPU's **weight-gradient convolution** (backward filter). In the per-conv
  table (quiet machine) the forward and input-gradient convs of the big layers reach
  90-190 GFLOP/s, while the weight gradient of the same conv reaches 13-77 GFLOP/s. Worst
  is layer1 at 128^2: forward 0.27 s, input gradient 0.31 s, weight gradient 2.9 s, so its
  four weight gradients alone take ~12 s of the ~29 s step. Under load the weight-gradient
  time barely moves, as if it ran on one thread. Large feature maps suffer most, so
  128^2 is hit harder than 64^2.
* XLA flags: `--xla_cpu_use_onednn=true`, `--xla_cpu_use_xnnpack=true` and
  `--xla_cpu_experimental_{onednn,xnn}_fusion_type=dot,conv` leave the weight-gradient conv
  as it is (128^2 layer1 conv timed alone: 2.5-2.8 s in every case) and the whole step
  within noise (variant rows).
* Layout: the same conv timed alone in NCHW, CHWN or HWCN instead of NHWC is no faster
  (weight gradient 12.7-15.8 GFLOP/s at 128^2).
* Precision: float32 has no TF32 path on CPU. bf16 compute (``config.compute_dtype``, issue 13)
  was measured later in ``suite_quick.md``: no gain for the convolutions on this CPU even though it
  has avx512_bf16 (see docs/speed.md).
* Issue 13 (docs/speed.md, suite_quick.json): the weight gradient over two batch halves
  (``config.conv_dw_groups=2``) is the one XLA-level change that sped up the 64^2 step.
* Weight gradient as GEMMs (`gemm_dw` variant: a custom VJP with shifted copies of the
  input and a batched matmul over row groups): 2.6x faster for the 128^2 layer1 conv in
  isolation (0.99 s vs 2.6 s). The whole train step got *slower*, though (64^2: 2.3 vs 7.1
  img/s on a quiet machine), with about 3x the peak memory: the shifted copies and the lost
  fusions cost more than the change saves. Not proposed for the model.
* Conclusion: no cheap win found on this CPU, so the model file stays as it is. CPU runs
  remain smoke tests (the quick presets use width 1/8 and 4x downsampling). The paper preset
  is for accelerators, where XLA's convolutions are cuDNN's.
* The machine is shared: compare rows only at similar load (the 1-min load includes the
  bench's own 2 threads, so ~1-2 is a quiet machine). Quietest pairs: 64^2 JAX 7.1 vs
  PyTorch 16.7 img/s (23:36) and 5.5 vs 14.2 (00:36); 128^2 JAX 1.1 vs PyTorch 3.0 (00:40).
  So JAX reaches ~0.35-0.45x PyTorch's throughput on this CPU. Neither matches the issue's
  PyTorch numbers (24.9 / 5.3 img/s), which must come from a faster or idle machine.
"""  # PyTorch numbers quoted in the issue (B=32, 2 threads)


def _timed(step, n):
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times


def gemm_dw_conv():
  """A drop-in for ``lax.conv_general_dilated`` (flax ``nn.Conv(conv_general_dilated=...)``) whose
  weight gradient is computed as GEMMs instead of XLA:CPU's backward-filter convolution.

  Why: on this CPU, XLA's weight-gradient conv of a 3x3, 64->64 conv on [32, 128, 128, 64]
  runs at ~14 GFLOP/s while the forward and input-gradient convs run at ~150-170 GFLOP/s,
  so it dominates the train step at 128^2. Here dW[i, j] = sum_{b,y,x} x_pad[b, s*y + i, s*x + j] dY[b, y, x]:
  the kw column shifts are concatenated on the channel axis ([B, Hp, Wo, kw*C]), and for each of
  the kh row offsets one batched matmul over G row-groups (so XLA can parallelise the long
  contraction), summed. Forward and input gradient are XLA's own. Only NHWC/HWIO, no dilation,
  one feature group; anything else falls back to lax. Experimental (bench only).
  """
  import functools

  import jax
  import jax.numpy as jnp
  from jax import lax

  def conv(x, w, strides, padding):
    return lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def weight_grad(x, dy, kernel_shape, strides, padding):
    kh, kw, c, _ = kernel_shape
    sy, sx = strides
    (pt, pb), (pl, pr) = padding
    b, ho, wo, co = dy.shape
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    hp = xp.shape[1]
    xw = jnp.concatenate(
      [
        lax.slice(xp, (0, 0, j, 0), (b, hp, j + sx * (wo - 1) + 1, c), (1, 1, sx, 1))
        for j in range(kw)
      ],
      axis=-1,
    )  # [B, Hp, Wo, kw*C]
    n = b * ho * wo
    g = next(k for k in (128, 64, 32, 16, 8, 4, 2, 1) if n % k == 0)
    d = dy.reshape(g, n // g, co)
    rows = []
    for i in range(kh):
      a = lax.slice(xw, (0, i, 0, 0), (b, i + sy * (ho - 1) + 1, wo, kw * c), (1, sy, 1, 1))
      rows.append(
        jnp.einsum("gnk,gnd->gkd", a.reshape(g, n // g, kw * c), d).sum(0).reshape(kw, c, co)
      )
    return jnp.stack(rows)  # [kh, kw, C, Cout]

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def fast(x, w, strides, padding):
    return conv(x, w, strides, padding)

  def fwd(x, w, strides, padding):
    return conv(x, w, strides, padding), (x, w)

  def bwd(strides, padding, res, dy):
    x, w = res
    dx = jax.vjp(lambda x_: conv(x_, w, strides, padding), x)[1](dy)[0]
    return dx, weight_grad(x, dy, w.shape, strides, padding).astype(w.dtype)

  fast.defvjp(fwd, bwd)

  def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    **kw,
  ):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    nhwc = dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = (
      all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
      and feature_group_count == 1
      and batch_group_count == 1
      and lhs.ndim == 4
    )
    if not (nhwc and plain):
      return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        **kw,
      )
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return fast(
      lhs,
      rhs,
      tuple(int(s) for s in window_strides),
      tuple(tuple(int(q) for q in p) for p in padding),
    )

  return conv_general_dilated


def worker_jax(
  size: int, batch: int, warmup: int, steps: int, width: float = 1.0, variant: str = "default"
) -> dict:
  """One configuration in this process; returns the measurements."""
  import jax

  if variant == "gemm_dw":
    # Swap flax's conv primitive inside the model module only (the model file is not ours to edit).
    import functools
    import types

    import flax.linen as nn

    from mtneuro_jax.models import resnet

    resnet.nn = types.SimpleNamespace(
      **{k: getattr(nn, k) for k in dir(nn) if not k.startswith("__")}
    )
    resnet.nn.Conv = functools.partial(nn.Conv, conv_general_dilated=gemm_dw_conv())
  from experiments.bench.ssl_step_bench import build

  base = _rss_mb()
  # The project's own train step (train/step.py) at configs/task1_supervised.py:paper.
  info, one = build("supervised", batch, width, view=size)
  for _ in range(warmup):
    one()
  times = [one() for _ in range(steps)]
  return {
    "compile_s": info["compile_s"],
    "step_s": times,
    "base_rss_mb": base,
    "peak_rss_mb": _peak_rss_mb(),
    "xla_buffers_mb": info["xla_buffers_mb"],
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "num_params": info["num_params"],
  }


def conv_shapes(size: int) -> list[tuple[str, int, int, int, int]]:
  """(name, input side, C_in, C_out, stride) of ResNet18-xray's 3x3 convs for a size^2 input."""
  return [
    ("stem", size, 1, 64, 1),
    ("layer1", size, 64, 64, 1),
    ("layer2_0", size, 64, 128, 2),
    ("layer2", size // 2, 128, 128, 1),
    ("layer3_0", size // 2, 128, 256, 2),
    ("layer3", size // 4, 256, 256, 1),
    ("layer4_0", size // 4, 256, 512, 2),
    ("layer4", size // 8, 512, 512, 1),
  ]


def conv_case(name: str, s: int, ci: int, co: int, st: int, batch: int):
  """(x [batch, s, s, ci], w [3, 3, ci, co], row header) of one ``conv_shapes`` entry."""
  import jax

  x = jax.random.normal(jax.random.key(0), (batch, s, s, ci))
  w = jax.random.normal(jax.random.key(1), (3, 3, ci, co)) * 0.05
  flops = 2 * batch * (s // st) ** 2 * ci * co * 9
  row = {"conv": name, "input": [batch, s, s, ci], "c_out": co, "stride": st, "gflop": flops / 1e9}
  return x, w, row


def conv_passes(conv_fn, st: int) -> dict:
  """{'fwd', 'dx', 'dw'}: jitted forward, input gradient and weight gradient of a 3x3 NHWC/HWIO
  conv with stride ``st`` and padding 1, run by ``conv_fn`` (lax.conv_general_dilated or a
  drop-in with its arguments)."""
  import jax

  def conv(x, w):
    return conv_fn(x, w, (st, st), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

  return {
    "fwd": jax.jit(conv),
    "dx": jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), argnums=0)),
    "dw": jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), argnums=1)),
  }


def worker_conv(size: int, batch: int, reps: int = 2, backend: str = "xla") -> dict:
  """Times one 3x3 conv of each ResNet18-xray shape: forward, input gradient, weight gradient.

  ``backend`` 'onednn': the optional oneDNN kernel (``mtneuro_jax.kernels.onednn``) instead of
  XLA's conv, with the same arguments.
  """
  from jax import lax

  conv_fn = lax.conv_general_dilated
  if backend == "onednn":
    from mtneuro_jax.kernels import onednn

    conv_fn = onednn.make_conv_general_dilated()
  rows = []
  for name, s, ci, co, st in conv_shapes(size):
    x, w, row = conv_case(name, s, ci, co, st, batch)
    fns = conv_passes(conv_fn, st)
    flops = row["gflop"] * 1e9
    for k, fn in fns.items():
      fn(x, w).block_until_ready()
      t = _timed(lambda fn=fn, x=x, w=w: fn(x, w).block_until_ready(), reps)
      row[f"{k}_ms"] = 1e3 * statistics.median(t)
      row[f"{k}_gflops"] = flops / statistics.median(t) / 1e9
    rows.append(row)
  return {"convs": rows, "backend": backend}


def build_torch(size: int, batch: int, threads: int = 2) -> tuple[dict, "callable"]:
  """The PyTorch ResNet18-xray supervised step (SGD momentum, CE), channels_last.

  Returns (info, one): ``one()`` runs one step and returns its seconds.
  """
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = _torch_resnet18_xray().to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
  x = torch.randn(batch, 1, size, size).to(memory_format=torch.channels_last)
  y = torch.randint(0, 4, (batch,))
  loss_fn = torch.nn.CrossEntropyLoss()

  def one() -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return time.perf_counter() - t

  info = {
    "compile_s": None,
    "xla_buffers_mb": None,
    "version": f"torch {torch.__version__}, {threads} threads",
    "torch": torch.__version__,
    "threads": threads,
    "num_params": int(sum(p.numel() for p in model.parameters())),
  }
  return info, one


def worker_torch(size: int, batch: int, warmup: int, steps: int, threads: int) -> dict:
  base = _rss_mb()
  info, one = build_torch(size, batch, threads)
  for _ in range(warmup):
    one()
  times = [one() for _ in range(steps)]
  return {**info, "step_s": times, "base_rss_mb": base, "peak_rss_mb": _peak_rss_mb()}


def worker_conv_torch(size: int, batch: int, threads: int = 2, reps: int = 2) -> dict:
  """PyTorch (oneDNN) counterpart of ``worker_conv``: each conv shape's three passes alone."""
  import torch

  torch.set_num_threads(threads)
  rows = []
  for name, s, ci, co, st in conv_shapes(size):
    x = torch.randn(batch, ci, s, s).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(co, ci, 3, 3) * 0.05).contiguous(memory_format=torch.channels_last)
    dy = torch.ones(batch, co, s // st, s // st).contiguous(memory_format=torch.channels_last)
    args = ([st, st], [1, 1], [1, 1], False, [0, 0], 1)
    fns = {
      "fwd": lambda x=x, w=w, st=st: torch.nn.functional.conv2d(x, w, stride=st, padding=1),
      "dx": lambda x=x, w=w, dy=dy, args=args: torch.ops.aten.convolution_backward(
        dy, x, w, None, *args, [True, False, False]
      ),
      "dw": lambda x=x, w=w, dy=dy, args=args: torch.ops.aten.convolution_backward(
        dy, x, w, None, *args, [False, True, False]
      ),
    }
    flops = 2 * batch * (s // st) ** 2 * ci * co * 9
    row = {"conv": name, "input": [batch, s, s, ci], "c_out": co, "stride": st}
    row["gflop"] = flops / 1e9
    with torch.no_grad():
      for k, fn in fns.items():
        fn()
        t = _timed(fn, reps)
        row[f"{k}_ms"] = 1e3 * statistics.median(t)
        row[f"{k}_gflops"] = flops / statistics.median(t) / 1e9
    rows.append(row)
  return {"convs": rows}


def worker_dw_variants(size: int, batch: int, reps: int = 3) -> dict:
  """XLA-level rewrites of one weight-gradient conv, each timed alone against XLA's own.

  For the 3x3 stride-1 convs of ResNet18-xray at ``size``^2 (layer1..layer4 shapes):
  ``xla`` (jax.vjp of the conv), ``batch_split_G`` (``train.step.split_weight_grad_conv``:
  G weight-gradient convs over batch slices, summed), ``shift_dot`` (nine dots of shifted input slices, one per
  tap, contracting B*Y*X), ``shift_dot_bf16`` (the same on bf16 operands, float32
  accumulation), ``im2col_dot`` (conv_general_dilated_patches then one dot, float32 and bf16).
  Also the max relative error against ``xla``.
  """
  import jax
  import jax.numpy as jnp
  from jax import lax

  def conv(x, w):
    return lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def dw_xla(x, w, dy):
    return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]

  def dw_shift(x, w, dy, dt=jnp.float32):
    b, h, wd, c = x.shape
    co = dy.shape[-1]
    xp = jnp.pad(x.astype(dt), ((0, 0), (1, 1), (1, 1), (0, 0)))
    d = dy.astype(dt).reshape(-1, co)
    taps = [
      lax.dot_general(
        lax.slice(xp, (0, i, j, 0), (b, i + h, j + wd, c)).reshape(-1, c),
        d,
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
      )
      for i in range(3)
      for j in range(3)
    ]
    return jnp.stack(taps).reshape(3, 3, c, co)

  def dw_im2col(x, w, dy, dt=jnp.float32):
    c, co = x.shape[-1], dy.shape[-1]
    p = lax.conv_general_dilated_patches(
      x.astype(dt), (3, 3), (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )  # [B, Y, X, C*9], channel-major
    r = lax.dot_general(
      p.reshape(-1, c * 9),
      dy.astype(dt).reshape(-1, co),
      (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32,
    )
    return r.reshape(c, 3, 3, co).transpose(1, 2, 0, 3)

  from mtneuro_jax.train.step import split_weight_grad_conv

  def dw_split(x, w, dy, groups):
    conv_g = split_weight_grad_conv(groups)
    f = lambda w: conv_g(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    return jax.vjp(f, w)[1](dy)[0]

  variants = {
    "xla": dw_xla,
    "batch_split_2": lambda x, w, dy: dw_split(x, w, dy, 2),
    "batch_split_4": lambda x, w, dy: dw_split(x, w, dy, 4),
    "shift_dot": dw_shift,
    "shift_dot_bf16": lambda x, w, dy: dw_shift(x, w, dy, jnp.bfloat16),
    "im2col_dot": dw_im2col,
    "im2col_dot_bf16": lambda x, w, dy: dw_im2col(x, w, dy, jnp.bfloat16),
  }
  rows = []
  for name, s, ci, co, st in conv_shapes(size):
    if st != 1 or ci == 1:
      continue
    x = jax.random.normal(jax.random.key(0), (batch, s, s, ci))
    w = jnp.zeros((3, 3, ci, co))
    dy = jax.random.normal(jax.random.key(1), (batch, s, s, co))
    flops = 2 * batch * s * s * ci * co * 9
    row = {"conv": name, "input": [batch, s, s, ci], "c_out": co, "gflop": flops / 1e9}
    ref = None
    for k, fn in variants.items():
      f = jax.jit(fn)
      out = f(x, w, dy).block_until_ready()
      ref = out if ref is None else ref
      t = statistics.median(
        _timed(lambda f=f, x=x, w=w, dy=dy: f(x, w, dy).block_until_ready(), reps)
      )
      row[f"{k}_ms"] = 1e3 * t
      row[f"{k}_rel_err"] = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    rows.append(row)
  return {"dw_variants": rows}


def _run_worker(framework: str, variant: str, size: int, args) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None) if framework == "jax" and not args.keep_env_flags else None
  if framework == "jax":
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), VARIANTS[variant]) if f)
  cmd = [
    sys.executable,
    "-m",
    "experiments.bench.resnet_step_bench",
    "--_worker",
    framework,
    "--sizes",
    str(size),
    "--batch",
    str(args.batch),
    "--warmup",
    str(args.warmup),
    "--steps",
    str(args.steps),
    "--torch_threads",
    str(args.torch_threads),
    "--width",
    str(args.width),
    "--variants",
    variant or "default",
  ]
  load0 = os.getloadavg()[0]
  t0 = time.time()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  wall = time.time() - t0
  row = {
    "framework": framework,
    "variant": variant if framework == "jax" else "channels_last",
    "size": size,
    "batch": args.batch,
    "warmup": args.warmup,
    "steps": args.steps,
    "load1_before": round(load0, 2),
    "date": time.strftime("%Y-%m-%d %H:%M"),
    "load1_after": round(os.getloadavg()[0], 2),
    "wall_s": round(wall, 1),
    "xla_flags": env.get("XLA_FLAGS", "") if framework == "jax" else None,
  }
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    row["error"] = (proc.stderr or proc.stdout)[-2000:]
    return row
  res = json.loads(lines[-1])
  med = statistics.median(res["step_s"])
  row.update(
    res,
    median_step_s=med,
    img_per_s=args.batch / med,
    best_img_per_s=args.batch / min(res["step_s"]),
  )
  return row


def _markdown(rows: list[dict], meta: dict, convs: list[dict] | None = None) -> str:
  lines = [
    "# ResNet18-xray train-step benchmark (CPU)",
    "",
    f"Machine: {meta['cpu']}, {meta['nproc']} cores visible, shared with other jobs "
    f"(1-min load average per row). Batch {meta['batch']}, 1-channel input, full width (11.2 M params), "
    "warm-up steps untimed, then the timed steps of each row's `steps`; img/s = B / median step time. "
    "Peak RSS includes the interpreter and library baseline (base RSS).",
    "",
    "| framework | variant | size | img/s (median) | img/s (best) | step s | timed steps | compile s "
    "| peak RSS MiB | base RSS MiB | XLA buffers MiB | load before/after | when | issue's torch img/s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(
        f"| {r['framework']} | {r['variant']} | {r['size']}² | failed: "
        f"{r['error'].strip().splitlines()[-1][:80] if r['error'].strip() else '?'} |||||||||||"
      )
      continue
    f = lambda v, d=1: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines.append(
      f"| {r['framework']} | {r['variant']} | {r['size']}² | {f(r['img_per_s'])} | {f(r['best_img_per_s'])} "
      f"| {f(r['median_step_s'], 2)} | {r.get('steps', '—')} | {f(r.get('compile_s'))} | {f(r['peak_rss_mb'], 0)} "
      f"| {f(r['base_rss_mb'], 0)} | {f(r.get('xla_buffers_mb'), 0)} "
      f"| {r['load1_before']}/{r['load1_after']} | {r.get('date', '—')} | {ISSUE_TORCH_IMG_S.get(r['size'], '—')} |"
    )
  if convs:
    lines += [
      "",
      f"## Where the time goes: one 3x3 conv per ResNet18-xray shape (JAX, default flags, B={meta['batch']})",
      "",
      "| conv | input [B,Y,X,C] | C_out | stride | GFLOP | fwd ms (GFLOP/s) | input grad ms (GFLOP/s) "
      "| weight grad ms (GFLOP/s) |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for c in convs:
      lines.append(
        f"| {c['conv']} | {c['input']} | {c['c_out']} | {c['stride']} | {c['gflop']:.1f} "
        + " ".join(f"| {c[k + '_ms']:.0f} ({c[k + '_gflops']:.0f})" for k in ("fwd", "dx", "dw"))
        + " |"
      )
  lines += ["", FINDINGS]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--sizes", default="64,128", help="comma-separated square input sizes")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument(
    "--variants", default="default", help=f"comma-separated XLA variants: {','.join(VARIANTS)}"
  )
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument(
    "--width", type=float, default=1.0, help="JAX model width multiplier (1 = the paper's)"
  )
  parser.add_argument(
    "--keep_env_flags", action="store_true", help="keep XLA_FLAGS from the environment"
  )
  parser.add_argument("--out", default="experiments/bench/results")
  parser.add_argument(
    "--micro_size",
    type=int,
    default=0,
    help="also time each conv shape (fwd / input grad / weight grad) for this input size; 0 = off",
  )
  parser.add_argument(
    "--append", action="store_true", help="add rows to an existing <out>/resnet_step_bench.json"
  )
  parser.add_argument(
    "--render_only", action="store_true", help="rewrite the .md from the existing .json"
  )
  parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")]

  if args._worker:  # child process: one configuration, one JSON line on stdout
    if args._worker == "conv":
      res = worker_conv(sizes[0], args.batch)
    elif args._worker == "conv_onednn":
      res = worker_conv(sizes[0], args.batch, backend="onednn")
    elif args._worker == "conv_torch":
      res = worker_conv_torch(sizes[0], args.batch, args.torch_threads)
    elif args._worker == "dw_variants":
      res = worker_dw_variants(sizes[0], args.batch)
    elif args._worker == "jax":
      res = worker_jax(sizes[0], args.batch, args.warmup, args.steps, args.width, args.variants)
    else:
      res = worker_torch(sizes[0], args.batch, args.warmup, args.steps, args.torch_threads)
    print(json.dumps(res), flush=True)
    return 0

  if args.render_only:
    with open(os.path.join(args.out, "resnet_step_bench.json")) as f:
      saved = json.load(f)
    with open(os.path.join(args.out, "resnet_step_bench.md"), "w") as f:
      f.write(_markdown(saved["rows"], saved["meta"], saved.get("convs")))
    return 0

  variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  try:
    import torch  # noqa: F401

    have_torch = not args.no_torch
  except ImportError:
    have_torch = False
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
  except (OSError, StopIteration):
    pass
  meta = {
    "cpu": cpu,
    "nproc": os.cpu_count(),
    "batch": args.batch,
    "warmup": args.warmup,
    "steps": args.steps,
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  rows = []
  json_path = os.path.join(args.out, "resnet_step_bench.json")
  if args.append and os.path.exists(json_path):
    with open(json_path) as f:
      rows = json.load(f)["rows"]
  for size in sizes:
    jobs = [("jax", v) for v in variants] + ([("torch", "")] if have_torch else [])
    for framework, variant in jobs:
      print(
        f"[bench] {framework} {variant or 'channels_last'} {size}x{size} B={args.batch} "
        f"(load {os.getloadavg()[0]:.2f}) ...",
        flush=True,
      )
      row = _run_worker(framework, variant, size, args)
      rows.append(row)
      msg = (
        row.get("error", "").strip().splitlines()[-1:]
        if "error" in row
        else [f"{row['img_per_s']:.1f} img/s, peak RSS {row['peak_rss_mb']:.0f} MiB"]
      )
      print(f"[bench]   -> {msg[0] if msg else 'failed'} ({row['wall_s']}s)", flush=True)
  convs = None
  if args.micro_size:
    print(
      f"[bench] per-conv timings at {args.micro_size}^2 (load {os.getloadavg()[0]:.2f}) ...",
      flush=True,
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "experiments.bench.resnet_step_bench",
        "--_worker",
        "conv",
        "--sizes",
        str(args.micro_size),
        "--batch",
        str(args.batch),
      ],
      env=env,
      capture_output=True,
      text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    convs = json.loads(lines[-1])["convs"] if lines else None
  elif args.append and os.path.exists(json_path):
    with open(json_path) as f:
      convs = json.load(f).get("convs")
  os.makedirs(args.out, exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(
      {"meta": meta, "issue_torch_img_per_s": ISSUE_TORCH_IMG_S, "rows": rows, "convs": convs},
      f,
      indent=1,
    )
  md = _markdown(rows, meta, convs)
  with open(os.path.join(args.out, "resnet_step_bench.md"), "w") as f:
    f.write(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
