"""SIGTERM during `python -m tcl_jax.main`: checkpoint, clean exit, and a resume that continues."""

import os
import re
import signal
import subprocess
import sys
import time

from conftest import REPO
import pytest

FIXTURE = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "tcl_tiny", "tcl_reference.pth")
STEP_LOG = re.compile(r"\[(\d+)\] .*train/loss=")


def _start(workdir, log_path, *overrides):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device in the child: compile fast
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  cmd = [
    sys.executable,
    "-m",
    "tcl_jax.main",
    "--config=configs/synthetic.py",
    f"--workdir={workdir}",
    "--config.batch_size=4",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1000",
    "--config.image_log_every_steps=0",
    "--config.evals.tasks=",
    "--config.synthetic.num_train_examples=64",
    "--config.input.options.shuffle_buffer=64",
    *overrides,
  ]
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
    # The same command again while it trains: refused in one line (tests/test_workdir_lock.py).
    second, fh2 = _start(workdir, tmp_path / "second.log", "--config.total_steps=10000", *init)
    assert second.wait(timeout=300) == 2
    fh2.close()
    lines = (tmp_path / "second.log").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --workdir={workdir} is in use"), lines
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


def _bad_shard(path, n=16):
  """A shard of `n` well-formed records whose image bytes are not an image."""
  from tcl_jax.data import schema  # pylint: disable=g-import-not-at-top

  with schema.ShardWriter(str(path)) as w:
    for i in range(n):
      w.write(schema.make_example(b"\x00not a jpeg" * 8, f"a photo {i}", f"bad-{i:02d}"))


def test_all_bad_data_stops_with_one_line_naming_the_file(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  _bad_shard(data / "train-00000-of-00001.tfrecord")
  env = dict(os.environ, XLA_FLAGS="", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  # An endless loop of epochs would never end: the generous timeout (start-up and compile on a
  # loaded 2-core machine take minutes) fails it with TimeoutExpired.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "tcl_jax.main",
      "--config=configs/synthetic.py",
      f"--workdir={tmp_path / 'wd'}",
      "--config.total_steps=5",
      "--config.evals.tasks=",
      "--config.synthetic.num_train_examples=16",
      f"--config.input.train_files=('{data}/*',)",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert last == (
    f"error: input: no usable example in a full pass over 1 file "
    f"({data / 'train-00000-of-00001.tfrecord'}): 16 corrupt_image"
  ), last
  assert "Traceback" not in proc.stderr
  # Each bad record is named once (rate-limited: the first 10) with its file and key.
  named = re.findall(r"input: corrupt_image: (\S+), key '(bad-\d\d)'", proc.stderr)
  assert len(named) == 10 and len({k for _, k in named}) == 10, proc.stderr[-3000:]


def test_sigterm_while_waiting_for_data_ends_the_run(tmp_path):
  # The only train file is a named pipe that no one writes: the input pipeline blocks opening
  # it, as on a stalled file system, and the loop never gets a first batch.
  data = tmp_path / "data"
  data.mkdir()
  fifo = data / "train-00000-of-00001.tfrecord"
  os.mkfifo(fifo)
  log_path = tmp_path / "run.log"
  proc, fh = _start(
    tmp_path / "wd", log_path, "--config.total_steps=5", f"--config.input.train_files=('{data}/*',)"
  )
  try:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
      if "Waiting for input data" in open(log_path).read():  # the loop's note after 10 s
        break
      time.sleep(0.5)
    text = open(log_path).read()
    assert proc.poll() is None and "Waiting for input data" in text, text[-3000:]
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    rc = proc.wait(timeout=180)  # a run still blocked on the pipe would never end
    took = time.time() - t0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    fh.close()
  text = open(log_path).read()
  assert rc == 0, text[-3000:]
  assert "Preempted while waiting for input data: stopped at step 0." in text, text[-3000:]
  # Seconds when idle (the loop checks every 0.2 s, then checkpoints step 0 and exits); the bound
  # leaves room for a loaded machine, and is far below waiting for data that never comes.
  assert took < 120, took


def test_ctrl_c_checkpoints_says_so_in_one_line_and_exits_130(tmp_path):
  workdir, log = tmp_path / "wd", tmp_path / "run.log"
  proc, fh = _start(workdir, log, "--config.total_steps=10000")
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if max(_logged_steps(log), default=0) >= 3:
        break
      time.sleep(0.5)
    assert proc.poll() is None, open(log).read()[-3000:]
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
    fh.close()
  text = open(log).read()
  assert rc == 130, text[-3000:]
  assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
  stopped = max(_logged_steps(log))
  assert stopped >= 3
  ckpts = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert ckpts == [stopped]  # the steps done are saved: a rerun resumes there
  lines = [ln for ln in text.splitlines() if ln.startswith("stopped: ")]
  assert lines == [
    f"stopped: interrupted (Ctrl-C) at step {stopped}; the checkpoint is in "
    f"{workdir / 'checkpoints'}: rerun the same command to resume"
  ], text[-2000:]


CRASH = re.compile(r"Fatal Python error|terminate called|Traceback|core dumped")


def _wait_for(proc, log_path, pattern, accept=lambda m: True, quiet_s=300):
  """The first match of `pattern` in the log that `accept`s (None if the run ends first). The
  limit is on silence, not on the whole wait: a slow machine still logs its progress."""
  size, last = -1, time.time()
  while proc.poll() is None:
    text = open(log_path).read()
    for m in re.finditer(pattern, text):
      if accept(m):
        return m
    if len(text) != size:
      size, last = len(text), time.time()
    assert time.time() - last < quiet_s, f"no progress for {quiet_s} s:\n{text[-3000:]}"
    time.sleep(0.05)
  return None


# A stress test, not the guard: the abort it looks for depends on timing, and this test passed
# with the fix removed (the guard is test_a_closed_input_pipeline_lets_python_exit). Slow: -m slow.
@pytest.mark.slow
def test_sigterm_at_several_moments_exits_cleanly_each_time_and_resumes(tmp_path):
  # The input pipeline's threads tokenize through tf.numpy_function: one still running when
  # Python exits hangs or aborts the process ("terminate called after throwing an instance of
  # ''"), at random. Three stops at different moments of one run, each resumed by the next.
  workdir = tmp_path / "wd"
  flags = (
    "--config.total_steps=10000",
    "--config.checkpoint_every_steps=2",
    "--config.eval_every_steps=4",
    "--config.evals.tasks=shapes",
    "--config.synthetic.num_eval_images=4",
  )
  moments = [  # (what, log line, which of its matches)
    ("the first step, just compiled", r"train_step compiled", lambda m: True),
    ("an asynchronous save in flight", r"Checkpoint at step (\d+)", lambda m: True),
    # A step that is evaluated is saved first: its evaluation runs right after this line.
    ("an evaluation", r"Checkpoint at step (\d+)", lambda m: int(m.group(1)) % 4 == 0),
  ]
  resumed_from = 0
  for i, (what, pattern, accept) in enumerate(moments):
    log_path = tmp_path / f"run{i}.log"
    proc, fh = _start(workdir, log_path, *flags)
    try:
      m = _wait_for(proc, log_path, pattern, accept)
      assert m, open(log_path).read()[-3000:]
      proc.send_signal(signal.SIGTERM)
      rc = proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      fh.close()
    text = open(log_path).read()
    assert rc == 0 and not CRASH.search(text), f"SIGTERM during {what}: rc {rc}\n{text[-3000:]}"
    if resumed_from:  # the previous stop's checkpoint restored
      assert f"Resuming from {workdir / 'checkpoints'} step {resumed_from}" in text, text[-3000:]
    # Stopped between steps, or (the signal a little later on a loaded machine) while waiting
    # for the next batch; after the step whose line was seen.
    stop = re.search(
      r"Preempted: checkpoint at step (\d+) written|Preempted while waiting for input data: "
      r"stopped at step (\d+)",
      text,
    )
    assert stop, f"{what}\n{text[-3000:]}"
    stopped = int(stop.group(1) or stop.group(2))
    assert stopped > (int(m.group(1)) if m.groups() else resumed_from), (what, stopped)
    assert stopped in _checkpoint_steps(workdir)
    resumed_from = stopped


def _checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


EXIT_SCRIPT = """
import sys
from tcl_jax.train import preemption
from tcl_jax.data import input_pipeline
it = input_pipeline.make_train_iterator(
  sys.argv[1], global_batch_size=64, seed=0, image_size=96, shuffle_buffer=64
)
next(it)  # the pipeline now refills its prefetch buffer: tokenizer calls into Python
preemption.close_input(it)  # what the training loop does before it returns
print("closed", flush=True)
"""


def test_a_closed_input_pipeline_lets_python_exit(tmp_path):
  # Without close_input, Python's exit met the prefetch threads inside tf.numpy_function: it hung
  # (the iterator's destructor, holding the GIL, waits for threads that wait for the GIL) or
  # aborted ("terminate called after throwing an instance of ''"): 2 of 2 hung here.
  from tcl_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  synthetic.write_synthetic_image_text(
    str(tmp_path), num_examples=256, image_size=96, num_shards=2, seed=0
  )
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
  for _ in range(2):
    proc = subprocess.Popen(
      [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path / "train-*.tfrecord")],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    try:
      out, err = proc.communicate(timeout=240)  # seconds when it exits; a hang never ends
    except subprocess.TimeoutExpired:
      proc.kill()  # a hung exit ignores SIGTERM
      out, err = proc.communicate()
      raise AssertionError(f"hung at exit after: {out!r}\n{err[-2000:]}") from None
    assert proc.returncode == 0 and out == "closed\n", (proc.returncode, out, err[-3000:])
    assert not CRASH.search(err), err[-3000:]
