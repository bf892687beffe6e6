"""grain input pipelines over the exported TFDS ArrayRecord datasets.

  tfds.data_source(task, data_dir)   (manifest verified on open: SHA-256 of every file)
  -> per-epoch seeded permutation      (numpy, from (seed, epoch); drop remainder)
  -> this process's rows of each global batch
  -> RecordTransform                  (rng from (seed, epoch, record index))
  -> grain batch                      (process-local rows)
  -> sharding.shard_batch             (global jax.Arrays on P('data'))

Everything runs in-process (grain MapDataset + to_iter_dataset with a small thread
pool): grain's multiprocessing workers would need absl flags. Every batch is a pure
function of (seed, step), so the iterator state is just grain's ``next_index`` and
resuming mid-epoch reproduces the same batches for any number of processes or
reader threads.

``data_cfg`` (ConfigDict or dict) keys: data_dir, task, downsample (1|2|4),
image_mean, image_std, random_crop (0 = off), batch_size, eval_batch_size;
optional read_threads (default 2), prefetch_batches (default 2).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Iterator

import grain
import jax
import numpy as np

from mtneuro_jax.data import manifest as manifest_lib
from mtneuro_jax.data.manifest import DatasetError, tfds_split
from mtneuro_jax.data.transforms import TARGET_KEYS, RecordTransform, num_target_classes
from mtneuro_jax import sharding
from mtneuro_jax.errors import ConfigError
from mtneuro_jax.volumes import spec

_MISSING = object()


def _get(cfg: Any, key: str, default: Any = _MISSING) -> Any:
  """``cfg[key]`` for a dict or ConfigDict; ``default`` when absent (KeyError if none given)."""
  try:
    return cfg[key]
  except (KeyError, AttributeError, TypeError):
    if hasattr(cfg, key) and not isinstance(cfg, dict):
      return getattr(cfg, key)
    if default is _MISSING:
      raise KeyError(f"data config has no {key!r}; required keys: data_dir, task") from None
    return default


# ---------------------------------------------------------------------------
# Opening datasets.
_VERIFIED: dict[str, tuple] = {}
_VERIFY_LOCK = threading.Lock()


def _signature(vdir: str) -> tuple:
  return tuple(
    sorted(
      (n, os.stat(os.path.join(vdir, n)).st_size, os.stat(os.path.join(vdir, n)).st_mtime_ns)
      for n in os.listdir(vdir)
    )
  )


def dataset_dir(data_dir: str, task: str) -> str:
  """Version folder of ``task`` under the export root ``data_dir``."""
  return os.path.join(os.path.abspath(data_dir), task, manifest_lib.VERSION)


def open_manifest(data_dir: str | None, task: str) -> dict:
  """Verifies the dataset (once per process while its files are unchanged) and returns its manifest.

  Raises DatasetError naming ``mtneuro export`` when the dataset is
  missing, and naming the broken file when it fails its checks.
  """
  spec.get_task(task)  # unknown task -> KeyError listing the known ones
  if not data_dir:
    raise DatasetError(
      f"data_dir is not set; export the data with `mtneuro export "
      f"--tasks {task} --out_dir DIR` and set config.data.data_dir=DIR"
    )
  vdir = dataset_dir(data_dir, task)
  if not os.path.isfile(os.path.join(vdir, manifest_lib.MANIFEST_NAME)):
    raise DatasetError(
      f"no complete export of {task} in {os.path.abspath(data_dir)} (missing "
      f"{vdir}/manifest.json); create it with `mtneuro export --tasks {task} "
      f"--out_dir {data_dir}`"
    )
  with _VERIFY_LOCK:
    sig = _signature(vdir)
    if _VERIFIED.get(vdir) != sig:
      manifest_lib.verify_dataset(vdir)
      _VERIFIED[vdir] = sig
  return manifest_lib.load_manifest(vdir)


def _resolve_split(manifest: dict, split: str) -> str:
  """Spec split name for ``split`` (accepts TFDS's name too, e.g. 'full' for Task 3's 'all')."""
  splits = manifest["splits"]
  if split in splits:
    return split
  for name, info in splits.items():
    if info.get("tfds_split") == split:
      return name
  raise KeyError(
    f"dataset {manifest['dataset']} has no split {split!r}; splits: {', '.join(splits)}"
  )


def open_split(data_dir: str, task: str, split: str):
  """Random-access TFDS ArrayRecord source of one split (records decoded to numpy)."""
  import tensorflow_datasets as tfds

  manifest = open_manifest(data_dir, task)
  name = _resolve_split(manifest, split)
  return tfds.data_source(
    task, split=tfds_split(name), data_dir=os.path.abspath(data_dir), download=False
  )


def _train_split(manifest: dict) -> str:
  # Task 3 has a single split ("all"): SSL pretraining and its evaluation use all of it.
  return "train" if "train" in manifest["splits"] else next(iter(manifest["splits"]))


def make_transform(data_cfg: Any, task: str, *, train: bool) -> RecordTransform:
  t = spec.get_task(task)
  return RecordTransform(
    kind=t.kind,
    label_set=t.label_set,
    downsample=int(_get(data_cfg, "downsample", 1)),
    mean=float(_get(data_cfg, "image_mean", 0.0)),
    std=float(_get(data_cfg, "image_std", 1.0)),
    random_crop=int(_get(data_cfg, "random_crop", 0)) if train else 0,
  )


def _read_options(data_cfg: Any) -> grain.ReadOptions:
  # Elements of the iter dataset are whole batches: keep the buffer small (a 3D batch
  # is ~100 MB of float32) and the thread count modest (the host has few cores).
  return grain.ReadOptions(
    num_threads=int(_get(data_cfg, "read_threads", 2)),
    prefetch_buffer_size=int(_get(data_cfg, "prefetch_batches", 2)),
  )


def _rng(*words: int) -> np.random.Generator:
  return np.random.default_rng([int(w) % (2**63) for w in words])


# ---------------------------------------------------------------------------
# Training.
class TrainIterator:
  """Infinite iterator of sharded training batches (see module docstring).

  Yields dicts of jax.Arrays with leading (global batch) axis on P('data'):
  image float32 ``[B, Y, X, 1]`` or ``[B, Z, Y, X, 1]``; the target (``label`` int32
  ``[B]``, ``mask`` int32 ``[B, (Z,) Y, X]`` or ``pixel_labels`` int32 ``[B, Y, X]``);
  ``region``, ``cube_set``, ``z`` int32 ``[B]``; ``valid`` bool ``[B]`` (all True).
  Batch ``s`` is global step ``s``: epoch ``s // steps_per_epoch``.
  """

  def __init__(self, data_cfg: Any, *, seed: int, mesh, global_batch_size: int):
    self.task = str(_get(data_cfg, "task"))
    self.seed = int(seed)
    self.mesh = mesh
    self.global_batch_size = int(global_batch_size)
    manifest = open_manifest(_get(data_cfg, "data_dir", None), self.task)
    self.split = _train_split(manifest)
    self._source = open_split(_get(data_cfg, "data_dir"), self.task, self.split)
    self.num_examples = len(self._source)
    self.local_batch_size = sharding.process_batch_size(self.global_batch_size, mesh)
    self.steps_per_epoch = self.num_examples // self.global_batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(
        f"{self.task}/{self.split} has {self.num_examples} examples, fewer than one global "
        f"batch of {self.global_batch_size}; lower the batch size"
      )
    self.transform = make_transform(data_cfg, self.task, train=True)
    G, L, n, pid = (
      self.global_batch_size,
      self.local_batch_size,
      self.num_examples,
      jax.process_index(),
    )
    per_epoch = self.steps_per_epoch * L  # this process's rows per epoch (remainder dropped)

    @functools.lru_cache(maxsize=4)
    def permutation(epoch: int) -> np.ndarray:
      return _rng(self.seed, epoch).permutation(n)

    def load(i: int, _):
      epoch, j = divmod(i, per_epoch)
      step_in_epoch, r = divmod(j, L)
      record = int(permutation(epoch)[step_in_epoch * G + pid * L + r])
      return self.transform(self._source[record], _rng(self.seed, epoch, record))

    self._dataset = (
      grain.MapDataset.range(per_epoch)
      .repeat(None)
      .map_with_index(load)
      .batch(L, drop_remainder=True)
    )
    self._iter = iter(self._dataset.to_iter_dataset(_read_options(data_cfg)))
    self._step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = next(self._iter)
    self._step += 1
    return sharding.shard_batch(batch, self.mesh)

  @property
  def step(self) -> int:
    """Batches consumed so far (the next batch is global step ``step``)."""
    return self._step

  def _identity(self) -> dict:
    return {
      "task": self.task,
      "split": self.split,
      "seed": self.seed,
      "num_examples": self.num_examples,
      "global_batch_size": self.global_batch_size,
    }

  def get_state(self) -> dict:
    """JSON-able state; ``set_state`` of it continues with exactly the same batches."""
    return {**self._identity(), "step": self._step, "grain": self._iter.get_state()}

  def set_state(self, state: dict) -> None:
    mine = self._identity()
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
      raise ValueError(
        f"iterator state is for another input pipeline (saved vs now: {diff}); "
        "resume with the same task, data, seed and global batch size"
      )
    self._iter.set_state(state["grain"])
    self._step = int(state["step"])


def train_iterator(data_cfg: Any, *, seed: int, mesh, global_batch_size: int) -> TrainIterator:
  """Infinite, checkpointable iterator of sharded training batches (see TrainIterator)."""
  return TrainIterator(data_cfg, seed=seed, mesh=mesh, global_batch_size=global_batch_size)


# ---------------------------------------------------------------------------
# Evaluation.
def eval_batches(
  data_cfg: Any, split: str, *, mesh, global_batch_size: int, task: str | None = None
) -> Iterator[dict[str, jax.Array]]:
  """One pass over ``split`` in record order, in sharded batches of ``global_batch_size``.

  No random crop. The last batch is padded (copies of record 0) with
  ``valid=False`` on the padding rows; keys and shapes as TrainIterator's.
  ``task`` overrides ``data_cfg.task`` (e.g. test a ROI-C1 model on ROI-C2).
  """
  task = task or str(_get(data_cfg, "task"))
  data_dir = _get(data_cfg, "data_dir", None)
  source = open_split(data_dir, task, split)
  n = len(source)
  G = int(global_batch_size)
  L = sharding.process_batch_size(G, mesh)
  pid = jax.process_index()
  transform = make_transform(data_cfg, task, train=False)
  num_batches = -(-n // G)

  def load(j: int):
    b, r = divmod(j, L)
    g = b * G + pid * L + r
    ex = transform(source[g if g < n else 0])
    if g >= n:
      ex["valid"] = np.bool_(False)
    return ex

  ds = grain.MapDataset.range(num_batches * L).map(load).batch(L, drop_remainder=True)

  def iterate():
    for batch in ds.to_iter_dataset(_read_options(data_cfg)):
      yield sharding.shard_batch(batch, mesh)

  # Opening and checks above run eagerly: a missing or broken dataset fails at the call.
  return iterate()


# ---------------------------------------------------------------------------
def dataset_info(data_cfg: Any, task: str | None = None) -> dict:
  """What a model and an evaluator need to know about a dataset.

  Returns num_examples per split; image_shape of one example as yielded (after
  downsampling, without random crop; channel last); num_classes and class_names
  (spec.REGIONS for Task 1, spec.PIXEL_CLASS_NAMES for Task 2, pixel ids for
  Task 3); target key; the source and export limit from the manifest.
  """
  task = task or str(_get(data_cfg, "task"))
  t = spec.get_task(task)
  manifest = open_manifest(_get(data_cfg, "data_dir", None), task)
  f = int(_get(data_cfg, "downsample", 1))
  if f not in spec.DOWNSAMPLE_FACTORS:
    raise ConfigError(f"downsample must be one of {spec.DOWNSAMPLE_FACTORS}, got {f}")
  tile = spec.QUADRANT if t.kind == "task3" else spec.TILE
  yx = (tile // f, tile // f)
  image_shape = ((t.window,) if t.kind == "task2" and t.window > 1 else ()) + yx + (1,)
  if t.kind == "task1":
    names = tuple(spec.REGIONS)
  elif t.kind == "task2":
    names = tuple(spec.PIXEL_CLASS_NAMES[t.label_set])
  else:
    names = tuple(sorted(spec.PIXEL_IDS, key=spec.PIXEL_IDS.get))
  crop = int(_get(data_cfg, "random_crop", 0))
  return {
    "task": task,
    "kind": t.kind,
    "target_key": TARGET_KEYS[t.kind],
    "num_examples": {s: int(v["num_examples"]) for s, v in manifest["splits"].items()},
    "excluded_unannotated": {
      s: int(v["excluded_unannotated"]) for s, v in manifest["splits"].items()
    },
    "train_split": _train_split(manifest),
    "image_shape": image_shape,
    "train_image_shape": image_shape[:-3] + (crop, crop, 1) if crop else image_shape,
    "num_classes": num_target_classes(t.kind, t.label_set),
    "class_names": names,
    "source": manifest.get("source_tag"),
    "synthetic": manifest["parameters"]["source"].get("kind") == "phantom",
    "limit_per_split": manifest["parameters"].get("limit_per_split"),
  }
