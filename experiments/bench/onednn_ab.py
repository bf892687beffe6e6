"""XLA's convolutions against the optional oneDNN kernel, A/B in ONE process, interleaved.

Why a separate bench: on a shared machine the suite's per-op tables run XLA and oneDNN in
different processes at different times, so a load change reads as a speed difference. Here
both variants are compiled in the same process and timed alternately (A, B, A, B, ...), so
they see the same background load; the ratio is the number to read, not the absolute times.

  python -m experiments.bench.onednn_ab                  # per pass (64²) + whole steps
  python -m experiments.bench.onednn_ab --size 128 --no_steps

Per pass: each ResNet18-xray 3x3 conv shape (``resnet_step_bench.conv_shapes``), B=32: forward,
input gradient, weight gradient (jitted, alone). Whole steps (``--models``): the ResNet18-xray
supervised train step (``ssl_step_bench.build``) and the 2D U-Net step
(``unet_step_bench.worker_jax``), B=32 1x64², and the 3D U-Net step, B=1 1x8x256²
(``STEP_CASES``), ``conv_backend`` 'xla' vs 'onednn'. ``--size`` is the per-pass input side. Writes ``<out>/onednn_ab_<size>.{json,md}``.
Needs the kernel (``python -m mtneuro_jax.kernels.onednn build``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _alternate(fns: dict, reps: int) -> dict:
  """Median seconds of each callable, timed round-robin ``reps`` times (after one warm call)."""
  for f in fns.values():
    f()
  times = {k: [] for k in fns}
  for r in range(reps):
    keys = list(fns)
    keys = keys[r % len(keys) :] + keys[: r % len(keys)]
    for k in keys:
      t = time.perf_counter()
      fns[k]()
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def per_pass(size: int, batch: int, reps: int) -> list[dict]:
  from jax import lax

  from experiments.bench.resnet_step_bench import conv_case, conv_passes, conv_shapes
  from mtneuro_jax.kernels import onednn

  convs = {"xla": lax.conv_general_dilated, "onednn": onednn.make_conv_general_dilated()}
  rows = []
  for name, s, ci, co, st in conv_shapes(size):
    x, w, row = conv_case(name, s, ci, co, st, batch)
    passes = {b: conv_passes(cf, st) for b, cf in convs.items()}
    for p in ("fwd", "dx", "dw"):
      fns = {b: (lambda f=f[p], x=x, w=w: f(x, w).block_until_ready()) for b, f in passes.items()}
      med = _alternate(fns, reps)
      for b, t in med.items():
        row[f"{p}_{b}_ms"] = 1e3 * t
    rows.append(row)
    print(
      f"[onednn_ab] {name}: "
      + ", ".join(f"{k} {v:.0f}" for k, v in row.items() if k.endswith("_ms")),
      flush=True,
    )
  return rows


# Whole-step cases: model -> (batch, shape [Z,] Y, X): the suite's quick 2D cases and its 3D one.
STEP_CASES = {
  "resnet": (32, (1, 64, 64)),
  "resnet128": (32, (1, 128, 128)),
  "unet2d": (32, (1, 64, 64)),
  "unet3d": (1, (8, 256, 256)),
}


def whole_steps(models, reps: int) -> list[dict]:
  from experiments.bench import ssl_step_bench, unet_step_bench

  rows = []
  for model in models:
    batch, shape = STEP_CASES[model]
    fns = {}
    for b in ("xla", "onednn"):
      if model.startswith("resnet"):
        _, one = ssl_step_bench.build("supervised", batch, 1.0, view=shape[-1], conv_backend=b)
      elif model == "unet2d":
        _, one = unet_step_bench.worker_jax(2, batch, shape[-1], 1, "float32", 1, b)
      else:
        _, one = unet_step_bench.worker_jax(3, batch, shape[-1], shape[0], "float32", 1, b)
      fns[b] = one
    med = _alternate(fns, reps)
    row = {"model": model, "batch": batch, "shape": list(shape)}
    row.update({f"{b}_step_s": t for b, t in med.items()})
    row.update({f"{b}_img_s": batch / t for b, t in med.items()})
    row["speedup"] = med["xla"] / med["onednn"]
    rows.append(row)
    print(f"[onednn_ab] {model}: {row}", flush=True)
  return rows


def markdown(rep: dict) -> str:
  m = rep["meta"]
  lines = [
    f"# XLA conv vs the oneDNN kernel, same process, interleaved ({m['start']} UTC)",
    "",
    f"Command: `{m['command']}`. oneDNN {m['onednn']}; jax {m['jax']}. 1-minute load before / "
    f"after: {m['load1_before']} / {m['load1_after']} (this bench adds ~2 on 2 cores). "
    f"Median of {m['reps']} alternating repetitions. {m['note']}",
  ]
  if rep.get("steps"):
    lines += [
      "",
      "| train step | XLA s/step (samples/s) | oneDNN s/step (samples/s) | oneDNN speed-up |",
      "|---|---|---|---|",
    ]
    for r in rep["steps"]:
      lines.append(
        f"| {r['model']} B={r['batch']} {'x'.join(map(str, r['shape']))} "
        f"| {r['xla_step_s']:.2f} ({r['xla_img_s']:.3g}) "
        f"| {r['onednn_step_s']:.2f} ({r['onednn_img_s']:.3g}) | {r['speedup']:.2f}x |"
      )
  if rep.get("per_pass"):
    lines += [
      "",
      f"Per pass, ResNet18-xray 3x3 convs at {m['size']}² (ms, XLA / oneDNN):",
      "",
      "| conv | input | C_out | stride | fwd | input grad | weight grad |",
      "|---|---|---|---|---|---|---|",
    ]
    tot = {p: [0.0, 0.0] for p in ("fwd", "dx", "dw")}
    for r in rep["per_pass"]:
      cells = []
      for p in ("fwd", "dx", "dw"):
        a, b = r[f"{p}_xla_ms"], r[f"{p}_onednn_ms"]
        tot[p][0] += a
        tot[p][1] += b
        cells.append(f"{a:.0f} / {b:.0f}")
      lines.append(
        f"| {r['conv']} | {r['input']} | {r['c_out']} | {r['stride']} | " + " | ".join(cells) + " |"
      )
    lines.append(
      "| sum | | | | " + " | ".join(f"{tot[p][0]:.0f} / {tot[p][1]:.0f}" for p in tot) + " |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.bench.onednn_ab", description=__doc__)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument(
    "--models",
    default="resnet,unet2d",
    help="whole steps: comma-separated of " + ",".join(STEP_CASES),
  )
  p.add_argument("--no_steps", action="store_true", help="per pass only")
  p.add_argument("--no_per_pass", action="store_true", help="whole steps only")
  p.add_argument("--note", default="")
  p.add_argument("--name", default="", help="output file stem (default onednn_ab_<size>)")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "bench", "results", "onednn"))
  args = p.parse_args(argv)

  import jax

  from mtneuro_jax.kernels import onednn

  if not onednn.available():
    print(f"oneDNN kernel unavailable: {onednn.why_unavailable()}", file=sys.stderr)
    return 1
  meta = {
    "command": "python -m experiments.bench.onednn_ab " + " ".join(argv or sys.argv[1:]),
    "start": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    "load1_before": round(os.getloadavg()[0], 2),
    "size": args.size,
    "batch": args.batch,
    "reps": args.reps,
    "onednn": onednn.version(),
    "jax": jax.__version__,
    "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
    "note": args.note,
  }
  rep = {"meta": meta}
  if not args.no_steps:
    rep["steps"] = whole_steps([m for m in args.models.split(",") if m], args.reps)
  if not args.no_per_pass:
    rep["per_pass"] = per_pass(args.size, args.batch, args.reps)
  meta.update(load1_after=round(os.getloadavg()[0], 2), end=time.strftime("%H:%M", time.gmtime()))
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, args.name or f"onednn_ab_{args.size}")
  with open(base + ".json", "w") as f:
    json.dump(rep, f, indent=1)
  with open(base + ".md", "w") as f:
    f.write(markdown(rep))
  print(markdown(rep))
  return 0


if __name__ == "__main__":
  sys.exit(main())
