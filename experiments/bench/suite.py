"""One benchmark command: our JAX train steps beside the PyTorch reference, input pipeline,
export and inference throughput, with the machine described.

Usage:
  python -m experiments.bench --quick                 # headline shapes only (a few minutes)
  python -m experiments.bench                         # every shape (tens of minutes)
  python -m experiments.bench --only resnet,unet2d --bf16 --per_op
  mtneuro bench --quick                               # the same through the project CLI

What is measured (every row: ``--warmup`` untimed turns, then ``--steps`` timed turns of
``--steps_per_turn`` steps run back to back; rate = the median of each turn's steps after its first):
  * train steps, one ``case`` = (model, batch, shape): ``resnet`` (ResNet18-xray supervised,
    our ``train/step.py`` at ``configs/task1_supervised.py:paper``), ``byol`` (BYOL at
    ``:paper``; views 1xS^2 cropped from 2S tiles), ``unet2d`` / ``unet3d`` (the reference U-Net,
    Adam, per-pixel CE; ``unet_step_bench``). Each framework (JAX float32, optionally JAX
    bfloat16 compute, PyTorch with ``--torch_threads`` threads) runs in its own fresh worker
    process (so peak RSS is that configuration's alone); after every worker has built (JAX:
    compiled) its step, the parent gives them one turn at a time, rotating the order, so all
    see the same background load. Ratio = JAX rate / PyTorch rate from the same run. A turn's
    first step follows seconds of idling (the other workers' turns), which costs every
    framework ~0.3 s on a VM that reports freed memory to its host (docs/speed.md); training
    runs its steps back to back, so those first steps are reported apart (``first_step_s``).
  * ``infer``: eval-mode forward of the 2D U-Net on a batch of 256^2 windows (a plain
    jitted batched apply, not a sliding-window driver), voxels/s, JAX beside PyTorch.
  * ``pipeline``: records/s of the training input pipeline (grain, host transforms at
    full resolution: 256^2 uint8 -> float32) over an export of Task 1 ROI-C1.
  * ``export``: MB/s of a small cold export of Task 1 ROI-C1 from the phantom
    (``export_bench``'s worker), into a temp dir; its output feeds ``pipeline`` unless
    ``--data_dir`` names an existing export.
  * ``--per_op``: ResNet18-xray's 3x3 conv shapes alone, forward / input grad / weight grad
    GFLOP/s, JAX vs PyTorch, plus XLA-level rewrites of the weight gradient
    (``resnet_step_bench``).
  * ``--memory``: XLA's buffer assignment of the ResNet step with and without donation.
The machine (CPU model, SIMD flags, cores, memory, versions) and the 1-minute load average
before/after the whole run and every step are recorded; the machine may be shared.

Writes ``<out>/suite[_quick].json`` and ``.md`` (default ``experiments/bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.bench.common import _peak_rss_mb, _rss_mb, serve_steps
from mtneuro_jax import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (model, batch, spatial shape without channel) per case; QUICK is the headline subset.
FULL_CASES = (
  ("resnet", 32, (64, 64)),
  ("resnet", 32, (128, 128)),
  ("resnet", 8, (256, 256)),
  ("byol", 32, (64, 64)),
  ("byol", 32, (128, 128)),
  ("unet2d", 32, (64, 64)),
  ("unet2d", 32, (128, 128)),
  ("unet2d", 8, (256, 256)),
  ("unet3d", 1, (8, 256, 256)),
  ("infer", 8, (256, 256)),
)
QUICK_CASES = (
  ("resnet", 32, (64, 64)),
  ("byol", 32, (64, 64)),
  ("unet2d", 32, (64, 64)),
  ("infer", 8, (256, 256)),
)
MODELS = ("resnet", "byol", "unet2d", "unet3d", "infer")
# glibc malloc mode per framework when not asked otherwise: ours as the `mtneuro` command runs
# (huge pages, mtneuro_jax/host_malloc.py), PyTorch as it ships (system).
DEFAULT_MALLOC = {"jax": "hugepages", "torch": "system"}
EXTRAS = ("pipeline", "export")
UNITS = {"infer": "voxels/s"}


def case_name(model: str, batch: int, shape) -> str:
  return f"{model} B={batch} 1x{'x'.join(str(s) for s in shape)}"


# ---------------------------------------------------------------------------
# Workers (child processes): build one step, then answer "step" lines.
def _build_infer(framework: str, batch: int, side: int, threads: int, compute_dtype: str):
  """Eval-mode 2D U-Net forward on [B, side, side, 1] windows; returns (info, one)."""
  if framework == "torch":
    import torch

    from experiments.bench.unet_step_bench import NUM_CLASSES
    from experiments.torch_reference.unet import UNet

    torch.set_num_threads(threads)
    model = UNet(in_channels=1, out_channels=NUM_CLASSES, dim=2).eval()
    x = torch.randn(batch, 1, side, side)

    def one() -> float:
      t = time.perf_counter()
      with torch.no_grad():
        model(x)
      return time.perf_counter() - t

    return {"version": f"torch {torch.__version__}, {threads} threads"}, one
  import jax
  import jax.numpy as jnp

  from experiments.bench.common import xla_buffers_mb
  from experiments.bench.unet_step_bench import NUM_CLASSES
  from mtneuro_jax.models import MODELS as REG
  from mtneuro_jax.train.step import with_compute_dtype

  model = with_compute_dtype(REG["unet"](num_classes=NUM_CLASSES, dims=2), compute_dtype)
  x = jax.random.normal(jax.random.key(0), (batch, side, side, 1), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x[:1])
  t0 = time.perf_counter()
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"]).lower(variables, x)
  compiled = compiled.compile()
  compile_s = time.perf_counter() - t0

  def one() -> float:
    t = time.perf_counter()
    compiled(variables, x).block_until_ready()
    return time.perf_counter() - t

  return {
    "version": f"jax {jax.__version__} ({jax.default_backend()})",
    "compile_s": compile_s,
    "xla_buffers_mb": xla_buffers_mb(compiled),
  }, one


def build(spec: dict):
  """(info, one) for one worker spec {framework, model, batch, shape, threads, compute_dtype}."""
  fw, model, b, shape = spec["framework"], spec["model"], spec["batch"], spec["shape"]
  threads, dt = spec.get("threads", 2), spec.get("compute_dtype", "float32")
  groups = spec.get("conv_dw_groups", 1)
  backend = spec.get("conv_backend", "xla")
  side = shape[-1]
  if model == "infer":
    return _build_infer(fw, b, side, threads, dt)
  if model in ("resnet", "byol"):
    from experiments.bench import resnet_step_bench, ssl_step_bench

    method = "supervised" if model == "resnet" else "byol"
    if fw == "jax":
      return ssl_step_bench.build(
        method, b, 1.0, view=side, compute_dtype=dt, conv_dw_groups=groups, conv_backend=backend
      )
    if model == "resnet":
      return resnet_step_bench.build_torch(side, b, threads)
    return ssl_step_bench.build_torch_byol(b, view=side, threads=threads)
  from experiments.bench import unet_step_bench

  dims = 2 if model == "unet2d" else 3
  depth = shape[0] if dims == 3 else 1
  if fw == "jax":
    return unet_step_bench.worker_jax(dims, b, side, depth, dt, groups, backend)
  return unet_step_bench.worker_torch(dims, b, side, depth, threads)


def serve(spec: dict) -> int:
  """Worker main: one JSON info line, then one {"step_s"} line per "step" on stdin."""
  __import__("torch" if spec["framework"] == "torch" else "jax")
  base = _rss_mb()  # interpreter + framework, before the model exists
  t0 = time.perf_counter()
  info, one = build(spec)
  info = {**info, "build_s": time.perf_counter() - t0, "base_rss_mb": base}
  # Peak so far = the build's (JAX: compilation); the final peak_rss_mb adds the steps.
  info.update(build_peak_rss_mb=_peak_rss_mb(), rss_after_build_mb=_rss_mb())
  # As the train loop does between compiling its step and running it (every framework alike;
  # PyTorch's heap has nothing to give back at that point).
  host_malloc.release_free_memory()
  info["rss_after_trim_mb"] = _rss_mb()
  return serve_steps(info, one)


def _env(framework: str, malloc: str | None = None) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  env = host_malloc.environ(env, malloc or DEFAULT_MALLOC[framework])
  if framework == "jax":
    env.pop("XLA_FLAGS", None)  # one real CPU device and XLA's default thread pool
  return env


def start_worker(spec: dict) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "experiments.bench.suite", "--_worker", json.dumps(spec)]
  return subprocess.Popen(
    cmd,
    cwd=REPO,
    env=_env(spec["framework"], spec.get("malloc")),
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def read_line(proc: subprocess.Popen) -> dict:
  while True:
    line = proc.stdout.readline()
    if not line:
      err = proc.stderr.read()[-3000:]
      raise RuntimeError(f"worker exited with status {proc.wait()}: {err}")
    if line.startswith("{"):
      return json.loads(line)


def summarize(times: list[float], per_step: float) -> dict:
  """Median step and rate (``per_step`` units per step: images, volumes or voxels)."""
  med = statistics.median(times)
  return {"median_step_s": med, "rate": per_step / med, "best_rate": per_step / min(times)}


def add_ratios(rows: list[dict]) -> list[dict]:
  """Sets the ratios (rate / the same case's PyTorch rate) on every non-torch row.

  ``ratio_vs_torch``: against PyTorch with glibc's default malloc (as it ships);
  ``ratio_vs_torch_hugepages``: against PyTorch with the huge-page malloc our JAX rows use by
  default (like for like). None where that PyTorch row is missing.
  """

  def rates(malloc):
    return {
      r["case"]: r["rate"]
      for r in rows
      if r["framework"] == "torch" and r.get("malloc", "system") == malloc and "rate" in r
    }

  for key, torch_rate in (
    ("ratio_vs_torch", rates("system")),
    ("ratio_vs_torch_hugepages", rates("hugepages")),
  ):
    for r in rows:
      t = torch_rate.get(r["case"])
      r[key] = r["rate"] / t if t and "rate" in r and r["framework"] != "torch" else None
  return rows


def run_case(model: str, batch: int, shape, args, log=print) -> list[dict]:
  """All frameworks of one case, steps interleaved; one row per framework."""
  name = case_name(model, batch, shape)
  specs = [{"framework": "jax", "compute_dtype": "float32", "malloc": m} for m in args.jax_malloc]
  if args.bf16:
    specs.append({"framework": "jax", "compute_dtype": "bfloat16"})
  for g in args.dw_groups if model != "infer" else ():
    specs.append({"framework": "jax", "compute_dtype": "float32", "conv_dw_groups": g})
  for backend in args.conv_backend if model != "infer" else ():
    specs.append({"framework": "jax", "compute_dtype": "float32", "conv_backend": backend})
  if args.torch:
    specs += [{"framework": "torch", "malloc": m} for m in args.torch_malloc]
  per_step = batch * (shape[-1] * shape[-2] if model == "infer" else 1)
  rows, procs = [], []
  for s in specs:
    s.update(model=model, batch=batch, shape=list(shape), threads=args.torch_threads)
    label = s["framework"] + ("" if s.get("compute_dtype", "float32") == "float32" else "-bf16")
    label += f"-dw{s['conv_dw_groups']}" if s.get("conv_dw_groups", 1) > 1 else ""
    label += f"-{s['conv_backend']}" if s.get("conv_backend", "xla") != "xla" else ""
    s.setdefault("malloc", DEFAULT_MALLOC[s["framework"]])
    label += f"-{s['malloc']}_malloc" if s["malloc"] != DEFAULT_MALLOC[s["framework"]] else ""
    row = {"case": name, "model": model, "batch": batch, "shape": list(shape), "label": label}
    row["malloc"] = s["malloc"]
    row.update(framework=s["framework"], compute_dtype=s.get("compute_dtype"))
    log(f"[bench] {name} {label}: building (load {os.getloadavg()[0]:.2f}) ...")
    p = start_worker(s)
    try:
      row.update(read_line(p))
    except RuntimeError as e:
      row["error"] = str(e)[-1500:]
      log(f"[bench]   failed: {row['error'][-300:]}")
      p = None
    rows.append(row)
    procs.append(p)
    row["step_s"], row["first_step_s"], row["load1"] = [], [], []
  live = [i for i, p in enumerate(procs) if p is not None]
  k_turn = args.steps_per_turn
  for k in range(args.warmup + args.steps):
    order = live[k % len(live) :] + live[: k % len(live)] if live else []
    msg = []
    for i in order:
      # Let the previous worker's after-step work (XLA freeing its temporaries, OpenMP threads
      # spinning down) end before this one's turn starts.
      time.sleep(args.settle_s)
      load0 = os.getloadavg()[0]
      procs[i].stdin.write(f"step {k_turn}\n")
      procs[i].stdin.flush()
      times = read_line(procs[i])["steps_s"]
      if k >= args.warmup:
        # The turn's first step follows the other workers' turns (seconds of idling, which
        # this VM punishes, docs/speed.md); the rest run back to back, as training does.
        rows[i]["first_step_s"].append(times[0])
        rows[i]["step_s"] += times[1:] if k_turn > 1 else times
        rows[i]["load1"] += [round(load0, 2), round(os.getloadavg()[0], 2)]
      msg.append(f"{rows[i]['label']} " + "/".join(f"{t:.2f}" for t in times) + "s")
    warm = " (warm-up)" if k < args.warmup else ""
    log(f"[bench] {name} turn {k + 1}/{args.warmup + args.steps}{warm}: " + ", ".join(msg))
  for i in live:
    procs[i].stdin.write("done\n")
    procs[i].stdin.flush()
    rows[i].update(read_line(procs[i]))
    procs[i].wait()
    rows[i].update(summarize(rows[i]["step_s"], per_step))
    rows[i]["median_first_step_s"] = statistics.median(rows[i]["first_step_s"])
    rows[i]["unit"] = UNITS.get(model, "vol/s" if model == "unet3d" else "img/s")
  return add_ratios(rows)


# ---------------------------------------------------------------------------
# Input pipeline, export, per-op, memory (each in a child process).
def _child_json(cmd: list[str], env=None, timeout=None) -> dict:
  proc = subprocess.run(
    cmd, cwd=REPO, env=env or _env("jax"), capture_output=True, text=True, timeout=timeout
  )
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    return {"error": (proc.stderr or proc.stdout)[-1500:]}
  return json.loads(lines[-1])


def run_export(out_dir: str, limit: int) -> dict:
  """A cold export of task1_roi_c1 (``limit`` samples per split) from the phantom into out_dir."""
  cmd = [sys.executable, "-m", "experiments.bench.export_bench", "--_one", "task1_roi_c1"]
  cmd += ["--out_dir", out_dir, "--cache_dir", os.path.join(out_dir, "_cache")]
  cmd += ["--source", "phantom", "--tasks", "task1_roi_c1", "--limit_per_split", str(limit)]
  load0 = os.getloadavg()[0]
  res = _child_json(cmd)
  res["load1"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
  return res


def pipeline_worker(data_dir: str, batch: int, batches: int) -> dict:
  """Records/s of the Task 1 ROI-C1 train iterator at full resolution (256^2 uint8 records)."""
  import ml_collections

  from mtneuro_jax import sharding
  from mtneuro_jax.data import pipeline

  cfg = ml_collections.ConfigDict(
    {"task": "task1_roi_c1", "data_dir": data_dir, "downsample": 1, "random_crop": 0}
  )
  it = pipeline.train_iterator(cfg, seed=0, mesh=sharding.make_mesh(1), global_batch_size=batch)
  b = min(batch, it.num_examples)
  if b != batch:
    it = pipeline.train_iterator(cfg, seed=0, mesh=sharding.make_mesh(1), global_batch_size=b)
  first = next(it)
  shape = list(first["image"].shape)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)["image"].block_until_ready()
  sec = time.perf_counter() - t0
  return {
    "records_per_s": b * batches / sec,
    "batch": b,
    "batches": batches,
    "seconds": sec,
    "image_shape": shape,
    "num_examples": it.num_examples,
    "peak_rss_mb": _peak_rss_mb(),
  }


def run_pipeline(data_dir: str, batch: int, batches: int) -> dict:
  cmd = [sys.executable, "-m", "experiments.bench.suite", "--_pipeline", data_dir]
  cmd += ["--_pipeline_batch", str(batch), "--_pipeline_batches", str(batches)]
  load0 = os.getloadavg()[0]
  res = _child_json(cmd)
  res.update(data_dir=data_dir, load1=[round(load0, 2), round(os.getloadavg()[0], 2)])
  return res


def run_per_op(sizes, batch: int, threads: int, with_torch: bool, backends=()) -> dict:
  """resnet_step_bench's per-conv tables (JAX, PyTorch) and weight-gradient rewrites;
  ``backends`` ('onednn'): also each conv through that conv backend (``conv_<backend>_<size>``)."""
  out = {}
  mod = [sys.executable, "-m", "experiments.bench.resnet_step_bench", "--batch", str(batch)]
  mod += ["--torch_threads", str(threads)]
  for size in sizes:
    kinds = ["conv", "dw_variants"] + (["conv_torch"] if with_torch else [])
    kinds += [f"conv_{b}" for b in backends]
    for kind in kinds:
      load0 = os.getloadavg()[0]
      res = _child_json(mod + ["--_worker", kind, "--sizes", str(size)])
      res["load1"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
      out[f"{kind}_{size}"] = res
      print(f"[bench] per-op {kind} {size}^2 done (load {os.getloadavg()[0]:.2f})", flush=True)
  return out


def memory_worker(size: int, batch: int) -> dict:
  """XLA buffer assignment of the ResNet18-xray supervised step, donation on and off."""
  import importlib

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mtneuro_jax import sharding
  from mtneuro_jax.models import MODELS as REG
  from mtneuro_jax.objectives import OBJECTIVES
  from mtneuro_jax.train import optim
  from mtneuro_jax.train import step as step_lib
  from mtneuro_jax.train.state import create_train_state

  cfg = importlib.import_module("configs.task1_supervised").get_config("paper")
  model = REG[cfg.model_name](**dict(cfg.model))
  objective = OBJECTIVES[cfg.objective_name]
  mesh = sharding.make_mesh(1)
  tx, _ = optim.make_optimizer(cfg.optim, steps_per_epoch=100, total_steps=1000, batch_size=batch)
  example = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
  state = jax.eval_shape(
    lambda: create_train_state(
      model, objective, tx, example, seed=0, objective_config=cfg.objective
    )
  )
  rng = np.random.default_rng(0)
  data = sharding.shard_batch(
    {
      "image": rng.normal(size=(batch, size, size, 1)).astype(np.float32),
      "label": np.zeros(batch, np.int32),
      "region": np.zeros(batch, np.int32),
      "valid": np.ones(batch, bool),
    },
    mesh,
  )
  out = {
    "state_mb": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20,
    "batch_mb": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(data)) / 2**20,
  }
  for dt in ("float32", "bfloat16"):
    for donate in (True, False):
      fn = step_lib.jit_train_step(
        mesh,
        model=model,
        objective=objective,
        optimizer=tx,
        config=cfg.objective,
        total_steps=1000,
        donate=donate,
        compute_dtype=dt,
      )
      m = fn.lower(state, data).compile().memory_analysis()
      out[f"{dt}_donate={donate}"] = {
        k: getattr(m, f"{k}_size_in_bytes") / 2**20
        for k in ("argument", "output", "alias", "temp", "generated_code")
      }
  return out


# ---------------------------------------------------------------------------
# Machine description, report.
def machine_info() -> dict:
  cpu, flags = platform.processor() or platform.machine(), []
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
    for ln in text.splitlines():
      if ln.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
        cpu = ln.split(":", 1)[1].strip()
      if ln.startswith("flags") and not flags:
        keep = ("avx", "fma", "amx", "sse4_2", "f16c", "vnni")
        flags = sorted(x for x in ln.split(":", 1)[1].split() if x.startswith(keep))
  except OSError:
    pass
  try:
    with open("/proc/meminfo") as f:
      mem_gb = int(f.readline().split()[1]) / 2**20
  except (OSError, ValueError, IndexError):
    mem_gb = None
  versions = {}
  for mod in ("jax", "jaxlib", "flax", "torch", "numpy"):
    try:
      versions[mod] = __import__(mod).__version__
    except ImportError:
      versions[mod] = None
  return {
    "cpu": cpu,
    "cpu_flags": flags,
    "cores": os.cpu_count(),
    "cores_usable": len(os.sched_getaffinity(0)),
    "mem_gb": None if mem_gb is None else round(mem_gb, 1),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "versions": versions,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def _f(v, d=1) -> str:
  if v is None:
    return "—"
  if isinstance(v, float) and v >= 1e5:
    return f"{v:,.0f}"
  return f"{v:.{d}f}"


def _variant(row: dict) -> str:
  parts = [] if row.get("compute_dtype") in (None, "float32") else [row["compute_dtype"]]
  if row.get("conv_dw_groups", 1) > 1:
    parts.append(f"conv_dw_groups={row['conv_dw_groups']}")
  if row.get("conv_backend", "xla") != "xla":
    parts.append(f"conv_backend={row['conv_backend']}")
  if "malloc" in row:
    parts.append(f"{row['malloc']} malloc")
  return f" [{', '.join(parts)}]" if parts else ""


def _turns_text(meta: dict) -> str:
  """How a row's steps were taken and which of them its rate is the median of."""
  k = meta.get("steps_per_turn", 1)
  text = f"{meta['warmup']} untimed turn(s), then {meta['steps']} timed turns of {k} step(s)"
  if k == 1:
    return text + " each; rate = median of those steps (each follows the other workers' turns)"
  return (
    text + " run back to back; rate = median of every turn's steps after its first "
    f"({meta['steps'] * (k - 1)} steps); the turns' first steps (after the other workers' "
    "turns, i.e. seconds of idling) are shown apart"
  )


def markdown(report: dict) -> str:
  m, meta = report["machine"], report["meta"]
  lines = [
    f"# Benchmark suite ({meta['mode']}): JAX (ours) beside the PyTorch reference",
    "",
    f"Command: `{meta['command']}`; {meta['start']} → {meta['end']} UTC. "
    f"Machine: {m['cpu']}, {m['cores_usable']} usable cores of {m['cores']}, {m['mem_gb']} GB; "
    f"SIMD flags: {' '.join(m['cpu_flags'])}. Versions: "
    + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    + f". 1-minute load average before / after the run: {meta['load1_before']} / "
    f"{meta['load1_after']} (the bench's own step adds ~2 on a 2-core machine)"
    + (f"; {meta['note']}" if meta.get("note") else "")
    + ". Frameworks run in separate worker processes, interleaved by turns: "
    + _turns_text(meta)
    + f"; PyTorch {meta['torch_threads']} threads; ratio = JAX rate / PyTorch rate of "
    "the same case in this run, against PyTorch as it ships (glibc's default malloc) and "
    "against PyTorch with the huge-page malloc our rows use by default "
    "(mtneuro_jax/host_malloc.py). Peak RSS includes the interpreter and libraries (base RSS).",
    "",
    "## Train steps (and inference)",
    "",
    "| case | framework | rate (median) | ratio vs torch | ratio vs torch with huge pages "
    "| step s | first step of a turn s | compile s | peak RSS MiB | peak RSS after build MiB | base RSS MiB "
    "| XLA buffers MiB | load 1-min (min-max) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in report["steps"]:
    if "error" in r:
      lines.append(f"| {r['case']} | {r['label']} | failed: {r['error'][-80:]!r} ||||||||||")
      continue
    loads = r["load1"] or [None]
    ratios = [r.get(k) for k in ("ratio_vs_torch", "ratio_vs_torch_hugepages")]
    lines.append(
      f"| {r['case']} | {r.get('version', r['label'])}{_variant(r)} "
      f"| {_f(r['rate'], 2)} {r['unit']} | "
      + " | ".join(f"{_f(x, 2)}{'x' if x else ''}" for x in ratios)
      + f" | {_f(r['median_step_s'], 3)} | {_f(r.get('median_first_step_s'), 3)} "
      f"| {_f(r.get('compile_s'))} | {_f(r['peak_rss_mb'], 0)} "
      f"| {_f(r.get('build_peak_rss_mb'), 0)} | {_f(r['base_rss_mb'], 0)} "
      f"| {_f(r.get('xla_buffers_mb'), 0)} | {min(loads)}-{max(loads)} |"
    )
  ex, pl = report.get("export"), report.get("pipeline")
  if ex or pl:
    lines += ["", "## Data", ""]
  if ex:
    if "error" in ex:
      lines.append(f"* export: failed ({ex['error'][-200:]!r})")
    else:
      lines.append(
        f"* export (cold, phantom → task1_roi_c1, {ex['samples']} samples, limit "
        f"{meta['export_limit']}/split): {ex['seconds']} s, source {ex['source_mb']} MB at "
        f"{ex['source_mb_s']} MB/s, shards {ex['shard_mb']} MB at {ex['shard_mb_s']} MB/s, "
        f"peak RSS {ex['peak_rss_mb']} MB, load {ex['load1'][0]}/{ex['load1'][1]}."
      )
  if pl:
    if "error" in pl:
      lines.append(f"* input pipeline: failed ({pl['error'][-200:]!r})")
    else:
      lines.append(
        f"* input pipeline (grain TrainIterator, task1_roi_c1 train, full resolution, batches "
        f"of {pl['batch']} → {pl['image_shape']} float32): {pl['records_per_s']:.0f} records/s "
        f"over {pl['batches']} batches ({pl['num_examples']} records, "
        f"{'the export above' if meta.get('pipeline_on_export') else pl['data_dir']}), "
        f"peak RSS {pl['peak_rss_mb']:.0f} MiB, load {pl['load1'][0]}/{pl['load1'][1]}."
      )
  mem = report.get("memory")
  if mem and "error" not in mem:
    lines += [
      "",
      f"## XLA buffer assignment, ResNet18-xray supervised step B={meta['memory_batch']} "
      f"{meta['memory_size']}² (MiB; state {mem['state_mb']:.0f}, batch {mem['batch_mb']:.1f})",
      "",
      "| compute dtype, donation | arguments | outputs | aliased (donated) | temporaries | code |",
      "|---|---|---|---|---|---|",
    ]
    for k, v in mem.items():
      if isinstance(v, dict):
        lines.append(
          f"| {k} | {v['argument']:.0f} | {v['output']:.0f} | {v['alias']:.0f} "
          f"| {v['temp']:.0f} | {v['generated_code']:.1f} |"
        )
  po = report.get("per_op")
  if po:
    lines += _per_op_markdown(po, meta)
  return "\n".join(lines) + "\n"


PASSES = ("fwd", "dx", "dw")  # forward, input gradient, weight gradient


def _pass_cells(ours: dict, other: dict | None) -> str:
  """'ms (GFLOP/s)' of each pass, ours beside the other's ('—' where it has no such conv)."""
  cells = []
  for k in PASSES:
    cells.append(f"{ours[k + '_ms']:.0f} ({ours[k + '_gflops']:.0f})")
    cells.append(f"{other[k + '_ms']:.0f} ({other[k + '_gflops']:.0f})" if other else "—")
  return " | ".join(cells)


def _per_op_markdown(po: dict, meta: dict) -> list[str]:
  lines = []
  for size in meta["per_op_sizes"]:
    jx, tc = po.get(f"conv_{size}", {}), po.get(f"conv_torch_{size}", {})
    if "convs" not in jx:
      continue
    tconv = {c["conv"]: c for c in tc.get("convs", [])}
    lines += [
      "",
      f"## Per conv shape, ResNet18-xray at {size}² (B={meta['batch_per_op']}): ms (GFLOP/s), "
      f"JAX vs PyTorch (load {jx['load1'][0]}/{jx['load1'][1]})",
      "",
      "| conv | input [B,Y,X,C] | C_out | stride | GFLOP | fwd JAX | fwd torch | input grad JAX "
      "| input grad torch | weight grad JAX | weight grad torch |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tot = {k: [0.0, 0.0] for k in PASSES}
    for c in jx["convs"]:
      t = tconv.get(c["conv"])
      for k in PASSES:
        tot[k][0] += c[k + "_ms"]
        tot[k][1] += t[k + "_ms"] if t else 0.0
      lines.append(
        f"| {c['conv']} | {c['input']} | {c['c_out']} | {c['stride']} | {c['gflop']:.1f} | "
        + _pass_cells(c, t)
        + " |"
      )
    lines.append(
      "| sum (one conv per shape) | | | | | "
      + " | ".join(f"{tot[k][0]:.0f} | {tot[k][1]:.0f}" for k in PASSES)
      + " |"
    )
    for key in sorted(po):
      if not (key.startswith("conv_") and key.endswith(f"_{size}")) or key in (
        f"conv_{size}",
        f"conv_torch_{size}",
      ):
        continue
      other = {c["conv"]: c for c in po[key].get("convs", [])}
      backend = key[len("conv_") : -len(f"_{size}")]
      lines += [
        "",
        f"conv_backend={backend}, {size}²: ms (GFLOP/s), beside XLA's (load "
        f"{po[key]['load1'][0]}/{po[key]['load1'][1]}):",
        "",
        f"| conv | fwd XLA | fwd {backend} | input grad XLA | input grad {backend} "
        f"| weight grad XLA | weight grad {backend} |",
        "|---|---|---|---|---|---|---|",
      ]
      for c in jx["convs"]:
        lines.append(f"| {c['conv']} | " + _pass_cells(c, other.get(c["conv"])) + " |")
    dv = po.get(f"dw_variants_{size}", {}).get("dw_variants")
    if dv:
      names = [k[:-3] for k in dv[0] if k.endswith("_ms")]
      lines += [
        "",
        f"Weight gradient rewritten at the XLA level, {size}² (ms; max rel. error vs XLA):",
        "",
        "| conv | input | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
      ]
      for r in dv:
        lines.append(
          f"| {r['conv']} | {r['input']} | "
          + " | ".join(f"{r[n + '_ms']:.0f} ({r[n + '_rel_err']:.0e})" for n in names)
          + " |"
        )
  return lines


# ---------------------------------------------------------------------------
def parse_only(only: str) -> list[str]:
  known = MODELS + EXTRAS + ("per_op", "memory")
  names = [x for x in only.split(",") if x]
  bad = [x for x in names if x not in known]
  if bad:
    from mtneuro_jax.errors import UsageError

    raise UsageError(f"unknown --only parts {bad}; choose from {','.join(known)}")
  return names


def main(argv=None) -> int:
  from mtneuro_jax.errors import ArgumentParser, UsageError

  p = ArgumentParser(
    prog="python -m experiments.bench",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--quick", action="store_true", help="headline shapes only (a few minutes)")
  p.add_argument("--only", default="", help="comma-separated parts: " + ",".join(MODELS + EXTRAS))
  p.add_argument("--bf16", action="store_true", help="also run JAX with compute_dtype=bfloat16")
  p.add_argument(
    "--dw_groups",
    default="",
    help="also run JAX with conv_dw_groups=G for each comma-separated G (e.g. 2,4)",
  )
  p.add_argument(
    "--conv_backend",
    default="",
    help="also run JAX with conv_backend=B for each comma-separated B (onednn: the optional "
    "oneDNN kernel, mtneuro_jax/kernels/onednn.py)",
  )
  p.add_argument(
    "--jax_malloc",
    default="hugepages",
    help="glibc malloc mode of the JAX workers, comma-separated (hugepages: as the mtneuro "
    "command runs, mtneuro_jax/host_malloc.py; system: glibc's defaults)",
  )
  p.add_argument(
    "--torch_malloc",
    default="system,hugepages",
    help="the same for PyTorch (default both: as it ships, and like for like with ours)",
  )
  p.add_argument("--per_op", action="store_true", help="per-conv tables (ResNet, 64² and 128²)")
  p.add_argument(
    "--per_op_sizes", default="64,128", help="input sides of the per-op tables (comma-separated)"
  )
  p.add_argument("--memory", action="store_true", help="XLA buffer assignment, donation on/off")
  p.add_argument("--no_torch", dest="torch", action="store_false", help="skip PyTorch")
  p.add_argument("--warmup", type=int, default=1, help="untimed turns per worker")
  p.add_argument("--steps", type=int, default=None, help="timed turns per worker (quick 3, full 4)")
  p.add_argument(
    "--steps_per_turn",
    type=int,
    default=2,
    help="steps a worker runs back to back per turn; with 2 or more, the rate is the median of "
    "every turn's steps after its first (training's regime), the first ones are reported apart",
  )
  p.add_argument("--torch_threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument(
    "--settle_s",
    type=float,
    default=0.3,
    help="pause before each worker's step, so the previous worker's after-step work is done",
  )
  p.add_argument(
    "--data_dir", default="", help="existing export for the pipeline (else a temp one)"
  )
  p.add_argument("--export_limit", type=int, default=8, help="samples per split of the export")
  p.add_argument("--pipeline_batches", type=int, default=20)
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "bench", "results"))
  p.add_argument("--note", default="", help="a line about the run (e.g. the machine's load)")
  p.add_argument("--cases", default="", help=argparse.SUPPRESS)  # JSON list (tests)
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_pipeline", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_pipeline_batch", type=int, default=32, help=argparse.SUPPRESS)
  p.add_argument("--_pipeline_batches", type=int, default=20, help=argparse.SUPPRESS)
  p.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._worker:
    return serve(json.loads(args._worker))
  if args._pipeline:
    res = pipeline_worker(args._pipeline, args._pipeline_batch, args._pipeline_batches)
    print(json.dumps(res), flush=True)
    return 0
  if args._memory:
    size, batch = (int(x) for x in args._memory.split(","))
    print(json.dumps(memory_worker(size, batch)), flush=True)
    return 0

  if args.torch:
    try:
      import torch  # noqa: F401
    except ImportError:
      print("[bench] PyTorch not installed: JAX only", flush=True)
      args.torch = False
  args.dw_groups = [int(g) for g in args.dw_groups.split(",") if g]
  args.conv_backend = [b for b in args.conv_backend.split(",") if b and b != "xla"]
  for key in ("jax_malloc", "torch_malloc"):
    modes = [m for m in getattr(args, key).split(",") if m]
    if not modes or any(m not in host_malloc.MODES for m in modes):
      raise UsageError(
        f"--{key}={getattr(args, key)!r}: expected a comma-separated list of "
        f"{' / '.join(host_malloc.MODES)}"
      )
    setattr(args, key, modes)
  mode = "quick" if args.quick else "full"
  args.steps = args.steps if args.steps is not None else (3 if args.quick else 4)
  if args.warmup < 0 or args.steps < 1 or args.steps_per_turn < 1:
    raise UsageError(
      f"--warmup={args.warmup} --steps={args.steps} --steps_per_turn={args.steps_per_turn}: "
      "expected --warmup >= 0, --steps >= 1 and --steps_per_turn >= 1"
    )
  only = parse_only(args.only)
  cases = [tuple(c[:2]) + (tuple(c[2]),) for c in json.loads(args.cases)] if args.cases else None
  cases = cases or list(QUICK_CASES if args.quick else FULL_CASES)
  if only:
    cases = [c for c in cases if c[0] in only]
  extras = [x for x in EXTRAS if not only or x in only]
  per_op = args.per_op or "per_op" in only or (mode == "full" and not only)
  memory = args.memory or "memory" in only or (mode == "full" and not only)
  meta = {
    "mode": mode,
    "command": "python -m experiments.bench "
    + " ".join(argv if argv is not None else sys.argv[1:]),
    "start": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    "load1_before": round(os.getloadavg()[0], 2),
    "warmup": args.warmup,
    "steps": args.steps,
    "steps_per_turn": args.steps_per_turn,
    "torch_threads": args.torch_threads,
    "settle_s": args.settle_s,
    "export_limit": args.export_limit,
    "note": args.note,
  }
  t_start = time.time()
  report = {"machine": machine_info(), "meta": meta, "steps": []}
  for model, batch, shape in cases:
    report["steps"] += run_case(model, batch, shape, args, log=lambda s: print(s, flush=True))
  tmp = tempfile.mkdtemp(prefix="mtneuro_bench_")
  try:
    if "export" in extras:
      print(f"[bench] export (load {os.getloadavg()[0]:.2f}) ...", flush=True)
      report["export"] = run_export(tmp, args.export_limit)
    if "pipeline" in extras:
      data_dir = args.data_dir or (tmp if "error" not in report.get("export", {"error": 1}) else "")
      if not data_dir:
        report["export"] = report.get("export") or run_export(tmp, args.export_limit)
        data_dir = tmp
      meta["pipeline_on_export"] = not args.data_dir
      print(f"[bench] input pipeline on {data_dir} ...", flush=True)
      report["pipeline"] = run_pipeline(data_dir, 32, args.pipeline_batches)
      if not args.data_dir:  # a temp dir, gone after the run: say what it was instead
        report["pipeline"]["data_dir"] = "(the export above, a temp dir)"
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  if memory:
    meta.update(memory_size=64, memory_batch=32)
    report["memory"] = _child_json(
      [sys.executable, "-m", "experiments.bench.suite", "--_memory", "64,32"]
    )
  if per_op:
    sizes = [int(x) for x in args.per_op_sizes.split(",") if x]
    meta.update(per_op_sizes=sizes, batch_per_op=32)
    report["per_op"] = run_per_op(sizes, 32, args.torch_threads, args.torch, args.conv_backend)
  meta.update(
    end=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    wall_s=round(time.time() - t_start, 1),
    load1_after=round(os.getloadavg()[0], 2),
  )
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, "suite_quick" if args.quick else "suite")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1)
  md = markdown(report)
  with open(stem + ".md", "w") as f:
    f.write(md)
  print(md)
  return 0 if all("error" not in r for r in report["steps"]) else 1


if __name__ == "__main__":
  sys.exit(main())
