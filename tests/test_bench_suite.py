"""The benchmark suite's machinery (experiments/bench/suite.py): ratios, the report, and one
tiny end-to-end run (JAX worker, plus PyTorch's when installed) with its JSON schema."""

import importlib.util
import io
import json
import statistics
import sys

import pytest

from experiments.bench import common, suite
from mtneuro_jax.errors import UsageError

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def test_summarize_and_ratios():
  s = suite.summarize([2.0, 1.0, 4.0], per_step=8)
  assert s == {"median_step_s": 2.0, "rate": 4.0, "best_rate": 8.0}
  rows = [
    {"case": "a", "framework": "jax", "rate": 3.0},
    {"case": "a", "framework": "jax", "rate": 6.0, "compute_dtype": "bfloat16"},
    {"case": "a", "framework": "torch", "rate": 4.0, "malloc": "system"},
    {"case": "a", "framework": "torch", "rate": 2.0, "malloc": "hugepages"},
    {"case": "b", "framework": "jax", "rate": 1.0},  # no torch row: no ratio
    {"case": "b", "framework": "jax", "error": "boom"},
  ]
  suite.add_ratios(rows)
  assert [r["ratio_vs_torch"] for r in rows] == [0.75, 1.5, None, None, None, None]
  assert [r["ratio_vs_torch_hugepages"] for r in rows] == [1.5, 3.0, None, None, None, None]


def test_bad_malloc_mode_is_one_usage_error(tmp_path):
  with pytest.raises(UsageError, match="--torch_malloc='system,jemalloc'"):
    suite.main(["--torch_malloc", "system,jemalloc", "--only", "resnet", "--out", str(tmp_path)])
  assert not list(tmp_path.iterdir())


def test_bad_turn_counts_are_one_usage_error(tmp_path):
  with pytest.raises(UsageError, match="--steps_per_turn=0"):
    suite.main(["--steps_per_turn", "0", "--only", "resnet", "--out", str(tmp_path)])
  assert not list(tmp_path.iterdir())


def test_worker_protocol_runs_n_steps_back_to_back(monkeypatch, capsys):
  """``step N`` answers with N step times from N calls; ``step`` alone is one; another line ends."""
  calls = []

  def one_step():
    calls.append(1)
    return float(len(calls))

  monkeypatch.setattr(sys, "stdin", io.StringIO("step 3\nstep\ndone\nstep 5\n"))
  assert common.serve_steps({"version": "x"}, one_step) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert lines[0] == {"version": "x"}
  assert lines[1] == {"steps_s": [1.0, 2.0, 3.0]} and lines[2] == {"steps_s": [4.0]}
  assert set(lines[3]) == {"peak_rss_mb"} and len(lines) == 4 and len(calls) == 4


def test_case_names_and_only():
  assert suite.case_name("unet3d", 1, (8, 256, 256)) == "unet3d B=1 1x8x256x256"
  assert {c[0] for c in suite.QUICK_CASES} <= set(suite.MODELS)
  assert set(suite.parse_only("resnet,pipeline")) == {"resnet", "pipeline"}
  with pytest.raises(UsageError, match="unknown --only"):
    suite.parse_only("resnet,nope")


def test_machine_info_keys():
  m = suite.machine_info()
  assert {"cpu", "cpu_flags", "cores", "cores_usable", "versions"} <= set(m)
  assert m["cores_usable"] >= 1


def test_tiny_run_writes_json_and_markdown(tmp_path):
  argv = ["--cases", json.dumps([["resnet", 2, [16, 16]]]), "--only", "resnet"]
  argv += ["--torch_malloc", "system"]
  argv += ["--warmup", "0", "--steps", "2", "--steps_per_turn", "3"]
  argv += ["--out", str(tmp_path), "--note", "test run"]
  assert suite.main(argv) == 0
  report = json.loads((tmp_path / "suite.json").read_text())
  assert set(report) >= {"machine", "meta", "steps"}
  assert report["meta"]["note"] == "test run" and report["meta"]["steps"] == 2
  assert report["meta"]["steps_per_turn"] == 3
  rows = report["steps"]
  assert [r["framework"] for r in rows] == ["jax"] + (["torch"] if HAVE_TORCH else [])
  assert [r["malloc"] for r in rows] == ["hugepages"] + (["system"] if HAVE_TORCH else [])
  for r in rows:
    assert r["case"] == "resnet B=2 1x16x16" and r["unit"] == "img/s"
    # Two timed turns of three steps: the rate is the median of the four steps after each
    # turn's first; the two first steps are kept apart.
    assert len(r["step_s"]) == 4 and len(r["first_step_s"]) == 2
    assert r["rate"] == pytest.approx(2 / statistics.median(r["step_s"]))
    assert r["median_first_step_s"] == pytest.approx(statistics.median(r["first_step_s"]))
    assert r["peak_rss_mb"] >= r["base_rss_mb"] > 0
    assert len(r["load1"]) == 4
  jax_row = rows[0]
  assert jax_row["compile_s"] > 0 and jax_row["xla_buffers_mb"] > 0
  if HAVE_TORCH:
    assert jax_row["ratio_vs_torch"] == pytest.approx(jax_row["rate"] / rows[1]["rate"])
  md = (tmp_path / "suite.md").read_text()
  assert "resnet B=2 1x16x16" in md and "test run" in md
