"""Blockwise, resumable, multi-process prediction of a box of a volume into a zarr group.

Plan: the output grid (ZYX in model-input voxels: full-res z, y/x divided by the downsampling
factor) is cut into blocks of ``block`` voxels; every zarr chunk is exactly one block, so no
two blocks ever write the same chunk file. A block is predicted from its box grown by a
context ``margin`` on each side (clipped to the requested box: the box's faces are the
volume's borders, where ``sliding_window`` edge-pads), then cropped back.

Commit: a block writes its chunks of every array, then its marker
``OUT/_blocks/<id>.json`` (temp file + rename). A rerun skips blocks with a marker; a block
killed in flight has no marker and is recomputed in full, overwriting whatever chunks it had
written, so a kill -9 loses at most the blocks in flight and the final bytes equal those of an
uninterrupted run.

Processes: process ``i`` of ``n`` predicts blocks ``i::n`` and only it writes them; the
processes never talk to each other (blocks are disjoint), so this needs no
``jax.distributed``. Each holds ``OUT/_locks/process-<i>-of-<n>/.lock`` (``dirlock``) while it
writes, so two copies of the same role refuse to run at once. Index and count come from the
caller (CLI ``--process i/n``) or the environment ``MTNEURO_PROCESS_ID`` /
``MTNEURO_NUM_PROCESSES``.

The group's ``.zattrs`` is the plan (model, run, step, source, box, window, stride, block,
margin, downsample); resuming into a folder written with another plan raises
``PredictionExistsError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable

import numpy as np

from mtneuro_jax import dirlock
from mtneuro_jax.deploy import sliding_window as sw
from mtneuro_jax.deploy import zarr_io
from mtneuro_jax.errors import UserError
from mtneuro_jax.volumes import spec

FORMAT = "mtneuro-prediction-1"
DEFAULT_BLOCK_YX = 256


class PredictionExistsError(UserError):
  """The output folder holds a prediction made with another plan."""


class BoxError(UserError, ValueError):
  """A box that cannot be predicted (outside the volume, smaller than the downsampling)."""


@dataclasses.dataclass(frozen=True)
class Block:
  index: int
  lo: tuple[int, int, int]  # output-grid ZYX start
  hi: tuple[int, int, int]  # output-grid ZYX stop

  @property
  def voxels(self) -> int:
    return int(np.prod([h - lo for lo, h in zip(self.lo, self.hi, strict=True)]))


def parse_box(text: str, shape_zyx=spec.VOLUME_SHAPE_ZYX) -> spec.Box:
  """``'z0:z1,y0:y1,x0:x1'`` (a part may be ``':'`` = the whole axis) -> a Box inside the volume."""
  parts = [p.strip() for p in str(text).split(",")]
  if len(parts) != 3:
    raise BoxError(f"box {text!r} needs three ranges; e.g. --box 200:216,600:856,1500:1756")
  bounds = []
  for part, n, axis in zip(parts, shape_zyx, "zyx", strict=True):
    lo, sep, hi = part.partition(":")
    try:
      a = int(lo) if lo.strip() else 0
      b = int(hi) if hi.strip() else n
    except ValueError:
      raise BoxError(
        f"box {text!r}: {axis} range {part!r} is not 'start:stop'; e.g. 200:216"
      ) from None
    if not sep or not (0 <= a < b <= n):
      raise BoxError(f"box {text!r}: {axis} range {part!r} must lie in [0, {n}) with start < stop")
    bounds += [a, b]
  return spec.Box(*bounds)


def trim_box(box: spec.Box, downsample: int) -> spec.Box:
  """``box`` with its y/x extents cut down to multiples of ``downsample`` (the far edge is dropped)."""
  ny, nx = (box.y1 - box.y0) // downsample, (box.x1 - box.x0) // downsample
  if ny < 1 or nx < 1:
    raise BoxError(
      f"box {box} is smaller than the downsampling factor {downsample} in y or x; enlarge it"
    )
  return spec.Box(
    box.z0, box.z1, box.y0, box.y0 + ny * downsample, box.x0, box.x0 + nx * downsample
  )


def plan_blocks(out_shape, block) -> list[Block]:
  """Blocks of ``block`` voxels over ``out_shape`` (the last ones along an axis may be smaller)."""
  grids = [range(0, n, b) for n, b in zip(out_shape, block, strict=True)]
  out = []
  for z in grids[0]:
    for y in grids[1]:
      for x in grids[2]:
        lo = (z, y, x)
        hi = tuple(min(a + b, n) for a, b, n in zip(lo, block, out_shape, strict=True))
        out.append(Block(len(out), lo, hi))
  return out


def process_from_env() -> tuple[int, int]:
  """(index, count) from MTNEURO_PROCESS_ID / MTNEURO_NUM_PROCESSES, default (0, 1)."""
  n = int(os.environ.get("MTNEURO_NUM_PROCESSES", "1") or 1)
  i = int(os.environ.get("MTNEURO_PROCESS_ID", "0") or 0)
  return i, n


def _quantise(p: np.ndarray) -> np.ndarray:
  return np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)


def predict_volume(
  source,
  run,
  box: spec.Box,
  out: str,
  *,
  window: tuple[int, int, int] | None = None,
  stride: tuple[int, int, int] | None = None,
  block: tuple[int, int, int] | None = None,
  margin: tuple[int, int, int] | None = None,
  batch: int = 8,
  sigma_scale: float = sw.DEFAULT_SIGMA_SCALE,
  process: tuple[int, int] | None = None,
  progress: bool = True,
  mesh=None,
  extra_attrs: dict | None = None,
  after_block: Callable[[Block], None] | None = None,
  predictor: sw.WindowPredictor | None = None,
) -> dict[str, Any]:
  """Predicts ``box`` (full-res ZYX) of ``source`` with ``run`` (a ``model.LoadedRun``) into ``out``.

  window / stride / margin: ZYX in model-input voxels (defaults: the run's training window,
  MONAI's 25 % overlap, half a window of context); a 2D model's z window and stride are 1.
  block: output voxels per block = per zarr chunk (default ``(8 or the 3D window, 256, 256)``,
  clipped to the output). ``predictor``: a ``WindowPredictor`` of this run to reuse (else one is
  built; ``batch`` and ``mesh`` are then ignored). Returns a summary dict (blocks, skipped,
  voxels/s).
  """
  index, count = process if process is not None else process_from_env()
  if not (0 <= index < count):
    raise UserError(f"process {index} of {count} does not exist; use --process i/n with 0 <= i < n")
  try:
    box.check_inside(source.shape())
  except ValueError as e:
    raise BoxError(str(e)) from None
  d = int(run.downsample)
  box = trim_box(box, d)
  out_shape = (box.z1 - box.z0, (box.y1 - box.y0) // d, (box.x1 - box.x0) // d)
  window = tuple(int(v) for v in (window or run.window))
  if run.dims == 2:
    window = (1,) + window[1:]
  stride = tuple(int(v) for v in (stride or sw.default_stride(window)))
  if run.dims == 2:
    stride = (1,) + stride[1:]
  tiling = sw.Tiling(window, stride)
  if run.dims == 3 and window[0] > 1 and out_shape[0] < 1:
    raise BoxError(f"box {box} has no slice to predict")
  block = tuple(
    min(int(b), n)
    for b, n in zip(
      block or ((8 if run.dims == 2 else window[0]), DEFAULT_BLOCK_YX, DEFAULT_BLOCK_YX),
      out_shape,
      strict=True,
    )
  )
  if any(b < 1 for b in block):
    raise UserError(f"block {block} must be positive ZYX sizes; e.g. --block 8,256,256")
  # Default context: half a window per side (none in z for a 2D model); None entries = default.
  default_margin = ((window[0] // 2 if run.dims == 3 else 0), window[1] // 2, window[2] // 2)
  margin = tuple(
    int(m if m is not None else dm)
    for m, dm in zip(margin or (None,) * 3, default_margin, strict=True)
  )
  if predictor is None:  # (a caller predicting many boxes passes one, compiled once)
    predictor = sw.WindowPredictor(
      sw.apply_fn_for(run.model), run.variables, dims=run.dims, batch=batch, mesh=mesh
    )
  probe = predictor(np.zeros((1,) + window, np.float32))
  attrs = {
    "format": FORMAT,
    "model": run.describe(),
    "source": getattr(source, "describe", lambda: {"kind": type(source).__name__})(),
    "box_zyx": list(box.as_tuple()),
    "downsample": d,
    "voxel_size_um_zyx": [spec.VOXEL_SIZE_UM, spec.VOXEL_SIZE_UM * d, spec.VOXEL_SIZE_UM * d],
    "window_zyx": list(window),
    "stride_zyx": list(stride),
    "sigma_scale": sigma_scale,
    "block_zyx": list(block),
    "margin_zyx": list(margin),
    "batch": int(predictor.batch),
    "regions": list(spec.REGIONS) if probe["region"] is not None else [],
    "arrays": {},
    **(extra_attrs or {}),
  }
  arrays: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]]] = {
    "image": (out_shape, block, ("z", "y", "x"))
  }
  for key in ("region", "micro"):
    if probe[key] is not None:
      c = int(probe[key].shape[-1])
      arrays[f"{key}_prob"] = ((c,) + out_shape, (c,) + block, ("c", "z", "y", "x"))
      arrays[f"{key}_label"] = (out_shape, block, ("z", "y", "x"))
  attrs["arrays"] = {k: {"shape": list(v[0]), "dims": list(v[2])} for k, v in arrays.items()}

  existing = zarr_io.read_attrs(out) if os.path.isdir(out) else {}
  if existing and existing != attrs:
    diff = sorted(k for k in set(existing) | set(attrs) if existing.get(k) != attrs.get(k))
    raise PredictionExistsError(
      f"{out} holds a prediction with another plan (differs in {', '.join(diff[:6])}); "
      "pass a new --out, or delete that folder"
    )
  blocks = plan_blocks(out_shape, block)
  mine = blocks[index::count]
  marker_dir = os.path.join(out, "_blocks")
  lock = dirlock.exclusive_lock(
    os.path.join(out, "_locks", f"process-{index}-of-{count}"),
    what=f"prediction into {out} (process {index} of {count})",
  )
  with lock:
    if not existing:
      zarr_io.create_group(out, attrs)
    os.makedirs(marker_dir, exist_ok=True)
    stores = {
      name: zarr_io.open_array(
        out,
        name,
        shape=shape,
        chunks=chunks,
        dtype="uint8",
        dimensions=dims,
        attrs=({"classes": attrs["regions"]} if name.startswith("region") else None),
      )
      for name, (shape, chunks, dims) in arrays.items()
    }
    todo = [b for b in mine if not os.path.exists(os.path.join(marker_dir, f"{b.index}.json"))]
    done_vox = sum(b.voxels for b in mine) - sum(b.voxels for b in todo)
    bar = None
    if progress:
      from tqdm.auto import tqdm

      bar = tqdm(
        total=sum(b.voxels for b in mine),
        initial=done_vox,
        unit="vox",
        unit_scale=True,
        desc=f"predict {index}/{count}",
        mininterval=1.0,
        smoothing=0.3,
      )
    t0 = time.perf_counter()
    try:
      for b in todo:
        _predict_block(
          source, run, predictor, tiling, box, out_shape, b, margin, sigma_scale, stores, marker_dir
        )
        if bar is not None:
          bar.update(b.voxels)
        if after_block is not None:
          after_block(b)
    finally:
      if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
  done_all = all(os.path.exists(os.path.join(marker_dir, f"{b.index}.json")) for b in blocks)
  vox = sum(b.voxels for b in todo)
  return {
    "out": out,
    "blocks": len(blocks),
    "my_blocks": len(mine),
    "predicted": len(todo),
    "skipped": len(mine) - len(todo),
    "complete": done_all,
    "voxels": vox,
    "seconds": seconds,
    "voxels_per_s": vox / seconds if seconds > 0 and vox else None,
    "out_shape_zyx": list(out_shape),
    "process": [index, count],
  }


def _predict_block(
  source, run, predictor, tiling, box, out_shape, b, margin, sigma_scale, stores, marker_dir
):
  d = int(run.downsample)
  lo = [max(0, a - m) for a, m in zip(b.lo, margin, strict=True)]
  hi = [min(n, a + m) for a, m, n in zip(b.hi, margin, out_shape, strict=True)]
  full = spec.Box(
    box.z0 + lo[0],
    box.z0 + hi[0],
    box.y0 + lo[1] * d,
    box.y0 + hi[1] * d,
    box.x0 + lo[2] * d,
    box.x0 + hi[2] * d,
  )
  image = source.read("image", full)
  from mtneuro_jax.data import transforms

  small = transforms.area_downsample(image, d)
  x = run.preprocess(image)
  probs = sw.blend(x, predictor, tiling, sigma_scale=sigma_scale)
  crop = tuple(slice(a - c, h - c) for a, h, c in zip(b.lo, b.hi, lo, strict=True))
  region = (slice(b.lo[0], b.hi[0]), slice(b.lo[1], b.hi[1]), slice(b.lo[2], b.hi[2]))
  h = hashlib.sha256()
  writes = {"image": np.rint(small[crop]).clip(0, 255).astype(np.uint8)}
  for key, p in probs.items():
    p = p[crop]
    q = _quantise(p)
    writes[f"{key}_prob"] = np.moveaxis(q, -1, 0)
    # Labels = argmax of the stored uint8 probabilities (ties -> the lower class): consistent
    # with region_prob/micro_prob, and a last-bit float difference between processes (seen on
    # XLA CPU at near-ties) cannot flip a label unless it crosses a quantisation step.
    label = np.argmax(q, axis=-1).astype(np.uint8)
    writes[f"{key}_label"] = label + 1 if key == "region" else label
  futures = []
  for name in sorted(writes):
    data = writes[name]
    where = region if data.ndim == 3 else (slice(None),) + region
    futures.append(stores[name][where].write(data))
    h.update(name.encode())
    h.update(np.ascontiguousarray(data).tobytes())
  for f in futures:
    f.result()
  zarr_io.write_json_atomic(
    os.path.join(marker_dir, f"{b.index}.json"),
    {"block": b.index, "lo_zyx": list(b.lo), "hi_zyx": list(b.hi), "sha256": h.hexdigest()},
  )
  delay = float(os.environ.get("MTNEURO_DEPLOY_TEST_DELAY", "0") or 0)
  if delay > 0:  # tests only: widens the window in which a kill -9 lands between commits
    time.sleep(delay)


class SliceStack:
  """A source whose z axis is chosen slices of another source (whole-slab maps at low cost).

  ``zs``: increasing full-res z indices; ``read(channel, box)`` returns slices
  ``zs[box.z0:box.z1]``. Y/X are the source's. A 2D model predicts each slice as it would in
  place; give a 3D model contiguous runs of slices (one block per run, no z margin).

  Whole slices of the ``cache`` channels are read once, in x strips, every cached channel of a
  strip right after the other (a renderer like the phantom renders all channels of a box
  together and keeps them in a small cache, so the second channel costs nothing); blocks with
  context margins then never read an overlap twice. Label channels are kept as uint8 when
  their ids fit (returned in the channel's dtype).
  """

  kind = "slice-stack"

  def __init__(
    self, source, zs, *, cache: tuple[str, ...] = ("image", "roi_labels"), strip: int = 640
  ):
    self.source = source
    self.zs = [int(z) for z in zs]
    if not self.zs or sorted(set(self.zs)) != self.zs:
      raise BoxError(f"slice list {zs} must be increasing, without repeats")
    n = source.shape()[0]
    if self.zs[0] < 0 or self.zs[-1] >= n:
      raise BoxError(f"slices {zs} must lie in [0, {n})")
    self.cache = tuple(cache)
    self.strip = int(strip)
    self._slices: dict[str, np.ndarray] = {}  # channel -> [len(zs), Y, X]

  def shape(self):
    return (len(self.zs),) + tuple(self.source.shape()[1:])

  def describe(self):
    inner = getattr(self.source, "describe", lambda: {})()
    return {**inner, "z_slices": self.zs}

  def _runs(self, sel):
    """(start index, source z0, z1) of the contiguous runs of ``sel``."""
    out, start = [], 0
    for i in range(1, len(sel) + 1):
      if i == len(sel) or sel[i] != sel[i - 1] + 1:
        out.append((start, sel[start], sel[i - 1] + 1))
        start = i
    return out

  def _fill_cache(self) -> None:
    ny, nx = self.source.shape()[1:]
    bufs = {}
    for x0 in range(0, nx, self.strip):
      x1 = min(nx, x0 + self.strip)
      for start, z0, z1 in self._runs(self.zs):
        for ch in self.cache:
          part = self.source.read(ch, spec.Box(z0, z1, 0, ny, x0, x1))
          if ch not in bufs:
            small = part.dtype.kind in "ui" and part.dtype.itemsize > 1
            bufs[ch] = (
              np.zeros((len(self.zs), ny, nx), np.uint8 if small else part.dtype),
              part.dtype,
            )
          buf, _ = bufs[ch]
          if buf.dtype != part.dtype and part.size and part.max() > 255:
            raise ValueError(f"{ch} ids above 255 cannot be cached as uint8")
          buf[start : start + (z1 - z0), :, x0:x1] = part
    self._slices = {ch: buf for ch, (buf, _) in bufs.items()}
    self._dtypes = {ch: dt for ch, (_, dt) in bufs.items()}

  def read(self, channel: str, box: spec.Box) -> np.ndarray:
    if channel in self.cache:
      if channel not in self._slices:
        self._fill_cache()
      data = self._slices[channel][box.z0 : box.z1, box.y0 : box.y1, box.x0 : box.x1]
      return data.astype(self._dtypes[channel])
    sel = self.zs[box.z0 : box.z1]
    parts = [
      self.source.read(channel, spec.Box(z0, z1, box.y0, box.y1, box.x0, box.x1))
      for _, z0, z1 in self._runs(sel)
    ]
    return np.concatenate(parts, axis=0)
