"""Worker processes that render parts of a phantom box in parallel (``PhantomVolume(workers=N)``).

Workers are plain child processes (``python -m mtneuro_jax.volumes.phantom_worker``) that
read render requests from stdin and write the rendered arrays to stdout (pickled).
Not ``multiprocessing``: its ``fork`` is unsafe once the main job has imported JAX,
and its ``spawn``/``forkserver`` re-import the caller's main module in every worker
(slow for a JAX program, fatal for a script without a ``__main__`` guard). A fresh
interpreter importing only numpy/scipy and this package starts in about half a second.

``render_parts`` spreads a list of parts over N - 1 children and the calling thread,
which renders too (``local``): all pull the next part from one queue, so uneven parts
balance. One set of children per size, created on first use and shared by every
``PhantomVolume`` of the process; they exit at interpreter exit (atexit) or when their
stdin closes. Each child keeps one in-process ``PhantomVolume(seed, workers=1, ...)``
per option set. A part's values are a pure function of its voxel coordinates (see
``phantom``), so the bytes never depend on how a box is split or on who rendered a part.
Replies are the uint8 arrays of ``PhantomVolume.render`` (3 bytes per voxel; the
parent widens labels to the cutout dtype).
"""

from __future__ import annotations

import atexit
import contextlib
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
    self.lock = threading.Lock()  # one request at a time on its pipes (callers may be threads)
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
    _widen_pipe(self.proc.stdout)

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


_PIPE_BYTES = 1 << 20


def _widen_pipe(f) -> None:
  """Raises a pipe's capacity to 1 MiB (Linux; the default 64 KiB holds 1/50 of a reply).

  The thread reading a reply needs the GIL back after every read, and while this
  process renders a part itself it gets it only every switch interval: fewer, larger
  reads keep a reply from waiting on the GIL."""
  try:
    import fcntl

    fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
  except (ImportError, AttributeError, OSError):
    pass  # not Linux, or capped lower: slower transfers, same bytes


class _WorkerSet:
  def __init__(self, n: int):
    self.workers = [_Worker() for _ in range(n)]
    self.threads = futures.ThreadPoolExecutor(max_workers=n)

  def close(self):
    self.threads.shutdown(wait=True)
    for w in self.workers:
      w.close()


def send(f, obj) -> None:
  data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  f.write(struct.pack("<Q", len(data)))
  f.write(data)
  f.flush()


def _read_exact(f, n: int) -> bytearray:
  buf = bytearray(n)
  view, got = memoryview(buf), 0
  while got < n:
    k = f.readinto(view[got:])
    if not k:
      raise EOFError("worker pipe closed")
    got += k
  return buf


def recv(f):
  (n,) = struct.unpack("<Q", _read_exact(f, 8))
  return pickle.loads(_read_exact(f, n))


def _worker_set(n: int) -> _WorkerSet:
  with _LOCK:
    ws = _SETS.get(n)
    if ws is None:
      if not _SETS:
        atexit.register(shutdown)
      ws = _SETS[n] = _WorkerSet(n)
  return ws


_SWITCH = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _short_switch_interval(seconds: float = 2e-4):
  """While this thread renders (holding the GIL between numpy calls), the threads that
  read the workers' replies wait up to the switch interval (5 ms by default) for the GIL
  after each read; a short interval lets them in promptly (nested and concurrent uses
  restore the original when the last one ends)."""
  with _LOCK:
    if _SWITCH["depth"] == 0:
      _SWITCH["saved"] = sys.getswitchinterval()
      sys.setswitchinterval(min(seconds, _SWITCH["saved"]))
    _SWITCH["depth"] += 1
  try:
    yield
  finally:
    with _LOCK:
      _SWITCH["depth"] -= 1
      if _SWITCH["depth"] == 0:
        sys.setswitchinterval(_SWITCH["saved"])


def start(workers: int, wait: bool = False) -> None:
  """Starts the children that ``render_parts(workers, ...)`` uses; with ``wait``, returns when
  every child has imported and answered (e.g. before timing), else at once (they import in
  the background). Optional: the first ``render_parts`` starts them too."""
  if workers < 2:
    return
  ws = _worker_set(workers - 1)
  if wait:

    def ping(w: _Worker):
      with w.lock:
        w.call(None)

    for job in [ws.threads.submit(ping, w) for w in ws.workers]:
      job.result()


def render_parts(workers: int, seed: int, zi_axon_labels: bool, parts, local) -> list[dict]:
  """``PhantomVolume.render`` of every box in ``parts`` (``(z0, z1, y0, y1, x0, x1)`` tuples)
  by ``workers`` renderers: ``workers - 1`` shared child processes and the calling thread,
  which renders with ``local(bounds)``; results in ``parts`` order.

  A failed child (killed, out of memory) is dropped with its set (the next call starts
  anew) and its part is rendered by ``local``; nothing is raised for it.
  """
  parts = [tuple(int(v) for v in p) for p in parts]
  results: list = [None] * len(parts)
  todo: queue.SimpleQueue = queue.SimpleQueue()
  for i in range(len(parts)):
    todo.put(i)
  failed: list[int] = []
  ws = _worker_set(workers - 1) if workers > 1 else None

  def next_part():
    try:
      return todo.get_nowait()
    except queue.Empty:
      return None

  def child_loop(w: _Worker):
    while (i := next_part()) is not None:
      try:
        with w.lock:
          results[i] = w.call((int(seed), bool(zi_axon_labels), parts[i]))
      except WorkerError:
        failed.append(i)
        return True
    return False

  jobs = []
  for w in ws.workers if ws else ():
    try:
      jobs.append(ws.threads.submit(child_loop, w))
    except RuntimeError:  # the set was closed meanwhile (another call saw a child fail)
      break
  with _short_switch_interval():
    while (i := next_part()) is not None:
      results[i] = local(parts[i])
    broken = any(j.result() for j in jobs)
  for i in failed:
    results[i] = local(parts[i])
  if broken:
    with _LOCK:
      if _SETS.get(workers - 1) is ws:
        del _SETS[workers - 1]
    ws.close()
  return results


def shutdown() -> None:
  """Stops every worker (registered with atexit; safe to call twice)."""
  with _LOCK:
    sets = list(_SETS.values())
    _SETS.clear()
  for ws in sets:
    ws.close()
