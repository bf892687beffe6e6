"""The project's bad-input error: every layer raises a subclass, every CLI prints it as one line.

A ``UserError``'s message is ``"<problem>; <fix>"``. The command-line entry points
(``experiments/cli.py``) print it as ``error: <message>`` on stderr and exit 2,
without a traceback (``--debug`` shows it). Anything that is not a UserError is
a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input (arguments, config, data on disk): the message says what is wrong and how to fix it."""
