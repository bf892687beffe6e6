"""The worker process of ``phantom_pool``: ``python -m mtneuro_jax.volumes.phantom_worker``.

Reads render requests ``(seed, zi_axon_labels, (z0, z1, y0, y1, x0, x1))`` (or ``None``, a
ping answered ``("ok", None)``) from stdin and writes ``("ok", arrays)`` or ``("error", text)``
to stdout, framed by ``phantom_pool.send`` /
``recv``. A module of its own so that imports point one way: phantom -> phantom_pool, and
this worker -> phantom, phantom_pool.
"""

from __future__ import annotations

import sys

from mtneuro_jax.volumes import phantom, phantom_pool, spec


def serve() -> None:
  """The worker loop: requests on stdin, ("ok", arrays) or ("error", text) on stdout."""
  stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
  sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
  phantom._warm_tables()  # one-off tables while the parent still renders its own first part
  volumes: dict = {}
  while True:
    try:
      request = phantom_pool.recv(stdin)
    except EOFError:
      return
    if request is None:  # a ping: ready
      phantom_pool.send(stdout, ("ok", None))
      continue
    seed, zi, bounds = request
    try:
      vol = volumes.get((seed, zi))
      if vol is None:
        vol = volumes[(seed, zi)] = phantom.PhantomVolume(
          seed, workers=1, zi_axon_labels=zi, cache_bytes=0
        )
      reply = ("ok", vol.render(spec.Box(*bounds)))
    except Exception as e:  # noqa: BLE001 -- reported; the parent renders the part itself
      reply = ("error", f"{e.__class__.__name__}: {e}")
    phantom_pool.send(stdout, reply)


if __name__ == "__main__":
  serve()
