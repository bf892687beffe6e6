"""Export MTNeuro tasks from any Source to TFDS ArrayRecord datasets with manifests.

Usage (``python -m data_prep.export`` is the same as ``mtneuro export``)::

  mtneuro export --source phantom --tasks all --out_dir out/data/phantom-seed0
  mtneuro export --source bossdb --tasks task1_roi_c1,task2_2d_3class
  mtneuro verify out/data/phantom-seed0          # every dataset, SHA-256
  mtneuro summary out/data/phantom-seed0         # split sizes / exclusions / bytes (verifies first)

What one export does, in order (nothing is fetched before the cheap checks pass):
  1. argument checks, task lookup, leakage guard (``spec.check_guard_bands``,
     ``--min_guard_slices``) and the source's channels (for every requested task first);
  2. sample plan (``spec.iter_samples``, ``--limit_per_split``) and a check that
     every box lies inside the source volume;
  3. the exclusive lock of ``<out_dir>/<task>`` (``mtneuro_jax.dirlock``): a second
     export of that task into that folder fails at once, naming the holder;
  4. an existing dataset with the same parameters that verifies is a no-op; one with
     other parameters (or broken) is refused unless ``--overwrite``;
  5. the output and cache folders must be writable;
  6. cube chunks are read through the cutout cache (``data_prep.cache``; every cutout
     value-checked by the source), samples are cut and labelled, TFDS writes shards
     into ``<out_dir>/.staging/...`` with canonical record bytes (byte-reproducible);
  7. the manifest (SHA-256 of every file) is written, then the version folder is
     ``os.replace``d to ``<out_dir>/<task>/1.0.0``. A killed export leaves only staging.
Any problem is one ``error: <problem>; <fix>`` line and exit status 2
(``mtneuro_jax.errors.run_cli``); nothing that existed before is changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
import uuid
from typing import Iterator, Mapping, Sequence

import numpy as np

from data_prep import builder as builder_lib
from data_prep import cache as cache_lib
from mtneuro_jax import dirlock
from mtneuro_jax.data import manifest as manifest_lib
from mtneuro_jax.data.manifest import DatasetError, verify_dataset  # noqa: F401 - re-exported
from mtneuro_jax.errors import ArgumentParser, UserError, run_cli
from mtneuro_jax.volumes import spec
from mtneuro_jax.volumes.sources import Source, SourceError, make_source

SCHEMA_VERSION = 1  # bump when the record contents for the same parameters change
DEFAULT_CHUNK_Z = 32  # slices per cached cutout: 32 x 256 x 256 = 2 MiB of uint8 per chunk
STAGING = ".staging"
DEFAULT_CACHE_SUBDIR = ".cache"
RESOLUTION = 0  # coordinates in spec are full resolution; downsampling is the pipeline's job


class ExportError(UserError, RuntimeError):
  """An export cannot run; the message names the problem and the fix.

  A ``UserError`` (the CLIs print it as one line); still a ``RuntimeError`` for older callers.
  """


def source_tag(source: Source) -> str:
  """Short folder-friendly name of a source, e.g. ``phantom-seed0`` or ``bossdb-api.bossdb.io``."""
  desc = source.describe()
  kind = desc.get("kind", source.kind)
  if kind == "phantom":
    return f"phantom-seed{desc.get('seed', 0)}"
  if kind == "local":
    return "local-" + os.path.basename(str(desc.get("path", "volume")).rstrip("/"))
  if kind == "bossdb":
    return "bossdb-" + str(desc.get("host", "boss")).replace(":", "_")
  return str(kind)


def _jsonable(obj):
  return json.loads(json.dumps(obj, sort_keys=True, default=str))


# ---------------------------------------------------------------------------
# Planning.
def plan_samples(
  task: spec.TaskSpec, limit_per_split: int | None = None
) -> dict[str, list[spec.SampleRef]]:
  """Candidate samples per split in ``spec.iter_samples`` order.

  ``limit_per_split`` keeps the first N candidates of each region in each split
  (for tests and tiny runs); for Task 3, N quadrants.
  """
  if limit_per_split is not None and limit_per_split < 1:
    raise ExportError(
      f"--limit_per_split must be >= 1 (got {limit_per_split}); omit it for a full export"
    )
  plan = {}
  for split in task.splits:
    kept, per_region = [], {}
    for s in spec.iter_samples(task, split):
      n = per_region.get(s.region, 0)
      if limit_per_split is None or n < limit_per_split:
        kept.append(s)
        per_region[s.region] = n + 1
    plan[split] = kept
  return plan


def check_export_args(*, limit_per_split: int | None, min_guard_slices: int, chunk_z: int) -> None:
  """ExportError for a numeric parameter out of range (before anything is read or written)."""
  if limit_per_split is not None and limit_per_split < 1:
    raise ExportError(
      f"--limit_per_split must be >= 1 (got {limit_per_split}); omit it for a full export"
    )
  if min_guard_slices < 0:
    raise ExportError(
      f"--min_guard_slices must be >= 0 (got {min_guard_slices}); the default is "
      f"{spec.DEFAULT_MIN_GUARD_SLICES}"
    )
  if chunk_z < 1:
    raise ExportError(
      f"--chunk_z must be >= 1 (got {chunk_z}); the default is {DEFAULT_CHUNK_Z} "
      "slices per cached cutout"
    )


def check_plan_inside(plan: dict[str, list[spec.SampleRef]], shape_zyx) -> None:
  """Raises SourceError naming the first sample whose box leaves the source volume."""
  for samples in plan.values():
    for s in samples:
      try:
        s.box.check_inside(shape_zyx)
      except ValueError as e:
        raise SourceError(
          f"sample {s.key}: {e}; the source volume is {tuple(shape_zyx)} (ZYX), the task "
          f"needs the MTNeuro extent {spec.VOLUME_SHAPE_ZYX}"
        ) from None


def check_writable(path: str, what: str) -> None:
  """Creates ``path`` if needed and proves it writable with a probe file; ExportError otherwise."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(probe, "wb") as f:
      f.write(b"ok")
    os.unlink(probe)
  except OSError as e:
    raise ExportError(
      f"{what} {path} is not writable ({e.strerror or e}); choose a writable "
      f"folder with --{'out_dir' if what == 'output folder' else 'cache_dir'} "
      "or fix its permissions"
    ) from None


def export_parameters(source: Source, task_name: str, limit_per_split: int | None) -> dict:
  """Everything that determines the records; equal parameters => identical datasets."""
  return _jsonable(
    {
      "task": task_name,
      "schema_version": SCHEMA_VERSION,
      "source": source.describe(),
      "resolution": RESOLUTION,
      "limit_per_split": limit_per_split,
    }
  )


def task_description(task: spec.TaskSpec) -> dict:
  """The task spec as JSON (splits with cube sets, z ranges, regions and xy windows)."""
  splits = {}
  for split, parts in task.splits.items():
    splits[split] = [
      {
        "cube_set": p.cube_set,
        "z_range": list(p.z_range),
        "regions": list(p.regions),
        "xy": {
          r: {
            "x": list(spec.CUBE_SETS[p.cube_set][r][:2]),
            "y": list(spec.CUBE_SETS[p.cube_set][r][2:]),
          }
          for r in p.regions
        },
      }
      for p in parts
    ]
  return {
    "name": task.name,
    "kind": task.kind,
    "description": task.description,
    "window": task.window,
    "label_set": task.label_set,
    "channels": list(task.channels),
    "splits": splits,
  }


# ---------------------------------------------------------------------------
# Records.
def make_record(
  task: spec.TaskSpec, sample: spec.SampleRef, image: np.ndarray, labels: np.ndarray
) -> dict | None:
  """One TFDS record from the ZYX cutouts of a sample; None if Task 1 and unannotated.

  image: uint8 ``[window, Y, X]``; labels: BossDB ids of the same box (ROI ids for
  Task 1, pixel ids otherwise). 2D records drop the z axis.
  """
  b = sample.box
  meta = {
    "region": spec.REGION_INDEX[sample.region],
    "cube_set": spec.CUBE_SET_INDEX[sample.cube_set],
    "z": b.z0,
    "y0": b.y0,
    "x0": b.x0,
  }
  image = np.asarray(image, np.uint8)
  if task.kind == "task1":
    label = spec.task1_label(labels)
    if label is None:
      return None
    return {"image": image[0], "label": label, **meta}
  if task.kind == "task2":
    mask = spec.remap(labels, spec.PIXEL_CLASS_MAPS[task.label_set])
    if task.window == 1:
      image, mask = image[0], mask[0]
    return {"image": image, "mask": mask, **meta}
  if task.kind == "task3":
    # Identity map over the known pixel ids: refuses ids that would not fit/mean anything.
    ids = spec.remap(labels, {v: v for v in spec.PIXEL_IDS.values()})
    return {"image": image[0], "pixel_labels": ids[0], "quadrant": sample.quadrant, **meta}
  raise ValueError(f"unknown task kind {task.kind!r}")


def _label_channel(task: spec.TaskSpec) -> str:
  return "roi_labels" if task.kind == "task1" else "pixel_labels"


# ---------------------------------------------------------------------------
# Staging and replacement.
def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _clean_stale_staging(out_dir: str, task_name: str) -> None:
  """Removes staging folders of this task left by killed exports (their pid is gone)."""
  root = os.path.join(out_dir, STAGING)
  if not os.path.isdir(root):
    return
  for name in os.listdir(root):
    head, _, rest = name.partition("@")
    if head != task_name:
      continue
    try:
      pid = int(rest.split("-", 1)[0])
    except ValueError:
      continue
    if pid != os.getpid() and not _pid_alive(pid):
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _existing_state(version_dir: str, params: dict) -> str:
  """'absent' | 'identical' | 'different' | 'broken: <why>' for what sits at ``version_dir``."""
  if not os.path.exists(version_dir):
    return "absent"
  try:
    manifest = manifest_lib.load_manifest(version_dir)
  except DatasetError as e:
    return f"broken: {e}"
  if manifest.get("parameters") != params:
    return "different"
  try:
    verify_dataset(version_dir)
  except DatasetError as e:
    return f"broken: {e}"
  return "identical"


def _param_diff(old: dict, new: dict) -> str:
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


# ---------------------------------------------------------------------------
def export_task(
  source: Source,
  task_name: str,
  out_dir: str,
  *,
  cache_dir: str | None = None,
  limit_per_split: int | None = None,
  min_guard_slices: int = spec.DEFAULT_MIN_GUARD_SLICES,
  progress: bool = True,
  overwrite: bool = False,
  chunk_z: int = DEFAULT_CHUNK_Z,
  companion_channels: Mapping[str, Sequence[str]] | None = None,
) -> dict:
  """Exports one task to ``<out_dir>/<task_name>/1.0.0`` and returns its manifest.

  A no-op (returns the existing manifest) when a complete export with the same
  parameters exists and verifies. Raises ExportError / SourceError / DatasetError
  with a one-line message naming the fix; nothing existing is touched on error.
  ``overwrite=True`` rebuilds and replaces whatever is there. ``chunk_z``: slices
  per cached cutout. ``companion_channels`` ("<set>:<region>" -> channels): also cache these
  channels of every chunk read (see ``cache.ChunkReader``; ``companions_for``).
  """
  return _export_task(
    source,
    task_name,
    out_dir,
    cache_dir=cache_dir,
    limit_per_split=limit_per_split,
    min_guard_slices=min_guard_slices,
    progress=progress,
    overwrite=overwrite,
    chunk_z=chunk_z,
    companion_channels=companion_channels,
  )[0]


def companions_for(task_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """``"<cube set>:<region>"`` -> every channel that any of ``task_names`` reads from that cube."""
  out: dict[str, set] = {}
  for name in task_names:
    task = spec.get_task(name)
    for parts in task.splits.values():
      for part in parts:
        for region in part.regions:
          out.setdefault(f"{part.cube_set}:{region}", set()).update(task.channels)
  return {k: tuple(sorted(v)) for k, v in sorted(out.items())}


def prepare_task(
  source: Source,
  task_name: str,
  *,
  limit_per_split: int | None = None,
  min_guard_slices: int = spec.DEFAULT_MIN_GUARD_SLICES,
  chunk_z: int = DEFAULT_CHUNK_Z,
) -> tuple[spec.TaskSpec, list[dict], dict[str, list[spec.SampleRef]]]:
  """Every check of one export that needs no disk writes: arguments, task, guard bands,
  the source's channels and the sample plan inside the volume. Returns (task, bands, plan)."""
  check_export_args(
    limit_per_split=limit_per_split, min_guard_slices=min_guard_slices, chunk_z=chunk_z
  )
  try:
    task = spec.get_task(task_name)
  except KeyError:
    raise ExportError(
      f"unknown task {task_name!r}; use one of: {', '.join(spec.TASKS)} (or --tasks all)"
    ) from None
  try:
    bands = spec.check_guard_bands(task, min_guard_slices)
  except ValueError as e:
    raise ExportError(str(e)) from None
  plan = plan_samples(task, limit_per_split)
  check_plan_inside(plan, source.shape())
  source.check_channels(sorted({*task.channels, _label_channel(task)}))
  return task, bands, plan


def _export_task(
  source,
  task_name,
  out_dir,
  *,
  cache_dir,
  limit_per_split,
  min_guard_slices,
  progress,
  overwrite,
  chunk_z,
  companion_channels=None,
) -> tuple[dict, bool]:
  """export_task; also says whether anything was written (False for the no-op)."""
  say = print if progress else (lambda *a, **k: None)
  task, bands, plan = prepare_task(
    source,
    task_name,
    limit_per_split=limit_per_split,
    min_guard_slices=min_guard_slices,
    chunk_z=chunk_z,
  )
  out_dir = os.path.abspath(out_dir)
  version_dir = os.path.join(out_dir, task_name, builder_lib.VERSION)
  params = export_parameters(source, task_name, limit_per_split)
  lock = dirlock.exclusive_lock(
    os.path.join(out_dir, task_name), what=f"`mtneuro export` of {task_name}"
  )
  try:
    check_writable(out_dir, "output folder")
    lock.acquire()
  except (ExportError, OSError) as e:
    # No lock file can be written: fine for a read-only copy that is already complete.
    if _existing_state(version_dir, params) == "identical" and not overwrite:
      say(
        f"{task_name}: identical complete export already at {version_dir} (read-only); nothing to do"
      )
      return manifest_lib.load_manifest(version_dir), False
    if isinstance(e, ExportError):
      raise
    raise ExportError(
      f"cannot lock {os.path.join(out_dir, task_name)} ({e.strerror or e}); choose a "
      "writable folder with --out_dir or fix its permissions"
    ) from None
  try:
    return _export_locked(
      source,
      task,
      bands,
      plan,
      out_dir,
      version_dir,
      params,
      cache_dir=cache_dir,
      limit_per_split=limit_per_split,
      min_guard_slices=min_guard_slices,
      say=say,
      progress=progress,
      overwrite=overwrite,
      chunk_z=chunk_z,
      companion_channels=companion_channels,
    )
  finally:
    lock.release()


def _export_locked(
  source,
  task,
  bands,
  plan,
  out_dir,
  version_dir,
  params,
  *,
  cache_dir,
  limit_per_split,
  min_guard_slices,
  say,
  progress,
  overwrite,
  chunk_z,
  companion_channels,
):
  """The part of an export that runs under the task folder's lock."""
  task_name = task.name
  state = _existing_state(version_dir, params)
  if state == "identical" and not overwrite:
    say(f"{task_name}: identical complete export already at {version_dir}; nothing to do")
    return manifest_lib.load_manifest(version_dir), False
  if state == "different" and not overwrite:
    old = manifest_lib.load_manifest(version_dir).get("parameters", {})
    raise ExportError(
      f"{version_dir} holds an export with other parameters ({_param_diff(old, params)}); "
      "pass --overwrite to replace it or choose another --out_dir"
    )
  if state.startswith("broken") and not overwrite:
    raise ExportError(
      f"{version_dir} exists but is not a valid export ({state[8:]}); "
      "pass --overwrite to rebuild it"
    )

  check_writable(out_dir, "output folder")
  if cache_dir is not None:
    check_writable(cache_dir, "cache folder")
  _clean_stale_staging(out_dir, task_name)

  cache = cache_lib.CutoutCache(source, cache_dir, RESOLUTION)
  reader = cache_lib.ChunkReader(cache, chunk_z, companions=companion_channels)
  label_channel = _label_channel(task)
  stats = {
    s: {
      "tfds_split": builder_lib.tfds_split(s),
      "candidates": len(plan[s]),
      "num_examples": 0,
      "excluded_unannotated": 0,
      "per_region": {},
    }
    for s in plan
  }
  total = sum(len(v) for v in plan.values())
  from tqdm.auto import tqdm  # lazy: only an export draws progress bars

  bar = tqdm(total=total, desc=task_name, unit="sample", disable=not progress, dynamic_ncols=True)

  def examples(split: str) -> Iterator[tuple[str, dict]]:
    st = stats[split]
    for sample in plan[split]:
      image = reader.read("image", sample)
      labels = reader.read(label_channel, sample)
      try:
        record = make_record(task, sample, image, labels)
      except ValueError as e:  # an id outside the tables (e.g. a tampered cache file)
        raise ExportError(
          f"{task_name}: sample {sample.key}: {e}; check the source's {label_channel} "
          "(and delete the cutout cache if it was edited)"
        ) from None
      bar.update(1)
      bar.set_postfix(hits=cache.stats.hits, misses=cache.stats.misses, refresh=False)
      if record is None:
        st["excluded_unannotated"] += 1
        continue
      st["num_examples"] += 1
      st["per_region"][sample.region] = st["per_region"].get(sample.region, 0) + 1
      yield sample.key, record
    if st["num_examples"] == 0:  # TFDS cannot write an empty split; say why it is empty
      raise ExportError(
        f"{task_name}/{split}: all {st['candidates']} candidate tiles are unannotated "
        "(ROI id 0), so the split would be empty; check the source's roi_labels "
        "(or raise --limit_per_split)"
      )

  staging = os.path.join(out_dir, STAGING, f"{task_name}@{os.getpid()}-{uuid.uuid4().hex[:8]}")
  t0 = time.time()
  try:
    os.makedirs(staging)
    import tensorflow_datasets as tfds  # lazy: slow import, only needed to write

    tfds.display_progress_bar(False)
    b = builder_lib.builder_class(task_name)(
      examples_fn=examples, data_dir=staging, file_format="array_record"
    )
    # TFDS prints "Downloading and preparing..." to stdout; our bar says the same.
    with contextlib.redirect_stdout(io.StringIO()):
      try:
        b.download_and_prepare(download_dir=os.path.join(staging, "downloads"))
      except UserError as e:
        # TFDS re-raises errors from inside the generator with its own prefix ("Failed to
        # generate...") and sometimes another type; ours carry the message users need.
        raise _original_user_error(e) from None
    bar.close()
    built = os.path.join(staging, task_name, builder_lib.VERSION)
    for split, st in stats.items():
      written = b.info.splits[st["tfds_split"]].num_examples
      if written != st["num_examples"]:
        raise ExportError(
          f"{task_name}/{split}: TFDS wrote {written} records, expected "
          f"{st['num_examples']}; this is a bug, please report it"
        )
    seconds = time.time() - t0
    files = manifest_lib.file_entries(built)
    manifest = {
      "format": manifest_lib.MANIFEST_FORMAT,
      "complete": True,
      "dataset": task_name,
      "version": builder_lib.VERSION,
      "parameters": params,
      "source": _jsonable(source.describe()),
      "source_tag": source_tag(source),
      "channels": {c: spec.CHANNELS[c].uri for c in task.channels if c in spec.CHANNELS}
      | {label_channel: spec.CHANNELS[label_channel].uri},
      "resolution": RESOLUTION,
      "task": task_description(task),
      "splits": stats,
      "guard_bands": _jsonable(bands),
      "files": files,
      # One digest over every data file (all but this manifest): equal iff the exports are
      # byte-identical, so two manifests compare with one string.
      "content_sha256": manifest_lib.content_digest(files),
      "shard_bytes": sum(v["bytes"] for k, v in files.items() if ".array_record-" in k),
      "export": {
        "min_guard_slices": min_guard_slices,
        "limit_per_split": limit_per_split,
        "chunk_z": chunk_z,
        "cache_dir": os.path.abspath(cache_dir) if cache_dir else None,
        "companion_channels": {k: list(v) for k, v in (companion_channels or {}).items()},
        "cache": cache.stats.as_dict(),
        "seconds": round(seconds, 3),
        # Requests/retries/faults by kind of a network source (cumulative for this process).
        "fetch": _jsonable(source.fetch_stats()) if hasattr(source, "fetch_stats") else None,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      },
      "versions": manifest_lib.package_versions(),
    }
    manifest_lib.write_manifest(built, manifest)
    os.makedirs(os.path.dirname(version_dir), exist_ok=True)
    if os.path.exists(version_dir):  # only reached with overwrite=True
      os.replace(version_dir, os.path.join(staging, "replaced"))
    os.replace(built, version_dir)
  finally:
    bar.close()
    shutil.rmtree(staging, ignore_errors=True)
    root = os.path.join(out_dir, STAGING)
    with contextlib.suppress(OSError):
      os.rmdir(root)  # only if empty: another export may be staging
  sizes = ", ".join(
    f"{s} {st['num_examples']}"
    + (f" (-{st['excluded_unannotated']} unannotated)" if st["excluded_unannotated"] else "")
    for s, st in stats.items()
  )
  fetch = manifest["export"]["fetch"]
  retries = f"; {fetch['retries']} retried requests" if fetch else ""
  say(
    f"{task_name}: wrote {version_dir} [{sizes}] in {seconds:.1f}s; {cache.stats.line()}{retries}"
  )
  return manifest, True


def _original_user_error(e: BaseException) -> BaseException:
  """The first UserError in ``e``'s cause/context chain that TFDS did not prefix (or ``e``)."""
  seen, cur = set(), e
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    if isinstance(cur, UserError) and not str(cur).startswith("Failed"):
      return cur
    cur = cur.__cause__ or cur.__context__
  return e


# ---------------------------------------------------------------------------
# CLI.
def _resolve_tasks(arg: str) -> list[str]:
  names = (
    list(spec.TASKS) if arg.strip() == "all" else [t.strip() for t in arg.split(",") if t.strip()]
  )
  unknown = [t for t in names if t not in spec.TASKS]
  if unknown or not names:
    raise ExportError(
      f"unknown task(s) {', '.join(unknown) or repr(arg)}; use 'all' or a comma list of: "
      f"{', '.join(spec.TASKS)}"
    )
  return list(dict.fromkeys(names))  # a task named twice is exported once


def _cmd_export(args) -> int:
  tasks = _resolve_tasks(args.tasks)
  check_export_args(
    limit_per_split=args.limit_per_split,
    min_guard_slices=args.min_guard_slices,
    chunk_z=args.chunk_z,
  )
  for name, value in (("--out_dir", args.out_dir), ("--cache_dir", args.cache_dir)):
    if value is not None and not value.strip():
      raise ExportError(f"{name} is empty; give a folder or leave the option out for the default")
  source = make_source(args.source)
  # Every task's cheap checks before the first one writes anything.
  for name in tasks:
    prepare_task(
      source,
      name,
      limit_per_split=args.limit_per_split,
      min_guard_slices=args.min_guard_slices,
      chunk_z=args.chunk_z,
    )
  out_dir = args.out_dir or os.path.join("out", "data", source_tag(source))
  cache_dir = args.cache_dir or os.path.join(out_dir, DEFAULT_CACHE_SUBDIR)
  total = cache_lib.CacheStats()
  written = 0
  # Every chunk read also caches the channels the other requested tasks need from it.
  companions = companions_for(tasks) if len(tasks) > 1 else None
  for name in tasks:
    m, wrote = _export_task(
      source,
      name,
      out_dir,
      cache_dir=cache_dir,
      limit_per_split=args.limit_per_split,
      min_guard_slices=args.min_guard_slices,
      progress=not args.quiet,
      overwrite=args.overwrite,
      chunk_z=args.chunk_z,
      companion_channels=companions,
    )
    if wrote:
      written += 1
      for k, v in m["export"]["cache"].items():
        setattr(total, k, getattr(total, k) + v)
  print(
    f"done: {written} of {len(tasks)} task(s) written to {out_dir} "
    f"({len(tasks) - written} already up to date); {total.line()}"
  )
  return 0


def dataset_dirs(path: str) -> list[str]:
  """Version folders to check under ``path`` (an export root or one dataset folder).

  Version folders without a manifest are included (they are incomplete: reported, never
  skipped silently). DatasetError when ``path`` holds no dataset at all.
  """
  target = os.path.abspath(path)
  if not os.path.isdir(target):
    raise DatasetError(
      f"{target} is not a folder; pass an export root (the --out_dir of "
      "`mtneuro export`) or one dataset folder"
    )
  if (
    os.path.isfile(os.path.join(target, manifest_lib.MANIFEST_NAME))
    or os.path.isdir(os.path.join(target, builder_lib.VERSION))
    or os.path.isfile(os.path.join(target, "dataset_info.json"))
  ):
    return [manifest_lib.resolve_version_dir(target)]  # one dataset (complete or not)
  vdirs = manifest_lib.find_datasets(target)
  for name in sorted(os.listdir(target)):
    v = os.path.join(target, name, builder_lib.VERSION)
    if not name.startswith(".") and os.path.isdir(v) and v not in vdirs:
      vdirs.append(v)
  if not vdirs:
    raise DatasetError(
      f"no exported dataset under {target}; export with `mtneuro export --out_dir "
      f"{path}` or pass the folder that holds the task folders"
    )
  return sorted(vdirs)


def _cmd_verify(args) -> int:
  for vdir in dataset_dirs(args.path):
    verify_dataset(vdir)
    m = manifest_lib.load_manifest(vdir)
    nbytes = sum(f["bytes"] for f in m["files"].values())
    print(f"OK {vdir} ({len(m['files'])} files, {nbytes / 1e6:.1f} MB, SHA-256 match)")
  return 0


def summary_rows(out_dir: str, *, verify: bool = True) -> list[dict]:
  """One row per (task, split) of the datasets under ``out_dir`` (or of one dataset folder).

  ``verify``: check each dataset against its manifest first (DatasetError if it fails).
  """
  rows = []
  for vdir in dataset_dirs(out_dir):
    if verify:
      verify_dataset(vdir)
    m = manifest_lib.load_manifest(vdir)
    for split, st in m["splits"].items():
      rows.append(
        {
          "task": m["dataset"],
          "split": split,
          "examples": st["num_examples"],
          "candidates": st["candidates"],
          "excluded": st["excluded_unannotated"],
          "shard_mb": m["shard_bytes"] / 1e6,
          "limit": m["parameters"].get("limit_per_split"),
          "source": m.get("source_tag", ""),
        }
      )
  return rows


def _cmd_summary(args) -> int:
  rows = summary_rows(args.path, verify=not args.no_verify)
  lines = [
    f"{'task':<17} {'split':<6} {'examples':>8} {'candidates':>10} {'excluded':>8} "
    f"{'shards MB':>9}  limit"
  ]
  last = None
  for r in rows:
    mb = f"{r['shard_mb']:9.1f}" if r["task"] != last else " " * 9
    lines.append(
      f"{r['task']:<17} {r['split']:<6} {r['examples']:>8} {r['candidates']:>10} "
      f"{r['excluded']:>8} {mb}  {r['limit'] if r['limit'] is not None else '-'}"
    )
    last = r["task"]
  srcs = sorted({r["source"] for r in rows})
  lines.append(
    f"source: {', '.join(srcs)}"
    + (
      "  (SYNTHETIC phantom: not comparable to the paper)"
      if any(s.startswith("phantom") for s in srcs)
      else ""
    )
  )
  print("\n".join(lines))  # printed only once every dataset passed
  return 0


def build_parser(prog: str = "mtneuro export") -> ArgumentParser:
  p = ArgumentParser(
    prog=prog,
    description="Export MTNeuro tasks from a volume source to TFDS "
    "ArrayRecord datasets with manifests (byte-reproducible; see docs/data.md).",
  )
  p.add_argument(
    "--source",
    default="phantom",
    help="phantom[:seed=N] | local:/path[,scale=S] | bossdb[:host=..,protocol=..] "
    "(default: phantom)",
  )
  p.add_argument(
    "--tasks", default="all", help="'all' or a comma list of task names (default: all)"
  )
  p.add_argument(
    "--out_dir", default=None, help="export root (TFDS data_dir); default out/data/<source tag>"
  )
  p.add_argument(
    "--cache_dir", default=None, help=f"cutout cache; default <out_dir>/{DEFAULT_CACHE_SUBDIR}"
  )
  p.add_argument(
    "--limit_per_split",
    type=int,
    default=None,
    help="keep the first N candidates per region per split (tests, tiny runs)",
  )
  p.add_argument(
    "--min_guard_slices",
    type=int,
    default=spec.DEFAULT_MIN_GUARD_SLICES,
    help=f"refuse splits of one cube closer than this many slices "
    f"(default: {spec.DEFAULT_MIN_GUARD_SLICES})",
  )
  p.add_argument(
    "--chunk_z",
    type=int,
    default=DEFAULT_CHUNK_Z,
    help=f"slices per cached cutout (default: {DEFAULT_CHUNK_Z})",
  )
  p.add_argument("--overwrite", action="store_true", help="replace existing exports of these tasks")
  p.add_argument("--quiet", action="store_true", help="no progress bars or per-task lines")
  return p


def build_check_parser(command: str) -> ArgumentParser:
  """Parser of ``mtneuro verify`` / ``mtneuro summary``."""
  doc = {
    "verify": "Check every file of each dataset against the SHA-256 and size in its manifest "
    "(exit status 0 = all match).",
    "summary": "Split sizes, exclusions and shard MB of each dataset (each verified first).",
  }
  p = ArgumentParser(prog=f"mtneuro {command}", description=doc[command])
  p.add_argument(
    "path", help="export root (the --out_dir of `mtneuro export`) or one dataset folder"
  )
  if command == "summary":
    p.add_argument(
      "--no_verify",
      action="store_true",
      help="skip the SHA-256 check (sizes and split counts only from the manifests)",
    )
  return p


def run(argv: Sequence[str]) -> int:
  """The CLI without the error wrapper: raises UserError subclasses (``main`` prints them)."""
  argv = list(argv)
  if argv and argv[0] in ("verify", "summary"):
    args = build_check_parser(argv[0]).parse_args(argv[1:])
    return _cmd_verify(args) if argv[0] == "verify" else _cmd_summary(args)
  if argv and argv[0] == "export":
    argv = argv[1:]
  return _cmd_export(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0 ok, 2 a reported problem: one stderr line)."""
  return run_cli(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  sys.exit(main())
