"""TFDS ``GeneratorBasedBuilder`` per MTNeuro task, writing ArrayRecord shards.

No TensorFlow: features are ``tfds.features.Tensor(..., encoding='zlib')`` and
``Scalar`` only (``tfds.features.Image`` would need TF). The record schema per task
kind is in ``docs/CONTRACTS.md`` and ``docs/data.md``.

Builder classes are made per task by ``builder_class`` and are not put in TFDS's
global registry: readers open the datasets from their files
(``tfds.data_source(task, data_dir=...)`` reads ``dataset_info.json``/``features.json``).

Byte-reproducible shards: TFDS serializes each record as a ``tf.train.Example``,
whose features are a protobuf *map*; protobuf (upb) writes map entries in an order
that changes from process to process, so the same records gave shards with other
bytes on every run. ``CanonicalExampleWriter`` re-serializes every record with
``deterministic=True`` (map keys sorted) before ArrayRecord writes it. Everything
else that reaches the bytes is already a pure function of the records: the record
order (TFDS sorts by a hash of the key), the shard count and names (from the total
size), zlib (``tfds.features.Tensor`` encoding) and zstd level 3 (ArrayRecord chunks).
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import writer as tfds_writer
from tensorflow_datasets.proto import tf_example_pb2

from mtneuro_jax.volumes import spec

from mtneuro_jax.data.manifest import TFDS_SPLIT_NAMES, VERSION, tfds_split  # noqa: F401 - re-exported


def _scalar() -> tfds.features.Scalar:
  return tfds.features.Scalar(dtype=np.int64)


def features(task: spec.TaskSpec) -> tfds.features.FeaturesDict:
  """Feature spec of one record. Images and masks are uint8 ZYX (Z only for 3D windows)."""
  meta = {k: _scalar() for k in ("region", "cube_set", "z", "y0", "x0")}
  tile = (spec.TILE, spec.TILE)

  def tensor(shape):
    return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib")

  if task.kind == "task1":
    return tfds.features.FeaturesDict({"image": tensor(tile), "label": _scalar(), **meta})
  if task.kind == "task2":
    shape = tile if task.window == 1 else (task.window, *tile)
    return tfds.features.FeaturesDict({"image": tensor(shape), "mask": tensor(shape), **meta})
  if task.kind == "task3":
    quad = (spec.QUADRANT, spec.QUADRANT)
    return tfds.features.FeaturesDict(
      {"image": tensor(quad), "pixel_labels": tensor(quad), "quadrant": _scalar(), **meta}
    )
  raise ValueError(f"unknown task kind {task.kind!r}")


ExamplesFn = Callable[[str], Iterator[tuple[str, dict]]]


def canonical_example(serialized: bytes) -> bytes:
  """A serialized ``tf.train.Example`` re-encoded deterministically (feature map keys sorted).

  Decodes to the same record; equal records give equal bytes in any process.
  """
  return tf_example_pb2.Example.FromString(serialized).SerializeToString(deterministic=True)


class CanonicalExampleWriter(tfds_writer.ExampleWriter):
  """TFDS's example writer (ArrayRecord here), fed canonical record bytes (see module doc)."""

  def write(self, path, examples):
    return super().write(path, ((key, canonical_example(ex)) for key, ex in examples))


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the per-task builders; ``examples_fn(split)`` yields ``(key, record)``."""

  VERSION = tfds.core.Version(VERSION)
  TASK: spec.TaskSpec

  # TFDS looks for checksums/metadata next to the builder's source file; its lookup
  # for a module inside a package imports `importlib_resources`, which we do not
  # ship. We download nothing, so there is no code path to search.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, examples_fn: ExamplesFn | None = None, **kwargs):
    self._examples_fn = examples_fn
    super().__init__(**kwargs)

  def _example_writer(self) -> tfds_writer.ExampleWriter:
    # TFDS's documented hook for custom writers; see CanonicalExampleWriter.
    return CanonicalExampleWriter(file_format=self.info.file_format)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.TASK.description,
      features=features(self.TASK),
      homepage="https://mtneuro.github.io",
      citation="Quesada, Sathidevi et al., MTNeuro, NeurIPS 2022 Datasets and Benchmarks.",
    )

  def _split_generators(self, dl_manager):
    if self._examples_fn is None:
      raise RuntimeError(
        "this builder only writes when given examples_fn; use `mtneuro export` to export a task"
      )
    return {tfds_split(s): self._generate_examples(s) for s in self.TASK.splits}

  def _generate_examples(self, split: str):
    yield from self._examples_fn(split)


@functools.cache
def builder_class(task_name: str) -> type[_TaskBuilder]:
  """The (unregistered) GeneratorBasedBuilder subclass of task ``task_name``."""
  task = spec.get_task(task_name)

  def body(ns):
    ns.update({"name": task_name, "TASK": task, "__module__": __name__})

  # skip_registration: re-creating a class must not clash in TFDS's global registry.
  return types.new_class(task_name, (_TaskBuilder,), {"skip_registration": True}, body)
