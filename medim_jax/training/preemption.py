"""SIGTERM/SIGINT become a stop request the training loop answers at the next step boundary.

Preemptible TPU and GPU machines send SIGTERM some seconds before they go; the loop then finishes
its step, saves a checkpoint and raises ``errors.Preempted``. A second Ctrl-C interrupts at once.
On several hosts, a signal on one host must not make only that host stop: there the decision is
the JAX distributed preemption service's (orbax's ``reached_preemption``), which every host agrees on.
"""

from __future__ import annotations

import signal
import sys
import threading

import jax

from medim_jax import errors

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
  """Context manager: while active, a stop signal sets ``signal_number`` instead of killing."""

  def __init__(self):
    self.signal_number: int | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_number is not None

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signal_number).name if self.requested else ""

  def preempted(self, step: int, checkpointer) -> errors.Preempted:
    """What a loop raises once it saved ``step`` for this request: the save is waited for first, so
    the checkpoint the error names is on disk."""
    checkpointer.wait()
    return errors.Preempted(self.signal_name or "preemption notice", self.signal_number or 0, step,
                            checkpointer.directory)

  def __enter__(self) -> "StopRequests":
    # Handlers can only be set from the main thread, and multi-host runs rely on the distributed
    # service (which has its own SIGTERM handling) so that all hosts stop at the same step.
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for number in STOP_SIGNALS:
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}

  def _handle(self, number, frame) -> None:
    if self.requested and number == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
    self.signal_number = number
    print(f"\n{signal.Signals(number).name} received: finishing this step, then saving a "
          "checkpoint (Ctrl-C again to stop without saving)", file=sys.stderr, flush=True)
