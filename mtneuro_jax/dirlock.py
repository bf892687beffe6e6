"""An exclusive, non-blocking lock on a folder: one writer at a time (exports, training workdirs).

  with exclusive_lock("out/data/x/task1_roi_c1", what="export of task1_roi_c1"):
    ...   # a second process asking for the same folder gets LockedError at once

The lock is the file ``<folder>/.lock``, held with ``fcntl.flock`` while the holder
runs (the kernel drops it when the process dies, however it dies) and holding one
JSON line that names the holder: ``{"pid", "host", "started_utc", "started", "what",
"argv"}``. A second writer fails at once with ``LockedError`` (a ``UserError``)
naming that holder.

Stale locks: a lock file whose flock is free belongs to a process that is gone.
It is taken over (with a log line) when its holder ran on this host and its pid is
no longer alive (or is our own pid: a previous life of this container). A holder
on another host, or a live pid here, is never assumed dead: the error says which
file to delete once the user has checked. The flock also guards against a pid
that was reused by another process (the lock file alone cannot tell).

Release deletes the lock file (and the folders the lock created, if still empty),
so an export that is refused leaves nothing behind.

Only the standard library and ``mtneuro_jax.errors``: the training loop imports it too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Any

from mtneuro_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class LockedError(UserError):
  """The folder is locked by another writer (the message names it and what to do)."""

  def __init__(self, message: str, holder: dict[str, Any] | None = None):
    super().__init__(message)
    self.holder = holder or {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  except (OverflowError, ValueError):
    return False
  return True


def _read_holder(fd: int) -> dict[str, Any] | None:
  """The holder record in an open lock file; None if empty, {} if unreadable."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
  except OSError:
    return {}
  if not data.strip():
    return None
  try:
    holder = json.loads(data.decode("utf-8", "replace"))
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any] | None) -> str:
  """``"export of task1_roi_c1 (pid 123 on host h, started 2024-05-01T10:00:00Z)"``."""
  if not holder:
    return "an unknown process"
  return (
    f"{holder.get('what') or 'a process'} (pid {holder.get('pid', '?')} on host "
    f"{holder.get('host', '?')}, started {holder.get('started_utc', '?')})"
  )


def read_holder(folder: str) -> dict[str, Any] | None:
  """Who holds (or last held, if it died) the lock of ``folder``; None if there is no lock file."""
  try:
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    return _read_holder(fd) or {}
  finally:
    os.close(fd)


class DirLock:
  """An exclusive lock on ``folder`` (see the module docstring). Not re-entrant.

  Use as a context manager, or ``acquire()`` / ``release()``. ``what`` names the
  holder in other writers' error messages (e.g. ``"export of task1_roi_c1"``,
  ``"training run"``). ``acquire`` creates ``folder`` (and its parents) if needed;
  ``release`` removes those it created if they are still empty.
  """

  def __init__(self, folder: str, what: str = "a process"):
    self.folder = os.path.abspath(folder)
    self.path = os.path.join(self.folder, LOCK_NAME)
    self.what = what
    self._fd: int | None = None
    self._created: list[str] = []

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _make_folder(self) -> None:
    missing, d = [], self.folder
    while not os.path.isdir(d):
      missing.append(d)
      parent = os.path.dirname(d)
      if parent == d:
        break
      d = parent
    for d in reversed(missing):
      try:
        os.mkdir(d)
        self._created.append(d)
      except FileExistsError:
        if not os.path.isdir(d):
          raise

  def _refuse(self, holder: dict[str, Any] | None, why: str = "") -> LockedError:
    return LockedError(
      f"{self.folder} is in use by {describe_holder(holder)}{why}; wait for it to finish, or "
      f"if that process is not running any more, delete {self.path}",
      holder,
    )

  def acquire(self) -> "DirLock":
    """Takes the lock or raises LockedError at once (never waits)."""
    if self._fd is not None:
      raise RuntimeError(f"{self.path} is already held by this DirLock")
    self._make_folder()
    try:
      return self._acquire()
    except BaseException:
      self._remove_created()
      raise

  def _acquire(self) -> "DirLock":
    me = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "started": time.time(),
      "what": self.what,
      "argv": list(sys.argv),
    }
    for _ in range(100):  # retried only when the file was replaced under us (a release raced)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
          if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
          raise self._refuse(_read_holder(fd)) from None
        try:
          same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
          same_file = False
        if not same_file:  # the holder released (and unlinked) it between our open and flock
          os.close(fd)
          fd = -1
          continue
        holder = _read_holder(fd)
        if holder:
          self._check_stale(holder)
        elif holder == {}:
          log.warning("lock file %s is unreadable; taking it over", self.path)
        data = (json.dumps(me) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd, fd = fd, -1
        return self
      finally:
        if fd >= 0:
          os.close(fd)
    raise self._refuse(None, " (its lock file keeps being replaced)")

  def _check_stale(self, holder: dict[str, Any]) -> None:
    """Raises LockedError unless the (unflocked) holder is provably gone; logs a take-over."""
    pid, host = holder.get("pid"), holder.get("host")
    if host != socket.gethostname():
      raise self._refuse(holder, ", on another host (its liveness cannot be checked from here)")
    if not isinstance(pid, int) or (pid != os.getpid() and _pid_alive(pid)):
      raise self._refuse(holder, ", whose pid is alive")
    log.warning(
      "taking over the stale lock %s of %s: that process is no longer running",
      self.path,
      describe_holder(holder),
    )

  def release(self) -> None:
    """Drops the lock and deletes the lock file (and the empty folders ``acquire`` created)."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      # Unlink while still holding the flock: a waiter that opened the old file notices the
      # inode change and retries on a fresh file (see acquire).
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
    finally:
      os.close(fd)
    self._remove_created()

  def _remove_created(self) -> None:
    for d in reversed(self._created):
      with contextlib.suppress(OSError):
        os.rmdir(d)  # only if empty
    self._created = []

  def __enter__(self) -> "DirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      with contextlib.suppress(OSError):
        os.close(self._fd)


def exclusive_lock(folder: str, what: str = "a process") -> DirLock:
  """``with exclusive_lock(folder, what="export of task1_roi_c1"): ...`` (see ``DirLock``)."""
  return DirLock(folder, what)
