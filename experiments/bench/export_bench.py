"""Export benchmark: time, throughput and peak memory of exporting every task from the phantom.

Usage:
  python -m experiments.bench.export_bench                 # all tasks, full size, fresh cache
  python -m experiments.bench.export_bench --tasks task1_roi_c1 --limit_per_split 16 --out /tmp/b

What is measured, per task, each in a fresh subprocess (so ``ru_maxrss`` is that
task's own peak, interpreter and libraries included):
  * pass "cold": tasks in ``spec.TASKS`` order into an empty out_dir with one
    fresh cutout cache shared by all tasks, exactly like
    ``python -m data_prep.export --tasks all`` on a new machine (including its
    companion channels: a chunk read for one task also caches the channels the
    other tasks need from that cube). So early tasks fetch (render) every chunk,
    later tasks only hit the cache;
  * pass "warm": the same exports into a second empty out_dir with the now full
    cache (what a re-export with other parameters, or a resume, costs).
Reported: wall seconds; samples/s; MB/s of voxels delivered by the source (its own
dtypes, so uint64 labels count 8 B/voxel) and of cache payload read; MB/s of
shards written; cache hits/misses; peak RSS. Plus ``verify`` (SHA-256 of all
files) time. The machine may be shared: the 1-minute load average is recorded.

Writes ``<out>/export_bench.json`` and ``.md`` (default ``experiments/bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one(args) -> None:
  """Child: export one task, print one JSON line of measurements."""
  from data_prep.export import companions_for, export_task
  from mtneuro_jax.volumes.sources import make_source

  t0 = time.perf_counter()
  m = export_task(
    make_source(args.source),
    args._one,
    args.out_dir,
    cache_dir=args.cache_dir,
    limit_per_split=args.limit_per_split,
    progress=False,
    companion_channels=companions_for(args.tasks.split(",")) if "," in args.tasks else None,
  )
  sec = time.perf_counter() - t0
  c = m["export"]["cache"]
  n = sum(s["num_examples"] for s in m["splits"].values())
  cand = sum(s["candidates"] for s in m["splits"].values())
  print(
    json.dumps(
      {
        "task": args._one,
        "seconds": round(sec, 2),
        "samples": n,
        "candidates": cand,
        "excluded": sum(s["excluded_unannotated"] for s in m["splits"].values()),
        "splits": {k: v["num_examples"] for k, v in m["splits"].items()},
        "samples_per_s": round(n / sec, 1),
        "cache": c,
        "source_mb": round(c["fetched_bytes"] / 1e6, 1),
        "source_mb_s": round(c["fetched_bytes"] / 1e6 / sec, 1),
        "cache_read_mb": round(c["read_bytes"] / 1e6, 1),
        "shard_mb": round(m["shard_bytes"] / 1e6, 1),
        "shard_mb_s": round(m["shard_bytes"] / 1e6 / sec, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "generator_version": m["source"].get("generator_version"),
      }
    )
  )


def _run_pass(name, tasks, out_dir, cache_dir, args) -> list[dict]:
  rows = []
  for task in tasks:
    cmd = [
      sys.executable,
      "-m",
      "experiments.bench.export_bench",
      "--_one",
      task,
      "--out_dir",
      out_dir,
      "--cache_dir",
      cache_dir,
      "--source",
      args.source,
      "--tasks",
      ",".join(tasks),
    ]
    if args.limit_per_split:
      cmd += ["--limit_per_split", str(args.limit_per_split)]
    load0 = os.getloadavg()[0]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
      sys.exit(f"export of {task} failed:\n{r.stderr[-3000:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row.update(
      {"pass": name, "load1_before": round(load0, 2), "load1_after": round(os.getloadavg()[0], 2)}
    )
    rows.append(row)
    print(
      f"[{name}] {task}: {row['seconds']}s, {row['samples']} samples, source {row['source_mb']} MB, "
      f"shards {row['shard_mb']} MB, peak {row['peak_rss_mb']} MB",
      flush=True,
    )
  return rows


def _totals(rows):
  sec = sum(r["seconds"] for r in rows)
  src = sum(r["cache"]["fetched_bytes"] for r in rows) / 1e6
  shard = sum(r["shard_mb"] for r in rows)
  return {
    "seconds": round(sec, 1),
    "samples": sum(r["samples"] for r in rows),
    "source_mb": round(src, 1),
    "source_mb_s": round(src / sec, 1),
    "shard_mb": round(shard, 1),
    "shard_mb_s": round(shard / sec, 1),
    "cache_hits": sum(r["cache"]["hits"] for r in rows),
    "cache_misses": sum(r["cache"]["misses"] for r in rows),
    "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
  }


def _markdown(res) -> str:
  L = [
    "# Export benchmark (phantom, all tasks)",
    "",
    f"Generator `{res['generator_version']}`, source `{res['source']}`, "
    f"limit_per_split {res['limit_per_split']}; {res['machine']['cpus']} CPUs "
    f"({res['machine']['platform']}), {res['machine']['mem_gb']} GB RAM; measured {res['date']}.",
    "The machine was shared with other jobs: see the load columns. Reproduce with "
    "`python -m experiments.bench.export_bench`.",
    "",
  ]
  for name in ("cold", "warm"):
    rows = [r for r in res["rows"] if r["pass"] == name]
    if not rows:
      continue
    t = res["totals"][name]
    L += [
      f"## Pass `{name}`: {t['seconds']} s total, {t['samples']} samples, source {t['source_mb']} MB "
      f"({t['source_mb_s']} MB/s), shards {t['shard_mb']} MB ({t['shard_mb_s']} MB/s), "
      f"cache {t['cache_hits']} hits / {t['cache_misses']} misses, peak RSS {t['peak_rss_mb']} MB",
      "",
      "| task | s | samples (excl.) | samples/s | source MB | source MB/s | cache read MB | shard MB | "
      "shard MB/s | hits/misses | peak RSS MB | load 1m |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      L.append(
        f"| {r['task']} | {r['seconds']} | {r['samples']} ({r['excluded']}) | {r['samples_per_s']} | "
        f"{r['source_mb']} | {r['source_mb_s']} | {r['cache_read_mb']} | {r['shard_mb']} | "
        f"{r['shard_mb_s']} | {r['cache']['hits']}/{r['cache']['misses']} | {r['peak_rss_mb']} | "
        f"{r['load1_before']}->{r['load1_after']} |"
      )
    L.append("")
  L += ["## Split sizes", "", "| task | " + " | ".join(["splits"]) + " |", "|---|---|"]
  for r in res["rows"]:
    if r["pass"] == "cold":
      L.append(f"| {r['task']} | " + ", ".join(f"{k} {v}" for k, v in r["splits"].items()) + " |")
  L += [
    "",
    f"`verify` (SHA-256 of every file of every dataset): {res['verify_seconds']} s for "
    f"{res['totals']['cold']['shard_mb']} MB of shards.",
    "",
    "Notes: 'source MB' counts bytes as the source delivers them (uint8 image, uint64 labels); "
    "the cache stores labels as uint8. Cache size after the cold pass: "
    f"{res['cache_mb']} MB.",
    "",
  ]
  return "\n".join(L)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", default="all")
  p.add_argument("--source", default="phantom")
  p.add_argument("--limit_per_split", type=int, default=None)
  p.add_argument(
    "--work",
    default=os.path.join(REPO, "out", "bench", "export"),
    help="scratch folder (emptied first, removed after unless --keep)",
  )
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "bench", "results"))
  p.add_argument("--no_warm", action="store_true", help="skip the warm-cache pass")
  p.add_argument("--keep", action="store_true")
  p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  p.add_argument("--out_dir", default=None, help=argparse.SUPPRESS)
  p.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._one:
    _one(args)
    return 0

  import psutil

  from data_prep.export import _resolve_tasks
  from data_prep.export import main as export_main
  from mtneuro_jax.volumes import phantom

  tasks = _resolve_tasks(args.tasks)
  shutil.rmtree(args.work, ignore_errors=True)
  cache = os.path.join(args.work, "cache")
  rows = _run_pass("cold", tasks, os.path.join(args.work, "cold"), cache, args)
  cache_mb = (
    sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs) / 1e6
  )
  t0 = time.perf_counter()
  assert export_main(["verify", os.path.join(args.work, "cold")]) == 0
  verify_s = time.perf_counter() - t0
  if not args.no_warm:
    rows += _run_pass("warm", tasks, os.path.join(args.work, "warm"), cache, args)
  res = {
    "generator_version": phantom.GENERATOR_VERSION,
    "source": args.source,
    "limit_per_split": args.limit_per_split,
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "machine": {
      "cpus": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
    },
    "rows": rows,
    "totals": {
      n: _totals([r for r in rows if r["pass"] == n])
      for n in ("cold", "warm")
      if any(r["pass"] == n for r in rows)
    },
    "verify_seconds": round(verify_s, 2),
    "cache_mb": round(cache_mb, 1),
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "export_bench.json"), "w") as f:
    json.dump(res, f, indent=1)
  with open(os.path.join(args.out, "export_bench.md"), "w") as f:
    f.write(_markdown(res))
  print(_markdown(res))
  if not args.keep:
    shutil.rmtree(args.work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
