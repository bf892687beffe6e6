"""Pictures of a prediction: PNG overlays of z-slices and a Neuroglancer state.

``overlay_png(path, image, region, micro, ...)``: one row per z-slice, panels image | region map
over the image | microstructure map over the image (either map may be None).

``neuroglancer_state(root, url=...)``: a small Neuroglancer state (JSON) with the zarr arrays of
a prediction group as layers (``zarr://<url>/<array>``): ``image`` as an image layer, the label
arrays as segmentation layers, at the group's voxel size. To open it:

  python -m mtneuro_jax.deploy.maps serve OUT.zarr --port 8000   # http + CORS for Neuroglancer
  # then in https://neuroglancer-demo.appspot.com: paste the JSON (Edit JSON state, {}), or open
  # the URL the command prints (the state in the URL fragment)

Any static server that sends ``Access-Control-Allow-Origin: *`` works the same.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse

import numpy as np

from mtneuro_jax.deploy import zarr_io
from mtneuro_jax.volumes import spec

# Region colours (CTX, STR, VP, ZI) and pixel-class colours (class 0 transparent).
REGION_COLOURS = np.array([[0.9, 0.3, 0.2], [0.2, 0.6, 0.9], [0.3, 0.8, 0.3], [0.9, 0.8, 0.2]])
MICRO_COLOURS = np.array([[0, 0, 0], [0.9, 0.1, 0.1], [0.1, 0.9, 0.9], [0.9, 0.5, 0.1]])


def _rgb(image: np.ndarray) -> np.ndarray:
  g = np.asarray(image, np.float32) / 255.0
  return np.repeat(g[..., None], 3, -1)


def overlay_png(
  path: str,
  image: np.ndarray,
  region: np.ndarray | None = None,
  micro: np.ndarray | None = None,
  *,
  z_labels=None,
  title: str = "",
  micro_names=None,
  alpha: float = 0.45,
) -> str:
  """Writes a PNG: rows = z-slices of ``image`` uint8 ``[Z, Y, X]``; ``region`` region index
  ``[Z, Y, X]`` (negative = none), ``micro`` pixel class ``[Z, Y, X]`` (0 drawn transparent)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch

  image = np.asarray(image)
  panels = 1 + (region is not None) + (micro is not None)
  nz, ny, nx = image.shape
  w = 12.0
  h = max(1.5, w / panels * ny / nx * nz + 0.8)
  fig, axes = plt.subplots(nz, panels, figsize=(w, h), squeeze=False)
  for i in range(nz):
    base = _rgb(image[i])
    cols = [base]
    if region is not None:
      r = np.asarray(region[i]).astype(np.int64)
      col = REGION_COLOURS[np.clip(r, 0, len(REGION_COLOURS) - 1)]
      m = (r >= 0)[..., None]
      cols.append(np.where(m, (1 - alpha) * base + alpha * col, base))
    if micro is not None:
      c = np.asarray(micro[i]).astype(np.int64)
      col = MICRO_COLOURS[np.clip(c, 0, len(MICRO_COLOURS) - 1)]
      m = (c > 0)[..., None]
      cols.append(np.where(m, (1 - alpha) * base + alpha * col, base))
    for j, a in enumerate(cols):
      ax = axes[i, j]
      ax.imshow(np.clip(a, 0, 1), interpolation="nearest", aspect="equal")
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0 and z_labels is not None:
        ax.set_ylabel(f"z={z_labels[i]}")
  names = (
    ["image", "region map", "microstructure"][:panels]
    if region is not None
    else ["image", "microstructure"]
  )
  for j, n in enumerate(names):
    axes[0, j].set_title(n, fontsize=9)
  handles = []
  if region is not None:
    handles += [Patch(color=REGION_COLOURS[k], label=r) for k, r in enumerate(spec.REGIONS)]
  if micro is not None and micro_names:
    handles += [Patch(color=MICRO_COLOURS[k], label=n) for k, n in enumerate(micro_names) if k > 0]
  if handles:
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.04, 1, 0.97))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def neuroglancer_state(root: str, *, url: str = "http://127.0.0.1:8000") -> dict:
  """A Neuroglancer state opening every array of the prediction group ``root`` served at ``url``."""
  attrs = zarr_io.read_attrs(root)
  vz, vy, vx = attrs.get("voxel_size_um_zyx", [spec.VOXEL_SIZE_UM] * 3)
  dims = {"x": [vx * 1e-6, "m"], "y": [vy * 1e-6, "m"], "z": [vz * 1e-6, "m"]}
  layers = []
  for name in zarr_io.array_names(root):
    arr_dims = zarr_io.read_attrs(root, name).get("_ARRAY_DIMENSIONS", ["z", "y", "x"])
    if "c" in arr_dims:
      continue  # probabilities: open them by hand (one channel per class)
    src = {
      "url": f"zarr://{url.rstrip('/')}/{name}",
      "transform": {"outputDimensions": {d: dims[d] for d in arr_dims}},
    }
    kind = "image" if name == "image" else "segmentation"
    layer = {"type": kind, "source": src, "name": name}
    if kind == "segmentation":
      layer["visible"] = name.startswith("region")
    layers.append(layer)
  shape = attrs.get("arrays", {}).get("image", {}).get("shape", [1, 1, 1])
  return {
    "dimensions": dims,
    "position": [shape[2] / 2, shape[1] / 2, shape[0] / 2],
    "layers": layers,
    "layout": "xy",
  }


def write_neuroglancer_state(root: str, path: str, *, url: str = "http://127.0.0.1:8000") -> dict:
  state = neuroglancer_state(root, url=url)
  # Not key-sorted: Neuroglancer reads the order of "dimensions" / "outputDimensions".
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(state, f, indent=1)
  os.replace(tmp, path)
  return state


def serve(root: str, port: int = 8000) -> None:  # pragma: no cover - interactive
  """Serves ``root`` over http with CORS (what Neuroglancer needs) until Ctrl-C."""
  import functools
  import http.server

  class Handler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
      self.send_header("Access-Control-Allow-Origin", "*")
      super().end_headers()

  state = neuroglancer_state(root, url=f"http://127.0.0.1:{port}")
  link = "https://neuroglancer-demo.appspot.com/#!" + urllib.parse.quote(json.dumps(state))
  print(f"serving {root} on http://127.0.0.1:{port}; open:\n{link}", flush=True)
  handler = functools.partial(Handler, directory=root)
  http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


if __name__ == "__main__":  # pragma: no cover
  args = sys.argv[1:]
  if len(args) < 2 or args[0] != "serve":
    print("usage: python -m mtneuro_jax.deploy.maps serve OUT.zarr [--port N]")
    sys.exit(2)
  port = int(args[args.index("--port") + 1]) if "--port" in args else 8000
  serve(args[1], port)
