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


def test_repeated_classes_are_kept_once_with_a_note(ckpt, tmp_path):
  # Was: shares summing to 52% and the class twice in the legend.
  from tcl_jax import demo  # pylint: disable=g-import-not-at-top

  image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "img.png")
  out = tmp_path / "seg.png"
  r = _run(
    f"--checkpoint={ckpt}",
    f"--image={tmp_path / 'img.png'}",
    "--classes=sky; grass, Sky",
    f"--output={out}",
    "--no_pamr",
    "--bg_thresh=0",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [
    "note: --classes repeats 'Sky': each class is kept once, where it first appears"
  ]
  shares = {
    line.split(":")[0].strip(): float(line.split(":")[1].split("%")[0])
    for line in r.stdout.splitlines()
    if "% of pixels" in line
  }
  assert list(shares) == ["background", "sky", "grass"]
  assert abs(sum(shares.values()) - 100.0) < 0.2 and shares["background"] == 0.0
  written = np.asarray(Image.open(out))
  np.testing.assert_array_equal(written[40:], demo.legend(["sky", "grass"], 48))
