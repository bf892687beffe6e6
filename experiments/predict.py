"""``mtneuro predict``: sliding-window prediction of a box of a volume into a zarr group.

  mtneuro predict --run out/icip_runs/.../dunet --source phantom \\
      --box 200:216,600:856,1500:1756 --out out/pred/box.zarr [--window 1,128,128]
      [--stride 1,96,96 | --overlap 0.25] [--batch 8] [--block 8,256,256] [--margin 0,64,64]
      [--process i/n] [--png OUT.png] [--neuroglancer STATE.json]

The run (a `mtneuro train` / `mtneuro icip` workdir) is rebuilt from its config.json and its
newest verified checkpoint; the image is downsampled and normalised as in training. Window,
stride, block and margin are ZYX in model-input voxels (y/x after downsampling; a 2D model's
z is 1); ``--window 128,128`` (two numbers) means ``1,128,128``. Defaults: the training input
size, MONAI's 25 % overlap, Gaussian blending (sigma 0.125 of the window), blocks of 8 x 256 x
256 with half a window of context. The box's faces are the volume's border: windows stay
inside, a box smaller than a window is edge-padded. y/x extents are cut down to multiples of
the downsampling factor.

Output (docs/deploy.md): a zarr v2 group (TensorStore) with ``image``, ``region_prob`` /
``region_label`` (label = region index + 1, spec.REGIONS order) and/or ``micro_prob`` /
``micro_label``; one chunk per block; ``_blocks/<id>.json`` commit markers. Rerunning the same
command resumes (finished blocks are skipped; the result is byte-identical to an uninterrupted
run). Several processes share a box with ``--process i/n`` (or MTNEURO_PROCESS_ID /
MTNEURO_NUM_PROCESSES): process i predicts blocks i::n. ``--png`` draws a few z-slices;
``--neuroglancer`` writes a state to open the zarr (serve it with
``python -m mtneuro_jax.deploy.maps serve OUT.zarr``).
"""

from __future__ import annotations

import json
import os
import sys

from mtneuro_jax.errors import ArgumentParser, UsageError, run_cli


def parse_zyx(text: str | None, flag: str, *, two_means_yx: bool = True):
  """'a,b,c' -> (a, b, c); 'b,c' -> (1, b, c) (a 2D size); None -> None."""
  if text is None:
    return None
  try:
    v = tuple(int(p) for p in str(text).split(","))
  except ValueError:
    raise UsageError(
      f"--{flag} {text!r} is not comma-separated integers; e.g. --{flag} 1,128,128"
    ) from None
  if len(v) == 2 and two_means_yx:
    v = (1,) + v
  if len(v) != 3 or min(v) < (0 if flag == "margin" else 1):
    raise UsageError(
      f"--{flag} {text!r} needs 3 (ZYX) or 2 (YX) positive sizes; e.g. --{flag} 1,128,128"
    )
  return v


def build_parser() -> ArgumentParser:
  p = ArgumentParser(
    prog="mtneuro predict",
    description=__doc__.split("\n\n")[0],
    epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
  )
  p.add_argument("--run", required=True, help="trained run workdir (config.json + checkpoints/)")
  p.add_argument("--source", default="phantom", help="volume source spec (default phantom)")
  p.add_argument("--box", required=True, help="z0:z1,y0:y1,x0:x1 full-resolution voxels")
  p.add_argument("--out", required=True, help="output zarr folder (created, or resumed)")
  p.add_argument(
    "--window", help="ZYX (or YX) window in model-input voxels (default: training size)"
  )
  p.add_argument("--stride", help="ZYX (or YX) stride, the 'field size' (default: from --overlap)")
  p.add_argument("--overlap", type=float, default=0.25, help="window overlap if no --stride (0.25)")
  p.add_argument("--sigma_scale", type=float, default=0.125, help="Gaussian sigma / window (0.125)")
  p.add_argument(
    "--batch", type=int, default=8, help="windows per device batch (rounded up to the device count)"
  )
  p.add_argument("--block", help="ZYX block (= zarr chunk) in output voxels (default 8,256,256)")
  p.add_argument("--margin", help="ZYX context margin per block side (default: half a window)")
  p.add_argument(
    "--downsample", type=int, help="override the run's xy downsampling (1|2|4; not advised)"
  )
  p.add_argument(
    "--process", help="i/n: this process's share of the blocks (default from env or 0/1)"
  )
  p.add_argument("--png", help="also draw a few z-slices (image | region | micro) into this PNG")
  p.add_argument("--neuroglancer", help="also write a Neuroglancer state JSON for the zarr here")
  p.add_argument(
    "--url",
    default="http://127.0.0.1:8000",
    help="where the zarr will be served (for --neuroglancer)",
  )
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  return p


def run(argv=None) -> dict:
  args = build_parser().parse_args(argv)
  from mtneuro_jax.deploy import blockwise, maps, model, sliding_window, zarr_io
  from mtneuro_jax.volumes import sources, spec

  window = parse_zyx(args.window, "window")
  stride = parse_zyx(args.stride, "stride")
  block = parse_zyx(args.block, "block", two_means_yx=False)
  margin = parse_zyx(args.margin, "margin", two_means_yx=False)
  process = None
  if args.process:
    try:
      i, n = (int(v) for v in args.process.split("/"))
    except ValueError:
      raise UsageError(f"--process {args.process!r} is not i/n; e.g. --process 0/2") from None
    process = (i, n)
  src = sources.make_source(args.source)
  box = blockwise.parse_box(args.box, src.shape())
  loaded = model.load_run(args.run)
  if args.downsample is not None:
    if args.downsample not in spec.DOWNSAMPLE_FACTORS:
      raise UsageError(f"--downsample {args.downsample} must be one of {spec.DOWNSAMPLE_FACTORS}")
    loaded.downsample = int(args.downsample)
  if window is not None and stride is None:
    win = (1,) + window[1:] if loaded.dims == 2 else window
    stride = sliding_window.default_stride(win, args.overlap)
  elif window is None and stride is None and args.overlap != 0.25:
    win = (1,) + loaded.window[1:] if loaded.dims == 2 else loaded.window
    stride = sliding_window.default_stride(win, args.overlap)
  summary = blockwise.predict_volume(
    src,
    loaded,
    box,
    args.out,
    window=window,
    stride=stride,
    block=block,
    margin=margin,
    batch=args.batch,
    sigma_scale=args.sigma_scale,
    process=process,
    progress=not args.no_progress,
  )
  if summary["complete"] and args.png:
    names = set(zarr_io.array_names(args.out))
    image = zarr_io.read_array(args.out, "image")
    zs = sorted({0, image.shape[0] // 2, image.shape[0] - 1})
    region = (
      zarr_io.read_array(args.out, "region_label")[zs].astype(int) - 1
      if "region_label" in names
      else None
    )
    micro = zarr_io.read_array(args.out, "micro_label")[zs] if "micro_label" in names else None
    maps.overlay_png(
      args.png,
      image[zs],
      region,
      micro,
      z_labels=[box.z0 + z for z in zs],
      title=f"{args.run} on {args.source}",
    )
    summary["png"] = args.png
  if summary["complete"] and args.neuroglancer:
    maps.write_neuroglancer_state(args.out, args.neuroglancer, url=args.url)
    summary["neuroglancer"] = args.neuroglancer
  return summary


def main(argv=None) -> int:
  def go(a):
    summary = run(a)
    print(json.dumps(summary, sort_keys=True))
    return 0

  return run_cli(go, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  raise SystemExit(main())
