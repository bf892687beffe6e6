"""mtneuro_jax.dirlock: one writer per folder, the holder named, stale locks taken over only if dead."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mtneuro_jax import dirlock
from mtneuro_jax.errors import UserError


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _write_holder(folder, **holder):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, dirlock.LOCK_NAME), "w") as f:
    json.dump(holder, f)


def test_second_lock_fails_at_once_naming_the_holder(tmp_path):
  folder = str(tmp_path / "a" / "b")
  with dirlock.exclusive_lock(folder, what="export of t1") as lock:
    assert lock.held and os.path.isfile(lock.path)
    holder = dirlock.read_holder(folder)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["what"] == "export of t1" and holder["started_utc"].endswith("Z")
    t0 = time.monotonic()
    pid = os.getpid()
    with pytest.raises(
      dirlock.LockedError, match=rf"in use by export of t1 \(pid {pid} on host "
    ) as e:
      dirlock.exclusive_lock(folder, what="other").acquire()  # not re-entrant, even in one process
    assert time.monotonic() - t0 < 1 and isinstance(e.value, UserError) and "delete" in str(e.value)
    assert e.value.holder["pid"] == os.getpid()
  # Released: the lock file and the folders the lock created are gone; it can be taken again.
  assert not os.path.exists(tmp_path / "a")
  with dirlock.exclusive_lock(folder):
    pass


def test_lock_held_by_another_process(tmp_path):
  folder = str(tmp_path / "w")
  script = (
    "import sys, time; from mtneuro_jax import dirlock\n"
    "l = dirlock.exclusive_lock(sys.argv[1], what='training run').acquire()\n"
    "print('held', flush=True); time.sleep(60)"
  )
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p = subprocess.Popen(
    [sys.executable, "-c", script, folder], stdout=subprocess.PIPE, text=True, env=env
  )
  try:
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(dirlock.LockedError, match=rf"training run \(pid {p.pid} on host"):
      dirlock.exclusive_lock(folder).acquire()
  finally:
    p.kill()
    p.wait()
  # SIGKILLed holder: the kernel dropped its flock; its pid is dead -> taken over.
  with dirlock.exclusive_lock(folder) as lock:
    assert dirlock.read_holder(folder)["pid"] == os.getpid() and lock.held


def test_stale_lock_rules(tmp_path, caplog):
  folder = str(tmp_path / "d")
  host = socket.gethostname()
  _write_holder(
    folder, pid=_dead_pid(), host=host, started_utc="2020-01-01T00:00:00Z", what="old export"
  )
  with caplog.at_level("WARNING"):
    with dirlock.exclusive_lock(folder):
      pass
  assert "taking over the stale lock" in caplog.text and "old export" in caplog.text
  # Another host: liveness unknown -> refused, with the file to delete.
  _write_holder(
    folder, pid=1, host="elsewhere.example", started_utc="2020-01-01T00:00:00Z", what="x"
  )
  with pytest.raises(
    dirlock.LockedError, match="on host elsewhere.example.*another host.*delete .*\\.lock"
  ):
    dirlock.exclusive_lock(folder).acquire()
  # Same host, live pid without the flock (e.g. pid reuse): refused, never assumed dead.
  _write_holder(folder, pid=os.getppid(), host=host, started_utc="2020-01-01T00:00:00Z", what="y")
  with pytest.raises(dirlock.LockedError, match="pid is alive"):
    dirlock.exclusive_lock(folder).acquire()
  assert os.path.isfile(os.path.join(folder, dirlock.LOCK_NAME))  # a refusal changes nothing
  # Our own pid from an earlier life (containers reuse pids), or an unreadable file: taken over.
  _write_holder(folder, pid=os.getpid(), host=host, started_utc="2020-01-01T00:00:00Z", what="z")
  with dirlock.exclusive_lock(folder):
    pass
  with open(os.path.join(folder, dirlock.LOCK_NAME), "w") as f:
    f.write("{garbage")
  with dirlock.exclusive_lock(folder):
    pass
  assert not os.path.exists(os.path.join(folder, dirlock.LOCK_NAME))
