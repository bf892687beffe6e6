"""ICIP 2021 tables: Double U-Net (two steps) and baselines -> micro and macro F1, ours beside the paper.

Usage:
  python -m experiments.icip_tables --preset quick --data_dir out/data/phantom-seed0 \
      --out experiments/results/icip_quick
  python -m experiments.icip_tables --preset paper --data_dir out/data/bossdb --out out/icip_paper
  (--models double_unet,unet  --seeds 1,100  --dry_run  to narrow or list the runs; also
   `mtneuro icip ...`)

Needs the exports task2_2d_4class (micro: bg, vessel, cell, axon; CTX/STR/VP) and
task2_2d_3class (the same tiles with all four regions: macro, Double U-Net step 1,
U-Net encoder) in ``--data_dir`` (``mtneuro export --source phantom --tasks all``).

Paper: "Multi-scale modeling of neural structure in X-ray imagery" (ICIP 2021). Runs per seed
(configs/icip_multiscale.py):
* Double U-Net: ``step1`` (class branch + U-Net on region CE + lambda x reconstruction MSE,
  task2_2d_3class), then ``step2`` (its class branch loaded with init_from and frozen, the
  U-Net trained on pixel CE, task2_2d_4class); its scores are step 2's (the macro ones come
  from the frozen branch, so they equal step 1's).
* U-Net (the Double U-Net's residual U-Net alone), MT U-Net (shared encoder, pixel + region
  heads), SegNet: one step (``joint``); U-Net encoder (the class branch alone, region CE):
  one step, macro only.
Micro F1: per pixel class, tp/fp/fn summed over the test split (``f1_dataset``), avg over the
four classes (background included, the paper's 'avg'). Macro F1: per region from the region
logits of each test tile of task2_2d_3class (all four regions), avg over regions. Cells are
mean ± sample sd over seeds, with a 95% percentile bootstrap interval of the avg. A majority
row per table predicts the most frequent training class / region.

Presets:
* ``paper`` (accelerators): 128x128 inputs (2x), n_blocks 5, width 1, step 1 100 epochs,
  step 2 and the segmentation baselines 300 epochs, every model, seeds 1, 100, 350.
* ``quick`` (the main job, CPU): ``configlib.ICIP_QUICK`` (64x64, n_blocks 4, width 1/4,
  ICIP_QUICK_STEPS steps at batch 16), Double U-Net + U-Net + MT U-Net + SegNet, seed 1.
* ``tiny`` (tests, seconds): ``:tiny`` configs, micro on task2_2d_3class (the test fixture
  has no 4-class export), every model, seed 1.

Resumable: a run whose workdir holds results.json is not rerun, a diverged one (failed.json)
is not retried, an interrupted one resumes from its checkpoint; majority rows and overlays
are cached likewise. Outputs in ``--out``: icip_micro.md, icip_macro.md, icip_tables.json
(with every model's final run workdir per seed: ``final_runs``; the quick Double U-Net's is
what `mtneuro deploy` loads), overlay_<model>.png. Run workdirs go to ``--runs`` (default
out/icip_runs/<data_dir name>/<preset>/) as <model>/seed<s>/{step1,step2,joint}.
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

MODELS = ("double_unet", "unet", "mt_unet", "segnet", "unet_encoder")
LABELS = {
  "double_unet": "Double U-Net",
  "unet": "U-Net",
  "mt_unet": "MT U-Net",
  "segnet": "SegNet",
  "unet_encoder": "U-Net encoder",
}
STEPS = {"double_unet": ("step1", "step2")}  # every other model: ("joint",)
SEGMENTERS = ("double_unet", "unet", "mt_unet", "segnet")
REGION_MODELS = ("double_unet", "mt_unet", "unet_encoder")
MICRO_TASK = "task2_2d_4class"
MACRO_TASK = "task2_2d_3class"
FAILED_FILE = "failed.json"

# The ICIP 2021 paper's numbers (F1 on the real X-ray volume; no sd given). Micro = per
# microstructure class (our 4-class names), macro = per region. None = not reported.
PAPER_SOURCE = "ICIP 2021 'Multi-scale modeling of neural structure in X-ray imagery', real data"
PAPER_MICRO = {
  "double_unet": {"axon": 0.79, "vessel": 0.59, "cell": 0.70, "background": 0.92, "avg": 0.75},
  "unet": {"avg": 0.75},
  "mt_unet": {"avg": 0.72},
  "segnet": {"avg": 0.69},
}
PAPER_MACRO = {
  "double_unet": {"STR": 0.95, "VP": 0.92, "CTX": 0.99, "ZI": 0.81, "avg": 0.92},
  "unet_encoder": {"avg": 0.93},
  "mt_unet": {"avg": 0.84},
}
MICRO_CLASSES = ("axon", "vessel", "cell", "background")  # the paper's column order
PAPER_CLASS_LABELS = {"axon": "axon", "vessel": "BV", "cell": "cell", "background": "bg"}
MACRO_REGIONS = ("STR", "VP", "CTX", "ZI")  # the paper's column order


@dataclasses.dataclass(frozen=True)
class Preset:
  size: str  # configs/icip_multiscale.py size word; '' = full size (the paper)
  models: tuple[str, ...]
  seeds: tuple[int, ...]
  micro_task: str = MICRO_TASK
  overrides: tuple[tuple[str, object], ...] = ()
  description: str = ""


_Q = configlib.ICIP_QUICK
PRESETS = {
  "paper": Preset(
    "",
    MODELS,
    (1, 100, 350),
    description="the paper's protocol (accelerator): 128x128 inputs, width 1, step 1 100 "
    "epochs, step 2 / segmentation baselines 300 epochs",
  ),
  "quick": Preset(
    "quick",
    ("double_unet", "unet", "mt_unet", "segnet"),
    (1,),
    description=f"CPU: {_Q.downsample}x ({256 // _Q.downsample}x{256 // _Q.downsample} tiles), "
    f"width 1/{round(1 / _Q.width_multiplier)}, {_Q.total_steps} steps per run at batch "
    f"{_Q.batch_size}",
  ),
  "tiny": Preset(
    "tiny",
    MODELS,
    (1,),
    micro_task=MACRO_TASK,
    description="test preset (seconds; micro on the 3-class export)",
  ),
}


@dataclasses.dataclass(frozen=True)
class Run:
  model: str
  step: str
  seed: int

  def workdir(self, runs_dir: str) -> str:
    return os.path.join(runs_dir, self.model, f"seed{self.seed}", self.step)

  def label(self) -> str:
    return f"{self.model} {self.step} seed {self.seed}"


def model_runs(model: str, seed: int) -> list[Run]:
  return [Run(model, s, seed) for s in STEPS.get(model, ("joint",))]


def build_config(run: Run, preset: Preset, data_dir: str, runs_dir: str):
  """The locked ConfigDict of one run (step 2 starts from the same seed's step 1)."""
  from configs import icip_multiscale

  c = icip_multiscale.get_config(",".join(w for w in (run.model, run.step, preset.size) if w))
  c.unlock()
  c.seed = int(run.seed)
  c.data.data_dir = data_dir
  c.progress = False  # the driver prints one line per run instead
  if c.data.task == MICRO_TASK and preset.micro_task != MICRO_TASK:
    c.data.task = preset.micro_task
    c.model.num_classes = len(spec.PIXEL_CLASS_NAMES[spec.get_task(preset.micro_task).label_set])
  if run.step == "step2":
    c.init_from.workdir = Run(run.model, "step1", run.seed).workdir(runs_dir)
  for k, v in preset.overrides:
    set_dotted(c, k, v)
  c.lock()
  return c


def execute(run: Run, preset: Preset, data_dir: str, runs_dir: str) -> dict:
  """Trains one run (or loads its results.json / failed.json); returns its results dict."""
  from mtneuro_jax.train import loop
  from mtneuro_jax.train.metrics import NonFiniteLossError

  wd = run.workdir(runs_dir)
  for name in ("results.json", FAILED_FILE):
    if os.path.exists(os.path.join(wd, name)):
      with open(os.path.join(wd, name)) as f:
        return json.load(f)
  try:
    return loop.train_and_evaluate(build_config(run, preset, data_dir, runs_dir), wd)
  except NonFiniteLossError as e:
    failed = {"failed": f"diverged: {str(e).splitlines()[0]}"}
    with open(os.path.join(wd, FAILED_FILE), "w") as f:
      json.dump(failed, f)
    return failed


# ---------------------------------------------------------------------------
# Majority rows.
def majority_rows(cfg_micro, cfg_macro) -> dict:
  """Test scores of predicting the most frequent training pixel class (micro, on
  ``cfg_micro``'s data) and the most frequent training region (macro, ``cfg_macro``'s)."""
  from experiments.task2_tables import majority_scores
  from mtneuro_jax import sharding
  from mtneuro_jax.data import pipeline
  from mtneuro_jax.eval.common import to_host
  from mtneuro_jax.eval.multiscale import macro_metrics

  micro = majority_scores(cfg_micro)
  mesh = sharding.make_mesh()
  info = pipeline.dataset_info(cfg_macro.data)
  bs = int(cfg_macro.data.eval_batch_size)

  def regions(split):
    out = []
    for b in pipeline.eval_batches(cfg_macro.data, split, mesh=mesh, global_batch_size=bs):
      out.append(to_host(b["region"])[to_host(b["valid"]).astype(bool)])
    return np.concatenate(out)

  counts = np.bincount(regions(info["train_split"]), minlength=len(spec.REGIONS))
  majority = int(np.argmax(counts))
  truth = regions("test")
  macro = macro_metrics(truth, np.full_like(truth, majority))
  macro = {f"test/{k}": v for k, v in macro.items()}
  macro["majority_region"] = spec.REGIONS[majority]
  return {"micro": micro, "macro": macro}


# ---------------------------------------------------------------------------
# Tables.
def _micro_key(name: str) -> str:
  return f"test_micro/micro/f1_dataset/{name}"


def _macro_key(name: str) -> str:
  return f"test_macro/macro/f1/{name}"


def model_cells(results: Sequence[dict], class_names: Sequence[str]) -> dict:
  """mean ± sd over the seeds' final results: micro per class + avg, macro per region + avg +
  accuracy (only the scores the model has)."""
  out: dict = {"micro": {}, "macro": {}}
  done = [r for r in results if r and "failed" not in r]
  micro_cols = [(n, _micro_key(n)) for n in class_names] + [("avg", _micro_key("mean"))]
  macro_cols = [(r, _macro_key(r)) for r in MACRO_REGIONS] + [
    ("avg", _macro_key("mean")),
    ("accuracy", "test_macro/macro/accuracy"),
  ]
  for part, cols in (("micro", micro_cols), ("macro", macro_cols)):
    if not any(k in r for r in done for _, k in cols):
      continue
    for name, key in cols:
      vals = [r[key] for r in done if key in r]
      cell = mean_sd(vals)
      if name == "avg":
        ci = bootstrap_ci(vals)
        cell["ci95"] = list(ci) if ci else None
      out[part][name] = cell
  return out


def _done(finals: dict, model: str, seed: int) -> bool:
  res = finals.get(model, {}).get(seed, {}).get("results") or {}
  return bool(res) and "failed" not in res


def build_tables(
  preset_name: str,
  preset: Preset,
  info: dict,
  finals: dict,
  extra: dict,
  majority: dict,
  timings: dict,
  overlays: dict,
  runs_dir: str,
) -> dict:
  header, row_source, comparable = source_line(info)
  micro_names = spec.PIXEL_CLASS_NAMES[spec.get_task(preset.micro_task).label_set]
  rows = []
  for model in preset.models:
    results = [finals[model][s]["results"] for s in preset.seeds if s in finals.get(model, {})]
    rows.append(
      {
        "model": model,
        "label": LABELS[model],
        "data_source": row_source,
        "seeds_done": [s for s in preset.seeds if _done(finals, model, s)],
        "ours": model_cells(results, micro_names),
        "paper_micro": PAPER_MICRO.get(model),
        "paper_macro": PAPER_MACRO.get(model),
        **extra.get(model, {}),
      }
    )
  final_runs = {
    m: {str(s): finals[m][s]["workdir"] for s in preset.seeds if s in finals.get(m, {})}
    for m in preset.models
  }
  return {
    "tables": "ICIP 2021 multi-scale models: micro F1 (per class) and macro F1 (per region)",
    "preset": preset_name,
    "preset_description": preset.description,
    "seeds": list(preset.seeds),
    "micro_task": preset.micro_task,
    "macro_task": MACRO_TASK,
    "micro_classes": list(micro_names),
    "data_source": info.get("source"),
    "synthetic": bool(info.get("synthetic")),
    "comparable_to_paper": comparable,
    "source_note": header,
    "paper_source": PAPER_SOURCE,
    "rows": rows,
    "majority": majority,
    "final_runs": final_runs,
    "runs_dir": runs_dir,
    "overlays": overlays,
    "timings_s": timings,
    "machine": machine_info(),
  }


def _num(v) -> str:
  return "—" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _paper_num(d: dict | None, key: str) -> str:
  v = (d or {}).get(key)
  return "—" if v is None else f"{v:.2f}"


def _intro(t: dict, what: str) -> list[str]:
  return [
    t["source_note"],
    "",
    f"Ours: preset `{t['preset']}` ({t['preset_description']}); seeds {t['seeds']}, mean ± "
    f"sample sd. {what} Paper: {t['paper_source']} (no sd given).",
    machine_line(t),
    "",
  ]


def micro_markdown(t: dict) -> str:
  names = [n for n in MICRO_CLASSES if n in t["micro_classes"]] + [
    n for n in t["micro_classes"] if n not in MICRO_CLASSES
  ]
  heads = []
  for n in names + ["avg"]:
    label = PAPER_CLASS_LABELS.get(n, n)
    heads += [f"{label} ours", f"{label} paper"]
  lines = [
    f"# ICIP 2021 — micro F1 (per microstructure class), test split of `{t['micro_task']}`",
    "",
    *_intro(
      t,
      "F1 per class with tp, fp, fn summed over the test split; avg = mean over the classes "
      "(background included, the paper's 'avg').",
    ),
    "| model | data | " + " | ".join(heads) + " | avg 95% CI |",
    "|---|---|" + "---|" * len(heads) + "---|",
  ]
  for row in t["rows"]:
    cells = row["ours"]["micro"]
    if not cells:
      continue
    out = []
    for n in names + ["avg"]:
      out += [fmt(cells.get(n)), _paper_num(row["paper_micro"], n)]
    ci = ci_text((cells.get("avg") or {}).get("ci95"))
    lines.append(f"| {row['label']} | {row['data_source']} | " + " | ".join(out) + f" | {ci} |")
  m = t["majority"].get("micro")
  if m:
    out = []
    for n in names:
      out += [_num(m.get(f"test/f1_dataset/{n}")), ""]
    out += [_num(m.get("test/f1_dataset/mean")), ""]
    label = f"Majority class (predicts '{m['majority_class']}')"
    lines.append(f"| {label} | same test split | " + " | ".join(out) + " | — |")
  lines += _overlay_markdown(t)
  return "\n".join(lines) + "\n"


def macro_markdown(t: dict) -> str:
  heads = []
  for n in list(MACRO_REGIONS) + ["avg"]:
    heads += [f"{n} ours", f"{n} paper"]
  lines = [
    f"# ICIP 2021 — macro F1 (per brain region), test split of `{t['macro_task']}`",
    "",
    *_intro(
      t,
      "F1 per region of the region-branch prediction of each test tile; avg = mean over "
      "the four regions. Models trained on task2_2d_4class (MT U-Net) never saw a ZI tile.",
    ),
    "| model | data | " + " | ".join(heads) + " | accuracy | avg 95% CI |",
    "|---|---|" + "---|" * len(heads) + "---|---|",
  ]
  for row in t["rows"]:
    cells = row["ours"]["macro"]
    if not cells:
      continue
    out = []
    for n in list(MACRO_REGIONS) + ["avg"]:
      out += [fmt(cells.get(n)), _paper_num(row["paper_macro"], n)]
    ci = ci_text((cells.get("avg") or {}).get("ci95"))
    lines.append(
      f"| {row['label']} | {row['data_source']} | "
      + " | ".join(out)
      + f" | {fmt(cells.get('accuracy'))} | {ci} |"
    )
  m = t["majority"].get("macro")
  if m:
    out = []
    for n in MACRO_REGIONS:
      out += [_num(m.get(f"test/f1/{n}")), ""]
    out += [_num(m.get("test/f1/mean")), ""]
    label = f"Majority region (predicts '{m['majority_region']}')"
    lines.append(
      f"| {label} | same test split | "
      + " | ".join(out)
      + f" | {_num(m.get('test/accuracy'))} | — |"
    )
  for row in t["rows"]:
    if "step1_macro_avg" in row:
      lines += [
        "",
        f"{row['label']}: step-1 macro F1 avg {_num(row['step1_macro_avg'])} (the frozen branch "
        f"gives step 2 the same region predictions: equal = {row['step1_equals_step2']}).",
      ]
  return "\n".join(lines) + "\n"


def _overlay_markdown(t: dict) -> list[str]:
  if not t["overlays"]:
    return []
  lines = ["", "## Overlays (image | truth | prediction; axon cyan, vessel red, cell yellow)", ""]
  for key, name in sorted(t["overlays"].items()):
    lines.append(f"- {key}: ![{key}]({name})")
  return lines


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
  parser = ArgumentParser(
    prog="mtneuro icip",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
  parser.add_argument(
    "--data_dir", default=configlib.DEFAULT_DATA_DIR, help="export root (TFDS data_dir)"
  )
  parser.add_argument(
    "--out", default=None, help="tables folder (default experiments/results/icip_<preset>)"
  )
  parser.add_argument(
    "--runs", default=None, help="run workdirs (default out/icip_runs/<data_dir name>/<preset>)"
  )
  parser.add_argument("--models", default=None, help=f"subset of {','.join(MODELS)}")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
  parser.add_argument("--no_overlays", action="store_true", help="skip the overlay PNGs")
  parser.add_argument("--dry_run", action="store_true", help="list the runs and exit")
  args = parser.parse_args(argv)

  preset = PRESETS[args.preset]
  models = select_words(parser, "--models", args.models, MODELS, preset.models)
  seeds = parse_seeds(parser, args.seeds, preset.seeds)
  preset = dataclasses.replace(preset, models=models, seeds=seeds)
  out = args.out or os.path.join("experiments", "results", f"icip_{args.preset}")
  runs_dir = args.runs or os.path.join(
    "out", "icip_runs", os.path.basename(os.path.normpath(args.data_dir)), args.preset
  )
  runs = [r for m in models for s in seeds for r in model_runs(m, s)]
  if args.dry_run:
    for r in runs:
      print(r.label(), "->", r.workdir(runs_dir))
    return 0

  tasks = sorted({preset.micro_task, MACRO_TASK})
  info = exports_info(args.data_dir, tasks)
  os.makedirs(out, exist_ok=True)
  t_start = time.time()
  src = "SYNTHETIC phantom — not comparable to the paper" if info["synthetic"] else "real data"
  print(
    f"[icip] preset {args.preset} ({preset.description}); data {info['source']} ({src}); "
    f"models {list(models)}, seeds {list(seeds)} -> {out}",
    flush=True,
  )
  results: dict[Run, dict] = {}
  timings: dict[str, float] = {}
  failed: list[tuple[str, str]] = []
  for run in runs:
    if run.step == "step2" and "failed" in results.get(Run(run.model, "step1", run.seed), {}):
      results[run] = {"failed": "step 1 failed"}
      continue
    wd = run.workdir(runs_dir)
    cached = any(os.path.exists(os.path.join(wd, n)) for n in ("results.json", FAILED_FILE))
    t0 = time.time()
    try:
      res = execute(run, preset, args.data_dir, runs_dir)
    except UserError:
      raise  # bad input is the same for every run: stop at once
    except Exception as e:  # one broken run must not lose the others
      failed.append((run.label(), repr(e)))
      results[run] = {"failed": repr(e)}
      print(f"[icip] {run.label()}: FAILED {e!r}", flush=True)
      traceback.print_exc()
      continue
    results[run] = res
    if not cached:
      timings[run.label()] = round(time.time() - t0, 1)
    how = "cached" if cached else f"{time.time() - t0:.0f}s"
    scores = [
      f"{what} {res[k]:.3f}"
      for what, k in (
        ("micro F1 avg", _micro_key("mean")),
        ("macro F1 avg", _macro_key("mean")),
        ("region acc", "test_macro/macro/accuracy"),
      )
      if k in res
    ]
    print(f"[icip] {run.label()}: {how}; {res.get('failed') or ', '.join(scores)}", flush=True)

  finals: dict = {}
  extra: dict = {}
  for m in models:
    finals[m] = {}
    for s in seeds:
      last = model_runs(m, s)[-1]
      finals[m][s] = {"results": results.get(last) or {}, "workdir": last.workdir(runs_dir)}
    if m == "double_unet":
      pairs = [
        (results.get(Run(m, "step1", s)) or {}, results.get(Run(m, "step2", s)) or {})
        for s in seeds
      ]
      step1 = [a.get(_macro_key("mean")) for a, _ in pairs]
      extra[m] = {
        "step1_macro_avg": mean_sd([v for v in step1 if v is not None])["mean"],
        "step1_equals_step2": all(
          a.get("test_macro/macro/confusion") == b.get("test_macro/macro/confusion")
          for a, b in pairs
        ),
      }

  # Majority rows (cached in runs_dir).
  path = os.path.join(runs_dir, f"majority_{preset.micro_task}.json")
  if not os.path.exists(path):
    seg = next((m for m in models if m in SEGMENTERS), "unet")
    cfg_micro = build_config(model_runs(seg, seeds[0])[-1], preset, args.data_dir, runs_dir)
    cfg_macro = build_config(
      Run("unet_encoder", "joint", seeds[0]), preset, args.data_dir, runs_dir
    )
    os.makedirs(runs_dir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(majority_rows(cfg_micro, cfg_macro), f)
  with open(path) as f:
    majority = json.load(f)

  overlays = {}
  if not args.no_overlays:
    from experiments.task2_tables import write_overlay

    for m in models:
      if m not in SEGMENTERS:
        continue
      s = seeds[0]
      res = finals[m][s]["results"]
      if _micro_key("mean") not in res:
        continue
      name = f"overlay_{m}.png"
      if not os.path.exists(os.path.join(out, name)):
        last = model_runs(m, s)[-1]
        title = (
          f"{LABELS[m]}, seed {s} ({info['source']}{', synthetic' if info['synthetic'] else ''})"
          f": test micro F1 avg {res[_micro_key('mean')]:.3f}"
        )
        cfg = build_config(last, preset, args.data_dir, runs_dir)
        write_overlay(cfg, last.workdir(runs_dir), os.path.join(out, name), title)
      overlays[LABELS[m]] = name
  timings["total"] = round(time.time() - t_start, 1)

  t = build_tables(args.preset, preset, info, finals, extra, majority, timings, overlays, runs_dir)
  with open(os.path.join(out, "icip_tables.json"), "w") as f:
    json.dump({**t, "failed_runs": failed}, f, indent=1)
  micro, macro = micro_markdown(t), macro_markdown(t)
  with open(os.path.join(out, "icip_micro.md"), "w") as f:
    f.write(micro)
  with open(os.path.join(out, "icip_macro.md"), "w") as f:
    f.write(macro)
  print(micro + "\n" + macro, flush=True)
  for m, wds in t["final_runs"].items():
    for s, wd in wds.items():
      print(f"[icip] final run {m} seed {s}: {wd}", flush=True)
  print(
    f"[icip] done in {timings['total']:.0f}s; tables in {out}"
    + (f"; {len(failed)} run(s) FAILED" if failed else ""),
    flush=True,
  )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(run_cli(main, sys.argv[1:]))
