"""Phantom render benchmark: wall-clock voxels/s of this revision vs a baseline revision.

Usage:
  python -m experiments.bench.phantom_render_bench --out experiments/bench/results
  python -m experiments.bench.phantom_render_bench --baseline_rev none --repeats 5
  python -m experiments.bench.phantom_render_bench --box 300,302,900,916,4600,4616 --out /tmp/b

What is timed: ``PhantomVolume.cutout`` of all three channels (image, roi_labels,
pixel_labels) of every box, on a fresh ``PhantomVolume`` (empty cache) per repeat,
WALL time (``time.perf_counter``; parallel rendering spends CPU in other processes,
so CPU time of this process would flatter it). Default boxes: exporter-shaped
32x256x256 boxes, one in each region's set-A cube (z [288, 320)), plus one larger
64x512x512 box around the set-B VP cube (it overlaps none of the others). Each
(revision, workers) measurement runs in a fresh subprocess after an untimed warm-up
render of a tiny box (one-off tables and imports excluded) and, with workers > 1, of a
2^20-voxel box that starts the worker processes (their start-up, ~0.5 s once per process,
is excluded like the imports; ``phantom_pool.start(w, wait=True)`` where the revision
has it); repeats are interleaved
(repeat 1 of every configuration, then repeat 2, ...), so a load change on the shared
machine hits all of them alike. Reported: the median over repeats, per box and in total.

Revisions: this checkout (``PYTHONPATH`` = its root) and ``--baseline_rev`` (default
``phantom-1.0``), extracted with ``git archive <rev> mtneuro_jax | tar -x`` into a
temporary folder and imported from there. Workers: 1 and all CPUs this process may use
(``len(os.sched_getaffinity(0))``); a revision whose ``PhantomVolume`` has no ``workers``
argument (phantom-1.0) is measured once, as "1 (no parallel rendering)", and that number
stands for its all-CPU row too. Ratios: this revision / baseline, at workers 1 and at
all CPUs.

Also recorded (the tests own the real check): SHA-256 of every box's three channels for
every workers value (they must agree), and of the first box rendered whole vs split
into four requests on a fresh volume.

Writes ``<out>/phantom_render_bench.json`` and ``.md``. The machine may be shared: the
CPU model, CPU count and the load average before and after are recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
THIS_FILE = os.path.abspath(__file__)
CHANNELS = ("image", "roi_labels", "pixel_labels")
DEFAULT_BASELINE = "536f558d02a09a433ddc11025515003c98793f79"  # the phantom-1.0 tag (tags may not travel with a clone)
RESULT_NAME = "phantom_render_bench"
WARMUP_BOX = (300, 302, 900, 916, 3100, 3116)  # z0, z1, y0, y1, x0, x1: tiny, inside tissue
# 2^20 voxels (rendered in parallel by a revision with workers); overlaps no timed box.
WARMUP_POOL_BOX = (100, 132, 300, 364, 500, 1012)


def default_boxes() -> list[tuple[int, ...]]:
  """[(z0, z1, y0, y1, x0, x1)]: one 32x256x256 box per region's set-A cube, plus 64x512x512."""
  from mtneuro_jax.volumes import spec

  boxes = []
  for r in spec.REGIONS:
    x0, x1, y0, y1 = spec.CUBE_SETS["A"][r]
    boxes.append((288, 320, y0, y1, x0, x1))
  x0, x1, y0, y1 = spec.CUBE_SETS["B"]["VP"]
  cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
  boxes.append((256, 320, cy - 256, cy + 256, cx - 256, cx + 256))
  return boxes


def all_cpus() -> int:
  """CPUs this process may use (what ``PhantomVolume(workers=None)`` uses)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _load() -> list[float] | None:
  return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------
# Child: runs with PYTHONPATH = one revision's root; imports only that revision's phantom.
def _digest(arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(memoryview(a).cast("B") if a.flags.c_contiguous else a.tobytes())
  return h.hexdigest()


def _child(cfg: dict) -> dict:
  import numpy as np

  import mtneuro_jax
  from mtneuro_jax.volumes import phantom, spec

  root = os.path.dirname(os.path.dirname(os.path.abspath(mtneuro_jax.__file__)))
  has_workers = "workers" in inspect.signature(phantom.PhantomVolume).parameters
  out = {
    "root": root,
    "generator_version": phantom.GENERATOR_VERSION,
    "has_workers": has_workers,
  }
  if cfg.get("probe"):
    return out
  w = cfg["workers"]
  if w != 1 and not has_workers:
    raise SystemExit(f"workers={w} asked of a phantom without a workers argument ({root})")

  def volume():
    if has_workers:
      return phantom.PhantomVolume(cfg["seed"], workers=w)
    return phantom.PhantomVolume(cfg["seed"])

  warm = volume()
  for ch in CHANNELS:
    warm.cutout(ch, spec.Box(*WARMUP_BOX))
  if w > 1:
    # Start the worker processes untimed (they live as long as this process, like in any
    # long job): a box large enough to be rendered in parallel, then wait until every
    # worker has answered (where the revision's pool can say so).
    z0, z1, y0, y1, x0, x1 = WARMUP_POOL_BOX
    warm.cutout("image", spec.Box(z0, z1, y0, y0 + max(y1 - y0, 32 * w), x0, x1))
    try:
      from mtneuro_jax.volumes import phantom_pool

      phantom_pool.start(w, wait=True)
    except (ImportError, AttributeError, TypeError):
      pass  # a revision without phantom_pool.start: the warm-up box started its workers
  del warm
  boxes = [spec.Box(*b) for b in cfg["boxes"]]
  vol = volume()  # fresh cache for this repeat
  seconds, digests = [], []
  for b in boxes:
    t0 = time.perf_counter()
    arrays = [vol.cutout(ch, b) for ch in CHANNELS]
    seconds.append(time.perf_counter() - t0)
    digests.append(_digest(arrays))  # after the clock stopped
    del arrays
  out.update({"seconds": seconds, "digests": digests})
  if cfg.get("split_check"):
    # The first box again on a fresh volume, as four requests (two z halves x two x halves).
    b = boxes[0]
    zm, xm = (b.z0 + b.z1) // 2, (b.x0 + b.x1) // 2
    parts = {}
    split_vol = volume()
    for ch in CHANNELS:
      rows = []
      for z0, z1 in ((b.z0, zm), (zm, b.z1)):
        cols = [
          split_vol.cutout(ch, spec.Box(z0, z1, b.y0, b.y1, x0, x1))
          for x0, x1 in ((b.x0, xm), (xm, b.x1))
        ]
        rows.append(np.concatenate(cols, axis=2))
      parts[ch] = np.concatenate(rows, axis=0)
    out["split_digest_box0"] = _digest([parts[ch] for ch in CHANNELS])
  return out


# ---------------------------------------------------------------------------
# Parent.
def resolve_revision(rev: str, repo: str = REPO) -> str:
  """The commit hash of ``rev`` in ``repo``; RuntimeError with the fix when git or the rev is missing."""
  if shutil.which("git") is None:
    raise RuntimeError("git is not installed; install git or pass --baseline_rev none")
  r = subprocess.run(
    ["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
    capture_output=True,
    text=True,
  )
  if r.returncode:
    raise RuntimeError(
      f"revision {rev!r} is not in the git repository at {repo}; fetch it "
      "(git fetch --tags) or pass --baseline_rev none"
    )
  return r.stdout.strip()


def extract_revision(rev: str, dest: str, repo: str = REPO) -> str:
  """``git archive <rev> mtneuro_jax | tar -x -C dest``; returns the commit hash."""
  commit = resolve_revision(rev, repo)
  os.makedirs(dest, exist_ok=True)
  archive = subprocess.run(
    ["git", "-C", repo, "archive", "--format=tar", commit, "mtneuro_jax"],
    capture_output=True,
    check=True,
  )
  subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
  return commit


def run_child(root: str, cfg: dict) -> dict:
  """Runs ``_child(cfg)`` in a fresh interpreter that imports ``mtneuro_jax`` from ``root``."""
  env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
  r = subprocess.run(
    [sys.executable, THIS_FILE, "--_child", json.dumps(cfg)],
    capture_output=True,
    text=True,
    env=env,
    cwd=root,
  )
  if r.returncode:
    raise RuntimeError(f"bench child ({root}) failed:\n{r.stderr[-3000:]}")
  res = json.loads(r.stdout.strip().splitlines()[-1])
  if os.path.realpath(res["root"]) != os.path.realpath(root):
    raise RuntimeError(
      f"the bench child imported mtneuro_jax from {res['root']}, not {root}; "
      "check PYTHONPATH / the editable install"
    )
  return res


def _git_head(repo: str = REPO) -> dict:
  if shutil.which("git") is None:
    return {}
  head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True)
  dirty = subprocess.run(
    ["git", "-C", repo, "status", "--porcelain", "--", "mtneuro_jax"],
    capture_output=True,
    text=True,
  )
  return {"commit": head.stdout.strip() or None, "mtneuro_jax_dirty": bool(dirty.stdout.strip())}


def measure(
  revisions: dict[str, str],
  boxes: list[tuple[int, ...]],
  *,
  repeats: int = 3,
  seed: int = 0,
  workers: tuple[int, ...] | None = None,
  progress: bool = True,
) -> dict:
  """Interleaved measurement of every revision ({name: root folder}) and workers value.

  Returns {name: {"generator_version", "has_workers", "configs": {workers: {...}}}}, where each
  config holds per-repeat seconds per box, the median total and per box, voxels/s and digests.
  """
  workers = tuple(workers or sorted({1, all_cpus()}))
  info = {name: run_child(root, {"probe": True}) for name, root in revisions.items()}
  plan = []
  for name in revisions:
    ws = workers if info[name]["has_workers"] else (1,)
    plan += [(name, w) for w in ws]
  runs: dict = {key: [] for key in plan}
  split: dict = {}
  vox = [(b[1] - b[0]) * (b[3] - b[2]) * (b[5] - b[4]) for b in boxes]
  from tqdm import tqdm

  bar = tqdm(total=repeats * len(plan), desc="render bench", disable=not progress)
  for rep in range(repeats):
    for name, w in plan:
      cfg = {"seed": seed, "workers": w, "boxes": [list(b) for b in boxes]}
      cfg["split_check"] = rep == 0
      res = run_child(revisions[name], cfg)
      runs[(name, w)].append(res)
      if "split_digest_box0" in res:
        split[(name, w)] = res["split_digest_box0"]
      bar.update(1)
  bar.close()
  out = {}
  for name in revisions:
    configs = {}
    for (n, w), reps in runs.items():
      if n != name:
        continue
      per_box = [statistics.median(r["seconds"][i] for r in reps) for i in range(len(boxes))]
      totals = [sum(r["seconds"]) for r in reps]
      digests = reps[0]["digests"]
      configs[str(w)] = {
        "workers": w,
        "seconds_per_repeat": [round(t, 4) for t in totals],
        "median_seconds": round(statistics.median(totals), 4),
        "voxels_per_s": sum(vox) / statistics.median(totals),
        "per_box_median_seconds": [round(s, 4) for s in per_box],
        "per_box_voxels_per_s": [v / s for v, s in zip(vox, per_box, strict=True)],
        "digests": digests,
        "digests_stable_over_repeats": all(r["digests"] == digests for r in reps),
        "split_digest_box0": split.get((n, w)),
        "whole_equals_split_box0": split.get((n, w)) == digests[0],
      }
    out[name] = {
      "root": info[name]["root"],
      "generator_version": info[name]["generator_version"],
      "has_workers": info[name]["has_workers"],
      "configs": configs,
    }
  return out


def summarise(meas: dict, workers_all: int) -> dict:
  """Ratios new/baseline (workers 1 and all CPUs) and the bitwise checks of each revision."""
  out = {"bitwise": {}}
  for name, m in meas.items():
    cfgs = m["configs"]
    first = next(iter(cfgs.values()))["digests"]
    out["bitwise"][name] = {
      "workers_agree": all(c["digests"] == first for c in cfgs.values()),
      "whole_equals_split_box0": all(c["whole_equals_split_box0"] for c in cfgs.values()),
      "stable_over_repeats": all(c["digests_stable_over_repeats"] for c in cfgs.values()),
    }

  def vps(name, w):
    cfgs = meas[name]["configs"]
    c = cfgs.get(str(w)) or cfgs["1"]  # no workers argument: its one number stands for all
    return c["voxels_per_s"]

  if "baseline" in meas:
    out["ratio_workers_1"] = vps("new", 1) / vps("baseline", 1)
    out["ratio_workers_all"] = vps("new", workers_all) / vps("baseline", workers_all)
  return out


def run_bench(
  *,
  baseline_rev: str | None = DEFAULT_BASELINE,
  boxes: list[tuple[int, ...]] | None = None,
  repeats: int = 3,
  seed: int = 0,
  workers: tuple[int, ...] | None = None,
  progress: bool = True,
) -> dict:
  """The whole benchmark as a JSON-able dict (see module docstring); nothing written."""
  boxes = [tuple(int(v) for v in b) for b in (boxes or default_boxes())]
  workers_all = all_cpus()
  workers = tuple(workers or sorted({1, workers_all}))
  tmp = tempfile.mkdtemp(prefix="phantom_render_bench_")
  try:
    revisions = {"new": REPO}
    baseline_commit = None
    if baseline_rev:
      baseline_commit = extract_revision(baseline_rev, tmp)
      revisions["baseline"] = tmp
    load_before = _load()
    t0 = time.perf_counter()
    meas = measure(revisions, boxes, repeats=repeats, seed=seed, workers=workers, progress=progress)
    wall = time.perf_counter() - t0
    load_after = _load()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  for m in meas.values():
    m.pop("root")
  res = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "seed": seed,
    "repeats": repeats,
    "boxes": [list(b) for b in boxes],
    "box_voxels": [(b[1] - b[0]) * (b[3] - b[2]) * (b[5] - b[4]) for b in boxes],
    "channels": list(CHANNELS),
    "workers": list(workers),
    "workers_all": workers_all,
    "generator_version": meas["new"]["generator_version"],
    "revision": {"new": _git_head(), "baseline": {"rev": baseline_rev, "commit": baseline_commit}},
    "measurements": meas,
    "machine": {
      "cpu_model": cpu_model(),
      "cpus": os.cpu_count(),
      "cpus_usable": workers_all,
      "platform": platform.platform(),
      "python": platform.python_version(),
      "load_average_before": load_before,
      "load_average_after": load_after,
    },
    "bench_wall_s": round(wall, 1),
  }
  res["summary"] = summarise(meas, workers_all)
  return res


def _w_label(meas_rev: dict, w: int) -> str:
  if not meas_rev["has_workers"]:
    return "1 (no parallel rendering)"
  return str(w)


def markdown(res: dict) -> str:
  """The result as a markdown page (tables of voxels/s, ratios, bitwise checks)."""
  m = res["machine"]
  base = res["revision"]["baseline"]
  L = [
    "# Phantom render benchmark (wall-clock voxels/s)",
    "",
    f"This revision: generator `{res['generator_version']}` "
    f"(commit {str(res['revision']['new'].get('commit'))[:10]}"
    + (", mtneuro_jax modified" if res["revision"]["new"].get("mtneuro_jax_dirty") else "")
    + ")"
    + (
      f"; baseline `{base['rev']}` (commit {base['commit'][:10]}, generator "
      f"`{res['measurements']['baseline']['generator_version']}`)."
      if base.get("commit")
      else "; no baseline."
    ),
    f"Machine: {m['cpu_model']}, {m['cpus']} CPUs ({m['cpus_usable']} usable), {m['platform']}; "
    f"load average before {m['load_average_before']}, after {m['load_average_after']}; "
    f"measured {res['date']} in {res['bench_wall_s']} s.",
    f"All three channels ({', '.join(res['channels'])}) of each box via `PhantomVolume.cutout`, "
    f"fresh volume per repeat, median of {res['repeats']} interleaved repeats, seed {res['seed']}. "
    "Reproduce with `python -m experiments.bench.phantom_render_bench`.",
    "",
    "| revision | generator | workers | total M voxels | median s | M voxels/s |",
    "|---|---|---|---|---|---|",
  ]
  tot = sum(res["box_voxels"])
  for name, mr in res["measurements"].items():
    for w, c in mr["configs"].items():
      L.append(
        f"| {name} | `{mr['generator_version']}` | {_w_label(mr, int(w))} | {tot / 1e6:.1f} | "
        f"{c['median_seconds']:.2f} | {c['voxels_per_s'] / 1e6:.2f} |"
      )
  s = res["summary"]
  if "ratio_workers_1" in s:
    L += [
      "",
      f"**Ratio this revision / baseline: {s['ratio_workers_1']:.2f}x at workers = 1, "
      f"{s['ratio_workers_all']:.2f}x at workers = all CPUs ({res['workers_all']}).**",
    ]
  L += ["", "## Per box (median seconds; M voxels/s)", ""]
  heads = [(n, w) for n, mr in res["measurements"].items() for w in mr["configs"]]
  L.append(
    "| box (z0,z1,y0,y1,x0,x1) | M voxels | "
    + " | ".join(f"{n} w={_w_label(res['measurements'][n], int(w))}" for n, w in heads)
    + " |"
  )
  L.append("|---|---|" + "---|" * len(heads))
  for i, b in enumerate(res["boxes"]):
    cells = []
    for n, w in heads:
      c = res["measurements"][n]["configs"][w]
      cells.append(
        f"{c['per_box_median_seconds'][i]:.2f} s; {c['per_box_voxels_per_s'][i] / 1e6:.2f}"
      )
    L.append(f"| {tuple(b)} | {res['box_voxels'][i] / 1e6:.1f} | " + " | ".join(cells) + " |")
  L += ["", "## Bitwise checks (recorded; the tests own the real check)", ""]
  L.append(
    "| revision | same bytes for every workers value | box 0 whole = split in 4 | same over repeats |"
  )
  L.append("|---|---|---|---|")
  for name, b in s["bitwise"].items():
    yn = {True: "yes", False: "**NO**"}
    L.append(
      f"| {name} | {yn[b['workers_agree']]} | {yn[b['whole_equals_split_box0']]} | "
      f"{yn[b['stable_over_repeats']]} |"
    )
  L += ["", "SHA-256 of each box (image, roi_labels, pixel_labels), workers = 1:", ""]
  for name, mr in res["measurements"].items():
    d = mr["configs"]["1"]["digests"]
    L.append(f"- {name}: " + ", ".join(x[:12] for x in d))
  return "\n".join(L) + "\n"


def _parse_box(text: str) -> tuple[int, ...]:
  try:
    vals = tuple(int(v) for v in text.split(","))
  except ValueError:
    vals = ()
  if len(vals) != 6 or not all(vals[i] < vals[i + 1] for i in (0, 2, 4)):
    raise argparse.ArgumentTypeError(
      f"--box {text!r} must be six integers z0,z1,y0,y1,x0,x1 with z0<z1, y0<y1, x0<x1"
    )
  return vals


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "bench", "results"))
  p.add_argument(
    "--baseline_rev",
    default=DEFAULT_BASELINE,
    help="git revision measured beside this checkout ('none' to skip; default %(default)s)",
  )
  p.add_argument("--repeats", type=int, default=3, help="repeats per configuration (median)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--workers", default=None, help="comma-separated workers values (default: 1 and all CPUs)"
  )
  p.add_argument(
    "--box",
    type=_parse_box,
    action="append",
    default=None,
    help="z0,z1,y0,y1,x0,x1 (repeatable) instead of the default boxes",
  )
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._child:
    print(json.dumps(_child(json.loads(args._child))))
    return 0
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}")
  workers = None
  if args.workers:
    try:
      workers = tuple(sorted({int(w) for w in args.workers.split(",")}))
    except ValueError:
      p.error(f"--workers {args.workers!r} must be comma-separated integers, e.g. 1,2")
    if min(workers) < 1:
      p.error(f"--workers values must be >= 1, got {args.workers}")
  baseline = None if args.baseline_rev.lower() in ("", "none") else args.baseline_rev
  try:
    res = run_bench(
      baseline_rev=baseline,
      boxes=args.box,
      repeats=args.repeats,
      seed=args.seed,
      workers=workers,
      progress=not args.no_progress,
    )
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"{RESULT_NAME}.json"), "w") as f:
    json.dump(res, f, indent=1)
  md = markdown(res)
  with open(os.path.join(args.out, f"{RESULT_NAME}.md"), "w") as f:
    f.write(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
