"""Task 2 tables: models x settings, an lr x batch grid chosen on val, then seeds -> Table 2 + overlays.

Usage:
  python -m experiments.task2_tables --preset quick --data_dir out/data/phantom-seed0 \
      --out experiments/results/task2_quick
  python -m experiments.task2_tables --preset paper --data_dir out/data/bossdb --out out/task2_paper
  (--models unet2d,unet3d  --settings 3class  --seeds 1,100  --dry_run  to narrow or list the runs;
   also `mtneuro task2 ...`)

Needs the exports task2_{2d,3d}_{3class,4class} of the models and settings asked for in
``--data_dir`` (``mtneuro export --source phantom --tasks all --out_dir DIR``).

Protocol (the paper's): for each model and setting, one run per point of the lr x batch
grid (seed ``grid_seed``), scored on the validation split by the mean IoU over the
foreground classes with the dataset reduction (``val/iou_dataset/mean_fg``: tp/fp/fn summed
over the split; background left out because it dominates the pixels); the best point
(ties -> the earlier grid point) is then trained with every seed of the preset (the grid's
run at that point is the first seed's run, not repeated) and scored on the test split.
Cells are mean ± sample sd over seeds with a 95% percentile bootstrap interval of the mean.
Training: configs/task2_segmentation.py (Adam, per-pixel CE, paired flips/rot90/z-flip).

Presets:
* ``paper`` (for accelerators): full resolution, 20 epochs, the full grid lr {0.1, 0.05, 0.01,
  0.005, 0.001} x batch {2, 4, 6, 8, 10}, every model, both settings, seeds 1, 100, 350, 631,
  872; one device per run (the grid's batches of 2 and 6 do not split over 8 devices).
* ``quick`` (the README main job; CPU): 2D U-Net, 3-class, a FIXED point (no grid: Adam lr
  QUICK_LR, batch 8) at ``configlib.TASK2_QUICK`` (64x64 tiles, width 1/4,
  TASK2_QUICK_STEPS steps), seeds 1, 100, 350.
* ``zoo`` (CPU, a broader committed table): every model x both settings at the quick size
  and the quick point, seed 1 only (no sd).
* ``tiny`` (tests, seconds): 2D and 3D U-Net, 3-class, at ``:tiny``, a 2-point lr grid, seed 1.

Every table has a majority-class row per test set: every pixel gets the class most frequent in
the training masks, scored with the same metrics on the same test split.

Resumable: a run whose workdir holds results.json is not rerun, a run that diverged (non-finite
loss, recorded in failed.json) is not retried, and a run interrupted mid-way resumes from its
last checkpoint. Overlays and majority rows are cached likewise.

Outputs in ``--out``: table2.{md,json}, overlay_<model>_<setting>.png (image | truth |
prediction of the first test image with the most classes present, from the first seed's run at
the chosen point; 3D models show a few z-slices). Run workdirs (checkpoints, logs) go to
``--runs`` (default out/task2_runs/<data_dir name>/<size>/, outside the committed results and
ignored by git), as <model>/<setting>/lr<lr>-b<batch>/seed<s>/; presets of one size share them
(``zoo`` reuses ``quick``'s seed-1 run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from typing import Sequence

import numpy as np

from experiments import paper_reference as paper
from experiments.tables import (
  bootstrap_ci,
  ci_text,
  exports_info,
  fmt,
  machine_info,
  machine_line,
  mean_sd,
  parse_seeds,
  select_words,
  set_dotted,
  source_line,
)
from mtneuro_jax import configlib
from mtneuro_jax.errors import ArgumentParser, UserError, run_cli
from mtneuro_jax.volumes import spec

MODELS = tuple(paper.TASK2_MODEL_LABELS)
DIMS = {"unet3d": 3, "vnet_light": 3, "highresnet": 3}  # every other model is 2D
SETTINGS = paper.TASK2_SETTINGS
SELECT_METRIC = "val/iou_dataset/mean_fg"
# Table columns: (key, result metric, header). F1 and IoU are the paper's "avg" (over all
# classes, background included); the foreground IoU is what the grid selects on.
COLUMNS = (
  ("f1", "f1_dataset/mean", "F1"),
  ("iou", "iou_dataset/mean", "IoU"),
  ("iou_fg", "iou_dataset/mean_fg", "fg IoU"),
)
FAILED_FILE = "failed.json"
# The quick point: Adam lr 0.01 at batch 8 had the best val fg IoU of lr {0.01, 0.005, 0.001}
# (0.539 / 0.518 / 0.413, seed 1, phantom-seed0; docs/task2.md), so quick runs no grid.
QUICK_LR = 0.01
_Q = configlib.TASK2_QUICK


@dataclasses.dataclass(frozen=True)
class Preset:
  size: str  # configs/task2_segmentation.py size word; '' = full size (the paper)
  models: tuple[str, ...]
  settings: tuple[str, ...]
  lr_grid: tuple[float, ...]
  batch_grid: tuple[int, ...]
  seeds: tuple[int, ...]
  grid_seed: int = 1
  overrides: tuple[tuple[str, object], ...] = ()  # dotted config key -> value
  description: str = ""

  @property
  def grid(self) -> list[tuple[float, int]]:
    return [(lr, b) for lr in self.lr_grid for b in self.batch_grid]


_QUICK_DESC = (
  f"CPU: {_Q.downsample}x ({256 // _Q.downsample}x{256 // _Q.downsample} tiles), width 1/"
  f"{round(1 / _Q.width_multiplier)}, {_Q.total_steps} steps, fixed lr {QUICK_LR} x batch "
  f"{_Q.batch_size} (no grid)"
)
PRESETS = {
  "paper": Preset(
    "",
    MODELS,
    SETTINGS,
    paper.TASK2_LR_GRID,
    paper.TASK2_BATCH_GRID,
    paper.PAPER_SEEDS,
    overrides=(("num_epochs", float(paper.TASK2_EPOCHS)), ("num_devices", 1)),
    description="the paper's protocol (accelerator): full resolution, 20 epochs, full grid",
  ),
  "quick": Preset(
    "quick",
    ("unet2d",),
    ("3class",),
    (QUICK_LR,),
    (_Q.batch_size,),
    (1, 100, 350),
    description=_QUICK_DESC,
  ),
  "zoo": Preset(
    "quick",
    MODELS,
    SETTINGS,
    (QUICK_LR,),
    (_Q.batch_size,),
    (1,),
    description=_QUICK_DESC + ", one seed (no sd)",
  ),
  "tiny": Preset(
    "tiny",
    ("unet2d", "unet3d"),
    ("3class",),
    (0.01, 0.001),
    (8,),
    (1,),
    description="test preset (seconds)",
  ),
}


@dataclasses.dataclass(frozen=True)
class Run:
  model: str
  setting: str
  lr: float
  batch: int
  seed: int

  def workdir(self, runs_dir: str) -> str:
    point = f"lr{self.lr:g}-b{self.batch}"
    return os.path.join(runs_dir, self.model, self.setting, point, f"seed{self.seed}")

  def label(self) -> str:
    return f"{self.model} {self.setting} lr {self.lr:g} batch {self.batch} seed {self.seed}"


def task_of(model: str, setting: str) -> str:
  return f"task2_{DIMS.get(model, 2)}d_{setting}"


def grid_runs(preset: Preset, model: str, setting: str) -> list[Run]:
  return [Run(model, setting, lr, b, preset.grid_seed) for lr, b in preset.grid]


def seed_runs(
  model: str, setting: str, point: tuple[float, int], seeds: Sequence[int]
) -> list[Run]:
  return [Run(model, setting, point[0], point[1], s) for s in seeds]


def build_config(run: Run, preset: Preset, data_dir: str):
  """The locked ConfigDict of one run: the config file's model/setting/size + the run's fields."""
  from configs import task2_segmentation

  c = task2_segmentation.get_config(",".join(w for w in (run.model, run.setting, preset.size) if w))
  c.unlock()
  c.seed = int(run.seed)
  c.data.data_dir = data_dir
  c.data.batch_size = int(run.batch)
  c.optim.learning_rate = float(run.lr)
  c.progress = False  # the driver prints one line per run instead
  for k, v in preset.overrides:
    set_dotted(c, k, v)
  c.lock()
  return c


def execute(run: Run, preset: Preset, data_dir: str, runs_dir: str) -> dict:
  """Trains one run (or loads its results.json / failed.json); returns its results dict.

  A diverged run (non-finite loss, e.g. Adam at lr 0.1) is a result of the grid, not an
  error: it is recorded in failed.json as {'failed': message} and never selected.
  """
  from mtneuro_jax.train import loop
  from mtneuro_jax.train.metrics import NonFiniteLossError

  wd = run.workdir(runs_dir)
  for name in ("results.json", FAILED_FILE):
    if os.path.exists(os.path.join(wd, name)):
      with open(os.path.join(wd, name)) as f:
        return json.load(f)
  try:
    return loop.train_and_evaluate(build_config(run, preset, data_dir), wd)
  except NonFiniteLossError as e:
    failed = {"failed": f"diverged: {str(e).splitlines()[0]}"}
    with open(os.path.join(wd, FAILED_FILE), "w") as f:
      json.dump(failed, f)
    return failed


def select_point(results: dict, runs: Sequence[Run]) -> tuple[tuple[float, int] | None, dict]:
  """The grid point with the best SELECT_METRIC (ties -> the earlier point) and every point's value."""
  scores = {}
  for r in runs:
    res = results.get(r) or {}
    v = res.get(SELECT_METRIC)
    scores[(r.lr, r.batch)] = None if v is None or not np.isfinite(v) else float(v)
  ok = [(p, v) for p, v in scores.items() if v is not None]
  if not ok:
    return None, scores
  best = max(ok, key=lambda pv: pv[1])[0]  # max keeps the first of equal values
  return best, scores


# ---------------------------------------------------------------------------
# Majority-class predictor and overlays (host-side helpers on a run's config).
def _mesh_and_info(cfg):
  from mtneuro_jax import sharding
  from mtneuro_jax.data import pipeline

  return sharding.make_mesh(), pipeline.dataset_info(cfg.data)


def majority_scores(cfg) -> dict:
  """Test metrics of predicting, for every pixel, the class most frequent in the training masks
  (same split, data config and evaluator metrics as the runs of ``cfg``)."""
  import jax
  import jax.numpy as jnp

  from mtneuro_jax.data import pipeline
  from mtneuro_jax.eval.common import to_host
  from mtneuro_jax.eval.segmentation import evaluate_segmentation

  mesh, info = _mesh_and_info(cfg)
  c = int(info["num_classes"])
  counts = np.zeros(c, np.int64)
  bs = int(cfg.data.eval_batch_size)
  for b in pipeline.eval_batches(cfg.data, info["train_split"], mesh=mesh, global_batch_size=bs):
    mask, valid = to_host(b["mask"]), to_host(b["valid"]).astype(bool)
    counts += np.bincount(mask[valid].reshape(-1), minlength=c)[:c]
  majority = int(np.argmax(counts))

  def predict_fn(batch):
    return {"logits": jax.nn.one_hot(jnp.full(batch["mask"].shape, majority), c)}

  out = evaluate_segmentation(
    predict_fn,
    pipeline.eval_batches(cfg.data, "test", mesh=mesh, global_batch_size=bs),
    num_classes=c,
    class_names=info["class_names"],
  )
  out = {f"test/{k}": v for k, v in out.items()}
  out["majority_class"] = info["class_names"][majority]
  out["train_pixel_fractions"] = (counts / max(counts.sum(), 1)).tolist()
  return out


def write_overlay(cfg, workdir: str, path: str, title: str) -> str:
  """Overlay PNG of a trained run: the first test image (3D: window) of the first test batch with
  the most classes in its truth, as image | truth | prediction (eval/segmentation.overlay_png)."""
  import jax

  from mtneuro_jax.data import pipeline
  from mtneuro_jax.eval.common import to_host
  from mtneuro_jax.eval.segmentation import overlay_png
  from mtneuro_jax.models import MODELS as MODEL_REGISTRY
  from mtneuro_jax.objectives import OBJECTIVES
  from mtneuro_jax.train.checkpoint import Checkpointer

  mesh, info = _mesh_and_info(cfg)
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    state = jax.tree.map(np.asarray, ck.read_state())
  finally:
    ck.close()
  batch = next(
    iter(
      pipeline.eval_batches(
        cfg.data, "test", mesh=mesh, global_batch_size=int(cfg.data.eval_batch_size)
      )
    )
  )
  batch = {k: to_host(v) for k, v in batch.items()}
  model = MODEL_REGISTRY[cfg.model_name](**cfg.model)
  out = OBJECTIVES[cfg.objective_name].predict(
    state["params"],
    state.get("model_state", {}),
    state.get("aux", {}),
    batch,
    model=model,
    config=cfg.objective,
  )
  pred = np.asarray(out["logits"]).argmax(-1)
  variety = [
    len(np.unique(m)) if v else -1 for m, v in zip(batch["mask"], batch["valid"], strict=True)
  ]
  i = int(np.argmax(variety))
  return overlay_png(
    path,
    batch["image"][i],
    batch["mask"][i],
    pred[i],
    class_names=info["class_names"],
    title=title,
  )


# ---------------------------------------------------------------------------
# Tables.
def cell_for(results: dict, runs: Sequence[Run], class_names: Sequence[str]) -> dict:
  """Test metrics of the seed runs: per column mean ± sd, bootstrap interval and per-seed values;
  per class mean dataset IoU and F1."""
  done = [(r, results.get(r) or {}) for r in runs]
  done = [(r, res) for r, res in done if "test/f1_dataset/mean" in res]
  cell = {
    "seeds_done": [r.seed for r, _ in done],
    "failed": [r.seed for r in runs if r not in {d[0] for d in done}],
  }
  for key, metric, _ in COLUMNS:
    vals = [res[f"test/{metric}"] for _, res in done]
    c = mean_sd(vals)
    c["by_seed"] = {str(r.seed): res[f"test/{metric}"] for r, res in done}
    ci = bootstrap_ci(vals)
    c["ci95"] = list(ci) if ci else None
    cell[key] = c
  per_class = {}
  for prefix in ("iou_dataset", "f1_dataset"):
    names = [n for n in class_names if done and f"test/{prefix}/{n}" in done[0][1]]
    per_class[prefix] = {
      n: mean_sd([res[f"test/{prefix}/{n}"] for _, res in done])["mean"] for n in names
    }
  cell["per_class"] = per_class
  return cell


def _paper_cells(model: str, setting: str) -> dict:
  ref = paper.TABLE2.get(model, {}).get(setting, {})
  return {k: (list(ref[k]) if k in ref else None) for k, _, _ in COLUMNS}


def build_table(
  stages: dict,
  majority: dict,
  preset_name: str,
  preset: Preset,
  info: dict,
  timings: dict,
  overlays: dict,
) -> dict:
  header, row_source, comparable = source_line(info)
  rows = []
  for model in preset.models:
    row = {
      "model": model,
      "label": paper.TASK2_MODEL_LABELS[model],
      "dims": DIMS.get(model, 2),
      "data_source": row_source,
      "comparable": comparable,
      "cells": {},
    }
    for setting in preset.settings:
      st = stages.get((model, setting))
      if st is None:
        row["cells"][setting] = {"ours": {"note": "not run"}, "paper": _paper_cells(model, setting)}
        continue
      names = spec.PIXEL_CLASS_NAMES[setting]  # class order (results.json sorts its keys)
      ours = (
        cell_for(st["results"], st["seed_runs"], names) if st["point"] else {"note": "grid failed"}
      )
      if st["point"]:
        ours.update({"lr": st["point"][0], "batch": st["point"][1]})
      ours["grid_val"] = {f"lr{lr:g}-b{b}": v for (lr, b), v in st["scores"].items()}
      row["cells"][setting] = {"ours": ours, "paper": _paper_cells(model, setting)}
    rows.append(row)
  majority_rows = []
  for (dims, setting), res in sorted(majority.items()):
    majority_rows.append(
      {
        "label": f"Majority class ({dims}D test, predicts '{res['majority_class']}')",
        "dims": dims,
        "setting": setting,
        "metrics": {k: res.get(f"test/{m}") for k, m, _ in COLUMNS},
        "per_class_iou": {
          n: res[f"test/iou_dataset/{n}"]
          for n in spec.PIXEL_CLASS_NAMES[setting]
          if f"test/iou_dataset/{n}" in res
        },
        "train_pixel_fractions": res["train_pixel_fractions"],
      }
    )
  return {
    "table": "Table 2 (Task 2 segmentation, test set)",
    "preset": preset_name,
    "preset_description": preset.description,
    "settings": list(preset.settings),
    "seeds": list(preset.seeds),
    "grid": {
      "lr": list(preset.lr_grid),
      "batch": list(preset.batch_grid),
      "seed": preset.grid_seed,
    },
    "selection_metric": SELECT_METRIC,
    "data_source": info.get("source"),
    "synthetic": bool(info.get("synthetic")),
    "comparable_to_paper": comparable,
    "source_note": header,
    "paper_source": paper.PAPER_SOURCE,
    "metric": (
      "test F1 / IoU, dataset reduction (tp, fp, fn summed over the test split), averaged over "
      "all classes (F1, IoU; the paper's 'avg') and over the foreground classes (fg IoU); mean ± "
      "sample sd over seeds"
    ),
    "rows": rows,
    "majority": majority_rows,
    "overlays": overlays,
    "timings_s": timings,
    "machine": machine_info(),
  }


def _num(v) -> str:
  return "—" if v is None else f"{v:.3f}"


def _paper(v) -> str:
  """The paper's 'mean ± sd' as printed there (its sds have up to three decimals)."""
  return f"{v[0]:.2f} ± {v[1]:g}" if v else "—"


def table2_markdown(t: dict) -> str:
  settings = t["settings"]
  heads = []
  for s in settings:
    for k, _, h in COLUMNS:
      heads.append(f"{s} {h} ours" + ("" if k == "iou_fg" else f" | {s} {h} paper"))
  ncols = sum(1 if k == "iou_fg" else 2 for k, _, _ in COLUMNS) * len(settings)
  grid = t["grid"]
  one_point = len(grid["lr"]) * len(grid["batch"]) == 1
  lines = [
    f"# Task 2 — Table 2: segmentation on the test set (preset `{t['preset']}`)",
    "",
    t["source_note"],
    "",
    f"Ours: {t['preset_description']}; seeds {t['seeds']}, mean ± sample sd. F1 / IoU: "
    "tp, fp, fn summed over the whole test split per class (dataset reduction), then averaged "
    "over all classes (background included, the paper's 'avg'); fg IoU leaves the background "
    "class out. Paper: " + t["paper_source"] + f", seeds {list(paper.PAPER_SEEDS)}, full "
    "resolution, 20 epochs (2D zoo with an ImageNet EfficientNet-b7 encoder; ours: random init).",
    (
      f"Point: fixed lr {grid['lr'][0]:g}, batch {grid['batch'][0]} (no grid)."
      if one_point
      else f"Point: lr {grid['lr']} x batch {grid['batch']} grid, seed {grid['seed']}, chosen on "
      f"`{t['selection_metric']}` (never on test)."
    ),
    machine_line(t),
    "",
    "| model | data | " + " | ".join(heads) + " | lr, batch |",
    "|---|---|" + "---|" * ncols + "---|",
  ]
  for row in t["rows"]:
    cells, notes = [], []
    for s in settings:
      c = row["cells"][s]
      for k, _, _ in COLUMNS:
        cells.append(fmt(c["ours"].get(k)) if k in c["ours"] else c["ours"].get("note", "—"))
        if k != "iou_fg":
          cells.append(_paper(c["paper"][k]))
      if "lr" in c["ours"]:
        notes.append(f"{s}: {c['ours']['lr']:g}, {c['ours']['batch']}")
    lines.append(
      f"| {row['label']} | {row['data_source']} | " + " | ".join(cells) + f" | {'; '.join(notes)} |"
    )
  for m in t["majority"]:
    cells = []
    for s in settings:
      for k, _, _ in COLUMNS:
        cells.append(_num(m["metrics"][k]) if m["setting"] == s else "")
        if k != "iou_fg":
          cells.append("")
    lines.append(f"| {m['label']} | same test split | " + " | ".join(cells) + " | — |")
  lines += _per_class_markdown(t) + _ci_markdown(t) + _grid_markdown(t) + _overlay_markdown(t)
  return "\n".join(lines) + "\n"


def _per_class_markdown(t: dict) -> list[str]:
  lines = ["", "## Per-class IoU (dataset reduction, mean over seeds)", ""]
  for s in t["settings"]:
    names = None
    body = []
    for row in t["rows"]:
      pc = row["cells"][s]["ours"].get("per_class", {}).get("iou_dataset")
      if not pc:
        continue
      names = names or list(pc)
      body.append(f"| {row['label']} | " + " | ".join(_num(pc.get(n)) for n in names) + " |")
    for m in t["majority"]:
      if m["setting"] == s and names:
        body.append(
          f"| {m['label']} | " + " | ".join(_num(m["per_class_iou"].get(n)) for n in names) + " |"
        )
    if names:
      lines += [f"{s}:", "", "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
      lines += body + [""]
  return lines


def _ci_markdown(t: dict) -> list[str]:
  lines = [
    "## Seed statistics",
    "",
    "95% percentile bootstrap interval of the mean over seeds (indicative only with few seeds; "
    "— with one seed).",
    "",
    "| model | "
    + " | ".join(f"{s} {h} 95% CI" for s in t["settings"] for _, _, h in COLUMNS)
    + " |",
    "|---|" + "---|" * (len(t["settings"]) * len(COLUMNS)),
  ]
  for row in t["rows"]:
    cells = [
      ci_text((row["cells"][s]["ours"].get(k) or {}).get("ci95"))
      for s in t["settings"]
      for k, _, _ in COLUMNS
    ]
    lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
  return lines


def _grid_markdown(t: dict) -> list[str]:
  g = t["grid"]
  if len(g["lr"]) * len(g["batch"]) == 1:
    return []
  lines = ["", f"## Grid: `{t['selection_metric']}` (seed {g['seed']}; — = diverged or failed)", ""]
  for row in t["rows"]:
    for s in t["settings"]:
      vals = row["cells"][s]["ours"].get("grid_val")
      if not vals:
        continue
      lines += [
        f"{row['label']}, {s}:",
        "",
        "| lr \\ batch | " + " | ".join(str(b) for b in g["batch"]) + " |",
        "|---|" + "---|" * len(g["batch"]),
      ]
      for lr in g["lr"]:
        lines.append(
          f"| {lr:g} | " + " | ".join(_num(vals.get(f"lr{lr:g}-b{b}")) for b in g["batch"]) + " |"
        )
      lines.append("")
  return lines


def _overlay_markdown(t: dict) -> list[str]:
  if not t["overlays"]:
    return []
  lines = [
    "",
    "## Overlays (image | truth | prediction; axon cyan, vessel red, cell yellow)",
    "",
  ]
  for key, name in sorted(t["overlays"].items()):
    lines.append(f"- {key}: ![{key}]({name})")
  return lines


# ---------------------------------------------------------------------------


class _Runner:
  """Runs (or loads) runs in order, printing one line each; keeps going after a broken run."""

  def __init__(self, preset, data_dir, runs_dir):
    self.preset, self.data_dir, self.runs_dir = preset, data_dir, runs_dir
    self.results: dict[Run, dict] = {}
    self.timings: dict[str, float] = {}
    self.failed: list[tuple[str, str]] = []

  def run(self, runs: Sequence[Run]) -> None:
    for run in runs:
      if run in self.results:
        continue
      cached = any(
        os.path.exists(os.path.join(run.workdir(self.runs_dir), n))
        for n in ("results.json", FAILED_FILE)
      )
      t0 = time.time()
      try:
        res = execute(run, self.preset, self.data_dir, self.runs_dir)
      except UserError:
        raise  # bad input is the same for every run: stop at once
      except Exception as e:  # one broken run must not lose the others
        self.failed.append((run.label(), repr(e)))
        print(f"[task2] {run.label()}: FAILED {e!r}", flush=True)
        traceback.print_exc()
        continue
      self.results[run] = res
      if not cached:
        self.timings[run.label()] = round(time.time() - t0, 1)
      how = "cached" if cached else f"{time.time() - t0:.0f}s"
      score = (
        res["failed"]
        if "failed" in res
        else f"val fg IoU {res.get(SELECT_METRIC, float('nan')):.3f}, "
        f"test fg IoU {res.get('test/iou_dataset/mean_fg', float('nan')):.3f}"
      )
      print(f"[task2] {run.label()}: {how}; {score}", flush=True)


def main(argv=None) -> int:
  parser = ArgumentParser(
    prog="mtneuro task2",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
  parser.add_argument(
    "--data_dir", default=configlib.DEFAULT_DATA_DIR, help="export root (TFDS data_dir)"
  )
  parser.add_argument(
    "--out", default=None, help="tables folder (default experiments/results/task2_<preset>)"
  )
  parser.add_argument(
    "--runs", default=None, help="run workdirs (default out/task2_runs/<data_dir name>/<size>)"
  )
  parser.add_argument("--models", default=None, help=f"subset of {','.join(MODELS)}")
  parser.add_argument("--settings", default=None, help=f"subset of {','.join(SETTINGS)}")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
  parser.add_argument("--no_overlays", action="store_true", help="skip the overlay PNGs")
  parser.add_argument("--dry_run", action="store_true", help="list the grid runs and exit")
  args = parser.parse_args(argv)

  preset = PRESETS[args.preset]
  models = select_words(parser, "--models", args.models, MODELS, preset.models)
  settings = select_words(parser, "--settings", args.settings, SETTINGS, preset.settings)
  seeds = parse_seeds(parser, args.seeds, preset.seeds)
  preset = dataclasses.replace(preset, models=models, settings=settings, seeds=seeds)
  out = args.out or os.path.join("experiments", "results", f"task2_{args.preset}")
  runs_dir = args.runs or os.path.join(
    "out", "task2_runs", os.path.basename(os.path.normpath(args.data_dir)), preset.size or "full"
  )
  pairs = [(m, s) for m in models for s in settings]
  if args.dry_run:
    for m, s in pairs:
      for r in grid_runs(preset, m, s):
        print(r.label(), "->", r.workdir(runs_dir))
      print(f"then {m} {s} seeds {list(seeds)} at the point chosen on {SELECT_METRIC}")
    return 0

  info = exports_info(args.data_dir, sorted({task_of(m, s) for m, s in pairs}), what="Task 2 ")
  os.makedirs(out, exist_ok=True)
  t_start = time.time()
  src = "SYNTHETIC phantom — not comparable to the paper" if info["synthetic"] else "real data"
  print(
    f"[task2] preset {args.preset} ({preset.description}); data {info['source']} ({src}); "
    f"{len(pairs)} model x setting pairs, {len(preset.grid)} grid point(s), seeds {list(seeds)} -> {out}",
    flush=True,
  )
  runner = _Runner(preset, args.data_dir, runs_dir)
  stages = {}
  for m, s in pairs:
    grid = grid_runs(preset, m, s)
    runner.run(grid)
    point, scores = select_point(runner.results, grid)
    seeded = seed_runs(m, s, point, seeds) if point else []
    runner.run(seeded)
    stages[(m, s)] = {
      "point": point,
      "scores": scores,
      "seed_runs": seeded,
      "results": runner.results,
    }

  majority = {}
  for dims, s in sorted({(DIMS.get(m, 2), s) for m, s in pairs}):
    model = next(m for m, s2 in pairs if DIMS.get(m, 2) == dims and s2 == s)
    path = os.path.join(runs_dir, f"majority_{dims}d_{s}.json")
    if not os.path.exists(path):
      res = majority_scores(build_config(Run(model, s, 0.0, 8, 1), preset, args.data_dir))
      os.makedirs(runs_dir, exist_ok=True)
      with open(path, "w") as f:
        json.dump(res, f)
    with open(path) as f:
      majority[(dims, s)] = json.load(f)

  overlays = {}
  if not args.no_overlays:
    for (m, s), st in stages.items():
      done = [r for r in st["seed_runs"] if "test/f1_dataset/mean" in (runner.results.get(r) or {})]
      if not done:
        continue
      r = done[0]
      name = f"overlay_{m}_{s}.png"
      res = runner.results[r]
      title = (
        f"{paper.TASK2_MODEL_LABELS[m]} {s}, seed {r.seed} ({info['source']}"
        f"{', synthetic' if info['synthetic'] else ''}): test fg IoU {res['test/iou_dataset/mean_fg']:.3f}"
      )
      if not os.path.exists(os.path.join(out, name)):
        write_overlay(
          build_config(r, preset, args.data_dir),
          r.workdir(runs_dir),
          os.path.join(out, name),
          title,
        )
      overlays[f"{m} {s}"] = name
  runner.timings["total"] = round(time.time() - t_start, 1)

  table = build_table(stages, majority, args.preset, preset, info, runner.timings, overlays)
  with open(os.path.join(out, "table2.json"), "w") as f:
    json.dump({**table, "failed_runs": runner.failed}, f, indent=1)
  md = table2_markdown(table)
  with open(os.path.join(out, "table2.md"), "w") as f:
    f.write(md)
  print(md, flush=True)
  print(
    f"[task2] done in {runner.timings['total'] / 60:.1f} min; tables in {out}"
    + (f"; {len(runner.failed)} run(s) FAILED" if runner.failed else ""),
    flush=True,
  )
  return 1 if runner.failed else 0


if __name__ == "__main__":
  sys.exit(run_cli(main, sys.argv[1:]))
