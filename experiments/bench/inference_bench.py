"""Sliding-window inference throughput on this CPU, and the projected time for the full volume.

Usage:
  python -m experiments.bench.inference_bench                 # stand-in 2D U-Net, two sizes
  python -m experiments.bench.inference_bench --run W         # a trained run instead
  python -m experiments.bench.inference_bench --out /tmp/bench --sizes 8x512x512,32x512x512

What is timed: ``deploy.blockwise.predict_volume`` end to end (read, downsample + normalise,
Gaussian-blended sliding window, argmax, zarr write, block commit) of a box of an in-memory
random uint8 volume (so the phantom's rendering cost is not counted: a real source adds its
read time), after one untimed warm-up prediction that compiles the model. Each size runs
``--repeats`` times into fresh folders; voxels/s = full-resolution input voxels / median
seconds. Linearity: the two sizes' voxels/s should agree (cost linear in voxels); the
projection for the whole 720 x 1420 x 5805 volume (5.94 Gvoxels) uses the larger size's rate.

Stand-in model (no --run): ``unet`` 2D, width 0.5 (16..128 filters, 4 levels), 3 classes,
random weights, xy downsampling 2, 128 x 128 windows with MONAI's 25 % overlap: the size of the
ICIP U-Net branch at its 128^2 input. The machine is shared: the 1-minute load average before
and after is recorded; compare numbers taken at similar load only.

Writes ``<out>/inference_bench.json`` and ``.md`` (default experiments/bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

FULL_VOXELS = 720 * 1420 * 5805


class ArraySource:
  """An in-memory uint8 volume with the Source read interface (image only)."""

  def __init__(self, shape, seed=0):
    self.data = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)

  def shape(self):
    return self.data.shape

  def describe(self):
    return {"kind": "array", "shape": list(self.data.shape), "note": "random uint8 (benchmark)"}

  def read(self, channel, box):
    return self.data[box.slices]


def _stand_in_run(workdir):
  import jax
  import jax.numpy as jnp

  from mtneuro_jax.models import MODELS
  from mtneuro_jax.train import checkpoint as ckpt_lib

  kwargs = {"num_classes": 3, "dims": 2, "width_multiplier": 0.5}
  m = MODELS["unet"](**kwargs)
  v = m.init({"params": jax.random.key(0)}, jnp.zeros((1, 128, 128, 1)), train=False)
  state = {"params": dict(v["params"]), "model_state": {k: v[k] for k in v if k != "params"}}
  c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  c.save(1, state)
  c.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(
      {
        "model_name": "unet",
        "model": kwargs,
        "data": {
          "task": "task2_2d_3class",
          "downsample": 2,
          "random_crop": 128,
          "image_mean": 0.5,
          "image_std": 0.25,
        },
      },
      f,
    )
  return workdir


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--run", help="trained run workdir (default: the stand-in U-Net)")
  p.add_argument("--sizes", default="8x512x1024,32x512x1024", help="ZxYxX full-res boxes")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--out", default=os.path.join("experiments", "bench", "results"))
  args = p.parse_args(argv)

  import jax

  from mtneuro_jax.deploy import blockwise, model
  from mtneuro_jax.deploy import sliding_window as sw
  from mtneuro_jax.volumes import spec

  tmp = tempfile.mkdtemp(prefix="inference_bench_")
  try:
    run_dir = args.run or _stand_in_run(os.path.join(tmp, "run"))
    loaded = model.load_run(run_dir)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    src = ArraySource(tuple(max(s[i] for s in sizes) for i in range(3)))
    load_before = os.getloadavg()[0]
    # One predictor (one compilation) for every timed call: fixed costs stay out of the rates.
    predictor = sw.WindowPredictor(
      sw.apply_fn_for(loaded.model), loaded.variables, dims=loaded.dims, batch=args.batch
    )
    blockwise.predict_volume(
      src,
      loaded,
      spec.Box(0, 1, 0, 256, 0, 256),
      os.path.join(tmp, "warm"),
      predictor=predictor,
      progress=False,
    )
    rows = []
    for size in sizes:
      secs = []
      for r in range(args.repeats):
        out = os.path.join(tmp, f"p{'x'.join(map(str, size))}-{r}")
        t = time.perf_counter()
        blockwise.predict_volume(
          src,
          loaded,
          spec.Box(0, size[0], 0, size[1], 0, size[2]),
          out,
          predictor=predictor,
          progress=False,
        )
        secs.append(time.perf_counter() - t)
        shutil.rmtree(out)
      vox = int(np.prod(size))
      med = statistics.median(secs)
      rows.append(
        {
          "size_zyx": list(size),
          "voxels": vox,
          "seconds": secs,
          "median_s": med,
          "voxels_per_s": vox / med,
        }
      )
    load_after = os.getloadavg()[0]
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  rate = rows[-1]["voxels_per_s"]
  result = {
    "model": loaded.describe() | {"run": args.run or "stand-in unet (random weights)"},
    "window_zyx": list((1,) + loaded.window[1:] if loaded.dims == 2 else loaded.window),
    "overlap": 0.25,
    "batch": args.batch,
    "devices": [str(d) for d in jax.devices()],
    "cpus": len(os.sched_getaffinity(0)),
    "load_avg_1min_before_after": [load_before, load_after],
    "rows": rows,
    "linearity_rate_ratio": rows[-1]["voxels_per_s"] / rows[0]["voxels_per_s"],
    # t = a + voxels / marginal rate through the two sizes: a = fixed seconds per call.
    "marginal_voxels_per_s": (rows[-1]["voxels"] - rows[0]["voxels"])
    / max(rows[-1]["median_s"] - rows[0]["median_s"], 1e-9),
    "full_volume_voxels": FULL_VOXELS,
    "projected_full_volume_hours": FULL_VOXELS / rate / 3600.0,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "inference_bench.json"), "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  lines = [
    "# Inference throughput (sliding window, blockwise, CPU)",
    "",
    f"Model: {result['model']['run']} ({loaded.model_name}, downsample {loaded.downsample}, window "
    f"{result['window_zyx']}, overlap 0.25, batch {args.batch}); {result['cpus']} CPUs, "
    f"{len(result['devices'])} JAX device(s); 1-min load average before/after: "
    f"{load_before:.1f} / {load_after:.1f} (shared machine).",
    "",
    "| box ZYX (full res) | voxels | median s | voxels/s |",
    "|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {'x'.join(map(str, r['size_zyx']))} | {r['voxels']:,} | {r['median_s']:.2f} | {r['voxels_per_s']:,.0f} |"
    )
  lines += [
    "",
    f"Rate ratio (large / small) {result['linearity_rate_ratio']:.2f} (1.0 = cost linear in "
    f"voxels); marginal rate between the sizes {result['marginal_voxels_per_s']:,.0f} voxels/s.",
    f"Projected time for the full 5.94-Gvoxel volume at the larger size's rate: "
    f"{result['projected_full_volume_hours']:.1f} h on this machine (source reads not included).",
    "",
  ]
  with open(os.path.join(args.out, "inference_bench.md"), "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  raise SystemExit(main())
