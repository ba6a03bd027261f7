"""Errors the user can fix: the command line prints them as one line, without a traceback.

Raise ``InputError`` (or a subclass) wherever a config value, a file or a checkpoint the user gave
is wrong; the message names the thing and the fix. Anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """A config value, input file or checkpoint that cannot be used as it is."""


class CorruptFileError(InputError):
  """A file the project wrote earlier whose bytes are no longer what was written."""


class NonFiniteError(FloatingPointError):
  """Training met a non-finite loss or gradient it is configured not to skip."""


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint at ``step``; rerunning resumes it."""

  def __init__(self, signal_name: str, signal_number: int, step: int, checkpoint_dir: str):
    super().__init__(f"training stopped by {signal_name} after step {step}; the checkpoint "
                     f"{checkpoint_dir}/{step} is saved: run the same command again to resume")
    self.signal_name, self.signal_number, self.step = signal_name, signal_number, step


class SaveFailed(OSError):
  """A checkpoint could not be written (disk full, a file-size limit, permissions); the earlier
  checkpoints are untouched."""
