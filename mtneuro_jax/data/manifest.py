"""Export manifests: what a dataset is, where it came from, and the SHA-256 of every file.

A dataset ``<out_dir>/<task>/1.0.0/`` is complete iff its ``manifest.json`` exists,
says ``complete: true`` and every file it lists has the recorded size and SHA-256.
``verify_dataset`` checks exactly that and raises ``DatasetError`` otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import tempfile
import zlib

from mtneuro_jax.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mtneuro-jax-export/1"
VERSION = "1.0.0"
# "all" is a reserved split name in TFDS (it means "every split"), so Task 3's
# single split is stored as "full". Readers accept either name.
TFDS_SPLIT_NAMES = {"all": "full"}
_SHARD_RE = re.compile(r"\.array_record-\d{5}-of-\d{5}$")


class DatasetError(UserError, ValueError):
  """A dataset on disk is missing, incomplete, corrupted or does not match its manifest.

  A ``UserError`` (the CLIs print it as one line); still a ``ValueError`` for older callers.
  """


def tfds_split(split: str) -> str:
  """The TFDS split name that stores spec split ``split``."""
  return TFDS_SPLIT_NAMES.get(split, split)


def sha256_file(path: str, bufsize: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      block = f.read(bufsize)
      if not block:
        break
      h.update(block)
  return h.hexdigest()


def file_entries(version_dir: str) -> dict[str, dict]:
  """``{name: {"bytes", "sha256"}}`` for every regular file of a version folder except the manifest."""
  out = {}
  for name in sorted(os.listdir(version_dir)):
    path = os.path.join(version_dir, name)
    if name == MANIFEST_NAME or not os.path.isfile(path):
      continue
    out[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
  return out


def content_digest(files: dict[str, dict]) -> str:
  """SHA-256 over the sorted ``name sha256`` lines of ``files`` (a manifest's ``files``).

  Two exports have the same digest iff every data file (shards, dataset_info.json,
  features.json) is byte-identical.
  """
  lines = "".join(f"{name} {files[name]['sha256']}\n" for name in sorted(files))
  return hashlib.sha256(lines.encode()).hexdigest()


def package_versions() -> dict[str, str]:
  """Versions of what shaped the bytes on disk (jax is not involved in export).

  The shard bytes depend on: numpy, tensorflow-datasets (record encoding, order, shard
  count), protobuf (record serialization), array-record (its bundled zstd) and the zlib
  library Python links against (``tfds.features.Tensor`` encoding).
  """
  out = {"python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION}
  for dist in (
    "numpy",
    "tensorflow-datasets",
    "protobuf",
    "array-record",
    "intern",
    "grain",
    "mtneuro-jax",
  ):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = "not installed"
  return out


def write_manifest(version_dir: str, manifest: dict) -> str:
  """Writes ``manifest.json`` atomically (temporary file + os.replace); returns its path."""
  path = os.path.join(version_dir, MANIFEST_NAME)
  fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json", dir=version_dir)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=False)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def resolve_version_dir(path: str) -> str:
  """``path`` may be a version folder (``.../task/1.0.0``) or a dataset folder (``.../task``)."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
    return path
  versioned = os.path.join(path, VERSION)
  if os.path.isdir(versioned):
    return versioned
  return path


def load_manifest(path: str) -> dict:
  """Reads the manifest of a dataset (version or dataset folder); DatasetError if absent/unreadable."""
  vdir = resolve_version_dir(path)
  mpath = os.path.join(vdir, MANIFEST_NAME)
  if not os.path.isdir(vdir):
    raise DatasetError(f"no dataset at {vdir}; export it with `mtneuro export`")
  if not os.path.isfile(mpath):
    raise DatasetError(
      f"{vdir} has no {MANIFEST_NAME}, so it is not a complete export; "
      "re-run `mtneuro export ... --overwrite`"
    )
  try:
    with open(mpath) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DatasetError(
      f"{mpath} is unreadable ({e}); re-run `mtneuro export ... --overwrite`"
    ) from None
  if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
    raise DatasetError(
      f"{mpath} is not an mtneuro-jax manifest (format "
      f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
      f"expected {MANIFEST_FORMAT!r}); re-export with --overwrite"
    )
  return manifest


def _split_lengths_from_info(vdir: str) -> dict[str, int]:
  with open(os.path.join(vdir, "dataset_info.json")) as f:
    info = json.load(f)
  return {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info.get("splits", [])}


def verify_dataset(path: str, *, check_hashes: bool = True) -> None:
  """Raises DatasetError unless the dataset at ``path`` matches its manifest byte for byte.

  Checks: manifest present and ``complete``; every listed file present with its
  size (truncation) and SHA-256 (corruption); no unlisted shard; the split sizes in
  TFDS's ``dataset_info.json`` equal the manifest's.
  """
  vdir = resolve_version_dir(path)
  manifest = load_manifest(vdir)
  fix = "re-run `mtneuro export ... --overwrite` for this task"
  if manifest.get("complete") is not True:
    raise DatasetError(f"{vdir}: manifest is not marked complete; {fix}")
  files = manifest.get("files") or {}
  if not any(_SHARD_RE.search(n) for n in files):
    raise DatasetError(f"{vdir}: manifest lists no array_record shard; {fix}")
  for name, entry in files.items():
    fpath = os.path.join(vdir, name)
    if not os.path.isfile(fpath):
      raise DatasetError(f"{fpath} is missing (listed in the manifest); {fix}")
    size = os.path.getsize(fpath)
    if size != entry["bytes"]:
      raise DatasetError(
        f"{fpath} has {size} bytes, the manifest says {entry['bytes']} "
        f"(truncated or replaced); {fix}"
      )
    if check_hashes and sha256_file(fpath) != entry["sha256"]:
      raise DatasetError(f"{fpath} fails its SHA-256 check (corrupted or modified); {fix}")
  digest = manifest.get("content_sha256")
  if digest is not None and digest != content_digest(files):
    raise DatasetError(
      f"{vdir}: manifest content_sha256 does not match its file list (manifest edited); {fix}"
    )
  for name in os.listdir(vdir):
    if _SHARD_RE.search(name) and name not in files:
      raise DatasetError(f"{os.path.join(vdir, name)} is a shard the manifest does not list; {fix}")
  try:
    lengths = _split_lengths_from_info(vdir)
  except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise DatasetError(f"{vdir}/dataset_info.json is unreadable ({e}); {fix}") from None
  for split, info in (manifest.get("splits") or {}).items():
    tfds_split = info.get("tfds_split", split)
    if lengths.get(tfds_split) != info.get("num_examples"):
      raise DatasetError(
        f"{vdir}: split {split!r} has {lengths.get(tfds_split)} examples in "
        f"dataset_info.json but {info.get('num_examples')} in the manifest; {fix}"
      )


def find_datasets(out_dir: str) -> list[str]:
  """Version folders of the datasets under an export root (those with a manifest), sorted."""
  out = []
  if not os.path.isdir(out_dir):
    return out
  for name in sorted(os.listdir(out_dir)):
    vdir = os.path.join(out_dir, name, VERSION)
    if not name.startswith(".") and os.path.isfile(os.path.join(vdir, MANIFEST_NAME)):
      out.append(vdir)
  return out
