"""Named registries (models, objectives, evaluators): plain dicts that name the known keys on a miss.

A registry is a ``dict`` on purpose (add an entry by adding one line; iterate,
``in`` and ``sorted`` as usual); the only difference is the error of an unknown
name, which is one line listing every known name:

  MODELS["resnet50"]  ->  UnknownNameError: unknown model 'resnet50'; known: resnet18_xray
"""

from __future__ import annotations

from typing import Any, Mapping

from mtneuro_jax.errors import UserError


class UnknownNameError(UserError, KeyError):
  """A registry lookup of an unknown name (a UserError, and a KeyError for dict semantics)."""

  def __str__(self) -> str:  # KeyError would quote the message
    return str(self.args[0]) if self.args else ""


class Registry(dict):
  """``Registry(kind, {name: entry})``: a dict whose missing keys raise ``UnknownNameError``."""

  def __init__(self, kind: str, entries: Mapping[str, Any]):
    super().__init__(entries)
    self.kind = kind

  def __missing__(self, name):
    raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
