"""U-Net train-step throughput on this CPU: ours (JAX) beside the PyTorch reference U-Net.

Usage:
  python -m experiments.bench.unet_step_bench                  # 2D B=8 1x256^2, 3D B=1 1x8x256^2
  python -m experiments.bench.unet_step_bench --dims 2 --size 64 --steps 2 --out /tmp/bench

What is timed: one optimizer step (forward, backward, Adam update) of the full-width
reference U-Net (4 blocks, 32 start filters, BatchNorm in train mode; 2D 1,971,587 /
3D 5,646,275 parameters, 3 classes) with per-pixel softmax cross-entropy on a fixed batch:
2D B=8 images [8, 256, 256, 1], 3D B=1 volume [1, 8, 256, 256, 1] (PyTorch: NCHW/NCDHW,
its default layout, as the reference trains). JAX: our ``unet`` under ``jax.jit`` with
donated state; PyTorch: ``experiments/torch_reference/unet.py`` (the reference's modules),
``torch.set_num_threads(2)``. This machine has 2 cores, so XLA's CPU thread pool has 2
threads as well.

Interleaving: per setting, one persistent worker process per framework builds its model
and compiles; then the parent asks them for one step at a time, alternating JAX and
PyTorch, so both see the same background load (the machine is shared). ``--warmup``
untimed step pairs, then ``--steps`` timed pairs; each worker times its own step
(``block_until_ready`` for JAX; PyTorch CPU eager is synchronous). img/s (or vol/s) =
B / median step time. Each worker's peak RSS (``ru_maxrss``, interpreter included; base
RSS after imports reported separately) is its own. The 1-minute load average is recorded
before and after every timed pair.

Writes ``<out>/unet_step_bench.{json,md}`` (default experiments/bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

from experiments.bench.common import _rss_mb, serve_steps, xla_buffers_mb

# The PyTorch original's throughput on this machine quoted by the issue (2 threads).
ISSUE_TORCH = {2: 3.1, 3: 0.24}
NUM_CLASSES = 3

NOTES = """## Notes

* Steps run interleaved (JAX, PyTorch, JAX, ...) in two persistent processes, so both
  frameworks see the same background load; the load column is the 1-minute load average
  over the timed steps (the bench itself adds ~2 on this 2-core machine). Compare rows of
  the same run only.
* Run of 2026-11-30 16:55 UTC on an otherwise idle machine: the PyTorch reference reaches
  the issue's numbers (2.6 img/s vs 3.1 quoted, 0.27 vol/s vs 0.24), our JAX step runs at
  0.50x (2D) and 0.30x (3D) of it.
* Where the time goes (per-conv table): XLA:CPU's weight-gradient ("backward filter") pass
  of the U-Net's biggest 2D conv runs at 36 GFLOP/s against PyTorch/oneDNN's 157, and its
  forward and input-gradient passes at 85-99 against 123-136; in 3D all three passes run at
  42-56 GFLOP/s against 247-295 (~5x). The step is bound by XLA:CPU's convolution kernels,
  the same finding as resnet_step_bench.md; closing the gap is issue 13's job (on
  accelerators XLA's convolutions are cuDNN's). An earlier run under load 5-7 gave 0.91x in
  2D: both frameworks then got a fraction of the cores, which hid the kernel gap.
* ``init_s``: the jitted ``model.init``; on XLA:CPU most of it is compiling one threefry
  kernel per parameter tensor, not running it.
"""


def _batch_shape(dims: int, batch: int, size: int, depth: int) -> tuple[int, ...]:
  return (batch, size, size) if dims == 2 else (batch, depth, size, size)


def worker_jax(
  dims: int,
  batch: int,
  size: int,
  depth: int,
  compute_dtype: str = "float32",
  conv_dw_groups: int = 1,
  conv_backend: str = "xla",
):
  """Builds the step; returns (info, one_step) where one_step() runs and times one step.

  ``compute_dtype`` 'bfloat16' runs the model through ``train.step.with_compute_dtype``;
  ``conv_dw_groups``, ``conv_backend``: see ``train.step.train_step``.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from mtneuro_jax.models import MODELS
  from mtneuro_jax.train.step import check_conv_backend, flax_conv, with_compute_dtype

  base = _rss_mb()
  check_conv_backend(conv_backend)
  model = with_compute_dtype(MODELS["unet"](num_classes=NUM_CLASSES, dims=dims), compute_dtype)
  shape = _batch_shape(dims, batch, size, depth)
  x = jax.random.normal(jax.random.key(0), shape + (1,), jnp.float32)
  y = jax.random.randint(jax.random.key(1), shape, 0, NUM_CLASSES)
  t0 = time.perf_counter()
  variables = jax.jit(lambda x: model.init(jax.random.key(2), x, train=False))(x[:1])
  jax.block_until_ready(variables)
  init_s = time.perf_counter() - t0
  params, stats = variables["params"], {"batch_stats": variables["batch_stats"]}
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  def loss_fn(params, stats, x, y):
    out, new = model.apply({"params": params, **stats}, x, train=True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y)
    return jnp.mean(ce), new

  def train_step(params, stats, opt_state, x, y):
    with flax_conv(conv_dw_groups, conv_backend):
      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), dict(new_stats), opt_state, loss

  t0 = time.perf_counter()
  compiled = (
    jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(params, stats, opt_state, x, y).compile()
  )
  compile_s = time.perf_counter() - t0
  xla_mb = xla_buffers_mb(compiled)
  state = [params, stats, opt_state]

  def one() -> float:
    t = time.perf_counter()
    p, s, o, loss = compiled(*state, x, y)
    jax.block_until_ready((p, loss))
    state[:] = [p, s, o]
    return time.perf_counter() - t

  info = {
    "init_s": init_s,
    "compile_s": compile_s,
    "base_rss_mb": base,
    "xla_buffers_mb": xla_mb,
    "compute_dtype": compute_dtype,
    "conv_dw_groups": conv_dw_groups,
    "conv_backend": conv_backend,
    "version": f"jax {jax.__version__} ({jax.default_backend()})",
    "num_params": int(sum(v.size for v in jax.tree.leaves(params))),
  }
  return info, one


def worker_torch(dims: int, batch: int, size: int, depth: int, threads: int):
  import torch

  from experiments.torch_reference.unet import UNet

  base = _rss_mb()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = UNet(in_channels=1, out_channels=NUM_CLASSES, dim=dims).train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  shape = _batch_shape(dims, batch, size, depth)
  x = torch.randn(shape[0], 1, *shape[1:])
  y = torch.randint(0, NUM_CLASSES, shape)
  loss_fn = torch.nn.CrossEntropyLoss()

  def one() -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return time.perf_counter() - t

  info = {
    "init_s": None,
    "compile_s": None,
    "base_rss_mb": base,
    "xla_buffers_mb": None,
    "version": f"torch {torch.__version__}, {threads} threads",
    "num_params": int(sum(p.numel() for p in model.parameters())),
  }
  return info, one


def _conv_shape(dims: int, batch: int, size: int, depth: int) -> tuple[int, ...]:
  """Input [B, *spatial, C] of the U-Net's biggest conv: first block's conv2, 32 -> 32 channels."""
  return _batch_shape(dims, batch, size, depth) + (32,)


def _median_ms(fn, reps: int) -> float:
  fn()  # warm-up (and compile)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1000 * statistics.median(times)


def micro_jax(dims: int, batch: int, size: int, depth: int, reps: int = 3) -> dict:
  """Forward, input-gradient and weight-gradient time of that conv alone (JAX, jit)."""
  import jax
  import jax.numpy as jnp

  shape = _conv_shape(dims, batch, size, depth)
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (3,) * dims + (32, 32)) * 0.05
  dn = ("NHWC", "HWIO", "NHWC") if dims == 2 else ("NDHWC", "DHWIO", "NDHWC")
  pad = ((1, 1),) * dims

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1,) * dims, pad, dimension_numbers=dn)

  dy = jnp.ones(shape)
  fwd = jax.jit(conv)
  dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return {
    "fwd_ms": _median_ms(lambda: fwd(x, w).block_until_ready(), reps),
    "dx_ms": _median_ms(lambda: dx(x, w, dy).block_until_ready(), reps),
    "dw_ms": _median_ms(lambda: dw(x, w, dy).block_until_ready(), reps),
  }


def micro_torch(dims: int, batch: int, size: int, depth: int, threads: int, reps: int = 3) -> dict:
  """The same conv in PyTorch (NC* layout): forward, input gradient, weight gradient."""
  import torch

  torch.set_num_threads(threads)
  shape = _conv_shape(dims, batch, size, depth)
  x = torch.randn(shape[0], shape[-1], *shape[1:-1])
  w = torch.randn(32, 32, *(3,) * dims) * 0.05
  dy = torch.ones_like(x)
  conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
  args = ([1] * dims, [1] * dims, [1] * dims, False, [0] * dims, 1)

  def bwd(mask):
    torch.ops.aten.convolution_backward(dy, x, w, None, *args, mask)

  with torch.no_grad():
    return {
      "fwd_ms": _median_ms(lambda: conv(x, w, padding=1), reps),
      "dx_ms": _median_ms(lambda: bwd([True, False, False]), reps),
      "dw_ms": _median_ms(lambda: bwd([False, True, False]), reps),
    }


def run_micro(dims: int, batch: int, args) -> list[dict]:
  rows = []
  for fw in ("jax", "torch"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "experiments.bench.unet_step_bench", "--_worker", f"micro_{fw}"]
    cmd += ["--dims", str(dims), "--batch", str(batch), "--size", str(args.size)]
    cmd += ["--depth", str(args.depth), "--torch_threads", str(args.torch_threads)]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
      raise RuntimeError(f"micro worker {fw} failed: {proc.stderr[-1000:]}")
    shape = _conv_shape(dims, batch, args.size, args.depth)
    gflop = 2 * 32 * 3**dims * math.prod(shape) / 1e9  # per pass (fwd, dx or dw)
    row = {"framework": fw, "dims": dims, "input": list(shape), "gflop": gflop}
    row.update(json.loads(lines[-1]), load1=[round(load0, 2), round(os.getloadavg()[0], 2)])
    print(f"[bench] micro {dims}D {fw}: {row}", flush=True)
    rows.append(row)
  return rows


def _serve(args) -> int:
  """Worker process: build, print an info line, then answer 'step' lines with step times."""
  if args._worker.startswith("micro_"):
    fn = micro_jax if args._worker == "micro_jax" else micro_torch
    extra = () if args._worker == "micro_jax" else (args.torch_threads,)
    print(json.dumps(fn(args.dims, args.batch, args.size, args.depth, *extra)), flush=True)
    return 0
  if args._worker == "jax":
    info, one = worker_jax(args.dims, args.batch, args.size, args.depth)
  else:
    info, one = worker_torch(args.dims, args.batch, args.size, args.depth, args.torch_threads)
  return serve_steps(info, one)


def _start(framework: str, dims: int, batch: int, args) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # no fake devices: one CPU device, XLA's default thread pool
  cmd = [sys.executable, "-m", "experiments.bench.unet_step_bench", "--_worker", framework]
  cmd += ["--dims", str(dims), "--batch", str(batch), "--size", str(args.size)]
  cmd += ["--depth", str(args.depth), "--torch_threads", str(args.torch_threads)]
  return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read(proc: subprocess.Popen) -> dict:
  while True:
    line = proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker exited with status {proc.wait()}")
    if line.startswith("{"):
      return json.loads(line)


def run_setting(dims: int, batch: int, args) -> list[dict]:
  """Both frameworks for one setting, steps interleaved; returns one row per framework."""
  frameworks = ["jax"] + ([] if args.no_torch else ["torch"])
  rows = {}
  procs = {}
  for fw in frameworks:  # build + compile one after the other (not timed against each other)
    print(f"[bench] {dims}D {fw}: building (load {os.getloadavg()[0]:.2f}) ...", flush=True)
    procs[fw] = _start(fw, dims, batch, args)
    rows[fw] = {"framework": fw, "dims": dims, "batch": batch, **_read(procs[fw]), "step_s": []}
  loads = []
  for i in range(args.warmup + args.steps):
    order = frameworks if i % 2 == 0 else frameworks[::-1]
    load0 = os.getloadavg()[0]
    times = {}
    for fw in order:
      procs[fw].stdin.write("step\n")
      procs[fw].stdin.flush()
      times[fw] = _read(procs[fw])["steps_s"][0]
      if i >= args.warmup:
        rows[fw]["step_s"].append(times[fw])
    if i >= args.warmup:
      loads += [load0, os.getloadavg()[0]]
    print(
      f"[bench] {dims}D step {i + 1}/{args.warmup + args.steps}"
      f"{' (warm-up)' if i < args.warmup else ''}: "
      + ", ".join(f"{fw} {times[fw]:.2f}s" for fw in order)
      + f" (load {os.getloadavg()[0]:.2f})",
      flush=True,
    )
  out = []
  for fw in frameworks:
    procs[fw].stdin.write("done\n")
    procs[fw].stdin.flush()
    rows[fw].update(_read(procs[fw]))
    procs[fw].wait()
    med = statistics.median(rows[fw]["step_s"])
    rows[fw].update(
      median_step_s=med,
      per_s=batch / med,
      load1_min=round(min(loads), 2),
      load1_max=round(max(loads), 2),
      issue_torch_per_s=ISSUE_TORCH[dims] if fw == "torch" else None,
      date=time.strftime("%Y-%m-%d %H:%M"),
    )
    out.append(rows[fw])
  return out


def _markdown(rows: list[dict], meta: dict, micro: list[dict] | None = None) -> str:
  f = lambda v, d=1: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
  lines = [
    "# U-Net train-step benchmark (CPU): JAX (ours) vs the PyTorch reference U-Net",
    "",
    f"Machine: {meta['cpu']}, {meta['nproc']} cores, load in the table; {meta['date']} UTC. "
    f"Full-width reference U-Net, {NUM_CLASSES} classes, Adam, per-pixel CE, BatchNorm in train "
    f"mode; {meta['warmup']} warm-up steps, then {meta['steps']} timed steps per framework, "
    "interleaved; rate = B / median step time. Command: "
    f"`{meta['command']}`.",
    "",
    "| setting | framework | params | rate (median) | step s (median) | steps s (timed) "
    "| compile s | init s | peak RSS MiB | base RSS MiB | XLA buffers MiB | load 1-min (min-max) "
    "| issue's PyTorch |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    unit = "img/s" if r["dims"] == 2 else "vol/s"
    setting = (
      f"2D B={r['batch']} 1x{meta['size']}²"
      if r["dims"] == 2
      else f"3D B={r['batch']} 1x{meta['depth']}x{meta['size']}²"
    )
    ratio = ""
    if r["framework"] == "jax":
      torch_row = next(
        (t for t in rows if t["framework"] == "torch" and t["dims"] == r["dims"]), None
      )
      if torch_row:
        ratio = f" ({r['per_s'] / torch_row['per_s']:.2f}x torch)"
    issue = "—" if r["issue_torch_per_s"] is None else f"{r['issue_torch_per_s']} {unit}"
    lines.append(
      f"| {setting} | {r['version']} | {r['num_params']:,} | {r['per_s']:.3f} {unit}{ratio} "
      f"| {r['median_step_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['step_s'])} "
      f"| {f(r['compile_s'])} | {f(r['init_s'])} | {f(r['peak_rss_mb'], 0)} "
      f"| {f(r['base_rss_mb'], 0)} | {f(r['xla_buffers_mb'], 0)} "
      f"| {r['load1_min']}-{r['load1_max']} "
      f"| {issue} |"
    )
  if micro:
    lines += [
      "",
      "## Where the time goes: the U-Net's biggest conv alone (first block's conv2, 3^d, 32 -> 32)",
      "",
      f"`{meta.get('micro_command', '')}` ({meta.get('micro_date', '')} UTC); median of 3 runs "
      "after one warm-up, each pass alone (JAX: jit; PyTorch: aten convolution(_backward), "
      f"{meta.get('torch_threads', 2)} threads).",
      "",
      "| framework | input [B, *spatial, C] | GFLOP per pass | forward ms (GFLOP/s) "
      "| input grad ms (GFLOP/s) | weight grad ms (GFLOP/s) | load before/after |",
      "|---|---|---|---|---|---|---|",
    ]
    for m in micro:
      cells = " | ".join(
        f"{m[k]:.0f} ({m['gflop'] / m[k] * 1e3:.0f})" for k in ("fwd_ms", "dx_ms", "dw_ms")
      )
      lines.append(
        f"| {m['framework']} | {m['input']} | {m['gflop']:.1f} | {cells} "
        f"| {m['load1'][0]}/{m['load1'][1]} |"
      )
  return "\n".join(lines + ["", NOTES])


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as fh:
      return next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--dims", default="2,3", help="comma-separated: 2, 3")
  parser.add_argument("--size", type=int, default=256, help="Y = X side")
  parser.add_argument("--depth", type=int, default=8, help="3D depth (slices)")
  parser.add_argument("--batch2d", type=int, default=8)
  parser.add_argument("--batch3d", type=int, default=1)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument(
    "--micro", action="store_true", help="also time the biggest conv alone (fwd / dx / dw)"
  )
  parser.add_argument(
    "--micro_only", action="store_true", help="only the conv timings; keep the saved step rows"
  )
  parser.add_argument(
    "--render_only", action="store_true", help="rewrite the .md from the saved .json"
  )
  parser.add_argument("--out", default="experiments/bench/results")
  parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker:
    args.dims = int(args.dims)
    return _serve(args)

  meta = {
    "cpu": _cpu_name(),
    "nproc": os.cpu_count(),
    "size": args.size,
    "depth": args.depth,
    "warmup": args.warmup,
    "steps": args.steps,
    "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    "command": " ".join(
      ["python -m experiments.bench.unet_step_bench", *(argv if argv is not None else sys.argv[1:])]
    ),
    "torch_threads": args.torch_threads,
  }
  json_path = os.path.join(args.out, "unet_step_bench.json")
  if args.render_only:
    with open(json_path) as fh:
      saved = json.load(fh)
    with open(os.path.join(args.out, "unet_step_bench.md"), "w") as fh:
      fh.write(_markdown(saved["rows"], saved["meta"], saved.get("micro")))
    return 0
  rows, micro = [], []
  dims_list = [int(d) for d in args.dims.split(",")]
  if args.micro_only:
    with open(json_path) as fh:
      saved = json.load(fh)
    meta, rows = saved["meta"], saved["rows"]
  else:
    for dims in dims_list:
      rows += run_setting(dims, args.batch2d if dims == 2 else args.batch3d, args)
  if args.micro or args.micro_only:
    for dims in dims_list:
      micro += run_micro(dims, args.batch2d if dims == 2 else args.batch3d, args)
    meta["micro_command"] = " ".join(
      ["python -m experiments.bench.unet_step_bench", *(argv if argv is not None else sys.argv[1:])]
    )
    meta["micro_date"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
  os.makedirs(args.out, exist_ok=True)
  with open(json_path, "w") as fh:
    json.dump({"meta": meta, "rows": rows, "micro": micro}, fh, indent=1)
  with open(os.path.join(args.out, "unet_step_bench.md"), "w") as fh:
    fh.write(_markdown(rows, meta, micro))
  print(_markdown(rows, meta, micro))
  return 0


if __name__ == "__main__":
  sys.exit(main())
