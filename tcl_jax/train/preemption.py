"""Stopping a training run between steps: SIGTERM (preemption) and SIGINT (Ctrl-C) are recorded,
the loop checkpoints and stops; a second Ctrl-C aborts at once. `next_batch` lets a notice that
arrives while the loop waits for input data stop the wait; `close_input` stops the input
pipeline's native threads before the process exits (a clean exit depends on it)."""

import signal
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils


class Interrupted(Exception):
  """Ctrl-C stopped the run after its checkpoint at `step` was written."""

  def __init__(self, step: int, directory: str):
    super().__init__(
      f"interrupted (Ctrl-C) at step {step}; the checkpoint is in {directory}: "
      "rerun the same command to resume"
    )
    self.step = step


class Preemption:
  """Records SIGTERM / SIGINT so the loop can checkpoint and exit between steps."""

  def __init__(self):
    self.requested = False
    self.signal = None  # the first signal received
    self._previous = {}

  def __enter__(self):
    # Multi-process: JAX's preemption service (started by jax.distributed.initialize) owns
    # SIGTERM; a Python handler here would replace its notifier. Ctrl-C is a single-process
    # (interactive) matter.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
    name = signal.Signals(signum).name
    logging.warning(
      "Received %s: will checkpoint and stop after this step%s.",
      name,
      " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else "",
    )
    self.requested = True
    self.signal = self.signal or signum

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)

  @property
  def interrupted(self) -> bool:
    """The stop was asked for with Ctrl-C (not a preemption notice)."""
    return self.signal == signal.SIGINT

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # All hosts must agree on the step; JAX's preemption service (active after
      # jax.distributed.initialize) delivers the notice to every process at the same step.
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested


def next_batch(train_iter, preemption: Preemption):
  """`next(train_iter)`, or None if a stop is requested while waiting for it.

  The read runs in a daemon thread: Python runs a signal handler only when the main thread runs
  bytecode, never while it is blocked inside tf.data's C++ reads (a stalled file system), so a
  SIGTERM would otherwise wait for data that may never come. An abandoned read stays blocked in
  its thread until the process exits.
  """
  done, out = threading.Event(), []

  def read():
    try:
      out.append((next(train_iter), None))
    except BaseException as e:  # pylint: disable=broad-except
      out.append((None, e))
    done.set()

  thread = threading.Thread(target=read, name="next_batch", daemon=True)
  thread.start()
  t0, report_at = time.time(), 10.0
  while not done.wait(0.2):
    if preemption.requested:
      _abandoned.append(thread)
      return None
    if time.time() - t0 >= report_at:
      logging.info("Waiting for input data (%.0f s so far)", time.time() - t0)
      report_at *= 2
  batch, error = out[0]
  if error is not None:
    raise error
  return batch


_abandoned = []  # next_batch's reads left running by a stop request


def reads_blocked() -> bool:
  """A read abandoned by a stop request is still inside the input pipeline's native code: when
  it returns into Python during interpreter exit, the process aborts (`terminate called after
  throwing an instance of ''`), so the caller must end the process with os._exit."""
  return any(t.is_alive() for t in _abandoned)


def close_input(train_iter, wait_s: float = 10.0) -> None:
  """Stops `train_iter`'s pipeline threads (its `close()`, if it has one) once no read is in
  flight: a read abandoned by a stop request gets `wait_s` to finish (a healthy pipeline's batch
  takes well under that); one still blocked then (a stalled file system) is left to
  reads_blocked()."""
  deadline = time.time() + wait_s
  for t in _abandoned:
    t.join(max(deadline - time.time(), 0.0))
  if not reads_blocked() and hasattr(train_iter, "close"):
    train_iter.close()
