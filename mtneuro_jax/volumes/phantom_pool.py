"""Worker processes that render parts of a phantom box in parallel (``PhantomVolume(workers=N)``).

Workers are plain child processes (``python -m mtneuro_jax.volumes.phantom_worker``) that
read render requests from stdin and write the rendered arrays to stdout (pickled).
Not ``multiprocessing``: its ``fork`` is unsafe once the main job has imported JAX,
and its ``spawn``/``forkserver`` re-import the caller's main module in every worker
(slow for a JAX program, fatal for a script without a ``__main__`` guard). A fresh
interpreter importing only numpy/scipy and this package starts in about a second.

One set of workers per worker count, created on first use and shared by every
``PhantomVolume`` of the process (threads take a free worker from a queue); they
exit at interpreter exit (atexit) or when their stdin closes. Each worker keeps one
in-process ``PhantomVolume(seed, workers=1, ...)`` per option set. A part's values
are a pure function of its voxel coordinates (see ``phantom``), so the bytes never
depend on how a box is split or on which worker rendered a part.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from concurrent import futures

_LOCK = threading.Lock()
_SETS: dict[int, _WorkerSet] = {}


class WorkerError(RuntimeError):
  """A worker process died or answered garbage (the caller renders in-process instead)."""


class _Worker:
  def __init__(self):
    env = dict(os.environ)
    # Workers are single-threaded numpy: keep BLAS/OpenMP pools from oversubscribing.
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
      env.setdefault(k, "1")
    # The importing process's package must win (e.g. a worktree on PYTHONPATH).
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "mtneuro_jax.volumes.phantom_worker"],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      env=env,
    )

  def call(self, request) -> dict:
    try:
      send(self.proc.stdin, request)
      status, payload = recv(self.proc.stdout)
    except (OSError, EOFError, pickle.UnpicklingError, struct.error) as e:
      raise WorkerError(f"phantom worker {self.proc.pid} failed: {e!r}") from None
    if status != "ok":
      raise WorkerError(f"phantom worker {self.proc.pid} raised: {payload}")
    return payload

  def close(self):
    try:
      self.proc.stdin.close()
      self.proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()


class _WorkerSet:
  def __init__(self, n: int):
    self.workers = [_Worker() for _ in range(n)]
    self.free: queue.Queue = queue.Queue()
    for w in self.workers:
      self.free.put(w)
    self.threads = futures.ThreadPoolExecutor(max_workers=n)

  def _run(self, request):
    w = self.free.get()
    try:
      return w.call(request)
    finally:
      self.free.put(w)

  def map(self, requests) -> list[dict]:
    return list(self.threads.map(self._run, requests))

  def close(self):
    self.threads.shutdown(wait=True)
    for w in self.workers:
      w.close()


def send(f, obj) -> None:
  data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  f.write(struct.pack("<Q", len(data)))
  f.write(data)
  f.flush()


def _read_exact(f, n: int) -> bytes:
  buf = bytearray()
  while len(buf) < n:
    chunk = f.read(n - len(buf))
    if not chunk:
      raise EOFError("worker pipe closed")
    buf += chunk
  return bytes(buf)


def recv(f):
  (n,) = struct.unpack("<Q", _read_exact(f, 8))
  return pickle.loads(_read_exact(f, n))


def render_parts(workers: int, seed: int, zi_axon_labels: bool, parts) -> list[dict]:
  """``PhantomVolume.render`` of every box in ``parts`` (``(z0, z1, y0, y1, x0, x1)`` tuples),
  spread over the ``workers`` shared worker processes; results in ``parts`` order.

  Raises ``WorkerError`` when a worker fails (its set is dropped; the next call starts anew).
  """
  with _LOCK:
    ws = _SETS.get(workers)
    if ws is None:
      if not _SETS:
        atexit.register(shutdown)
      ws = _SETS[workers] = _WorkerSet(workers)
  try:
    return ws.map([(int(seed), bool(zi_axon_labels), tuple(int(v) for v in p)) for p in parts])
  except WorkerError:
    with _LOCK:
      if _SETS.get(workers) is ws:
        del _SETS[workers]
    ws.close()
    raise


def shutdown() -> None:
  """Stops every worker (registered with atexit; safe to call twice)."""
  with _LOCK:
    sets = list(_SETS.values())
    _SETS.clear()
  for ws in sets:
    ws.close()
