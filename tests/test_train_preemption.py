"""SIGTERM during `python -m tcl_jax.main`: checkpoint, clean exit, and a resume that continues."""

import os
import re
import signal
import subprocess
import sys
import time

from conftest import REPO

FIXTURE = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "tcl_tiny",
                       "tcl_reference.pth")
STEP_LOG = re.compile(r"\[(\d+)\] .*train/loss=")


def _start(workdir, log_path, *overrides):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device in the child: compile fast
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  cmd = [sys.executable, "-m", "tcl_jax.main", "--config=configs/synthetic.py",
         f"--workdir={workdir}", "--config.batch_size=4", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=1000", "--config.image_log_every_steps=0",
         "--config.evals.tasks=", "--config.synthetic.num_train_examples=64",
         "--config.input.options.shuffle_buffer=64", *overrides]
  log = open(log_path, "w")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _logged_steps(log_path):
  with open(log_path) as f:
    return [int(m.group(1)) for m in STEP_LOG.finditer(f.read())]


def test_sigterm_checkpoints_exits_cleanly_and_resumes(tmp_path):
  workdir, log1 = tmp_path / "wd", tmp_path / "run1.log"
  # Start from the shared fixture's weights when present (covers init_checkpoint conversion).
  init = [f"--config.init_checkpoint={FIXTURE}"] if os.path.exists(FIXTURE) else []
  proc, fh = _start(workdir, log1, "--config.total_steps=10000", *init)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if max(_logged_steps(log1), default=0) >= 3:
        break
      time.sleep(0.5)
    assert proc.poll() is None, open(log1).read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
    fh.close()
  text = open(log1).read()
  assert rc == 0, text[-3000:]
  if init:
    assert f"Initialising parameters from {FIXTURE}" in text
  m = re.search(r"Preempted: checkpoint at step (\d+) written", text)
  assert m, text[-3000:]
  stopped = int(m.group(1))
  assert stopped >= 3 and stopped == max(_logged_steps(log1))
  ckpts = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert ckpts == [stopped]

  # Restart in the same workdir: resumes at `stopped` and runs 2 more steps.
  log2 = tmp_path / "run2.log"
  proc, fh = _start(workdir, log2, f"--config.total_steps={stopped + 2}", *init)
  try:
    rc = proc.wait(timeout=240)
  finally:
    if proc.poll() is None:
      proc.kill()
    fh.close()
  text = open(log2).read()
  assert rc == 0, text[-3000:]
  assert f"Resuming from {workdir / 'checkpoints'} step {stopped}" in text
  assert _logged_steps(log2) == [stopped + 1, stopped + 2]
  assert "Initialising parameters" not in text  # resume wins over init_checkpoint
  ckpts = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert ckpts == [stopped, stopped + 2]
