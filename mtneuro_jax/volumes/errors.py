"""The one error type of the volumes layer (its own module so sources and bossdb share it without a cycle)."""

from __future__ import annotations


class SourceError(ValueError):
  """A source cannot serve a request; the message names the problem and the fix."""
