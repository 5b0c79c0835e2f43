"""`python -m tcl_jax.main` end to end on `configs/tcl.py:smoke` (in-memory batches, no data
files): the run, its closing summary, a no-op restart, and the refusal to extend a finished run."""

import glob
import os
import re
import subprocess
import sys

from conftest import REPO
import pytest

# The smoke config with a tiny CLIP so that a CPU runs it in seconds (the recipe's ViT-B/16 dims
# are run by the slow test below).
TINY = (
  "--config.model.clip.vision_layers=2",
  "--config.model.clip.vision_width=64",
  "--config.model.clip.vision_heads=2",
  "--config.model.clip.image_resolution=32",
  "--config.input.image_size=32",
  "--config.model.clip.transformer_layers=1",
  "--config.model.clip.transformer_width=32",
  "--config.model.clip.transformer_heads=2",
  "--config.model.clip.embed_dim=16",
  "--config.model.ie_freeze=1",
  "--config.batch_size=4",
)


def _main(workdir, *args, cwd=REPO, timeout=600):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
    XLA_FLAGS="",
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
  )
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "tcl_jax.main",
      "--config=configs/tcl.py:smoke",
      f"--workdir={workdir}",
      *args,
    ],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 2-step smoke run, started from a directory without configs/ or data."""
  cwd = tmp_path_factory.mktemp("elsewhere")
  proc = _main(cwd / "wd", *TINY, cwd=cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return cwd / "wd", proc


def test_smoke_trains_without_data_and_prints_a_summary(finished_run):
  workdir, proc = finished_run
  assert sorted(os.listdir(workdir)) == [
    ".run.lock",  # tcl_jax.train.workdir_lock's (released when the run ended)
    "checkpoints",
    "config.json",
    os.path.basename(_events(workdir)[0]),
  ]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  summary = proc.stdout[proc.stdout.index("Run summary") :].splitlines()
  rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in summary[1:])
  assert rows["workdir"] == str(workdir)
  assert rows["steps"] == "0 -> 2 (2 in this run)"
  assert re.fullmatch(r"\d+\.\d s", rows["wall time"])
  # The last logged losses, as logged at step 2.
  logged = [
    line for line in proc.stderr.splitlines() if "] [2] train/" in line and "train/loss=" in line
  ][0]
  loss = float(logged.split("train/loss=")[1].split(",")[0])
  assert rows["train/loss"] == f"{loss:.4f}  (step 2)"
  for term in (
    "area_loss",
    "neg_area_loss",
    "tclf_loss",
    "tcli_loss",
    "tv_img_loss",
    "tv_mask_loss",
  ):
    assert rows[f"train/{term}"].endswith("(step 2)"), term
  assert rows["checkpoints written"] == f"2  (in {workdir}/checkpoints)"


def _events(workdir):
  return sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))


def test_restart_of_a_finished_run_is_a_no_op_without_an_events_file(finished_run):
  workdir, _ = finished_run
  before = _events(workdir)
  config_json = os.stat(workdir / "config.json").st_mtime_ns
  proc = _main(workdir, *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "is at step 2 of total_steps=2: nothing to train" in proc.stderr
  assert _events(workdir) == before
  assert os.stat(workdir / "config.json").st_mtime_ns == config_json  # not rewritten
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  assert "2 -> 2 (0 in this run)" in proc.stdout


def test_extending_a_finished_run_is_refused(finished_run):
  workdir, _ = finished_run
  proc = _main(workdir, *TINY, "--config.total_steps=5")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: {workdir} holds a finished run (step 2 of total_steps=2); continuing it to "
    "total_steps=5 would restart the decay of its lr schedule mid-run. Train in a new "
    f"--workdir with --config.init_checkpoint={workdir} to start from its weights"
  )
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  # The refused command left the run as it was: the same command without the change is a no-op.
  with open(workdir / "config.json") as f:
    assert '"total_steps": 2' in f.read()


@pytest.mark.slow
def test_smoke_at_the_recipes_dims(tmp_path):
  """The recipe's ViT-B/16 at 224 px for one step (batch 2 instead of 64: CPU time)."""
  proc = _main(tmp_path / "wd", "--config.total_steps=1", "--config.batch_size=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "0 -> 1 (1 in this run)" in proc.stdout
  assert "parameters by group" in proc.stderr


def test_pytest_m_slow_selects_the_slow_tests():
  """The README's `pytest -m slow`: the command line's -m replaces pyproject's `-m 'not slow'`."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "--collect-only",
      "-q",
      "-m",
      "slow",
      "tests/test_main_run.py",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert proc.stdout.splitlines()[0] == "tests/test_main_run.py::test_smoke_at_the_recipes_dims"
  assert "1/5 tests collected (4 deselected)" in proc.stdout
