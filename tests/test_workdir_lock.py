"""One training run per workdir (tcl_jax.train.workdir_lock): a second `main` in a busy workdir is one
line, exit status 2, before it writes anything; a run that dies (even by SIGKILL) leaves no stale
lock; the processes of one multi-host run hold one lock each, so they do not lock each other out."""

import os
import signal
import subprocess
import sys

from conftest import REPO

HOLD = (
  "import sys, time; from tcl_jax.train import workdir_lock; "
  "problem = workdir_lock.acquire(sys.argv[1], int(sys.argv[2])); "
  "print(problem or 'held', flush=True); time.sleep(0 if problem else 600)"
)


def _hold(workdir, process_index=0):
  """A process that takes the lock (or says why not) and holds it until killed."""
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(workdir), str(process_index)],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  return proc, proc.stdout.readline().strip()


def _main(workdir, pythonpath):
  env = dict(os.environ, PYTHONPATH=pythonpath, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "tcl_jax.main",
      "--config=configs/synthetic.py",
      f"--workdir={workdir}",
      "--config.total_steps=5",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_a_second_run_in_a_busy_workdir_is_one_line_and_a_killed_run_frees_it(tmp_path):
  # Was: both trained; the second died after ~5 min in 309 lines of orbax tracebacks, the first
  # reported a checkpoint whose `input` part was missing.
  poisoned = tmp_path / "poisoned"  # the refusal comes before TensorFlow or JAX loads
  for name in ("tensorflow", "jax"):
    os.makedirs(poisoned / name)
    (poisoned / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
  pythonpath = os.pathsep.join([str(poisoned), REPO])
  workdir = tmp_path / "wd"
  workdir.mkdir()
  holder, said = _hold(workdir)
  try:
    assert said == "held"
    proc = _main(workdir, pythonpath)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and proc.stdout == "", proc.stderr[-3000:]
    assert lines[0].startswith(
      f"error: --workdir={workdir} is in use by another training run (pid {holder.pid} on "
    ), lines[0]
    assert lines[0].endswith(
      "); a workdir takes one run at a time: wait for it to end, or give another --workdir"
    )
    assert os.listdir(workdir) == [".run.lock"]  # nothing written
  finally:
    holder.send_signal(signal.SIGKILL)  # a crashed run: no chance to clean up
    holder.wait()
  # The kernel released the lock with the process: the same command gets past it (to the
  # poisoned import, which proves it went on).
  proc = _main(workdir, pythonpath)
  assert proc.returncode != 2 and "tensorflow was imported" in proc.stderr, proc.stderr[-3000:]


def test_the_processes_of_one_run_hold_one_lock_each(tmp_path):
  holders = []
  try:
    for index in (0, 1):  # one multi-host run: both hold the shared workdir
      proc, said = _hold(tmp_path, index)
      holders.append(proc)
      assert said == "held", said
    proc, said = _hold(tmp_path, 1)  # process 1 of a second run
    holders.append(proc)
    assert said.startswith(f"--workdir={tmp_path} is in use by another training run (pid ")
  finally:
    for proc in holders:
      proc.kill()
      proc.wait()
