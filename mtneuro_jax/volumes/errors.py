"""The one error type of the volumes layer (its own module so sources and bossdb share it without a cycle)."""

from __future__ import annotations

from mtneuro_jax.errors import UserError


class SourceError(UserError, ValueError):
  """A source cannot serve a request; the message names the problem and the fix.

  A ``UserError`` (the CLIs print it as one line); still a ``ValueError`` for older callers.
  """
