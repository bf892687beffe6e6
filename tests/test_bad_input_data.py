"""Bad input to the data CLIs (export, verify, summary, serve, main, fidelity, the dispatcher).

Every case runs ``mtneuro ...`` in-process (``experiments.cli.main``) and asserts: exit status
2, exactly one non-empty stderr line ``error: <problem>; <fix>`` naming the problem, no
traceback, and that no file that existed before changed (SHA-256 of the whole workspace,
which holds a complete tiny export, broken copies of it and the bad volumes), with no lock
or staging folder left behind.
"""

import json
import os
import shutil
import socket

import numpy as np
import pytest

from experiments import cli
from mtneuro_jax import dirlock
from mtneuro_jax.data import manifest as manifest_lib
from test_export_integrity import make_zarr_volume

TASK = "task1_roi_c1"
SHARD = f"{TASK}-train.array_record-00000-of-00001"


@pytest.fixture(scope="module")
def ws(tiny_data_dir, tmp_path_factory):
  """The workspace: a good export, broken copies of it, bad local volumes, a plain file."""
  root = tmp_path_factory.mktemp("bad_input_ws")

  def dataset(name):
    shutil.copytree(os.path.join(tiny_data_dir, TASK), root / name / TASK)
    return root / name / TASK / "1.0.0"

  dataset("good")
  v = dataset("flipped")
  with open(v / SHARD, "r+b") as f:
    f.seek(1000)
    b = f.read(1)
    f.seek(1000)
    f.write(bytes([b[0] ^ 0xFF]))
  v = dataset("truncated")
  with open(v / SHARD, "r+b") as f:
    f.truncate(os.path.getsize(v / SHARD) - 7)
  os.unlink(dataset("nomanifest") / "manifest.json")
  (dataset("badjson") / "manifest.json").write_text("{not json")
  v = dataset("extra")
  shutil.copy(v / SHARD, v / f"{TASK}-train.array_record-00001-of-00002")
  v = dataset("splits")
  m = json.loads((v / "manifest.json").read_text())
  m["splits"]["val"]["num_examples"] += 3
  (v / "manifest.json").write_text(json.dumps(m))
  locked = root / "locked" / TASK
  locked.mkdir(parents=True)
  (locked / dirlock.LOCK_NAME).write_text(
    json.dumps(
      {
        "pid": 4242,
        "host": "other-host.example",
        "started_utc": "2024-01-01T00:00:00Z",
        "what": "`mtneuro export` of task1_roi_c1",
      }
    )
  )
  (root / "empty").mkdir()
  (root / "afile").write_text("not a folder")

  vols = root / "vols"
  for name, arr in {
    "small": np.zeros((200, 64, 64), np.uint8),
    "flat": np.zeros((64, 64), np.uint8),
    "float": np.full((4, 4, 4), 0.5, np.float32),
    "complex": np.zeros((2, 2, 2), np.complex64),
  }.items():
    (vols / name).mkdir(parents=True)
    np.save(vols / name / "image.npy", arr)
  (vols / "garbage").mkdir()
  (vols / "garbage" / "image.npy").write_bytes(b"this is not an npy file at all")
  (vols / "truncnpy").mkdir()
  np.save(vols / "truncnpy" / "image.npy", np.zeros((8, 8, 8), np.uint8))
  with open(vols / "truncnpy" / "image.npy", "r+b") as f:
    f.truncate(200)  # header intact, data cut
  (vols / "pickled").mkdir()
  np.save(vols / "pickled" / "image.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  u8, f32 = (np.uint8, 100), (np.float32, 0.25)
  for name, arrays in {
    "int16_300": {"image": (np.int16, 300), "roi_labels": (np.uint8, 1)},
    "roi9": {"image": u8, "roi_labels": (np.uint16, 9)},
    "pix_neg": {"image": u8, "pixel_labels": (np.int8, -1)},
    "pix_frac": {"image": u8, "pixel_labels": (np.float32, 0.5)},
    "float2": {"image": (np.float32, 2.0), "roi_labels": (np.uint8, 1)},
    "nan": {"image": (np.float32, float("nan")), "roi_labels": (np.uint8, 1)},
    "no_roi": {"image": f32},
  }.items():
    make_zarr_volume(vols / name, arrays)
  shape_vol = make_zarr_volume(vols / "roi_shape", {"image": u8})
  np.save(os.path.join(shape_vol, "roi_labels.npy"), np.zeros((2, 2, 2), np.uint8))
  return root


def _snapshot(root) -> dict[str, str]:
  return {
    os.path.relpath(os.path.join(d, n), root): manifest_lib.sha256_file(os.path.join(d, n))
    for d, _, names in os.walk(root)
    for n in names
  }


def _leftovers(root, before) -> list[str]:
  """Locks and staging folders that were not there before the case."""
  out = []
  for d, dirs, names in os.walk(root):
    for n in [*dirs, *names]:
      rel = os.path.relpath(os.path.join(d, n), root)
      if (n in (dirlock.LOCK_NAME, ".staging") or ".tmp-" in n) and rel not in before:
        out.append(rel)
  return out


def _busy_port():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  s.listen(1)
  return s


def _exp(*args, limit="1", task=TASK, out="{ws}/o"):
  return [
    "export",
    "--tasks",
    task,
    "--limit_per_split",
    limit,
    "--chunk_z",
    "8",
    "--quiet",
    "--out_dir",
    out,
    *args,
  ]


# (case id, argv with {ws} for the workspace, what the line must name)
CASES = [
  # export: source specs
  ("phantom-seed-abc", _exp("--source", "phantom:seed=abc"), "seed must be an integer"),
  ("phantom-seed-no-value", _exp("--source", "phantom:seed"), "expected key=value"),
  ("phantom-unknown-option", _exp("--source", "phantom:colour=red"), "unknown option(s) colour"),
  ("unknown-source", _exp("--source", "s3bucket"), "unknown source 's3bucket'"),
  ("bossdb-empty-host", _exp("--source", "bossdb:host="), "option host is empty"),
  ("bossdb-host-twice", _exp("--source", "bossdb:host=a.org,host=b.org"), "given twice"),
  ("bossdb-concurrency-0", _exp("--source", "bossdb:concurrency=0"), "concurrency must be >= 1"),
  ("bossdb-retries-text", _exp("--source", "bossdb:retries=many"), "retries must be an integer"),
  (
    "bossdb-protocol-ftp",
    _exp("--source", "bossdb:protocol=ftp"),
    "protocol must be 'http' or 'https'",
  ),
  ("bossdb-host-with-scheme", _exp("--source", "bossdb:host=https://x.org"), "without scheme"),
  ("bossdb-bad-chunk", _exp("--source", "bossdb:chunk=1x2"), "three positive ZYX"),
  (
    "bossdb-token-file-missing",
    _exp("--source", "bossdb:token_file={ws}/nope"),
    "cannot read token_file",
  ),
  ("local-no-path", _exp("--source", "local:"), "needs a path"),
  ("local-missing", _exp("--source", "local:{ws}/vols/none"), "does not exist"),
  (
    "local-scale-text",
    _exp("--source", "local:{ws}/vols/float2,scale=abc"),
    "scale must be a positive number",
  ),
  (
    "local-scale-zero",
    _exp("--source", "local:{ws}/vols/float2,scale=0"),
    "scale must be a positive number",
  ),
  # export: bad volumes
  ("local-garbage-npy", _exp("--source", "local:{ws}/vols/garbage"), "is not a .npy file"),
  (
    "local-truncated-npy",
    _exp("--source", "local:{ws}/vols/truncnpy"),
    "is not a readable .npy array",
  ),
  (
    "local-pickled-npy",
    _exp("--source", "local:{ws}/vols/pickled"),
    "is not a readable .npy array",
  ),
  ("local-2d-image", _exp("--source", "local:{ws}/vols/flat"), "must be 3D ZYX"),
  ("local-complex-image", _exp("--source", "local:{ws}/vols/complex"), "not a numeric array"),
  ("local-too-small", _exp("--source", "local:{ws}/vols/small"), "outside the volume"),
  ("local-float-image", _exp("--source", "local:{ws}/vols/float"), "channel image is float32"),
  (
    "local-float-over-scale",
    _exp("--source", "local:{ws}/vols/float2,scale=255"),
    "scale=255 maps to [510, 510], outside uint8",
  ),
  ("local-nan-image", _exp("--source", "local:{ws}/vols/nan,scale=255"), "non-finite"),
  (
    "local-int16-wraps",
    _exp("--source", "local:{ws}/vols/int16_300"),
    "int16 with values in [300, 300], outside uint8",
  ),
  (
    "local-unknown-roi-id",
    _exp("--source", "local:{ws}/vols/roi9"),
    "ids 9 that are not MTNeuro ROI ids",
  ),
  (
    "local-negative-pixel-id",
    _exp("--source", "local:{ws}/vols/pix_neg", task="task2_2d_3class"),
    "ids -1 that are not MTNeuro pixel ids",
  ),
  (
    "local-fractional-labels",
    _exp("--source", "local:{ws}/vols/pix_frac", task="task3"),
    "non-integer values",
  ),
  (
    "local-missing-channel",
    _exp("--source", "local:{ws}/vols/no_roi,scale=255"),
    "no readable channel 'roi_labels'",
  ),
  (
    "local-channel-shape",
    _exp("--source", "local:{ws}/vols/roi_shape"),
    "roi_labels has shape (2, 2, 2)",
  ),
  # export: arguments and folders
  ("chunk-z-0", _exp("--chunk_z", "0"), "--chunk_z must be >= 1"),
  ("chunk-z-text", _exp("--chunk_z", "abc"), "invalid int value: 'abc'"),
  ("limit-0", _exp(limit="0"), "--limit_per_split must be >= 1"),
  ("guard-negative", _exp("--min_guard_slices", "-1"), "--min_guard_slices must be >= 0"),
  ("guard-leaky-split", _exp("--min_guard_slices", "5"), "slice(s) apart (minimum 5)"),
  ("unknown-task", ["export", "--tasks", "task9", "--out_dir", "{ws}/o"], "unknown task(s) task9"),
  ("empty-tasks", ["export", "--tasks", " , ", "--out_dir", "{ws}/o"], "unknown task(s)"),
  ("unknown-flag", ["export", "--bogus"], "unrecognized arguments: --bogus"),
  ("out-dir-is-a-file", _exp(out="{ws}/afile"), "not writable"),
  ("out-dir-empty", _exp(out=""), "--out_dir is empty"),
  ("cache-dir-is-a-file", _exp("--cache_dir", "{ws}/afile/c"), "cache folder"),
  (
    "other-parameters",
    _exp(out="{ws}/good", limit="2"),
    "other parameters (limit_per_split: 4 -> 2",
  ),
  ("broken-existing", _exp(out="{ws}/nomanifest", limit="4"), "is not a valid export"),
  (
    "locked-by-other-host",
    _exp(out="{ws}/locked"),
    "in use by `mtneuro export` of task1_roi_c1 (pid 4242 on host other-host.example",
  ),
  # verify
  ("verify-missing-path", ["verify", "{ws}/nope"], "is not a folder"),
  ("verify-no-dataset", ["verify", "{ws}/empty"], "no exported dataset under"),
  ("verify-flipped-byte", ["verify", "{ws}/flipped"], "fails its SHA-256 check"),
  ("verify-truncated", ["verify", "{ws}/truncated"], "(truncated or replaced)"),
  ("verify-no-manifest", ["verify", "{ws}/nomanifest"], "not a complete export"),
  ("verify-manifest-not-json", ["verify", "{ws}/badjson"], "is unreadable"),
  ("verify-unlisted-shard", ["verify", "{ws}/extra"], "a shard the manifest does not list"),
  (
    "verify-split-count",
    ["verify", "{ws}/splits"],
    "split 'val' has 16 examples in dataset_info.json but 19",
  ),
  ("verify-no-argument", ["verify"], "the following arguments are required: path"),
  # summary
  ("summary-flipped-byte", ["summary", "{ws}/flipped"], "fails its SHA-256 check"),
  ("summary-no-manifest", ["summary", "{ws}/nomanifest/" + TASK], "not a complete export"),
  ("summary-missing-path", ["summary", "{ws}/nope"], "is not a folder"),
  ("summary-a-file", ["summary", "{ws}/afile"], "is not a folder"),
  # serve
  ("serve-port-range", ["serve", "--port", "70000"], "--port must be in [0, 65535]"),
  ("serve-port-busy", ["serve", "--port", "{port}"], "cannot listen on 127.0.0.1"),
  ("serve-bad-faults", ["serve", "--faults", "rate=2"], "fault rate must be in [0, 1]"),
  (
    "serve-unknown-fault-option",
    ["serve", "--faults", "often=yes"],
    "bad fault option 'often=yes'",
  ),
  ("serve-bad-source", ["serve", "--source", "phantom:seed=x"], "seed must be an integer"),
  (
    "serve-token-env-unset",
    ["serve", "--token_env", "MTNEURO_TEST_UNSET_VAR"],
    "environment variable is empty",
  ),
  (
    "serve-negative-cache",
    ["serve", "--cache_mb", "-1"],
    "--cache_mb must be a finite number >= 0",
  ),
  # main and the dispatcher
  (
    "main-bogus-preset",
    ["main", "--preset", "bogus", "--data_dir", "{ws}/main-data"],
    "unknown --preset 'bogus'",
  ),
  ("main-data-dir-file", ["main", "--data_dir", "{ws}/afile"], "--data_dir {ws}/afile is a file"),
  ("main-unknown-flag", ["main", "--fast"], "unrecognized arguments: --fast"),
  ("main-bad-tasks", ["main", "--tasks", "1,4"], "--tasks '1,4': give task numbers from 1,2,3"),
  (
    "fidelity-workers-0",
    ["fidelity", "--workers", "0", "--out", "{ws}/fid"],
    "--workers must be >= 1",
  ),
  ("unknown-command", ["exprot"], "unknown command 'exprot'"),
]


def test_enough_distinct_cases():
  assert len({c[0] for c in CASES}) == len(CASES) >= 28
  assert {c[1][0] for c in CASES} >= {"export", "verify", "summary", "serve", "main"}


@pytest.mark.parametrize("case,argv,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
  ws, case, argv, names, capfd, monkeypatch
):
  monkeypatch.delenv("MTNEURO_TEST_UNSET_VAR", raising=False)
  monkeypatch.delenv("MTNEURO_DEBUG", raising=False)
  busy = _busy_port()
  fill = {"ws": str(ws), "port": str(busy.getsockname()[1])}
  argv = [a.format(**fill) for a in argv]
  names = names.format(**fill)
  before = _snapshot(ws)
  capfd.readouterr()
  try:
    rc = cli.main(argv)
  finally:
    busy.close()
  out, err = capfd.readouterr()
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert rc == 2, (out, err)
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert names in lines[0], lines[0]
  assert "; " in lines[0]  # "<problem>; <fix>"
  assert "Traceback" not in err + out
  after = _snapshot(ws)
  assert {k: after.get(k) for k in before} == before  # nothing that existed changed
  assert _leftovers(ws, before) == []
  if case == "main-bogus-preset":
    assert not os.path.exists(ws / "main-data")  # refused before exporting anything


def test_debug_shows_the_traceback(ws, capfd, monkeypatch):
  assert cli.main(["--debug", "export", "--source", "phantom:seed=abc"]) == 2
  err = capfd.readouterr().err
  assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: phantom seed")
  monkeypatch.setenv("MTNEURO_DEBUG", "1")
  assert cli.main(["verify", str(ws / "flipped")]) == 2
  assert "Traceback" in capfd.readouterr().err


@pytest.mark.parametrize("command", ["export", "verify", "summary", "serve", "main", "fidelity"])
def test_help_lists_the_options(command, capfd):
  assert cli.main([command, "--help"]) == 0
  out = capfd.readouterr().out
  assert f"usage: mtneuro {command}" in out
  want = {
    "export": [
      "--source",
      "--tasks",
      "--out_dir",
      "--cache_dir",
      "--limit_per_split",
      "--min_guard_slices",
      "--chunk_z",
      "--overwrite",
      "--quiet",
    ],
    "verify": ["path"],
    "summary": ["path", "--no_verify"],
    "serve": ["--source", "--bind", "--port", "--token_env", "--faults", "--cache_mb", "--memo_mb"],
    "main": ["--data_dir", "--out", "--preset", "--tasks", "--skip_task1"],
    "fidelity": ["--out", "--seed", "--workers", "--no_progress"],
  }[command]
  for opt in want:
    assert opt in out, opt


def test_top_level_help(capfd):
  assert cli.main(["--help"]) == 0
  out = capfd.readouterr().out
  for command in cli.COMMANDS:
    assert f"mtneuro {command}" in out
