"""The demo command line on mistakes: one line naming what the user gave, before any model work."""

import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from tcl_jax.models import tcl as tcl_lib
from tcl_jax.weights import model_files


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  cfg = tcl_lib.tiny_config()
  path = tmp_path_factory.mktemp("demo_cli") / "ckpt"
  model_files.save_checkpoint(path, cfg, tcl_lib.init_params(cfg, jax.random.key(0)))
  return path


def _run(*args):
  return subprocess.run(
    [sys.executable, "-m", "tcl_jax.demo", *args], capture_output=True, text=True, timeout=300
  )


def _one_error_line(r, code=2):
  assert r.returncode == code, r.stderr[-2000:]
  assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  return r.stderr.strip()


def test_an_elongated_image_names_the_users_size(ckpt, tmp_path):
  # 4000 x 8: downscaled to 2048 x 4 by --max_side, then too thin for the pipeline's resize.
  Image.fromarray(np.full((8, 4000, 3), 128, np.uint8)).save(tmp_path / "thin.png")
  line = _one_error_line(
    _run(
      f"--checkpoint={ckpt}",
      f"--image={tmp_path / 'thin.png'}",
      "--classes=dog",
      f"--output={tmp_path / 'seg.png'}",
    )
  )
  assert "(4000x8)" in line and "too elongated" in line, line
  assert not (tmp_path / "seg.png").exists()


def test_output_into_a_missing_folder_fails_before_the_model_loads(tmp_path):
  # The checkpoint does not exist either: the --output check comes first, before any loading.
  line = _one_error_line(
    _run(
      "--checkpoint=nowhere",
      "--image=sample",
      "--classes=dog",
      f"--output={tmp_path / 'no' / 'seg.png'}",
    )
  )
  assert line.startswith(f"error: --output {tmp_path / 'no' / 'seg.png'}: folder "), line


def test_bg_thresh_out_of_range_is_a_usage_error(tmp_path):
  line = _one_error_line(
    _run("--checkpoint=nowhere", "--image=sample", "--classes=dog", "--bg_thresh=1.5")
  )
  assert "--bg_thresh must be in [0, 1], got 1.5" in line


def test_help_describes_every_option():
  r = _run("--help")
  assert r.returncode == 0
  text = " ".join(r.stdout.split())
  assert "Segments one image with any list of class names" in text
  for option, words in [
    ("--no_pamr", "mask refinement"),
    ("--kp_w", "KP branch"),
    ("--bg_thresh", "background"),
  ]:
    assert option in text and words in text, (option, text)
