"""Preemption: SIGTERM / SIGINT become a flag the training loop checks between steps.

The loop (train.run) saves a checkpoint at the next step boundary and raises Preempted; main.py
exits with 128 + the signal number, and the same command resumes the run from that checkpoint.
"""
from __future__ import annotations

import signal


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps (then it saves and exits)."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Preempted(Exception):
  """Raised after the state was saved because SIGTERM/SIGINT arrived; rerun to resume."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by signal {signum} at step {step}; checkpoint saved, rerun the same "
                     "command to resume")
    self.signum, self.step = signum, step
