"""One training run per workdir: a lock file that the kernel releases when its process dies.

`acquire(workdir, process_index)` takes an exclusive `fcntl.flock` on `<workdir>/.run.lock` (process
0; `.run.lock.<i>` for process i of a multi-host run, so that the processes of one run, which
share the workdir, do not lock each other out while each of them keeps a second run's process i
out). The lock lasts as long as the process: a crashed or killed run leaves no stale lock, only the
file, which the next run reuses. The file names the holder (pid, host, start time) for the message
of a run that is refused. Only the standard library: it answers before JAX or TensorFlow loads.
"""

import datetime
import fcntl
import os
import socket

_held = []  # the open lock files of this process: closing one would release its lock


def lock_path(workdir: str, process_index: int = 0) -> str:
  name = ".run.lock" if process_index == 0 else f".run.lock.{process_index}"
  return os.path.join(workdir, name)


def acquire(workdir: str, process_index: int = 0, flag: str = "--workdir") -> str | None:
  """Holds `workdir`'s lock until this process ends. Returns the one-line problem when another
  run holds it (None: held now, or a remote workdir such as gs://..., which has no file locks)."""
  if "://" in workdir:
    return None
  path = lock_path(workdir, process_index)
  try:
    f = open(path, "a+")  # pylint: disable=consider-using-with  (open while the process lives)
  except OSError as e:
    return f"{flag}={workdir}: cannot open its lock file {path} ({e.strerror or e})"
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    return (
      f"{flag}={workdir} is in use by another training run ({holder}); a workdir takes one "
      "run at a time: wait for it to end, or give another --workdir"
    )
  f.seek(0)
  f.truncate()
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
  f.flush()
  _held.append(f)
  return None
