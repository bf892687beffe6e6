"""The fidelity report's pieces (experiments/phantom_fidelity.py, volumes/morphology.py) and the
render bench's baseline machinery, on constructed inputs: no rendering of real-size boxes, no
dependence on an exported dataset or on the phantom's exact numbers."""

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest

from experiments import phantom_fidelity as fid
from experiments.bench import phantom_render_bench as bench
from mtneuro_jax.errors import UserError
from mtneuro_jax.volumes import morphology, spec

V, C, A = (spec.PIXEL_IDS[k] for k in ("vessel", "cell", "axon"))
T = 128
N = T * T


def _two_tiles() -> np.ndarray:
  """Tile 0: two 3x3 cells 20 px apart, an 8x8 vessel, a 16-row axon band. Tile 1: one 2x2 cell."""
  t = np.zeros((2, T, T), np.uint8)
  t[0, 9:12, 9:12] = C  # centroid (10, 10)
  t[0, 9:12, 29:32] = C  # centroid (10, 30)
  t[0, 50:58, 50:58] = V
  t[0, 100:116, :] = A
  t[1, 60:62, 60:62] = C
  return t


def test_calibration_stats_known_answers():
  st = morphology.calibration_stats(_two_tiles())
  assert set(st) == set(morphology.CALIBRATION_KEYS)
  assert st["cells_per_tile"] == {"mean": 1.5, "sd": 0.5, "n": 2}
  areas = np.array([9.0, 9.0, 4.0])
  assert st["cell_area"]["n"] == 3
  assert st["cell_area"]["mean"] == pytest.approx(areas.mean())
  assert st["cell_area"]["sd"] == pytest.approx(areas.std())
  # Only tile 0's two cells have a neighbour in their tile: 20 px each way.
  assert st["cell_nn_distance"] == {"mean": pytest.approx(20.0), "sd": pytest.approx(0.0), "n": 2}
  assert st["vessel_density"]["mean"] == pytest.approx(64 / N / 2)
  assert st["vessel_density"]["sd"] == pytest.approx(64 / N / 2)
  assert st["axon_density"]["mean"] == pytest.approx(16 * T / N / 2)
  assert st["axon_density"]["sd"] == pytest.approx(16 * T / N / 2)


def test_calibration_stats_eight_connected_and_empty():
  t = np.zeros((1, T, T), np.uint8)
  t[0, 10, 10] = t[0, 11, 11] = C  # diagonal neighbours: one component of 2 px
  st = morphology.calibration_stats(t)
  assert st["cells_per_tile"]["mean"] == 1
  assert st["cell_area"]["mean"] == 2
  assert st["cell_nn_distance"]["n"] == 0 and math.isnan(st["cell_nn_distance"]["mean"])
  empty = morphology.calibration_stats(np.zeros((3, T, T), np.uint8))
  assert empty["cells_per_tile"] == {"mean": 0.0, "sd": 0.0, "n": 3}
  assert math.isnan(empty["cell_area"]["mean"]) and empty["cell_area"]["n"] == 0
  with pytest.raises(ValueError, match=r"\[N, H, W\]"):
    morphology.calibration_stats(np.zeros((T, T), np.uint8))


def _stats(cells=10.0, area=50.0, nn=20.0, vessel=0.02, axon=0.2, axon_sd=0.1) -> dict:
  def e(m, s=1.0):
    return {"mean": m, "sd": s, "n": 16}

  return {
    "cells_per_tile": e(cells),
    "cell_area": e(area),
    "cell_nn_distance": e(nn),
    "vessel_density": e(vessel, 0.01),
    "axon_density": e(axon, axon_sd),
  }


def test_calibration_check_tolerances():
  real = _stats()
  assert all(morphology.calibration_check(_stats(), real).values())
  ok = morphology.calibration_check(_stats(cells=12.4, area=38.0, vessel=0.0245), real)
  assert ok["cells_per_tile"] and ok["cell_area"] and ok["vessel_density"]
  bad = morphology.calibration_check(_stats(cells=12.6, nn=14.0, vessel=0.026), real)
  assert not bad["cells_per_tile"] and not bad["cell_nn_distance"] and not bad["vessel_density"]
  assert bad["cell_area"]
  # Axon-density spread: within a factor of 2 either way passes, beyond fails.
  assert morphology.calibration_check(_stats(axon_sd=0.2), real)["axon_density_sd"]
  assert morphology.calibration_check(_stats(axon_sd=0.05), real)["axon_density_sd"]
  assert not morphology.calibration_check(_stats(axon_sd=0.21), real)["axon_density_sd"]
  assert not morphology.calibration_check(_stats(axon_sd=0.04), real)["axon_density_sd"]


def test_calibration_check_zi_like_zero_axons():
  real = _stats(axon=0.0, axon_sd=0.0)  # the real ZI masks carry no axon labels
  faint = morphology.calibration_check(_stats(axon=0.015, axon_sd=0.008), real)
  assert faint["axon_density"] and faint["axon_density_sd"]
  dense = morphology.calibration_check(_stats(axon=0.5, axon_sd=0.06), real)
  assert not dense["axon_density"] and not dense["axon_density_sd"]
  none = morphology.calibration_check(_stats(axon=0.0, axon_sd=0.0), real)
  assert none["axon_density"] and none["axon_density_sd"]


def test_real_masks_shipped_ignores_override(monkeypatch, tmp_path):
  monkeypatch.setenv(morphology.REAL_MASKS_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="cannot be read"):
    morphology.load_real_masks("CTX")
  masks = morphology.load_real_masks("CTX", shipped=True)
  assert masks.shape == (16, 128, 128)
  assert "shipped" in morphology.real_masks_source(shipped=True)
  with pytest.raises(ValueError):
    morphology.load_real_masks("CTX", str(tmp_path), shipped=True)


def _tiles(rng, labels, means, size=16):
  x = rng.normal(0.0, 0.05, (len(labels), size, size)) + np.asarray(means)[labels][:, None, None]
  return np.clip(x, 0, 1).astype(np.float32)


def test_histogram_probe_separable_by_mean():
  rng = np.random.default_rng(0)
  means = [0.2, 0.4, 0.6, 0.8]
  ytr, yte = np.repeat(np.arange(4), 30), np.repeat(np.arange(4), 20)
  out = fid.histogram_probe(
    _tiles(rng, ytr, means), ytr, {"c1_test": (_tiles(rng, yte, means), yte)}
  )
  assert out["train"] > 0.95 and out["c1_test"] > 0.95


def test_histogram_probe_not_separable():
  # Every class draws its tiles from one distribution: grey-level statistics carry no label.
  rng = np.random.default_rng(1)
  ytr, yte = np.repeat(np.arange(4), 40), np.repeat(np.arange(4), 60)
  same = [0.5] * 4
  out = fid.histogram_probe(_tiles(rng, ytr, same), ytr, {"t": (_tiles(rng, yte, same), yte)})
  assert out["t"] < 0.45  # chance is 0.25
  assert fid.histogram_features(_tiles(rng, yte, same)).shape == (len(yte), 4)


# ---------------------------------------------------------------------------
# The report's acceptance rows and markdown, on a small fake report dict.
def _fake_report(hist_c1=0.70, sup_c1=0.90, bench=None) -> dict:
  tiles = _two_tiles()
  cal_stats = morphology.calibration_stats(tiles)
  shifted = morphology.calibration_stats(np.where(tiles == C, 0, tiles).astype(np.uint8))
  calibration = {}
  for i, r in enumerate(spec.REGIONS):
    ph = shifted if i == 0 else cal_stats  # CTX without cells: fails its check
    calibration[r] = {
      "phantom": ph,
      "real": cal_stats,
      "check": morphology.calibration_check(ph, cal_stats),
    }
  ts = morphology.tile_stats(tiles)
  probe = {"train": 1.0, "c1_val": 0.8, "c1_test": 0.6, "c2_test": 0.3}
  rep = {
    "generator_version": "phantom-test",
    "seed": 0,
    "quick_dev": False,
    "runtime_s": 12.0,
    "machine": {"cpus": 2, "load_average_start": [0.1, 0.2, 0.3]},
    "data": {
      "data_dir": "out/data",
      "exports": {
        t: {"reused": True, "content_sha256": "ab" * 32, "seconds": 0.1} for t in fid.TASKS
      },
    },
    "probe_downsample": 2,
    "histogram_probe": {
      "2": {**probe, "c1_test": hist_c1},
      "4": {**probe, "c1_test": hist_c1 - 0.05},
    },
    "pca_linear": {**probe, "n_components": 256},
    "texture_probe": probe,
    "supervised": {
      "config": "configs/task1_supervised.py:quick",
      "seed": 1,
      "reused": False,
      "seconds": 30.0,
      "downsample": 4,
      "steps": 96,
      "results": {"test_c1/accuracy": sup_c1, "test_c2/accuracy": 0.5, "val/accuracy": 0.9},
    },
    "paper": {
      "pca": {"ROI-C1": 0.59, "ROI-C2": 0.25},
      "supervised": {"ROI-C1": 0.88, "ROI-C2": 0.77},
    },
    "task1_counts": {"train": 10, "c1_val": 2, "c1_test": 2, "c2_test": 4, "dropped": 1},
    "calibration": calibration,
    "regions": {
      r: {
        "fractions": ts["fractions"],
        "within_tolerance": {c: True for c in fid.CLASSES},
        "morphology": ts,
      }
      for r in spec.REGIONS
    },
    "real_masks": {r: ts for r in spec.REGIONS},
    "cubes": {"A-CTX": {"image_mean": 120.0, "image_sd": 20.0}},
    "layout_inside": {"A-CTX": 1.0},
    "speed": {
      "voxels": 8 << 20,
      "has_workers": False,
      "configs": {"1": {"voxels_per_s": 5e6, "seconds": 1.7}},
    },
    "render_bench": bench or {"status": "missing", "path": "experiments/bench/results/x.json"},
    "rendered_mvox": 377.0,
    "render_wall_s": 40.0,
    "cube_workers": 2,
    "real_masks_source": morphology.real_masks_source(shipped=True),
    "appearance_images": ["real.png"],
  }
  rep["acceptance"] = fid.acceptance(rep)
  rep["known_gaps"] = fid.known_gaps(rep)
  return rep


def _verdicts(rep) -> dict:
  return {a["criterion"]: a["passed"] for a in rep["acceptance"]}


def test_acceptance_rows():
  rep = _fake_report(hist_c1=0.70, sup_c1=0.80)
  v = _verdicts(rep)
  assert v["Histogram probe <= 0.65 on ROI-C1 test"] is False  # worst downsampling counts
  assert v["Histogram probe <= 0.40 on ROI-C2 test"] is True
  assert v["Quick supervised ROI-C1 accuracy <= 0.95"] is True
  assert v["Quick supervised ROI-C1 accuracy >= histogram probe + 0.15"] is False  # 0.80 < 0.85
  cal = {k: p for k, p in v.items() if k.split(":")[0] in spec.REGIONS}
  assert cal[next(k for k in cal if k.startswith("CTX"))] is False
  assert all(p for k, p in cal.items() if not k.startswith("CTX"))
  render = next(a for a in rep["acceptance"] if a["criterion"].startswith("Render"))
  assert render["passed"] is None and "not measured" in render["measured"]
  good = _verdicts(_fake_report(hist_c1=0.60, sup_c1=0.80))
  assert good["Histogram probe <= 0.65 on ROI-C1 test"] is True
  assert good["Quick supervised ROI-C1 accuracy >= histogram probe + 0.15"] is True
  assert any("Acceptance not met" in g for g in rep["known_gaps"])


def test_render_bench_result(tmp_path):
  path = tmp_path / "phantom_render_bench.json"
  assert fid.render_bench_result(str(path), "phantom-x")["status"] == "missing"
  res = {
    "generator_version": "phantom-x",
    "date": "today",
    "workers_all": 2,
    "revision": {"baseline": {"rev": "phantom-1.0"}},
    "summary": {"ratio_workers_all": 2.5, "ratio_workers_1": 1.2},
  }
  path.write_text(json.dumps(res))
  assert fid.render_bench_result(str(path), "phantom-y")["status"] == "other generator"
  rb = fid.render_bench_result(str(path), "phantom-x")
  assert rb["status"] == "measured" and rb["ratio_workers_all"] == 2.5
  rep = _fake_report(bench=rb)
  render = next(a for a in rep["acceptance"] if a["criterion"].startswith("Render"))
  assert render["passed"] is True and "2.50x" in render["measured"]


def test_write_markdown(tmp_path):
  rep = _fake_report()
  path = tmp_path / "report.md"
  fid.write_markdown(str(path), rep)
  md = path.read_text()
  assert md.startswith("# Phantom fidelity report (SYNTHETIC data)")
  acc, difficulty = md.index("## Acceptance"), md.index("## Task difficulty")
  assert acc < difficulty < md.index("## Calibration targets")
  assert "**FAIL**" in md and "not measured" in md
  for r in spec.REGIONS:
    assert f"### {r}" in md
  for k in morphology.CALIBRATION_KEYS:
    assert f"| {k} |" in md
  assert "CC-BY-4.0" in md and "shipped" in md
  assert "supervised ResNet-18 xray (`configs/task1_supervised.py:quick`" in md
  assert "paper vs masks" in md
  assert "/work/shared" not in md
  json.dumps(rep)  # the same dict is report.json


# ---------------------------------------------------------------------------
# Exports: reuse only when complete and from this phantom.
def test_export_reuse_only_refuses_missing(tmp_path):
  with pytest.raises(UserError, match="mtneuro export"):
    fid.ensure_exports(0, str(tmp_path / "none"), reuse_only=True, progress=False)


def test_comparable_ignores_workers():
  a = {"task": "t", "source": {"kind": "phantom", "seed": 0, "workers": 2}}
  b = {"task": "t", "source": {"kind": "phantom", "seed": 0}}
  assert fid._comparable(a) == fid._comparable(b)
  assert fid._comparable({**b, "limit_per_split": 4}) != fid._comparable(b)


# ---------------------------------------------------------------------------
# The render bench's --baseline_rev machinery, on a tiny box.
def _baseline_or_skip() -> str:
  if shutil.which("git") is None:
    pytest.skip("git is not installed: the bench's --baseline_rev needs it")
  try:
    return bench.resolve_revision(bench.DEFAULT_BASELINE)
  except RuntimeError as e:
    pytest.skip(f"no {bench.DEFAULT_BASELINE} in this checkout ({e})")
  except subprocess.SubprocessError as e:  # pragma: no cover - a broken git
    pytest.skip(f"git failed: {e}")


def test_extract_revision(tmp_path):
  commit = _baseline_or_skip()
  assert bench.extract_revision(bench.DEFAULT_BASELINE, str(tmp_path)) == commit
  src = (tmp_path / "mtneuro_jax" / "volumes" / "phantom.py").read_text()
  assert 'GENERATOR_VERSION = "phantom-1.0"' in src
  assert not (tmp_path / "experiments").exists()  # only the library is extracted
  with pytest.raises(RuntimeError, match="--baseline_rev none"):
    bench.resolve_revision("no-such-revision-xyz")


def test_bench_baseline_tiny_box(tmp_path):
  _baseline_or_skip()
  box = "300,302,900,916,3100,3116"
  rc = bench.main(
    ["--box", box, "--repeats", "1", "--workers", "1", "--out", str(tmp_path), "--no_progress"]
  )
  assert rc == 0
  res = json.loads((tmp_path / "phantom_render_bench.json").read_text())
  meas = res["measurements"]
  assert set(meas) == {"new", "baseline"}
  assert meas["baseline"]["generator_version"] == "phantom-1.0"
  assert meas["baseline"]["has_workers"] is False  # phantom-1.0 renders in one process
  for m in meas.values():
    c = m["configs"]["1"]
    assert c["voxels_per_s"] > 0 and len(c["digests"]) == 1
    assert c["whole_equals_split_box0"] is True
  assert res["summary"]["ratio_workers_1"] > 0 and res["summary"]["ratio_workers_all"] > 0
  assert res["box_voxels"] == [2 * 16 * 16]
  assert res["machine"]["load_average_before"] is not None
  md = (tmp_path / "phantom_render_bench.md").read_text()
  assert "1 (no parallel rendering)" in md and "Ratio this revision / baseline" in md
  assert os.path.getsize(tmp_path / "phantom_render_bench.md") > 0


def test_bench_rejects_bad_box():
  with pytest.raises(SystemExit):
    bench.main(["--box", "3,1,0,16,0,16"])
