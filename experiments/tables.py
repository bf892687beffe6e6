"""Helpers every paper-table driver shares (experiments/task{1,2,3}_tables.py): mean ± sd
over seeds, the bootstrap interval, the data-source sentence, the machine that made the numbers,
and dotted config overrides."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from mtneuro_jax.errors import UserError

BOOTSTRAP_RESAMPLES = 10_000


def set_dotted(cfg, dotted: str, value) -> None:
  *path, last = dotted.split(".")
  node = cfg
  for k in path:
    node = node[k]
  node[last] = value


def mean_sd(values: Sequence[float]) -> dict:
  """Mean and sample sd of the finite values (None-s and NaN-s are left out)."""
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  n = len(vals)
  if not n:
    return {"mean": None, "sd": None, "n": 0, "values": []}
  m = sum(vals) / n
  sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1)) if n > 1 else None
  return {"mean": m, "sd": sd, "n": n, "values": vals}


def fmt(cell: dict | None, *, single: str = "seed") -> str:
  """'mean ± sd', or 'mean (1 <single>)' for one value, or the cell's note."""
  if not cell or cell.get("mean") is None:
    return (cell or {}).get("note", "—")
  s = f"{cell['mean']:.3f}"
  if cell.get("sd") is not None:
    s += f" ± {cell['sd']:.3f}"
  elif cell.get("n") == 1:
    s += f" (1 {single})"
  return s


def bootstrap_ci(
  values: Sequence[float],
  *,
  level: float = 0.95,
  resamples: int = BOOTSTRAP_RESAMPLES,
  seed: int = 0,
) -> tuple[float, float] | None:
  """Percentile bootstrap interval of the mean over seeds (None for fewer than 2 values).

  Seeds are resampled with replacement ``resamples`` times (a fixed numpy seed, so the
  interval is reproducible); with few seeds it is wide and only indicative.
  """
  v = np.asarray([float(x) for x in values], np.float64)
  if v.size < 2:
    return None
  idx = np.random.default_rng(seed).integers(0, v.size, (resamples, v.size))
  means = v[idx].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
  return float(lo), float(hi)


def source_line(info: dict) -> tuple[str, str, bool]:
  """(header sentence, short row label, comparable to the paper?)."""
  src = info.get("source") or "unknown source"
  limit = info.get("limit_per_split")
  lim = f", export limited to {limit} samples per region and split" if limit else ""
  if info.get("synthetic"):
    return (
      f"Data source: **{src}** — SYNTHETIC phantom volume{lim}. These numbers are NEVER comparable "
      "to the paper's, which come from the real BossDB X-ray volume; they only check the machinery.",
      f"{src} (synthetic; not comparable)",
      False,
    )
  comparable = not limit
  return (
    f"Data source: **{src}**{lim}.",
    src + ("" if comparable else " (limited export)"),
    comparable,
  )


def machine_info() -> dict:
  """What made the numbers: CPU model, cores, accelerator, library versions (see the README's
  reproducibility note: bit for bit on the same CPU model and versions, seed noise elsewhere)."""
  import platform

  import jax
  import jaxlib

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(
        (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
      )
  except OSError:
    pass
  dev = jax.devices()[0]
  return {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "python": platform.python_version(),
  }


def ci_text(ci) -> str:
  return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—"


def machine_line(table: dict) -> str:
  m = table.get("machine") or {}
  return (
    f"Made on: {m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores), {m.get('backend', '?')} "
    f"({m.get('device_kind', '?')}), jax {m.get('jax', '?')}. Reruns reproduce these numbers bit for "
    "bit on the same CPU model and library versions; another CPU model agrees only within seed noise."
  )


# ---------------------------------------------------------------------------
# Driver arguments and inputs shared by the table drivers (task2_tables, icip_tables).
def select_words(parser, flag: str, value: str | None, known: Sequence, default: Sequence) -> tuple:
  """The comma-separated words of ``flag`` (each one of ``known``), or ``default`` when empty."""
  if not value:
    return tuple(default)
  words = tuple(w for w in value.split(",") if w)
  bad = [w for w in words if w not in known]
  if bad or not words:
    parser.error(f"{flag}={value!r}: unknown {bad}; known: {','.join(known)}")
  return words


def parse_seeds(parser, value: str | None, default: Sequence[int]) -> tuple[int, ...]:
  """``--seeds`` as a non-empty tuple of ints (empty items skipped), or ``default``."""
  try:
    seeds = tuple(int(s) for s in value.split(",") if s) if value else tuple(default)
  except ValueError:
    parser.error(f"--seeds={value!r} must be comma-separated integers, e.g. 1,100")
  if not seeds:
    parser.error("--seeds is empty; give at least one seed, e.g. 1")
  return seeds


def exports_info(data_dir: str, tasks: Sequence[str], *, what: str = "") -> dict:
  """Source facts from the exports the runs need; raises naming the export command if one is missing.

  ``what`` names the exports in the mixed-sources message (e.g. ``"Task 2 "``).
  Returns ``source``, ``synthetic``, ``limit_per_split`` and ``num_examples`` per task.
  """
  from mtneuro_jax.data import pipeline

  infos = {
    t: pipeline.dataset_info({"data_dir": data_dir, "task": t, "downsample": 1}) for t in tasks
  }
  sources = {i["source"] for i in infos.values()}
  if len(sources) > 1:
    raise UserError(
      f"the {what}exports in {data_dir} come from different sources: {sorted(sources)}; "
      f"export {', '.join(tasks)} from one source"
    )
  return {
    "source": sources.pop(),
    "synthetic": any(i["synthetic"] for i in infos.values()),
    "limit_per_split": next(
      (i["limit_per_split"] for i in infos.values() if i["limit_per_split"]), None
    ),
    "num_examples": {t: i["num_examples"] for t, i in infos.items()},
  }
