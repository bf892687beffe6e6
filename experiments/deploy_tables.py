"""``mtneuro deploy``: region/microstructure maps of a trained run + accuracy before/after kNN clean-up.

  mtneuro deploy --preset quick --run out/icip_runs/<...>/dunet [--out out/deploy/quick]
      [--source phantom]

Two predictions (``mtneuro_jax.deploy``), each a resumable zarr group under ``--out``:

* ``slab.zarr``: the whole Y/X extent of the volume on z-slices inside the annotated range
  (``spec.ROI_ANNOTATED_Z``; quick: the 16 contiguous slices 264..279, full: every 8th slice of
  128..447), at the run's own downsampling: the region map of the whole slab at a cost this
  machine affords (all 720 slices would be 5.9 Gvoxels);
* ``subvolume.zarr``: a contiguous sub-volume (every slice, every voxel of the model's input
  grid) across the STR / VP border.

For both, the region labels are cleaned up (``cleanup.knn_cleanup``: per region the ``--keep``
largest 3D components as seeds, kNN relabelling of the rest, voxel spacing = the true
distances, so the slab's slices are far apart in z) and scored against ``roi_labels`` where
annotated (majority-downsampled to the prediction grid): per-region and overall voxel
accuracy, before and after, written to ``region_accuracy.{md,json}`` with the data source
named (the phantom is SYNTHETIC). Also ``slab.png`` / ``subvolume.png`` (image | region map
after clean-up | microstructure map) and ``neuroglancer_{slab,subvolume}.json`` (open with
``python -m mtneuro_jax.deploy.maps serve OUT/slab.zarr``). A run without a region output
(a pure segmentation model) gets maps and no accuracy; one without pixel logits gets no
microstructure map.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from mtneuro_jax.errors import ArgumentParser, UsageError, run_cli

PRESETS = {
  # Slab slices: contiguous (a true 3D clean-up) and inside one 32-slice phantom render chunk
  # (the phantom renders 32 slices whatever is asked, so more chunks cost more, not more slices).
  "quick": {
    "slab_z": tuple(range(264, 280)),
    "subvolume": "270:286,600:1112,2800:3312",
    "keep": 2,
    "k": 5,
  },
  "full": {
    "slab_z": tuple(range(128, 448, 8)),
    "subvolume": "240:304,400:1424,2600:3624",
    "keep": 2,
    "k": 9,
  },
}


def build_parser() -> ArgumentParser:
  import argparse

  p = ArgumentParser(
    prog="mtneuro deploy",
    description=__doc__.split("\n\n")[0],
    epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
  p.add_argument("--run", required=True, help="trained run workdir (config.json + checkpoints/)")
  p.add_argument("--out", help="output folder (default out/deploy/<preset>)")
  p.add_argument("--source", default="phantom", help="volume source spec (default phantom)")
  p.add_argument("--window", help="YX (or ZYX) window; default the run's training input size")
  p.add_argument("--stride", help="YX (or ZYX) stride ('field size'); default 25%% overlap")
  p.add_argument("--keep", type=int, help="components kept per region as kNN seeds (preset)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--no_progress", action="store_true")
  return p


def _truth(src, box, d: int) -> np.ndarray:
  """roi_labels of ``box`` -> region index per prediction voxel (UNANNOTATED where none)."""
  from mtneuro_jax.data import transforms
  from mtneuro_jax.deploy import cleanup
  from mtneuro_jax.volumes import spec

  roi = cleanup.roi_classes(src.read("roi_labels", box))
  nreg = len(spec.REGIONS)
  roi = np.where(roi == cleanup.UNANNOTATED, nreg, roi)
  small = transforms.majority_downsample(roi, d, nreg + 1)
  return np.where(small == nreg, cleanup.UNANNOTATED, small).astype(np.uint8)


def _one(
  name,
  src,
  loaded,
  box,
  out_dir,
  *,
  window,
  block,
  margin,
  stride,
  keep,
  k,
  spacing,
  z_abs,
  batch,
  progress,
  title,
):
  from mtneuro_jax.deploy import blockwise, cleanup, maps, zarr_io

  root = os.path.join(out_dir, f"{name}.zarr")
  t0 = time.perf_counter()
  summary = blockwise.predict_volume(
    src,
    loaded,
    box,
    root,
    window=window,
    stride=stride,
    block=block,
    margin=margin,
    batch=batch,
    progress=progress,
  )
  t_pred = time.perf_counter() - t0
  names = set(zarr_io.array_names(root))
  image = zarr_io.read_array(root, "image")
  res = {
    "zarr": root,
    "box_zyx": list(box.as_tuple()),
    "predict": summary,
    "seconds_predict": t_pred,
  }
  region = micro = None
  if "micro_label" in names:
    micro = zarr_io.read_array(root, "micro_label")
  if "region_label" in names:
    raw = zarr_io.read_array(root, "region_label").astype(np.int64) - 1
    t1 = time.perf_counter()
    clean = cleanup.knn_cleanup(raw, keep=keep, k=k, spacing=spacing)
    res["seconds_cleanup"] = time.perf_counter() - t1
    attrs = zarr_io.read_attrs(root)
    store = zarr_io.open_array(
      root,
      "region_label_clean",
      shape=clean.shape,
      chunks=tuple(attrs["block_zyx"]),
      dtype="uint8",
      dimensions=("z", "y", "x"),
      attrs={
        "classes": attrs["regions"],
        "cleanup": {"keep": keep, "k": k, "spacing_zyx": list(spacing)},
      },
    )
    store.write((clean + 1).astype(np.uint8)).result()
    t2 = time.perf_counter()
    trimmed = blockwise.trim_box(box, loaded.downsample)
    truth = _truth(src, trimmed, loaded.downsample)
    res["seconds_truth"] = time.perf_counter() - t2
    res["before"] = cleanup.region_accuracy(raw, truth)
    res["after"] = cleanup.region_accuracy(clean, truth)
    region = clean
  zs = (
    list(range(image.shape[0]))
    if image.shape[0] <= 4
    else sorted({0, image.shape[0] // 2, image.shape[0] - 1})
  )
  micro_names = None
  if micro is not None:
    classes = loaded.config.get("model", {}).get("num_classes")
    micro_names = {3: ("other", "vessel", "cell"), 4: ("background", "vessel", "cell", "axon")}.get(
      classes
    )
  res["png"] = maps.overlay_png(
    os.path.join(out_dir, f"{name}.png"),
    image[zs],
    None if region is None else region[zs],
    None if micro is None else micro[zs],
    z_labels=[z_abs[z] for z in zs],
    title=title,
    micro_names=micro_names,
  )
  res["neuroglancer"] = os.path.join(out_dir, f"neuroglancer_{name}.json")
  maps.write_neuroglancer_state(root, res["neuroglancer"])
  return res


def _fmt(v):
  return "-" if v is None else f"{v:.3f}"


def markdown(report: dict) -> str:
  from mtneuro_jax.volumes import spec

  lines = [
    f"# Region accuracy before / after kNN clean-up ({report['preset']} preset)",
    "",
    f"Data: {report['data']}. Run: `{report['run']}` (model {report['model_name']}, step {report['step']}).",
    "Voxel accuracy against roi_labels where annotated, on the prediction grid "
    f"(xy downsampled x{report['downsample']}); per region = fraction of that region's voxels labelled right.",
    "",
    "| prediction | region | voxels | before | after |",
    "|---|---|---|---|---|",
  ]
  for name in ("slab", "subvolume"):
    part = report.get(name, {})
    if "before" not in part:
      continue
    for r in (*spec.REGIONS, "overall"):
      vox = part["before"]["voxels"] if r == "overall" else part["before"][f"voxels/{r}"]
      lines.append(
        f"| {name} | {r} | {vox} | {_fmt(part['before'][r])} | {_fmt(part['after'][r])} |"
      )
  if len(lines) == 7:
    lines.append("| - | (the run has no region output) | - | - | - |")
  lines += ["", "Paper (real data, ICIP 2021): ZI 0.67 -> 0.80, overall 0.88 -> 0.93.", ""]
  return "\n".join(lines)


def run(argv=None) -> dict:
  args = build_parser().parse_args(argv)
  from experiments.predict import parse_zyx
  from mtneuro_jax.deploy import blockwise, model, zarr_io
  from mtneuro_jax.volumes import sources, spec

  preset = PRESETS[args.preset]
  out_dir = args.out or os.path.join("out", "deploy", args.preset)
  src = sources.make_source(args.source)
  loaded = model.load_run(args.run)
  stride = parse_zyx(args.stride, "stride")
  window = parse_zyx(args.window, "window")
  keep = int(args.keep if args.keep is not None else preset["keep"])
  if keep < 1:
    raise UsageError(f"--keep {keep} must be >= 1")
  os.makedirs(out_dir, exist_ok=True)
  d = loaded.downsample
  t0 = time.perf_counter()
  desc = src.describe() if hasattr(src, "describe") else {"kind": args.source}
  synthetic = desc.get("kind") == "phantom"
  data = f"{args.source} ({'SYNTHETIC phantom, generator ' + str(desc.get('generator_version')) if synthetic else desc.get('kind')})"
  report = {
    "preset": args.preset,
    "run": os.path.abspath(args.run),
    "model_name": loaded.model_name,
    "step": loaded.step,
    "downsample": d,
    "data": data,
    "synthetic": synthetic,
    "source": desc,
  }
  # Slab: chosen slices (a 3D model gets runs of its window depth starting there).
  wz = loaded.window[0] if loaded.dims == 3 else 1
  zs = sorted({z + i for z in preset["slab_z"] for i in range(wz)})
  stack = blockwise.SliceStack(src, zs)
  ny, nx = src.shape()[1:]
  slab_box = spec.Box(0, len(zs), 0, ny, 0, nx)
  gaps = np.diff(preset["slab_z"]) if len(preset["slab_z"]) > 1 else [1]
  report["slab"] = _one(
    "slab",
    stack,
    loaded,
    slab_box,
    out_dir,
    window=window,
    block=(wz if loaded.dims == 3 else len(zs), 512, 512),
    margin=(0, None, None),
    stride=stride,
    keep=keep,
    k=preset["k"],
    spacing=(float(np.mean(gaps)) if wz == 1 else 1.0, float(d), float(d)),
    z_abs=zs,
    batch=args.batch,
    progress=not args.no_progress,
    title=f"{loaded.model_name}, whole slab, z {zs[0]}..{zs[-1]} ({len(zs)} slices; {data})",
  )
  sub = blockwise.parse_box(preset["subvolume"], src.shape())
  report["subvolume"] = _one(
    "subvolume",
    src,
    loaded,
    sub,
    out_dir,
    window=window,
    block=None,
    margin=None,
    stride=stride,
    keep=keep,
    k=preset["k"],
    spacing=(1.0, float(d), float(d)),
    z_abs=list(range(sub.z0, sub.z1)),
    batch=args.batch,
    progress=not args.no_progress,
    title=f"{loaded.model_name} sub-volume {sub} ({data})",
  )
  report["seconds_total"] = time.perf_counter() - t0
  with open(os.path.join(out_dir, "region_accuracy.md"), "w") as f:
    f.write(markdown(report))
  zarr_io.write_json_atomic(os.path.join(out_dir, "region_accuracy.json"), report)
  return report


def main(argv=None) -> int:
  def go(a):
    report = run(a)
    print(markdown(report))
    print(
      f"wrote {report['slab']['png']}, {report['subvolume']['png']} and the tables "
      f"({report['seconds_total']:.1f}s)"
    )
    return 0

  return run_cli(go, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  raise SystemExit(main())
