"""Task 1 table driver: the tiny preset end to end on tiny exports, plus planning and selection logic."""

import json
import os
import shutil

import pytest

from experiments import paper_reference as paper
from experiments import task1_tables as t1


@pytest.fixture(scope="module")
def tiny_task1_dir(tiny_data_dir, tmp_path_factory):
  """The shared tiny export root + a tiny task1_roi_c3 (the shared fixture has C1 and C2 only)."""
  from data_prep.export import export_task
  from mtneuro_jax.volumes.sources import make_source

  root = tmp_path_factory.mktemp("task1_tables")
  data = root / "data"
  for task in ("task1_roi_c1", "task1_roi_c2"):
    shutil.copytree(os.path.join(tiny_data_dir, task), data / task)
  export_task(
    make_source("phantom"),
    "task1_roi_c3",
    str(data),
    cache_dir=str(root / "cache"),
    limit_per_split=4,
    progress=False,
    chunk_z=8,
  )
  return str(data)


def test_plan_shares_the_c1_run_with_c2_and_table_a3():
  runs = t1.plan_runs(t1.PRESETS["paper"], ["supervised"], [1])
  keys = {(r.setting, r.downsample): r.evals for r in runs}
  # One ROI-C1 training at 2x serves ROI-C1 and ROI-C2 of Table 1 and the 2x column of Table A3.
  assert keys == {
    ("c12", 2): ("test_c1", "test_c2"),
    ("c3", 2): ("test_c3",),
    ("c12", 4): ("test_c1",),
    ("c12", 1): ("test_c1",),
  }
  runs = t1.plan_runs(t1.PRESETS["paper"], ["mixup"], paper.PAPER_SEEDS)
  assert len(runs) == 5 * 5 * 4  # p grid x seeds x (c12@2, c3@2, c12@4, c12@1)


def test_quick_runs_the_ssl_rows_on_one_seed_unless_seeds_are_given(capsys):
  quick = t1.PRESETS["quick"]
  runs = t1.plan_runs(quick, t1.METHODS, quick.seeds, quick.ssl_seeds)
  seeds = {m: sorted({r.seed for r in runs if r.method == m}) for m in t1.METHODS}
  assert all(seeds[m] == [1] for m in t1.SSL_METHODS)
  assert all(seeds[m] == [1, 100] for m in t1.METHODS if m not in t1.SSL_METHODS)
  assert len(runs) == 2 * (4 * 2 + len(t1.SSL_METHODS))  # 2 settings x (4 methods x 2 seeds + SSL)
  # --seeds is for every method: the dry run lists the SSL rows at both seeds.
  assert t1.main(["--preset", "quick", "--seeds", "1,100", "--dry_run"]) == 0
  assert "byol c12 4x seed 100" in capsys.readouterr().out
  assert t1.main(["--preset", "quick", "--dry_run"]) == 0
  listed = capsys.readouterr().out
  assert "byol c12 4x seed 1 " in listed and "byol c12 4x seed 100" not in listed
  assert "supervised c12 4x seed 100" in listed


def test_mixup_p_is_selected_on_validation_not_test():
  runs = t1.plan_runs(t1.PRESETS["tiny"], ["mixup"], [1, 2])
  results = {}
  for r in runs:
    # p=0.1 is better on val, p=0.5 better on test: the table must report p=0.1's test accuracy.
    good_val = r.p == 0.1
    results[r] = {
      "val/accuracy": 0.9 if good_val else 0.5,
      **{f"{e}/accuracy": (0.6 if good_val else 0.99) + 0.01 * r.seed for e in r.evals},
    }
  p, means = t1.select_p(results, runs, "c12", 4, [1, 2])
  assert p == 0.1 and means == {0.1: 0.9, 0.5: 0.5}
  cell = t1.cell_for(results, runs, "mixup", "c12", 4, "test_c1", [1, 2])
  assert cell["p_selected"] == 0.1
  assert cell["mean"] == pytest.approx(0.615) and cell["sd"] == pytest.approx(0.00707107, rel=1e-4)


def test_mean_sd_uses_sample_sd():
  import numpy as np

  vals = [0.8, 0.9, 0.85]
  c = t1.mean_sd(vals)
  assert c["mean"] == pytest.approx(np.mean(vals)) and c["sd"] == pytest.approx(
    np.std(vals, ddof=1)
  )
  assert t1.mean_sd([0.7])["sd"] is None


@pytest.mark.slow  # ~10 tiny runs, dominated by compilation (about a minute on 2 cores)
def test_tiny_preset_end_to_end(tiny_task1_dir, tmp_path, capsys):
  out = str(tmp_path / "tables")
  rc = t1.main(["--preset", "tiny", "--data_dir", tiny_task1_dir, "--out", out])
  assert rc == 0
  for name in ("table1", "table_a3"):
    assert os.path.exists(os.path.join(out, f"{name}.md")) and os.path.exists(
      os.path.join(out, f"{name}.json")
    )

  tab1 = json.load(open(os.path.join(out, "table1.json")))
  assert tab1["synthetic"] and not tab1["comparable_to_paper"]
  assert [r["method"] for r in tab1["rows"]] == list(t1.METHODS)
  for row in tab1["rows"]:
    assert "synthetic" in row["data_source"]
    for s in t1.SETTINGS:
      ours, ref = row["cells"][s]["ours"], row["cells"][s]["paper"]
      assert 0.0 <= ours["mean"] <= 1.0 and ours["n"] == 1
      # The paper's value beside ours; methods the paper did not run (VICReg) have none.
      assert (ref["mean"], ref["sd"]) == paper.TABLE1.get(row["method"], {}).get(s, (None, None))
  mix = next(r for r in tab1["rows"] if r["method"] == "mixup")
  assert mix["cells"]["ROI-C1"]["ours"]["p_selected"] in (0.1, 0.5)
  # ROI-C1 and ROI-C2 come from the same training run (one workdir, two test evals).
  res = json.load(open(os.path.join(out, "runs", "supervised", "c12-ds4", "seed1", "results.json")))
  assert tab1["rows"][0]["cells"]["ROI-C1"]["ours"]["mean"] == pytest.approx(
    res["test_c1/accuracy"]
  )
  assert tab1["rows"][0]["cells"]["ROI-C2"]["ours"]["mean"] == pytest.approx(
    res["test_c2/accuracy"]
  )
  assert not os.path.exists(os.path.join(out, "runs", "supervised", "c2-ds4"))

  md1 = open(os.path.join(out, "table1.md")).read()
  assert "SYNTHETIC" in md1 and "NEVER comparable" in md1
  table_part, stats_part = md1.split("## Seed statistics")
  lines = [ln for ln in table_part.splitlines() if ln.startswith("| ")]
  assert lines[0].count("|") == 2 + 2 * 3 + 2  # method, data, (ours, paper) x 3 settings, notes
  assert len(lines) == 1 + len(t1.METHODS)
  sup = next(ln for ln in lines if ln.startswith("| Supervised"))
  assert "0.88 ± 0.03" in sup and "0.77 ± 0.03" in sup  # the paper's values beside ours
  assert "| PCA |" in md1 and "0.59" in md1
  # Seed statistics: one row per method; paired differences to supervised for the others.
  assert len([ln for ln in stats_part.splitlines() if ln.startswith("| ")]) == 1 + len(t1.METHODS)
  assert set(tab1["paired_vs_supervised"]) == set(t1.METHODS) - {"supervised"}
  byol_c1 = tab1["paired_vs_supervised"]["byol"]["ROI-C1"]
  byol_cell = next(r for r in tab1["rows"] if r["method"] == "byol")["cells"]["ROI-C1"]["ours"]
  assert byol_c1["n"] == 1 and byol_c1["mean_diff"] == pytest.approx(
    byol_cell["mean"] - tab1["rows"][0]["cells"]["ROI-C1"]["ours"]["mean"]
  )
  # An SSL row is its frozen probe's corners accuracy, trained from the pretraining run's encoder.
  probe = json.load(open(os.path.join(out, "runs", "byol", "c12-ds4", "seed1", "results.json")))
  assert byol_cell["mean"] == pytest.approx(probe["test_c1/accuracy"])
  assert os.path.isdir(
    os.path.join(out, "runs", "byol", "c12-ds4", "seed1", "pretrain", "checkpoints")
  )

  a3 = json.load(open(os.path.join(out, "table_a3.json")))
  for row in a3["rows"]:
    assert row["cells"]["4"]["ours"]["mean"] is not None  # the tiny preset runs 4x
    assert row["cells"]["2"]["ours"]["note"] == "not run (tiny)"
    assert (
      row["cells"]["1"]["paper"]["mean"] == paper.TABLE_A3.get(row["method"], {}).get(1, (None,))[0]
    )
  md3 = open(os.path.join(out, "table_a3.md")).read()
  assert "0.83" in md3 and "not run (tiny)" in md3

  # Resumable: a second call reruns nothing.
  capsys.readouterr()
  assert t1.main(["--preset", "tiny", "--data_dir", tiny_task1_dir, "--out", out]) == 0
  log = capsys.readouterr().out
  assert log.count(": cached;") == len(t1.plan_runs(t1.PRESETS["tiny"], t1.METHODS, (1,)))


def test_bootstrap_interval_and_paired_comparison_closed_forms():
  assert t1.bootstrap_ci([0.5]) is None  # one seed: no interval
  assert t1.bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
  lo, hi = t1.bootstrap_ci([0.6, 0.8, 1.0])
  assert 0.6 <= lo < 0.8 < hi <= 1.0
  assert t1.bootstrap_ci([0.6, 0.8, 1.0]) == (lo, hi)  # fixed resampling seed: reproducible
  # Three seeds all better by 0.1: of the 2^3 sign patterns only all-plus and all-minus reach
  # |mean| >= 0.1, so the exact two-sided p is 2/8.
  cmp = t1.paired_comparison({1: 0.9, 2: 0.95, 3: 1.0, 7: 0.5}, {1: 0.8, 2: 0.85, 3: 0.9})
  assert cmp["seeds"] == [1, 2, 3] and cmp["n"] == 3
  assert cmp["mean_diff"] == pytest.approx(0.1) and cmp["p_sign_flip"] == pytest.approx(0.25)
  assert cmp["ci95"] == pytest.approx([0.1, 0.1])
  mixed = t1.paired_comparison({1: 0.9, 2: 0.7}, {1: 0.8, 2: 0.8})
  assert mixed["mean_diff"] == pytest.approx(0.0) and mixed["p_sign_flip"] == pytest.approx(1.0)
  assert t1.paired_comparison({1: 0.9}, {2: 0.8}) is None
