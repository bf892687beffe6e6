"""Task 1 tables: methods x settings x downsampling x seeds -> Table 1 and Table A3 (markdown + JSON).

Usage:
  python -m experiments.task1_tables --preset quick --data_dir out/data/phantom-seed0 \
      --out experiments/results/task1_quick
  python -m experiments.task1_tables --preset paper --data_dir out/data/bossdb --out out/task1_paper
  (--methods supervised,pca  --seeds 1,100  --dry_run  to narrow or list the runs)

Needs the exports task1_roi_c1, task1_roi_c2 and task1_roi_c3 in ``--data_dir``
(``mtneuro export --source phantom --tasks all --out_dir DIR``).

What runs:
* methods: ``supervised`` (configs/task1_supervised.py), ``mixup`` (configs/task1_mixup.py,
  one run per p of the preset's grid; the reported p is the one with the best
  mean *validation* accuracy over seeds, per setting and downsampling -- never
  chosen on test), ``pca`` and ``nmf`` (configs/task1_pca_nmf.py).
* settings: ROI-C2 trains exactly like ROI-C1 (same train and val splits), so one
  run trains on task1_roi_c1 and is evaluated on both test sets (an eval with a
  ``task`` override); ROI-C3 trains on task1_roi_c3. Table 1 uses the preset's
  Table 1 downsampling; Table A3 adds ROI-C1 runs at its other factors (the
  Table 1 ROI-C1 run is shared).
* seeds: mean +- sample sd (ddof 1) over seeds; the paper's seeds are 1, 100, 350, 631, 872.

Presets:
* ``paper`` (for accelerators): the paper's protocol -- 2x for Table 1 and 4x/2x/full
  for Table A3, full-width ResNet-18, batch 256, SGD lr 0.03, 100 epochs, the full p
  grid {0.01, 0.1, 0.3, 0.5, 0.7}, five seeds, PCA/NMF with 256 components.
* ``quick`` (CPU; 24 runs; measured 10.8 min on 2 cores in the main job of a fresh clone of
  f25b0c7, cold caches, on a host about half as fast as earlier ones): the configs at ``:quick``
  with no size overrides (``configlib.QUICK`` in mtneuro_jax/configlib.py is what quick
  means), Table 1 and Table A3's 4x column only (2x/full not run), two seeds (1, 100)
  for the supervised, mixup and PCA/NMF rows and seed 1 for the SSL rows, mixup p = 0.5 only. Fine for checking the machinery, not for numbers.
* ``tiny`` (tests, seconds): configs at ``:tiny`` (2 steps, width 1/16), one seed,
  p grid {0.1, 0.5}, 8 PCA/NMF components.

Resumable: a run whose workdir already holds results.json is not rerun (and a
training run interrupted mid-way resumes from its last checkpoint).

Outputs in ``--out``: table1.{md,json}, table_a3.{md,json}, runs/<method>[-p<p>]/<setting>-ds<k>/seed<s>/.
Every table names its data source in the header and in every row; numbers from
the synthetic phantom are marked as never comparable to the paper's (real data).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
import traceback
from typing import Any, Sequence

import numpy as np

from experiments import paper_reference as paper
from experiments.tables import (
  BOOTSTRAP_RESAMPLES,
  bootstrap_ci,
  ci_text,
  fmt,
  machine_info,
  machine_line,
  mean_sd,
  set_dotted,
  source_line,
)
from mtneuro_jax import configlib
from mtneuro_jax.errors import ArgumentParser, UserError, run_cli

METHODS = ("supervised", "mixup", "pca", "nmf", "byol", "myow", "myow_merged", "vicreg")
# Self-supervised methods: pretraining config (configs/task1_<method>.py) then a frozen linear
# probe (configs/task1_linear_probe.py, init_from the pretraining run's encoder), scored on the
# four half-size corners of each test tile (the crop scale the encoder was trained on).
SSL_METHODS = ("byol", "myow", "myow_merged", "vicreg")
PROBE_PROTOCOL = "corners"
# Row labels: the paper's, plus methods the paper did not run.
LABELS = {**paper.METHOD_LABELS, "vicreg": "VICReg (not in the paper)"}
SETTINGS = ("ROI-C1", "ROI-C2", "ROI-C3")
# Training task of each setting; ROI-C2 reuses the ROI-C1 training run.
TRAIN_TASK = {"c12": "task1_roi_c1", "c3": "task1_roi_c3"}
SETTING_RUN = {
  "ROI-C1": ("c12", "test_c1"),
  "ROI-C2": ("c12", "test_c2"),
  "ROI-C3": ("c3", "test_c3"),
}
TEST_TASK = {"test_c1": "task1_roi_c1", "test_c2": "task1_roi_c2", "test_c3": "task1_roi_c3"}
_Q = configlib.QUICK  # what `quick` means, defined once


@dataclasses.dataclass(frozen=True)
class Preset:
  config_arg: str  # the configs' get_config(arg) preset
  seeds: tuple[int, ...]
  p_grid: tuple[float, ...]
  table1_downsample: int
  a3_downsamplings: tuple[int, ...]
  # Dotted config key -> value, on top of config_arg (sizes belong to configlib, not here).
  # Seeds of the SSL rows when --seeds is not given (None = ``seeds``).
  ssl_seeds: tuple[int, ...] | None = None
  overrides: tuple[tuple[str, Any], ...] = ()  # network runs
  baseline_overrides: tuple[tuple[str, Any], ...] = ()  # PCA/NMF runs
  description: str = ""


PRESETS = {
  "paper": Preset(
    "paper",
    paper.PAPER_SEEDS,
    (0.01, 0.1, 0.3, 0.5, 0.7),
    2,
    (4, 2, 1),
    description="the paper's protocol (accelerator)",
  ),
  "quick": Preset(
    "quick",
    (1, 100),
    (0.5,),
    4,
    (4,),
    # One seed for the SSL rows: they pretrain and then probe (twice the work of a
    # supervised run) and score near chance at this size, so a second seed bought little
    # and cost ~5 of the main job's 20 minutes on 2 cores.
    ssl_seeds=(1,),
    description=(
      f"CPU smoke run: {_Q.downsample}x, "
      f"width 1/{round(1 / _Q.width_multiplier)}, "
      f"{_Q.total_steps} steps x {_Q.batch_size}, 2 seeds (SSL rows: seed 1), p = 0.5 only"
    ),
  ),
  "tiny": Preset(
    "tiny",
    (1,),
    (0.1, 0.5),
    4,
    (4,),
    baseline_overrides=(("baseline.n_components", 8), ("baseline.nmf_max_iter", 50)),
    description="test preset (seconds)",
  ),
}


@dataclasses.dataclass(frozen=True)
class Run:
  method: str
  p: float | None  # mixup only
  setting: str  # 'c12' (ROI-C1 training, tested on C1 and C2) or 'c3'
  downsample: int
  seed: int
  evals: tuple[str, ...]  # test eval names, besides 'val'

  @property
  def variant(self) -> str:
    return self.method if self.p is None else f"{self.method}-p{self.p:g}"

  def workdir(self, out: str) -> str:
    return os.path.join(
      out, "runs", self.variant, f"{self.setting}-ds{self.downsample}", f"seed{self.seed}"
    )

  def label(self) -> str:
    return f"{self.variant} {self.setting} {self.downsample}x seed {self.seed}"


def plan_runs(
  preset: Preset,
  methods: Sequence[str],
  seeds: Sequence[int],
  ssl_seeds: Sequence[int] | None = None,
) -> list[Run]:
  """Every run the tables need, de-duplicated (Table 1's ROI-C1 run serves Table A3 too).

  ``ssl_seeds``: the SSL methods' seeds (None = ``seeds``)."""
  runs: dict[tuple, Run] = {}
  for method in methods:
    variants = list(preset.p_grid) if method == "mixup" else [None]
    method_seeds = seeds if ssl_seeds is None or method not in SSL_METHODS else ssl_seeds
    for p in variants:
      for seed in method_seeds:
        d1 = preset.table1_downsample
        cands = [
          Run(method, p, "c12", d1, seed, ("test_c1", "test_c2")),
          Run(method, p, "c3", d1, seed, ("test_c3",)),
        ]
        cands += [
          Run(method, p, "c12", d, seed, ("test_c1",)) for d in preset.a3_downsamplings if d != d1
        ]
        for r in cands:
          runs.setdefault((r.method, r.p, r.setting, r.downsample, r.seed), r)
  return list(runs.values())


def build_config(run: Run, preset: Preset, data_dir: str):
  """The ConfigDict of one run (a preset of the experiment's config file + the run's fields)."""

  from configs import task1_mixup, task1_pca_nmf, task1_supervised

  if run.method in SSL_METHODS:
    return build_ssl_configs(run, preset, data_dir)[1]
  if run.method == "supervised":
    c = task1_supervised.get_config(preset.config_arg)
  elif run.method == "mixup":
    c = task1_mixup.get_config(preset.config_arg)
    c.objective.p = float(run.p)
  else:
    c = task1_pca_nmf.get_config(f"{run.method},{preset.config_arg}")
  c.unlock()
  c.seed = int(run.seed)
  c.data.data_dir = data_dir
  c.data.task = TRAIN_TASK[run.setting]
  c.data.downsample = int(run.downsample)
  if "progress" in c:
    c.progress = False  # the driver prints one line per run instead
  for k, v in preset.baseline_overrides if run.method in ("pca", "nmf") else preset.overrides:
    set_dotted(c, k, v)
  c.evals = _run_evals(run, "whole")
  c.lock()
  return c


def _run_evals(run: Run, protocol: str):
  """'val' on the training task plus the run's test evals, each a classification eval."""
  import ml_collections

  evals = ml_collections.ConfigDict()
  for name in ("val",) + run.evals:
    evals[name] = ml_collections.ConfigDict(
      {
        "kind": "classification",
        "split": "val" if name == "val" else "test",
        "protocol": protocol,
        "task": TRAIN_TASK[run.setting] if name == "val" else TEST_TASK[name],
        "name": name,
      }
    )
  return evals


def build_ssl_configs(run: Run, preset: Preset, data_dir: str, out: str | None = None):
  """(pretraining config, linear-probe config) of one SSL run.

  The pretraining run writes ``<workdir>/pretrain``; its evals are dropped (the frozen
  probe is the evaluation; the online probe's ``probe/acc`` is still logged). The probe
  starts from that run's encoder (``init_from.subtree = 'encoder'``).
  """
  import importlib

  import ml_collections

  from configs import task1_linear_probe

  pre = importlib.import_module(f"configs.task1_{run.method}").get_config(preset.config_arg)
  probe = task1_linear_probe.get_config(preset.config_arg)
  for c in (pre, probe):
    c.unlock()
    c.seed = int(run.seed)
    c.data.data_dir = data_dir
    c.data.task = TRAIN_TASK[run.setting]
    c.data.downsample = int(run.downsample)
    c.progress = False
  pre.evals = ml_collections.ConfigDict()
  probe.model.width_multiplier = pre.model.width_multiplier
  probe.init_from.workdir = os.path.join(run.workdir(out or "."), "pretrain")
  probe.init_from.subtree = "encoder"
  probe.evals = _run_evals(run, PROBE_PROTOCOL)
  for c in (pre, probe):
    c.lock()
  return pre, probe


def execute(run: Run, preset: Preset, data_dir: str, out: str) -> dict:
  """Runs one configuration (or loads its results.json); returns the results dict."""
  wd = run.workdir(out)
  path = os.path.join(wd, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if run.method in SSL_METHODS:
    from mtneuro_jax.train import loop

    pre, probe = build_ssl_configs(run, preset, data_dir, out)
    pre_results = loop.train_and_evaluate(pre, os.path.join(wd, "pretrain"))
    res = loop.train_and_evaluate(probe, wd)
    return {**res, **{f"pretrain/{k}": v for k, v in pre_results.items()}}
  cfg = build_config(run, preset, data_dir)
  if run.method in ("pca", "nmf"):
    from mtneuro_jax.baselines import pca_nmf

    return pca_nmf.fit_and_evaluate(cfg, wd)
  from mtneuro_jax.train import loop

  return loop.train_and_evaluate(cfg, wd)


# ---------------------------------------------------------------------------
# Aggregation.
def paired_comparison(a: dict, b: dict) -> dict | None:
  """Method a vs b on the seeds both ran ({seed: accuracy} each): mean difference a - b, its
  bootstrap 95% interval, and the exact two-sided sign-flip permutation p-value (all 2^n sign
  patterns of the per-seed differences; the paper reports neither)."""
  common = sorted(set(a) & set(b))
  if not common:
    return None
  d = np.asarray([float(a[k]) - float(b[k]) for k in common], np.float64)
  observed = abs(d.mean())
  signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
  p = float(np.mean(np.abs((signs * d).mean(axis=1)) >= observed - 1e-12))
  ci = bootstrap_ci(d)
  return {
    "seeds": common,
    "mean_diff": float(d.mean()),
    "ci95": list(ci) if ci else None,
    "p_sign_flip": p,
    "n": int(d.size),
  }


def select_p(
  results: dict, runs: list[Run], setting: str, downsample: int, seeds: Sequence[int]
) -> tuple:
  """The mixup p with the best mean validation accuracy (ties -> smaller p), and every p's mean."""
  by_p: dict[float, list[float]] = {}
  for r in runs:
    if (
      r.method == "mixup"
      and r.setting == setting
      and r.downsample == downsample
      and r.seed in seeds
    ):
      res = results.get(r)
      if res and "val/accuracy" in res:
        by_p.setdefault(r.p, []).append(res["val/accuracy"])
  if not by_p:
    return None, {}
  means = {p: sum(v) / len(v) for p, v in by_p.items()}
  best = max(sorted(means), key=lambda p: means[p])
  return best, means


def cell_for(
  results: dict,
  runs: list[Run],
  method: str,
  setting: str,
  downsample: int,
  test: str,
  seeds: Sequence[int],
) -> dict:
  extra = {}
  p = None
  if method == "mixup":
    p, means = select_p(results, runs, setting, downsample, seeds)
    if p is None:
      return {"mean": None, "note": "not run"}
    extra = {"p_selected": p, "val_accuracy_by_p": {f"{k:g}": v for k, v in sorted(means.items())}}
  vals, found, by_seed = [], False, {}
  for r in runs:
    if (
      r.method == method
      and r.p == p
      and r.setting == setting
      and r.downsample == downsample
      and r.seed in seeds
      and test in r.evals
    ):
      found = True
      res = results.get(r)
      if res and f"{test}/accuracy" in res:
        vals.append(res[f"{test}/accuracy"])
        by_seed[r.seed] = res[f"{test}/accuracy"]
  if not found:
    return {"mean": None, "note": "not run"}
  cell = {**mean_sd(vals), **extra, "by_seed": {str(k): v for k, v in sorted(by_seed.items())}}
  ci = bootstrap_ci(vals)
  if ci is not None:
    cell["ci95"] = list(ci)
  if not vals:
    cell["note"] = "failed"
  return cell


def build_tables(
  results: dict,
  runs: list[Run],
  preset_name: str,
  preset: Preset,
  methods: Sequence[str],
  seeds: Sequence[int],
  info: dict,
  timings: dict,
) -> tuple[dict, dict]:
  header, row_source, comparable = source_line(info)
  d1 = preset.table1_downsample
  t1_rows = []
  for m in methods:
    row = {
      "method": m,
      "label": LABELS[m],
      "data_source": row_source,
      "comparable": comparable,
      "downsample": d1,
      "cells": {},
    }
    for s in SETTINGS:
      setting, test = SETTING_RUN[s]
      ours = cell_for(results, runs, m, setting, d1, test, seeds)
      row["cells"][s] = {
        "ours": ours,
        "paper": _paper_cell(paper.TABLE1.get(m, {}).get(s), paper_ds=2),
      }
    t1_rows.append(row)
  a3_rows = []
  for m in methods:
    row = {
      "method": m,
      "label": LABELS[m],
      "data_source": row_source,
      "comparable": comparable,
      "cells": {},
    }
    for d in paper.DOWNSAMPLINGS:
      ours = (
        cell_for(results, runs, m, "c12", d, "test_c1", seeds)
        if d in preset.a3_downsamplings or d == d1
        else {"mean": None, "note": f"not run ({preset_name})"}
      )
      row["cells"][str(d)] = {
        "ours": ours,
        "paper": _paper_cell(paper.TABLE_A3.get(m, {}).get(d), paper_ds=d),
      }
    a3_rows.append(row)
  common = {
    "preset": preset_name,
    "preset_description": preset.description,
    "seeds": list(seeds),
    "data_source": info.get("source"),
    "synthetic": bool(info.get("synthetic")),
    "comparable_to_paper": comparable,
    "source_note": header,
    "paper_source": paper.PAPER_SOURCE,
    "metric": "test accuracy, whole tiles; mean ± sample sd over seeds",
    "timings_s": timings,
    "machine": machine_info(),
  }
  t1 = {
    **common,
    "table": "Table 1",
    "downsample": d1,
    "paper_downsample": 2,
    "rows": t1_rows,
    "paired_vs_supervised": paired_vs_supervised(t1_rows),
  }
  a3 = {**common, "table": "Table A3 (ROI-C1 by downsampling)", "rows": a3_rows}
  return t1, a3


def paired_vs_supervised(rows: list[dict]) -> dict:
  """{method: {setting: paired_comparison(method, supervised)}} for every non-supervised row."""
  sup = next((r for r in rows if r["method"] == "supervised"), None)
  if sup is None:
    return {}
  out = {}
  for row in rows:
    if row["method"] == "supervised":
      continue
    per = {}
    for setting, cell in row["cells"].items():
      cmp = paired_comparison(
        cell["ours"].get("by_seed") or {}, sup["cells"][setting]["ours"].get("by_seed") or {}
      )
      if cmp is not None:
        per[setting] = cmp
    if per:
      out[row["method"]] = per
  return out


def _paper_cell(value, paper_ds: int) -> dict:
  if value is None:  # a method the paper did not run (e.g. VICReg)
    return {"mean": None, "sd": None, "downsample": paper_ds}
  mean, sd = value
  return {"mean": mean, "sd": sd, "downsample": paper_ds}


def _ds_name(d: int) -> str:
  return "full" if d == 1 else f"{d}x"


def table1_markdown(t1: dict) -> str:
  d = t1["downsample"]
  lines = [
    f"# Task 1 — Table 1: test accuracy by setting (preset `{t1['preset']}`)",
    "",
    t1["source_note"],
    "",
    f"Ours: {_ds_name(d)} downsampling, seeds {t1['seeds']}, mean ± sample sd; {t1['preset_description']}. "
    f"Paper: {t1['paper_source']}, 2x downsampling, seeds {list(paper.PAPER_SEEDS)}."
    + (" **Downsampling differs from the paper's.**" if d != 2 else ""),
    "Mixup: p chosen per setting on the validation accuracy (mean over seeds), never on test.",
    machine_line(t1),
    "",
    "| method | data | " + " | ".join(f"{s} ours | {s} paper" for s in SETTINGS) + " | notes |",
    "|---|---|" + "---|---|" * len(SETTINGS) + "---|",
  ]
  lines += [_row_markdown(row, [(s, s) for s in SETTINGS]) for row in t1["rows"]]
  if any(row["method"] in SSL_METHODS for row in t1["rows"]):
    lines += [
      "",
      f"SSL rows: a frozen encoder (inference-mode BatchNorm, stop-gradient) + a linear probe trained "
      f"on half-size crops, scored on the four half-size corners of each test tile (`{PROBE_PROTOCOL}`), "
      "as the reference scores its SSL encoders; the other rows score whole tiles.",
    ]
  lines += _statistics_markdown(t1)
  return "\n".join(lines) + "\n"


def _statistics_markdown(t1: dict) -> list[str]:
  """95% bootstrap intervals over seeds and paired differences to supervised (same seeds)."""
  lines = [
    "",
    "## Seed statistics (not in the paper)",
    "",
    f"95% percentile bootstrap interval of the mean over seeds ({BOOTSTRAP_RESAMPLES} resamples; "
    "indicative only with few seeds) and, per method, the paired difference to Supervised on the "
    "same seeds: mean Δ, its bootstrap interval and the exact sign-flip permutation p-value.",
    "",
    "| method | " + " | ".join(f"{s} 95% CI | {s} Δ vs sup (p)" for s in SETTINGS) + " |",
    "|---|" + "---|---|" * len(SETTINGS),
  ]
  paired = t1.get("paired_vs_supervised", {})
  for row in t1["rows"]:
    cells = []
    for s in SETTINGS:
      cells.append(ci_text(row["cells"][s]["ours"].get("ci95")))
      cmp = paired.get(row["method"], {}).get(s)
      cells.append(
        f"{cmp['mean_diff']:+.3f} {ci_text(cmp['ci95'])} (p={cmp['p_sign_flip']:.2f}, n={cmp['n']})"
        if cmp
        else "—"
      )
    lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
  return lines


def _row_markdown(row: dict, columns: list[tuple[str, str]]) -> str:
  """One table row: ours and the paper's value per (cell key, column name), then mixup's p notes."""
  cells, notes = [], []
  for key, name in columns:
    c = row["cells"][key]
    theirs = c["paper"]
    cells += [
      fmt(c["ours"]),
      paper.format_paper(None if theirs["mean"] is None else (theirs["mean"], theirs["sd"])),
    ]
    if "p_selected" in c["ours"]:
      notes.append(f"{name}: p={c['ours']['p_selected']:g}")
  return (
    f"| {row['label']} | {row['data_source']} | " + " | ".join(cells) + f" | {'; '.join(notes)} |"
  )


def a3_markdown(a3: dict) -> str:
  lines = [
    f"# Task 1 — Table A3: ROI-C1 test accuracy by downsampling (preset `{a3['preset']}`)",
    "",
    a3["source_note"],
    "",
    f"Ours: seeds {a3['seeds']}, mean ± sample sd; {a3['preset_description']}. "
    f"Paper: {a3['paper_source']} (no sd reported).",
    machine_line(a3),
    "",
    "| method | data | "
    + " | ".join(f"{_ds_name(d)} ours | {_ds_name(d)} paper" for d in paper.DOWNSAMPLINGS)
    + " | notes |",
    "|---|---|" + "---|---|" * len(paper.DOWNSAMPLINGS) + "---|",
  ]
  lines += [
    _row_markdown(row, [(str(d), _ds_name(d)) for d in paper.DOWNSAMPLINGS]) for row in a3["rows"]
  ]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
def _data_info(data_dir: str) -> dict:
  """Source facts from the exports; raises naming the export command if one is missing."""
  from mtneuro_jax.data import pipeline

  infos = {
    t: pipeline.dataset_info({"data_dir": data_dir, "task": t, "downsample": 1})
    for t in ("task1_roi_c1", "task1_roi_c2", "task1_roi_c3")
  }
  sources = {i["source"] for i in infos.values()}
  if len(sources) > 1:
    raise UserError(
      f"the three Task 1 exports in {data_dir} come from different sources: {sorted(sources)}; "
      "export all three from one source (`mtneuro export --tasks task1_roi_c1,task1_roi_c2,"
      "task1_roi_c3 ...`)"
    )
  first = infos["task1_roi_c1"]
  return {
    "source": first["source"],
    "synthetic": any(i["synthetic"] for i in infos.values()),
    "limit_per_split": next(
      (i["limit_per_split"] for i in infos.values() if i["limit_per_split"]), None
    ),
    "num_examples": {t: i["num_examples"] for t, i in infos.items()},
  }


def main(argv=None) -> int:
  parser = ArgumentParser(
    prog="mtneuro task1",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
  parser.add_argument(
    "--data_dir", default="out/data/phantom-seed0", help="export root (TFDS data_dir)"
  )
  parser.add_argument(
    "--out", default=None, help="output folder (default experiments/results/task1_<preset>)"
  )
  parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
  parser.add_argument("--dry_run", action="store_true", help="list the runs and exit")
  args = parser.parse_args(argv)

  preset = PRESETS[args.preset]
  out = args.out or os.path.join("experiments", "results", f"task1_{args.preset}")
  methods = [m for m in args.methods.split(",") if m]
  bad = [m for m in methods if m not in METHODS]
  if bad:
    parser.error(f"unknown methods {bad}; known: {METHODS}")
  try:
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else preset.seeds
  except ValueError:
    parser.error(f"--seeds={args.seeds!r} must be comma-separated integers, e.g. 1,100")
  if not seeds:
    parser.error("--seeds is empty; give at least one seed, e.g. 1")
  # --seeds applies to every method; the preset's own seeds may give SSL rows fewer.
  ssl_seeds = None if args.seeds else preset.ssl_seeds
  runs = plan_runs(preset, methods, seeds, ssl_seeds)
  if args.dry_run:
    for r in runs:
      print(r.label(), "->", r.workdir(out))
    print(f"{len(runs)} runs")
    return 0

  info = _data_info(args.data_dir)
  os.makedirs(out, exist_ok=True)
  t_start = time.time()
  src_note = "SYNTHETIC phantom — not comparable to the paper" if info["synthetic"] else "real data"
  print(
    f"[task1] preset {args.preset} ({preset.description}); data {info['source']} ({src_note}); "
    f"{len(runs)} runs -> {out}",
    flush=True,
  )
  results: dict[Run, dict] = {}
  timings: dict[str, float] = {}
  failed = []
  done_time, done_n = 0.0, 0
  for i, run in enumerate(runs, 1):
    cached = os.path.exists(os.path.join(run.workdir(out), "results.json"))
    t0 = time.time()
    try:
      res = execute(run, preset, args.data_dir, out)
    except UserError:
      raise  # bad input (data, config, a locked workdir) is the same for every run: stop at once
    except Exception as e:  # keep going: one broken run must not lose the others
      failed.append((run, repr(e)))
      print(f"[task1] [{i}/{len(runs)}] {run.label()}: FAILED {e!r}", flush=True)
      traceback.print_exc()
      continue
    dt = time.time() - t0
    results[run] = res
    if not cached:
      timings[run.label()] = round(dt, 1)
      done_time, done_n = done_time + dt, done_n + 1
    todo = len(runs) - i
    eta = f", ~{done_time / done_n * todo / 60:.1f} min left" if done_n and todo else ""
    accs = ", ".join(
      f"{k.split('/')[0]} {res[k]:.3f}" for k in sorted(res) if k.endswith("/accuracy")
    )
    print(
      f"[task1] [{i}/{len(runs)}] {run.label()}: {'cached' if cached else f'{dt:.0f}s'}; {accs}{eta}",
      flush=True,
    )
  timings["total"] = round(time.time() - t_start, 1)

  t1, a3 = build_tables(results, runs, args.preset, preset, methods, seeds, info, timings)
  for name, table, md in (("table1", t1, table1_markdown(t1)), ("table_a3", a3, a3_markdown(a3))):
    with open(os.path.join(out, f"{name}.json"), "w") as f:
      json.dump({**table, "failed_runs": [(r.label(), e) for r, e in failed]}, f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
      f.write(md)
    print(md, flush=True)
  print(
    f"[task1] done in {timings['total'] / 60:.1f} min; tables in {out}"
    + (f"; {len(failed)} run(s) FAILED" if failed else ""),
    flush=True,
  )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(run_cli(main, sys.argv[1:]))
