"""What every command does with an error the user can act on: one ``error:`` line, no traceback
(``--debug`` shows it, and the libraries' own logs)."""

from __future__ import annotations

import logging as std_logging
import sys

from medim_jax import errors

# Input, corrupt files, a save the disk refused, a non-finite loss: the message names the thing and
# the fix. Anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, errors.InputError, errors.NonFiniteError, errors.SaveFailed)


class _DropOrbaxFailures(std_logging.Filter):
  """Orbax logs a failed background write with its traceback from each of its threads; the same
  failure then reaches the command, which names it in one line."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno >= std_logging.ERROR and "orbax" in record.pathname)


def configure_logs(debug: bool) -> None:
  from absl import logging
  logging.set_verbosity(logging.INFO if debug else logging.WARNING)  # orbax logs every file at INFO
  if not debug:  # on the logger: under app.run and in a plain script alike
    std_logging.getLogger("absl").addFilter(_DropOrbaxFailures())


def exit_with(error: BaseException, debug: bool) -> None:
  """Re-raise ``error`` with its traceback under --debug; otherwise exit with its one line."""
  if debug:
    raise error
  sys.exit(f"error: {error}")
