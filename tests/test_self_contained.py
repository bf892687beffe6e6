"""The repository stands on its own, and its layers import only downwards.

* No project file points outside the repository (a folder next to it, or a path of one machine).
* The real expert masks ship inside the package, load without configuration and are SHA-256 checked.
* The import graph, read statically with ``ast`` (imports inside functions count too), obeys the
  layer rules in ``RULES`` and has no cycles, between packages or between modules.
"""

from __future__ import annotations

import ast
import collections
import fnmatch
import hashlib
import os
import re
import shutil

import numpy as np
import pytest

from mtneuro_jax.errors import UserError
from mtneuro_jax.volumes import morphology, spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_PACKAGES = ("mtneuro_jax", "data_prep", "experiments", "configs")

# ---------------------------------------------------------------------------
# Layer rules. A rule applies to every module whose name is the importer or starts with it + ".".
# "only":  every project import must fall under one of the targets (its own package included).
# "never": no import may fall under any of the targets.
# SUBPACKAGES stands for every subpackage of mtneuro_jax (folders with __init__.py).
SUBPACKAGES = "<every mtneuro_jax subpackage>"
L = "mtneuro_jax."
RULES = (
  # (importer, kind, targets, why)
  ("mtneuro_jax", "never", ("data_prep", "experiments", "configs"), "the library knows no drivers"),
  ("data_prep", "never", ("experiments", "configs"), "export sits below the drivers"),
  (L + "volumes", "only", (L + "volumes", L + "errors"), "voxels come first"),
  (
    L + "data",
    "only",
    (L + "volumes", L + "data", L + "sharding", L + "errors"),
    "data sits on volumes",
  ),
  (
    L + "models",
    "only",
    (L + "models", L + "errors", L + "registry"),
    "models know no loss, data or loop",
  ),
  (
    L + "objectives",
    "only",
    (L + "objectives", L + "models", L + "data.augment", L + "errors", L + "registry"),
    "objectives know no I/O, loop or evaluator (on-device views are pure JAX)",
  ),
  (
    L + "eval",
    "never",
    (L + "train", L + "objectives", L + "baselines", L + "readout"),
    "evaluators get a predict_fn",
  ),
  (
    L + "train",
    "never",
    (L + "baselines", L + "readout", L + "deploy"),
    "the loop knows no baseline",
  ),
  # deploy (inference) sits above train, beside eval: it may use train (checkpoints), models, data.
  (
    L + "deploy",
    "never",
    (L + "baselines", L + "readout", L + "objectives"),
    "deployment runs models, it trains nothing",
  ),
  # readout (Task 3) sits at the baselines layer: it may use train, models, data, eval, baselines.
  (L + "baselines", "never", (L + "readout",), "baselines and readout are siblings"),
  (L + "sharding", "never", (SUBPACKAGES,), "top-level helpers are leaves"),
  (L + "errors", "never", (SUBPACKAGES,), "top-level helpers are leaves"),
  (L + "registry", "never", (SUBPACKAGES,), "top-level helpers are leaves"),
  (L + "configlib", "never", (SUBPACKAGES,), "top-level helpers are leaves"),
)

# Text files that must not point outside the repository.
SCAN_PATHS = (
  "mtneuro_jax",
  "data_prep",
  "experiments",
  "configs",
  "docs",
  "scripts",
  "README.md",
  "pyproject.toml",
)
SCAN_SUFFIXES = (".py", ".md", ".json", ".toml", ".txt", ".sh")
FORBIDDEN = ("shared/", "/work/")


def _under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


# ---------------------------------------------------------------------------
# Self-contained: no path outside the repository.
def _scanned_files() -> list[str]:
  out = []
  for p in SCAN_PATHS:
    full = os.path.join(ROOT, p)
    if os.path.isfile(full):
      out.append(full)
    for dirpath, dirnames, filenames in os.walk(full):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      out += [os.path.join(dirpath, f) for f in filenames if f.endswith(SCAN_SUFFIXES)]
  return sorted(out)


def test_no_path_outside_the_repository():
  files = _scanned_files()
  assert any(f.endswith("morphology.py") for f in files)  # the walk really saw the tree
  bad = []
  for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
      for i, line in enumerate(f, 1):
        for pat in FORBIDDEN:
          if pat in line:
            bad.append(f"{os.path.relpath(path, ROOT)}:{i}: contains {pat!r}: {line.strip()[:120]}")
  assert not bad, "paths outside the repository (a user's clone does not have them):\n" + "\n".join(
    bad
  )


# ---------------------------------------------------------------------------
# The shipped real masks.
MASKS_DIR = os.path.join(ROOT, "mtneuro_jax", "volumes", "real_masks")


def test_shipped_masks_load_without_configuration(monkeypatch):
  monkeypatch.delenv(morphology.REAL_MASKS_ENV, raising=False)
  assert "shipped" in morphology.real_masks_source()
  for region in spec.REGIONS:
    m = morphology.load_real_masks(region)
    assert m.shape == (16, 128, 128) and m.dtype == np.uint8, region
    assert set(np.unique(m).tolist()) <= {0, 1, 2, 3}, region
  # BossDB ids after the remap: the CTX and ZI masks carry no axons (BossDB id 3), VP is axon-dense.
  assert not (morphology.load_real_masks("CTX") == 3).any()
  assert not (morphology.load_real_masks("ZI") == 3).any()
  assert (morphology.load_real_masks("VP") == 3).mean() > 0.4
  with np.load(os.path.join(MASKS_DIR, "masks_str.npz")) as f:  # the file's own convention
    assert (
      list(f.keys()) == ["masks"]
      and f["masks"].shape == (16, 128, 128)
      and f["masks"].dtype == np.uint8
    )


def test_pinned_digests_match_files_and_readme():
  names = set(spec.XRAY_THC_REGION_FILES.values())
  assert set(morphology.REAL_MASKS_SHA256) == names
  with open(os.path.join(MASKS_DIR, "README.md")) as f:
    readme = f.read()
  for name in names:
    with open(os.path.join(MASKS_DIR, name), "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == morphology.REAL_MASKS_SHA256[name], name
    row = rf"`{re.escape(name)}` \| \d+ \| `{digest}`"
    assert re.search(row, readme), f"the README lists another digest for {name}"


def test_corrupted_override_fails_with_sha256_error(tmp_path, monkeypatch):
  for name in spec.XRAY_THC_REGION_FILES.values():
    shutil.copy(os.path.join(MASKS_DIR, name), tmp_path / name)
  monkeypatch.setenv(morphology.REAL_MASKS_ENV, str(tmp_path))
  assert str(tmp_path) in morphology.real_masks_source()
  assert morphology.load_real_masks("STR").shape == (16, 128, 128)  # an intact override is used
  data = bytearray((tmp_path / "masks_str.npz").read_bytes())
  data[len(data) // 2] ^= 0xFF
  (tmp_path / "masks_str.npz").write_bytes(bytes(data))
  with pytest.raises(UserError, match=r"masks_str\.npz has SHA-256 [0-9a-f]{64}, expected"):
    morphology.load_real_masks("STR")
  assert morphology.load_real_masks("CTX").shape == (16, 128, 128)  # only the bad file fails
  monkeypatch.delenv(morphology.REAL_MASKS_ENV)
  with pytest.raises(UserError, match=r"masks_str\.npz has SHA-256"):  # the explicit argument too
    morphology.load_real_masks("STR", masks_dir=str(tmp_path))
  with pytest.raises(UserError, match=r"masks_zi\.npz cannot be read"):
    morphology.load_real_masks("ZI", masks_dir=str(tmp_path / "missing"))


def test_real_data_folders_are_package_data():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
  for package, folder in (
    ("mtneuro_jax.volumes", "real_masks"),
    ("experiments", "reference_images"),
  ):
    pkg_dir = os.path.join(ROOT, *package.split("."))
    files = os.listdir(os.path.join(pkg_dir, folder))
    assert "README.md" in files, folder
    for name in files:
      rel = f"{folder}/{name}"
      assert any(fnmatch.fnmatch(rel, g) for g in package_data.get(package, ())), (
        f"{rel} is not package data"
      )


# ---------------------------------------------------------------------------
# The import graph.
Edge = collections.namedtuple("Edge", "src dst path line text")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
  if rel[-1] == "__init__":
    rel = rel[:-1]
  return ".".join(rel)


def _project_modules() -> dict[str, str]:
  """{module name: file path} of every .py file of the project packages."""
  out = {}
  for pkg in PROJECT_PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      for f in filenames:
        if f.endswith(".py"):
          out[_module_name(os.path.join(dirpath, f))] = os.path.join(dirpath, f)
  return out


def _resolve(name: str, modules) -> str | None:
  """The longest project module that ``name`` is or lies under; None outside the project."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in modules:
      return ".".join(parts[:n])
  return None


def _edges(modules: dict[str, str], root: str = ROOT) -> list[Edge]:
  edges = []
  for mod, path in sorted(modules.items()):
    is_pkg = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    rel_path = os.path.relpath(path, root)
    for node in ast.walk(tree):  # every import, at module level or inside a function
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importing module's package, up level - 1
          pkg = mod if is_pkg else mod.rpartition(".")[0]
          pkg = ".".join(pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)])
          base = f"{pkg}.{base}" if base else pkg
        # ``from a.b import c``: c may be a module (a.b.c) or a name defined in a.b.
        targets = [
          f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
        ]
      for t in targets:
        dst = _resolve(t, modules)
        if dst is not None and dst != mod:
          edges.append(Edge(mod, dst, rel_path, node.lineno, ast.unparse(node)))
  return edges


@pytest.fixture(scope="module")
def graph():
  modules = _project_modules()
  assert "mtneuro_jax.volumes.spec" in modules and "experiments.cli" in modules
  return modules, _edges(modules)


def _subpackages() -> tuple[str, ...]:
  lib = os.path.join(ROOT, "mtneuro_jax")
  return tuple(
    f"mtneuro_jax.{d}"
    for d in sorted(os.listdir(lib))
    if os.path.isfile(os.path.join(lib, d, "__init__.py"))
  )


def _package_of(module: str) -> str:
  """Node of the package graph: mtneuro_jax.<subpackage or helper module>, or the top-level package."""
  parts = module.split(".")
  return ".".join(parts[:2]) if parts[0] == "mtneuro_jax" and len(parts) > 1 else parts[0]


def test_layer_rules(graph):
  _, edges = graph
  subpackages = _subpackages()
  assert {"mtneuro_jax.volumes", "mtneuro_jax.data", "mtneuro_jax.train"} <= set(subpackages)
  bad = []
  for importer, kind, targets, why in RULES:
    targets = tuple(t for tt in targets for t in (subpackages if tt == SUBPACKAGES else (tt,)))
    for e in edges:
      if not _under(e.src, importer):
        continue
      hit = any(_under(e.dst, t) for t in targets)
      if (kind == "never" and hit) or (kind == "only" and not hit):
        allowed = "may import only" if kind == "only" else "may not import"
        bad.append(
          f"{e.path}:{e.line}: `{e.text}` ({e.dst}): {importer} {allowed} "
          f"{', '.join(targets)} ({why})"
        )
  assert not bad, "layer rule violations:\n" + "\n".join(bad)


def _cycles(nodes, adj) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(adj.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(nodes):
    if v not in index:
      visit(v)
  return out


def _check_acyclic(nodes, edges, node_of, what: str) -> None:
  adj = collections.defaultdict(set)
  for e in edges:
    a, b = node_of(e.src), node_of(e.dst)
    if a != b:
      adj[a].add(b)
  msgs = []
  for comp in _cycles(nodes, adj):
    inside = [
      e
      for e in edges
      if node_of(e.src) in comp and node_of(e.dst) in comp and node_of(e.src) != node_of(e.dst)
    ]
    msgs.append(
      f"cycle between {', '.join(comp)}:\n"
      + "\n".join(
        f"  {e.path}:{e.line}: `{e.text}` ({node_of(e.src)} -> {node_of(e.dst)})" for e in inside
      )
    )
  assert not msgs, f"{what} import cycles:\n" + "\n".join(msgs)


def test_no_package_cycles(graph):
  modules, edges = graph
  _check_acyclic({_package_of(m) for m in modules}, edges, _package_of, "package-level")


def test_no_module_cycles(graph):
  modules, edges = graph
  _check_acyclic(set(modules), edges, lambda m: m, "module-level")


def test_graph_reader_sees_lazy_and_relative_imports(tmp_path):
  """The ast reader itself: a lazy import inside a function and a relative import are edges."""
  modules = {
    "mtneuro_jax.volumes.a": str(tmp_path / "a.py"),
    "mtneuro_jax.volumes.b": str(tmp_path / "b.py"),
    "mtneuro_jax.train": str(tmp_path / "__init__.py"),
  }
  (tmp_path / "a.py").write_text("def f():\n  from mtneuro_jax import train\n  return train\n")
  (tmp_path / "b.py").write_text("from . import a\nimport numpy\n")
  (tmp_path / "__init__.py").write_text("")
  got = {(e.src, e.dst, e.line) for e in _edges(modules, str(tmp_path))}
  assert got == {
    ("mtneuro_jax.volumes.a", "mtneuro_jax.train", 2),
    ("mtneuro_jax.volumes.b", "mtneuro_jax.volumes.a", 1),
  }
