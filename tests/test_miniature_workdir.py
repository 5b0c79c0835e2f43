"""A miniature workdir records what it was made with (tcl_jax/miniature/record.py): a command with
other settings is refused in one line instead of reporting another run's figures under its own
label, and a finished run's re-run prints the stored figures and wall time. Also what the run
writes: figures rounded as the README's table, the masks picture's headers and legend, and no
start-up noise on stderr.

One tiny miniature run (2 TCL steps, 64 training pairs, 4 evaluation images) is shared by the
module; about a minute on a 2-core machine.
"""

import json
import os
import subprocess
import sys

from conftest import REPO
import numpy as np
from PIL import Image
import pytest

from tcl_jax.data import synthetic
from tcl_jax.miniature import experiment as miniature

TINY = (
  "--config.synthetic.num_train_examples=64",
  "--config.synthetic.num_eval_images=4",
  "--config.miniature.num_mask_images=2",
  "--config.input.options.shuffle_buffer=64",
)
NOISE = (
  "oneDNN custom operations",
  "cpu_feature_guard",
  "Unable to initialize backend",
  "absl::InitializeLog",
  "share=True",
)


def _main(workdir, *args, cwd=REPO):
  env = dict(os.environ, XLA_FLAGS="", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell: main silences TF itself
  return subprocess.run(
    [sys.executable, "-m", "tcl_jax.main", *args, f"--workdir={workdir}"],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.fixture(scope="module")
def seed0_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("miniature") / "wd"
  proc = _main(workdir, "--config=configs/synthetic.py:steps=2", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def _one_line(proc, status=2) -> str:
  assert proc.returncode == status, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def test_another_seed_is_refused_not_reported_under_its_label(seed0_run):
  # Was: "miniature (seed 1): ..." with seed 0's data, baseline and checkpoint, and a
  # miniature.json rewritten with "seed": 1.
  workdir, _ = seed0_run
  before = (workdir / "miniature.json").read_bytes()
  line = _one_line(_main(workdir, "--config=configs/synthetic.py:steps=2,seed=1", *TINY))
  assert line == (
    f"error: --workdir={workdir} holds a miniature run made with seed=0, "
    "synthetic.seed=0; this command has seed=1, synthetic.seed=1: use a new "
    "--workdir (or the workdir's own settings, to resume or report it)"
  )
  assert (workdir / "miniature.json").read_bytes() == before


def test_other_settings_and_steps_are_refused(seed0_run):
  workdir, _ = seed0_run
  line = _one_line(
    _main(workdir, "--config=configs/synthetic.py:steps=2", *TINY, "--config.evals.bg_thresh=0.3")
  )
  assert line.startswith(
    f"error: --workdir={workdir} holds a miniature run made with "
    "evals.bg_thresh=0.5; this command has evals.bg_thresh=0.3"
  )
  line = _one_line(
    _main(workdir, "--config=configs/synthetic.py:steps=2", *TINY, "--config.total_steps=1")
  )
  assert line == (
    f"error: --workdir={workdir} holds a finished miniature run of 2 TCL steps; "
    "this command asks for total_steps=1: use a new --workdir"
  )


def test_other_steps_on_a_finished_run_are_refused_in_terms_of_steps(seed0_run):
  # Was: "made with optim.ust_steps=0, optim.warmup_steps=1; this command has ...", fields the
  # command never named.
  workdir, _ = seed0_run
  before = (workdir / "miniature.json").read_bytes()
  line = _one_line(_main(workdir, "--config=configs/synthetic.py:steps=30", *TINY))
  assert line == (
    f"error: --workdir={workdir} holds a finished miniature run of 2 TCL steps (:steps=2); "
    "this command asks for :steps=30: use a new --workdir, or :steps=2 to report it"
  )
  assert (workdir / "miniature.json").read_bytes() == before


def test_finished_run_reports_its_stored_figures_and_wall_time(seed0_run):
  # Was: a re-run re-evaluated and rewrote wall_s with ~9 s.
  workdir, first = seed0_run
  before = (workdir / "miniature.json").read_bytes()
  proc = _main(workdir, "--config=configs/synthetic.py:steps=2", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "miniature.json").read_bytes() == before
  stored = json.loads(before)
  first_line = first.stdout.strip().splitlines()[-1]
  assert proc.stdout.strip() == first_line + (
    f". A finished run: these are the figures stored in {workdir / 'miniature.json'}, "
    "nothing was recomputed"
  )
  # The stored wall time is the first run's (the file's bytes are unchanged above); no bound on
  # its size: a faster machine runs the tiny run in under the 20 s this once assumed.
  assert f"; {stored['wall_s']:.0f} s." in first_line and stored["wall_s"] > 0
  assert proc.stderr == ""  # answered before TensorFlow or JAX were loaded


def test_report_is_rounded_as_the_table(seed0_run):
  # Was: "tcl_miou": 31.419999999999998.
  workdir, _ = seed0_run
  text = (workdir / "miniature.json").read_text()
  out = json.loads(text)
  assert (out["seed"], out["tcl_steps"]) == (0, 2)

  def floats(node):
    if isinstance(node, dict):
      return [f for v in node.values() for f in floats(v)]
    return [node] if isinstance(node, float) else []

  values = floats({k: v for k, v in out.items() if k != "wall_s"})
  assert len(values) > 20 and all(round(v, 2) == v for v in values)
  assert all(len(repr(v).split(".")[-1]) <= 2 for v in values), text


def test_no_start_up_noise(seed0_run):
  _, proc = seed0_run
  for noise in NOISE:
    assert noise not in proc.stderr, noise


def test_masks_picture_has_headers_a_legend_and_object_colours(seed0_run):
  # Was: no headers, no legend, and the VOC palette (a blue square drawn dark red).
  workdir, _ = seed0_run
  img = np.asarray(Image.open(workdir / "miniature_masks.png").convert("RGB"))
  cell = 2 * 96
  grid_h = 2 * cell  # num_mask_images=2
  assert img.shape[1] == 4 * cell
  header_h = miniature._HEADER_PX
  assert img.shape[0] > header_h + grid_h  # a legend below the grid
  header, legend = img[:header_h], img[header_h + grid_h :]
  for band in (header, legend):  # text and swatches drawn on white
    assert (band < 100).all(axis=-1).sum() > 100
  # Every class's colour appears in the legend, as a swatch.
  colours = miniature.class_colours(synthetic.CLASSES)[:-1]
  for name, rgb in zip(synthetic.CLASSES, colours):
    assert (legend == rgb).all(axis=-1).sum() >= 100, name
  # The truth cells are drawn in those colours only.
  truth = img[header_h : header_h + grid_h, cell : 2 * cell].reshape(-1, 3)
  assert {tuple(c) for c in np.unique(truth, axis=0)} <= {tuple(c) for c in colours}


def test_class_colours_are_the_objects_colours():
  colours = miniature.class_colours(synthetic.CLASSES)
  assert len({tuple(c) for c in colours}) == len(colours)  # each class its own colour
  for name, rgb in zip(synthetic.CLASSES[1:], colours[1:]):
    colour = synthetic.COLORS[name.split(" ")[0]]
    # The object's dominant channels stay dominant: a blue square is blue, not dark red.
    assert np.argmax(rgb) == np.argmax(colour), (name, rgb)
    assert int(rgb.max()) - int(rgb.min()) > 40, (name, rgb)
