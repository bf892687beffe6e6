"""Back the train step's large temporary buffers with transparent huge pages (glibc's malloc).

Why: XLA:CPU allocates each executable's temporary block (0.9 GiB for the ResNet18-xray step
at B=32 1x64², several GiB at 128²) with ``posix_memalign`` on one of its worker threads and
frees it when the step ends. glibc serves a block that large with ``mmap`` (a thread's own
arena always does: its heaps are at most 64 MiB), so every step maps the block anew, takes a
page fault on each 4 KiB page (the kernel zeroes it) and unmaps it. Measured on the 2-core
machine (docs/speed.md, "Host memory"): 231,662 minor faults and 0.44-0.51 s of system CPU per
2.3-2.4 s ResNet step. PyTorch's CPU allocator does the same (145-280k faults per step).

glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes malloc ``madvise`` its
mmap'd blocks for transparent huge pages: 2 MiB pages, ~700 faults per step, 0.09 s of system
CPU, steps run back to back ~10 % faster, peak RSS unchanged (a step after seconds of idling
pays the VM's memory reclaim either way on the 2-core machine: docs/speed.md). Tunables are
read when the process starts, so the ``mtneuro`` command and ``python -m
mtneuro_jax.train.loop`` re-execute themselves once with it set (``reexec_with_hugepages``);
the benchmark puts it into its workers' environment (``environ``). In scripts of your own,
start Python with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.

What was tried and not kept: keeping the block in the heap instead (``mallopt``: one arena, no
mmap, no trimming) removed every fault and made the step 12-15 % faster, but the heap
fragments around the block and grew to three blocks' worth (ResNet 64²: RSS 3.3 GiB instead of
1.5). ``MTNEURO_MALLOC=system`` leaves glibc as it is. Linux with glibc only; it does nothing
where transparent huge pages are off (``/sys/kernel/mm/transparent_hugepage/enabled`` =
never) or glibc is older than 2.35.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Mapping

from mtneuro_jax.errors import ConfigError

ENV = "MTNEURO_MALLOC"
MODES = ("hugepages", "system")
TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _checked(value: str, what: str) -> str:
  if value not in MODES:
    raise ConfigError(f"{what}{value!r}: expected one of {', '.join(MODES)}")
  return value


def mode(env: Mapping[str, str] | None = None) -> str:
  """``$MTNEURO_MALLOC`` of ``env`` (default: this process): 'hugepages' (default) or 'system'."""
  value = (os.environ if env is None else env).get(ENV, "hugepages").strip().lower()
  return _checked(value, f"{ENV}=")


def supported() -> bool:
  """Whether the tunable can do anything here: Linux, glibc >= 2.35, huge pages not 'never'."""
  if platform.system() != "Linux":
    return False
  lib, version = platform.libc_ver()
  try:
    if lib != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
      return False
    return "[never]" not in _THP_ENABLED.read_text()
  except (OSError, ValueError):
    return False


def _tunables(env: Mapping[str, str]) -> list[str]:
  return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def active(env: Mapping[str, str] | None = None) -> bool:
  """Whether ``env`` (default: this process's) carries the tunable."""
  return TUNABLE in _tunables(os.environ if env is None else env)


def environ(env: Mapping[str, str], malloc_mode: str) -> dict[str, str]:
  """A copy of ``env`` for a child process in ``malloc_mode`` ('hugepages' adds the tunable to
  ``GLIBC_TUNABLES``, keeping any others; 'system' removes it)."""
  _checked(malloc_mode, "malloc mode ")
  out = dict(env)
  rest = [t for t in _tunables(env) if not t.startswith("glibc.malloc.hugetlb=")]
  tunables = rest + ([TUNABLE] if malloc_mode == "hugepages" else [])
  if tunables:
    out["GLIBC_TUNABLES"] = ":".join(tunables)
  else:
    out.pop("GLIBC_TUNABLES", None)
  out[ENV] = malloc_mode
  return out


def release_free_memory() -> bool:
  """Hands the memory glibc's heaps hold free back to the OS (``malloc_trim(0)``); returns
  whether glibc released any (False where there is no glibc).

  Why: compiling a train step frees its working memory into glibc's heaps, which keep it (a
  heap returns only its free top), so it stays in RSS beside the step's temporaries. Called
  between compiling the step and running it, this takes it out of the step's peak RSS:
  ResNet18-xray B=32 1x64², oneDNN convs: 1558 -> 1346 MiB (PyTorch: 1229-1281); docs/speed.md,
  "Memory". Takes ~50 ms.
  """
  import ctypes
  import ctypes.util

  name = ctypes.util.find_library("c")
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not name:
    return False
  try:
    return bool(ctypes.CDLL(name).malloc_trim(0))
  except (OSError, AttributeError):
    return False


def reexec_with_hugepages() -> None:
  """Re-executes this program (``sys.orig_argv``) with the tunable set, unless it is set
  already, ``$MTNEURO_MALLOC`` is 'system' or ``supported()`` is False. Only for a program's
  own entry point, before it has done any work: the process image is replaced."""
  if mode() == "system" or active() or not supported():
    return
  argv = list(getattr(sys, "orig_argv", []))
  if not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], environ(os.environ, "hugepages"))
