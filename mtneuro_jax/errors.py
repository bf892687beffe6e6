"""The project's bad-input error: every layer raises a subclass, every CLI prints it as one line.

A ``UserError``'s message is ``"<problem>; <fix>"``. The command-line entry points
(``experiments/cli.py``) run through ``run_cli``, which prints it as ``error: <message>``
on stderr and exits 2, without a traceback (``mtneuro --debug ...`` or ``MTNEURO_DEBUG=1``
shows it). Anything that is not a UserError is a bug and keeps its traceback.

Command-line parsers use ``ArgumentParser`` (below): a usage error raises ``UsageError``
instead of printing the usage block, so it too ends as one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

DEBUG_ENV = "MTNEURO_DEBUG"


class UserError(Exception):
  """Bad input (arguments, config, data on disk): the message says what is wrong and how to fix it."""


class UsageError(UserError):
  """Bad command-line arguments (unknown option, missing or malformed value)."""


class ConfigError(UserError, ValueError):
  """A config value the code cannot run with (the message names the key and a valid value)."""


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose usage errors raise ``UsageError`` (one line via ``run_cli``).

  ``--help`` behaves as usual (prints and exits 0).
  """

  def error(self, message: str) -> NoReturn:
    raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def debug_enabled() -> bool:
  return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(message: object) -> str:
  """``message`` with its lines joined: the error line must stay one line whatever it quotes."""
  return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _usage_error_types() -> tuple[type[BaseException], ...]:
  # absl flags errors count as usage errors, but absl is only checked if something imported it
  # (importing it here would slow down every command).
  flags = sys.modules.get("absl.flags")
  app = sys.modules.get("absl.app")
  out: list[type[BaseException]] = []
  if flags is not None:
    out.append(flags.Error)
  if app is not None:
    out.append(app.UsageError)
  return tuple(out)


def run_cli(
  fn: Callable[[Sequence[str]], int | None], argv: Sequence[str], *, debug: bool | None = None
) -> int:
  """Runs ``fn(argv)`` and turns bad input into one stderr line; returns the exit status.

  - ``UserError`` (incl. ``UsageError``, ``SourceError``, ``DatasetError``, ...) and absl
    flag errors: ``error: <message>`` on stderr, status 2;
  - ``OSError`` (unwritable folder, disk full, ...): ``error: <strerror>: <file>; <fix>``, 2;
  - ``KeyboardInterrupt``: ``error: interrupted``, 130;
  - ``SystemExit`` (``--help``, or a tool that exits itself): its status;
  - anything else is a bug: the traceback is kept.
  ``debug`` (default: ``MTNEURO_DEBUG`` set) also prints the traceback before the line.
  """
  debug = debug_enabled() if debug is None else debug

  def report(line: str, status: int) -> int:
    if debug:
      traceback.print_exc()
    sys.stdout.flush()
    print(f"error: {one_line(line)}", file=sys.stderr, flush=True)
    return status

  try:
    return int(fn(list(argv)) or 0)
  except UserError as e:
    return report(str(e), 2)
  except OSError as e:
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return report(
      f"{e.strerror or e}{where}; check the path, its permissions and the free disk "
      "space (`mtneuro --debug ...` shows the traceback)",
      2,
    )
  except KeyboardInterrupt:
    return report("interrupted (Ctrl-C); rerun the command to continue", 130)
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return int(e.code or 0)
    return report(str(e.code), 2)
  except Exception as e:  # noqa: BLE001 - usage errors of libraries we do not import here
    usage = _usage_error_types()
    if usage and isinstance(e, usage):
      return report(f"{e}; see --help", 2)
    raise
