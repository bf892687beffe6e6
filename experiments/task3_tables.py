"""Task 3 tables: semantic features of every quadrant, frozen Task 1 embeddings, linear readout R^2.

Usage:
  python -m experiments.task3_tables --preset quick --data_dir out/data/phantom-seed0 \
      --t1_dir out/task1_quick --out experiments/results/task3_quick
  (= mtneuro task3 ...; --methods byol,pca  --seeds 1  --components 2d  --no_umap to narrow)

Needs the ``task3`` export in ``--data_dir`` and, for the encoder rows, the Task 1 runs of
the same preset in ``--t1_dir`` (``mtneuro task1 --preset P --out T1``): the ROI-C1 training
runs ``<t1_dir>/runs/<method>/c12-ds<k>/seed<s>`` at the preset's Table 1 downsampling k
(an SSL encoder is ``<run>/pretrain``). Mixup: the p with the best mean validation
accuracy over the seeds (Task 1's rule). A missing run leaves its row "not run".

What it does (mtneuro_jax/readout):
1. Features per quadrant (features.py; defaults 3D face-connected components, border
   cells clipped, NaN where undefined) from the export's pixel labels; the same features of
   the shipped real expert masks (2D: its tiles are not neighbouring slices) per region.
2. Embeddings of the 5760 quadrants (embeddings.py): each encoder at the downsampling and
   normalisation it was trained with; PCA and NMF (256 components) of the quadrants.
3. Linear regression R^2 per feature (regression.py): the paper protocol (in-sample, all
   rows) and held out (grouped K-fold over contiguous z-blocks); mean ± sample sd over seeds.
4. UMAP PNGs per method (first seed) coloured by region and by each feature.

Presets:
* ``quick`` (CPU): the Task 1 quick encoders (4x, width 1/8, 64-d features), seeds 1 and
  100; PCA/NMF at 4x (32x32 quadrants, the encoders' input), one fit (NMF's nndsvda init is
  deterministic, PCA's randomized solver nearly so); NMF 50 iterations; UMAP on 1000
  random rows (200 epochs, 30 neighbours). Measured on 2 cores: see docs/task3.md.
* ``paper``: the Task 1 paper encoders (2x), the paper's five seeds, PCA/NMF at 2x (64x64
  quadrants, as the reference) for every seed, NMF 400 iterations, UMAP on all rows with
  the reference's 100 neighbours.
* ``tiny`` (tests): Task 1 tiny encoders, one seed, 8 components, small UMAP.

Resumable: features, embeddings and UMAP coordinates are cached in ``<out>/cache`` (keyed by
the export's digest and everything that defines them); a rerun only recomputes what changed.
Outputs in ``--out``: table3.{md,json}, umap_<method>.png, cache/.
Every table names its data source; phantom numbers are marked as never comparable to the
paper's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from experiments import paper_reference as paper
from experiments import tables
from mtneuro_jax.errors import ArgumentParser, UserError, run_cli

ENCODER_METHODS = ("supervised", "mixup", "byol", "myow", "myow_merged", "vicreg")
LINEAR_METHODS = ("pca", "nmf")
METHODS = ENCODER_METHODS + LINEAR_METHODS
LABELS = {**paper.METHOD_LABELS, "vicreg": "VICReg (not in the paper)"}


@dataclasses.dataclass(frozen=True)
class Preset:
  t1_preset: str  # the Task 1 preset whose encoders are read
  seeds: tuple[int, ...]  # encoder seeds
  linear_seeds: tuple[int, ...]  # PCA/NMF random_state values
  linear_downsample: int
  n_components: int
  nmf_max_iter: int
  block_size: int
  folds: int
  gap: int
  umap_points: int | None  # None = every row
  umap_neighbors: int
  umap_epochs: int | None  # None = umap's default
  description: str = ""


PRESETS = {
  "paper": Preset(
    "paper",
    paper.PAPER_SEEDS,
    paper.PAPER_SEEDS,
    2,
    256,
    400,
    36,
    5,
    8,
    None,
    100,
    None,
    "the paper's encoders (2x), five seeds, PCA/NMF 256 at 2x, UMAP on all rows",
  ),
  "quick": Preset(
    "quick",
    (1, 100),
    (1,),
    4,
    256,
    50,
    36,
    5,
    8,
    1000,
    30,
    200,
    "Task 1 quick encoders (4x, width 1/8), seeds 1 and 100; PCA/NMF 256 at 4x (one fit); "
    "UMAP on 1000 rows",
  ),
  "tiny": Preset("tiny", (1,), (1,), 4, 8, 50, 2, 3, 1, 64, 10, 50, "test preset (seconds)"),
}


# ---------------------------------------------------------------------------
# Where the encoders live (experiments/task1_tables.py's layout).
def t1_downsample(preset: Preset) -> int:
  from experiments import task1_tables

  return task1_tables.PRESETS[preset.t1_preset].table1_downsample


def run_dir(t1_dir: str, variant: str, downsample: int, seed: int) -> str:
  return os.path.join(t1_dir, "runs", variant, f"c12-ds{downsample}", f"seed{seed}")


def _finished(path: str) -> bool:
  from mtneuro_jax.readout import embeddings

  try:
    return os.path.exists(os.path.join(embeddings.encoder_workdir(path), "results.json"))
  except UserError:
    return False


def mixup_variant(t1_dir: str, downsample: int, seeds: Sequence[int]) -> tuple[str | None, dict]:
  """(the mixup variant folder with the best mean val accuracy over seeds, {p: mean})."""
  root = os.path.join(t1_dir, "runs")
  means = {}
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    if not name.startswith("mixup-p"):
      continue
    accs = []
    for s in seeds:
      path = os.path.join(run_dir(t1_dir, name, downsample, s), "results.json")
      if os.path.exists(path):
        with open(path) as f:
          acc = json.load(f).get("val/accuracy")
        if acc is not None:
          accs.append(float(acc))
    if accs:
      means[name] = sum(accs) / len(accs)
  if not means:
    return None, {}
  best = max(sorted(means, key=lambda n: float(n[len("mixup-p") :])), key=lambda n: means[n])
  return best, means


# ---------------------------------------------------------------------------
# Cache: npz files whose 'key' (a JSON string) must equal what would be computed.
def _key(obj: dict) -> str:
  return json.dumps(obj, sort_keys=True, default=str)


def _cache_path(out: str, name: str, key: str) -> str:
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  return os.path.join(out, "cache", f"{name}-{digest}.npz")


def _load_cached(path: str, key: str) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f["key"]) != key:
        return None
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, KeyError):
    return None  # a partial or foreign file: recompute


def _save_cached(path: str, key: str, **arrays) -> None:
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  ignore = os.path.join(folder, ".gitignore")
  if not os.path.exists(ignore):  # caches (MBs of embeddings) never belong in git
    with open(ignore, "w") as f:
      f.write("*\n")
  tmp = path + ".tmp.npz"
  np.savez(tmp, key=np.asarray(key), **arrays)
  os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written cache


# ---------------------------------------------------------------------------
def compute_features(rows, config, out: str) -> tuple[dict, bool]:
  from mtneuro_jax.readout import features as F

  key = _key({"what": "features", "data": rows.content_sha256, "n": len(rows), **config.as_dict()})
  path = _cache_path(out, "features", key)
  hit = _load_cached(path, key)
  if hit is not None:
    return {k: hit[k] for k in F.FEATURES}, True
  feats = F.rows_features(
    rows.labels, group=rows.group, z=rows.z, quadrant=rows.quadrant, config=config
  )
  _save_cached(path, key, **feats)
  return feats, False


def compute_embedding(method: str, seed: int, rows, preset: Preset, src: str | None, out: str):
  """(embedding [N, D], info, cached?) of one method and seed; ``src`` = the encoder's run dir."""
  from mtneuro_jax.readout import embeddings as E

  if method in LINEAR_METHODS:
    spec = {
      "method": method,
      "seed": seed,
      "n_components": preset.n_components,
      "downsample": preset.linear_downsample,
      "nmf_max_iter": preset.nmf_max_iter,
    }
  else:
    wd = E.encoder_workdir(src)
    spec = {"method": method, "workdir": os.path.abspath(wd), "steps": _checkpoint_steps(wd)}
  key = _key({"what": "embedding", "data": rows.content_sha256, "n": len(rows), **spec})
  path = _cache_path(out, f"emb-{method}-seed{seed}", key)
  hit = _load_cached(path, key)
  if hit is not None:
    return hit["z"], json.loads(str(hit["info"])), True
  if method in LINEAR_METHODS:
    z, info = E.linear_embeddings(
      rows.images,
      method,
      n_components=preset.n_components,
      seed=seed,
      downsample=preset.linear_downsample,
      nmf_max_iter=preset.nmf_max_iter,
    )
  else:
    z, info = E.encoder_embeddings(src, rows.images)
  _save_cached(path, key, z=z, info=np.asarray(json.dumps(info)))
  return z, info, False


def _checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def compute_umap(method, seed, z, rows, preset: Preset, emb_info: dict, out: str):
  from mtneuro_jax.readout import figures

  idx = figures.subsample(len(rows), preset.umap_points, seed=0)
  key = _key(
    {
      "what": "umap",
      "data": rows.content_sha256,
      "embedding": emb_info,
      "points": preset.umap_points,
      "neighbors": preset.umap_neighbors,
      "epochs": preset.umap_epochs,
    }
  )
  path = _cache_path(out, f"umap-{method}-seed{seed}", key)
  hit = _load_cached(path, key)
  if hit is not None:
    return hit["idx"], hit["coords"], True
  coords = figures.umap_2d(z[idx], n_neighbors=preset.umap_neighbors, n_epochs=preset.umap_epochs)
  _save_cached(path, key, idx=idx, coords=coords)
  return idx, coords, False


# ---------------------------------------------------------------------------
# Aggregation and tables.
def source_line(rows) -> tuple[str, str, bool]:
  """(header sentence, short label, comparable to the paper?) of the Task 3 rows' export."""
  src = rows.source_tag or rows.source.get("kind", "unknown source")
  info = {"source": src, "limit_per_split": rows.limit_per_split, "synthetic": rows.synthetic}
  return tables.source_line(info)


def table3_markdown(t: dict) -> str:
  from mtneuro_jax.readout.features import FEATURE_LABELS, FEATURE_UNITS, FEATURES
  from mtneuro_jax.readout.regression import HELD_OUT, IN_SAMPLE

  h = t["held_out_config"]
  fc = t["feature_config"]
  lines = [
    f"# Task 3 — Table 3: linear readout R² of semantic features (preset `{t['preset']}`)",
    "",
    t["source_note"],
    "",
    f"Rows: {t['n_rows']} quadrants (128×128) of the `task3` export. Encoders: Task 1 "
    f"`{t['t1_preset']}` runs trained on ROI-C1 at {t['encoder_downsample']}x "
    f"(`{t['t1_dir']}`), seeds {t['seeds']}; PCA/NMF: {t['n_components']} components at "
    f"{t['linear_downsample']}x, random_state {t['linear_seeds']}. Cells: mean ± sample sd "
    "over seeds. "
    f"Paper: {paper.PAPER_SOURCE}, ROI-C1 encoders, in-sample R² on all rows (no sd in our "
    "transcription).",
    "",
    f"* **{IN_SAMPLE}**: OLS fitted and scored on all rows, as the paper.",
    f"* **{HELD_OUT}**: grouped {h['folds']}-fold CV over contiguous z-blocks of "
    f"{h['block_size']} slices (block b in fold b mod {h['folds']}, all regions together), "
    f"training rows within {h['gap']} slices of a test slice dropped; R² pooled over the "
    "out-of-fold predictions.",
    f"* Features: {fc['components'].upper()} connected components ({fc['connectivity']} "
    f"connectivity), border cells `{fc['border']}`; rows where a feature is undefined "
    "(cell size with no cell, NN distance with < 2 cells) are left out of that feature's fit "
    "only (see `rows_used`).",
    "",
    "| method | R² | " + " | ".join(FEATURE_LABELS[k] for k in FEATURES) + " |",
    "|---|---|" + "---|" * len(FEATURES),
  ]
  for row in t["rows"]:
    c = row["cells"]
    lines.append(
      f"| {row['label']} | ours, {IN_SAMPLE} | "
      + " | ".join(tables.fmt(c[k]["in_sample"], single="fit") for k in FEATURES)
      + " |"
    )
    lines.append(
      f"| | ours, {HELD_OUT} | "
      + " | ".join(tables.fmt(c[k]["held_out"], single="fit") for k in FEATURES)
      + " |"
    )
    lines.append(
      "| | paper (in-sample) | "
      + " | ".join(paper.format_paper(c[k]["paper"]) for k in FEATURES)
      + " |"
    )
  lines += ["", f"Data: {t['data_label']}."]
  notes = [f"{r['label']}: {r['note']}" for r in t["rows"] if r.get("note")]
  if notes:
    lines += [""] + [f"* {n}" for n in notes]
  lines += [
    "",
    "## Features: per-region means",
    "",
    "Mean over the quadrants where the feature is defined. Phantom = the `task3` export "
    f"above ({fc['components'].upper()} components, and 2D for comparison); real = the "
    "expert masks shipped in `mtneuro_jax/volumes/real_masks` (16 tiles of 128×128 per "
    "region, xray-thc; 2D components since its tiles are not neighbouring slices). Units: "
    + "; ".join(f"{FEATURE_LABELS[k]} {FEATURE_UNITS[k]}" for k in FEATURES)
    + ".",
    "",
    "| region | source | " + " | ".join(FEATURE_LABELS[k] for k in FEATURES) + " | rows |",
    "|---|---|" + "---|" * len(FEATURES) + "---|",
  ]
  for region, by_src in t["feature_means"].items():
    for src, m in by_src.items():
      vals = [
        "—" if m.get(k) is None else (f"{m[k]:.4f}" if "density" in k else f"{m[k]:.2f}")
        for k in FEATURES
      ]
      lines.append(f"| {region} | {src} | " + " | ".join(vals) + f" | {m['n_rows']} |")
  lines += [
    "",
    "Rows where a feature is defined (phantom, default config): "
    + ", ".join(f"{FEATURE_LABELS[k]} {t['rows_defined'][k]}" for k in FEATURES)
    + f" of {t['n_rows']}.",
  ]
  if t.get("umap_pngs"):
    lines += ["", "## UMAP (first seed of each method; region and each feature)", ""]
    lines += [f"* {m}: [{os.path.basename(p)}]({os.path.basename(p)})" for m, p in t["umap_pngs"]]
  lines += ["", f"Timings (s): {json.dumps(t['timings_s'])}"]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
def main(argv=None) -> int:
  from mtneuro_jax.readout import features as F

  parser = ArgumentParser(
    prog="mtneuro task3",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
  parser.add_argument(
    "--data_dir", default="out/data/phantom-seed0", help="export root holding task3"
  )
  parser.add_argument(
    "--t1_dir",
    default=None,
    help="Task 1 output folder with the encoder runs (default out/task1_<preset>)",
  )
  parser.add_argument(
    "--out", default=None, help="output folder (default experiments/results/task3_<preset>)"
  )
  parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
  parser.add_argument("--seeds", default=None, help="comma-separated encoder seeds")
  parser.add_argument("--components", default="3d", choices=F.COMPONENTS)
  parser.add_argument("--connectivity", default="face", choices=F.CONNECTIVITY)
  parser.add_argument("--border", default="clip", choices=F.BORDER)
  parser.add_argument("--no_umap", action="store_true", help="skip the UMAP figures")
  args = parser.parse_args(argv)

  preset = PRESETS[args.preset]
  out = args.out or os.path.join("experiments", "results", f"task3_{args.preset}")
  t1_dir = args.t1_dir or os.path.join("out", f"task1_{args.preset}")
  methods = [m for m in args.methods.split(",") if m]
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    parser.error(f"unknown or no --methods {bad}; known: {','.join(METHODS)}")
  try:
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else preset.seeds
  except ValueError:
    parser.error(f"--seeds={args.seeds!r} must be comma-separated integers, e.g. 1,100")
  if not seeds:
    parser.error("--seeds is empty; give at least one seed, e.g. 1")
  if any(m in ENCODER_METHODS for m in methods) and not os.path.isdir(t1_dir):
    parser.error(
      f"--t1_dir {t1_dir} does not exist; run `mtneuro task1 --preset {preset.t1_preset} "
      f"--out {t1_dir}` first, or give --methods pca,nmf"
    )
  return run(args, preset, out, t1_dir, methods, seeds)


def run(args, preset: Preset, out: str, t1_dir: str, methods: list[str], seeds) -> int:
  """Computes (or loads from the cache) everything and writes table3.{md,json} + PNGs."""
  from tqdm import tqdm

  from mtneuro_jax.readout import features as F
  from mtneuro_jax.readout import figures, regression
  from mtneuro_jax.readout import rows as rows_lib
  from mtneuro_jax.readout.regression import HeldOutConfig

  fconfig = F.FeatureConfig(
    components=args.components, connectivity=args.connectivity, border=args.border
  )
  hconfig = HeldOutConfig(block_size=preset.block_size, folds=preset.folds, gap=preset.gap)
  timings: dict[str, Any] = {}
  t_all = time.time()
  os.makedirs(out, exist_ok=True)

  t0 = time.time()
  rows = rows_lib.load_rows(args.data_dir)
  header, data_label, comparable = source_line(rows)
  timings["load_rows"] = round(time.time() - t0, 1)
  print(
    f"[task3] preset {args.preset}; {len(rows)} quadrants from {data_label}; -> {out}", flush=True
  )

  t0 = time.time()
  feats, cached = compute_features(rows, fconfig, out)
  feats_2d = (
    feats
    if fconfig.components == "2d"
    else compute_features(rows, dataclasses.replace(fconfig, components="2d"), out)[0]
  )
  real = F.real_mask_features(fconfig)
  timings["features"] = round(time.time() - t0, 1)
  print(f"[task3] features {'(cached) ' if cached else ''}{timings['features']}s", flush=True)
  means: dict[str, dict] = {}
  phantom_name = "phantom" if rows.synthetic else "export"
  for name, fs in (
    (f"{phantom_name} ({fconfig.components.upper()})", feats),
    (f"{phantom_name} (2D)", feats_2d),
  ):
    for region, m in F.region_means(fs, rows.region).items():
      means.setdefault(region, {})[name] = m
  if fconfig.components == "2d":
    for region in means:
      means[region].pop(f"{phantom_name} (2D)", None)
  for region, fs in real.items():
    n = len(next(iter(fs.values())))
    m = F.region_means(fs, np.zeros(n, np.int64))["CTX"]  # one group: all tiles of the region
    means.setdefault(region, {})["real masks (2D)"] = m

  # Which embeddings: (method, seed, encoder run dir or None).
  downsample = t1_downsample(preset)
  jobs, notes = [], {}
  for m in methods:
    if m in LINEAR_METHODS:
      jobs += [(m, s, None) for s in preset.linear_seeds]
      continue
    variant = m
    if m == "mixup":
      variant, by_p = mixup_variant(t1_dir, downsample, seeds)
      if variant is None:
        notes[m] = "not run (no mixup run in --t1_dir)"
        continue
      if len(by_p) > 1:
        notes[m] = f"{variant} (best mean val accuracy of {', '.join(sorted(by_p))})"
    found = [s for s in seeds if _finished(run_dir(t1_dir, variant, downsample, s))]
    if not found:
      notes[m] = f"not run (no finished {variant} run at {downsample}x in --t1_dir)"
    elif len(found) < len(seeds):
      notes[m] = f"seeds {found} only (others not run)"
    jobs += [(m, s, run_dir(t1_dir, variant, downsample, s)) for s in found]

  t0 = time.time()
  results: dict[tuple[str, int], dict] = {}
  infos: dict[tuple[str, int], dict] = {}
  embs: dict[tuple[str, int], np.ndarray] = {}
  for m, s, src in tqdm(jobs, desc="[task3] embeddings + readout", unit="emb", file=sys.stderr):
    z, info, _ = compute_embedding(m, s, rows, preset, src, out)
    infos[(m, s)] = info
    results[(m, s)] = regression.readout(z, feats, z=rows.z, group=rows.group, config=hconfig)
    if not args.no_umap and s == (preset.linear_seeds if m in LINEAR_METHODS else seeds)[0]:
      embs[(m, s)] = z
  timings["embeddings_and_readout"] = round(time.time() - t0, 1)

  pngs = []
  if not args.no_umap and embs:
    t0 = time.time()
    for (m, s), z in tqdm(embs.items(), desc="[task3] UMAP", unit="fig", file=sys.stderr):
      idx, coords, _ = compute_umap(m, s, z, rows, preset, infos[(m, s)], out)
      path = figures.save_umap_png(
        os.path.join(out, f"umap_{m}.png"),
        coords,
        rows.region[idx],
        {k: v[idx] for k, v in feats.items()},
        title=f"{LABELS[m]} (seed {s}) — UMAP of {len(idx)} of {len(rows)} quadrants — "
        f"{data_label}",
      )
      pngs.append((m, path))
    timings["umap"] = round(time.time() - t0, 1)

  table_rows = []
  for m in methods:
    keys = [k for k in results if k[0] == m]
    cells = {}
    for k in F.FEATURES:
      ins = tables.mean_sd([results[key][k]["in_sample"] for key in keys])
      ho = tables.mean_sd([results[key][k]["held_out"] for key in keys])
      for c, proto in ((ins, "in_sample"), (ho, "held_out")):
        c["by_seed"] = {str(key[1]): results[key][k][proto] for key in keys}
        if not keys:
          c["note"] = "not run"
      cells[k] = {
        "in_sample": ins,
        "held_out": ho,
        "held_out_folds": {str(key[1]): results[key][k]["held_out_folds"] for key in keys},
        "rows_used": {str(key[1]): results[key][k]["n_rows"] for key in keys},
        "paper": paper.TABLE3.get(m, {}).get(k),
      }
    row = {
      "method": m,
      "label": LABELS[m],
      "data_source": data_label,
      "comparable": comparable,
      "cells": cells,
      "embeddings": {str(key[1]): infos[key] for key in keys},
    }
    if m in notes:
      row["note"] = notes[m]
    table_rows.append(row)
  timings["total"] = round(time.time() - t_all, 1)
  table = {
    "table": "Table 3",
    "preset": args.preset,
    "preset_description": preset.description,
    "t1_preset": preset.t1_preset,
    "t1_dir": t1_dir,
    "encoder_downsample": downsample,
    "seeds": list(seeds),
    "linear_seeds": list(preset.linear_seeds),
    "linear_downsample": preset.linear_downsample,
    "n_components": preset.n_components,
    "n_rows": len(rows),
    "data_source": rows.source_tag,
    "data_label": data_label,
    "synthetic": rows.synthetic,
    "comparable_to_paper": comparable,
    "source_note": header,
    "paper_source": paper.PAPER_SOURCE,
    "metric": "R² of OLS per feature; mean ± sample sd over seeds",
    "feature_config": fconfig.as_dict(),
    "held_out_config": dataclasses.asdict(hconfig),
    "rows_defined": {k: int(np.sum(~np.isnan(feats[k]))) for k in F.FEATURES},
    "feature_means": means,
    "rows": table_rows,
    "umap_pngs": pngs,
    "timings_s": timings,
  }
  md = table3_markdown(table)
  with open(os.path.join(out, "table3.json"), "w") as f:
    json.dump(_jsonable(table), f, indent=1, allow_nan=False)
  with open(os.path.join(out, "table3.md"), "w") as f:
    f.write(md)
  print(md, flush=True)
  print(f"[task3] done in {timings['total']:.0f}s; tables in {out}", flush=True)
  return 0


def _jsonable(o):
  """Plain JSON: numpy scalars and arrays to Python, NaN / inf to None (strict JSON)."""
  if isinstance(o, dict):
    return {str(k): _jsonable(v) for k, v in o.items()}
  if isinstance(o, (list, tuple)):
    return [_jsonable(v) for v in o]
  if isinstance(o, np.ndarray):
    return _jsonable(o.tolist())
  if isinstance(o, (np.floating, np.integer)):
    o = o.item()
  if isinstance(o, float) and not np.isfinite(o):
    return None
  return o


if __name__ == "__main__":
  sys.exit(run_cli(main, sys.argv[1:]))
