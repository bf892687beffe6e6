"""Prediction volumes on disk: a zarr v2 group written with TensorStore, Neuroglancer-readable.

Layout of ``OUT.zarr/``:

  .zgroup, .zattrs          group; .zattrs = the prediction's record (model, run, step, window,
                            stride, source + generator version, box, downsample, voxel size)
  image/                    uint8 [Z, Y, X]  the model's input image (downsampled, not normalised)
  region_prob/              uint8 [R, Z, Y, X]  round(255 * p) per region (spec.REGIONS order)
  region_label/             uint8 [Z, Y, X]  argmax region + 1 (0 = not predicted)
  micro_prob/, micro_label/ the same for the pixel classes (label = argmax class id)
  _blocks/<id>.json         per-block commit markers (blockwise.py), not part of the arrays
  _locks/                   per-process locks while writing

Each array's ``.zattrs`` carries ``_ARRAY_DIMENSIONS`` (xarray's convention, which Neuroglancer's
zarr source reads for dimension names). Chunks are gzip-compressed (deterministic bytes: the
same data always gives the same chunk files). All JSON is written sorted, via temp + rename.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorstore as ts

COMPRESSOR = {"id": "gzip", "level": 5}


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as sorted JSON to ``path`` via a temp file + ``os.replace`` (all or nothing)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _spec(path: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.abspath(path)}}


def create_group(root: str, attrs: dict) -> None:
  os.makedirs(root, exist_ok=True)
  write_json_atomic(os.path.join(root, ".zgroup"), {"zarr_format": 2})
  write_json_atomic(os.path.join(root, ".zattrs"), attrs)


def read_attrs(root: str, name: str = "") -> dict:
  path = os.path.join(root, name, ".zattrs")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def open_array(
  root: str,
  name: str,
  *,
  shape: tuple[int, ...],
  chunks: tuple[int, ...],
  dtype: str,
  dimensions: tuple[str, ...],
  attrs: dict | None = None,
) -> ts.TensorStore:
  """Creates (or opens an identical) zarr v2 array ``root/name``; writes its ``.zattrs``."""
  path = os.path.join(root, name)
  spec = _spec(path)
  spec["metadata"] = {
    "shape": [int(s) for s in shape],
    "chunks": [int(c) for c in chunks],
    "dtype": np.dtype(dtype).str,
    "compressor": COMPRESSOR,
    "fill_value": 0,
    "order": "C",
  }
  store = ts.open(spec, create=True, open=True).result()
  write_json_atomic(
    os.path.join(path, ".zattrs"), {"_ARRAY_DIMENSIONS": list(dimensions), **(attrs or {})}
  )
  return store


def open_existing(root: str, name: str) -> ts.TensorStore:
  return ts.open(_spec(os.path.join(root, name)), open=True).result()


def read_array(root: str, name: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
  """The array ``root/name`` (or ``region`` of it) as numpy."""
  store = open_existing(root, name)
  view = store[region] if region is not None else store
  return np.asarray(view.read().result())


def array_names(root: str) -> list[str]:
  """Names of the arrays in a group folder (sub-folders holding ``.zarray``)."""
  return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, ".zarray")))
