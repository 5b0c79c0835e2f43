"""The one-image demo path: label maps, background threshold, overlay, CLI."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tcl_jax import convert
from tcl_jax import demo
from tcl_jax.models import tcl as tcl_lib

SMALL = dict(img_scale=(256, 64), crop=64, stride=32)


@pytest.fixture(scope="module")
def model():
  cfg = tcl_lib.tiny_config()
  return cfg, tcl_lib.init_params(cfg, jax.random.key(0))


def test_segment_background_threshold_bounds(model):
  cfg, params = model
  img = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
  none_bg = demo.segment(params, cfg, img, ["dog", "sky"], pamr=False, bg_thresh=0.0, **SMALL)
  all_bg = demo.segment(params, cfg, img, ["dog", "sky"], pamr=False, bg_thresh=1.0, **SMALL)
  assert none_bg.shape == (50, 70) and all_bg.shape == (50, 70)
  assert set(np.unique(none_bg)) <= {1, 2} and (all_bg == 0).all()  # soft masks lie in (0, 1)


def test_overlay_colours_foreground_only():
  img = np.full((2, 3, 3), 100, np.uint8)
  labels = np.array([[0, 1, 2], [0, 0, 21]])
  out = demo.overlay(img, labels, alpha=0.5)
  np.testing.assert_array_equal(out[0, 0], [100, 100, 100])
  np.testing.assert_array_equal(out[0, 1], np.round((100 + demo.PALETTE[0].astype(float)) / 2))
  np.testing.assert_array_equal(out[1, 2], out[0, 1])  # class 21 cycles to the first colour
  with pytest.raises(ValueError, match="RGB image"):
    demo.segment(None, None, np.zeros((4, 4)), ["a"])


def test_cli_writes_overlay_and_reports_bad_image(model, tmp_path):
  cfg, params = model
  convert.save_checkpoint(tmp_path / "ckpt", cfg, params)
  Image.fromarray((np.random.default_rng(1).random((40, 48, 3)) * 255).astype(np.uint8)).save(
      tmp_path / "img.png")
  out = tmp_path / "seg.png"
  r = subprocess.run([sys.executable, "-m", "tcl_jax.demo", f"--checkpoint={tmp_path / 'ckpt'}",
                      f"--image={tmp_path / 'img.png'}", "--classes=dog, cat", f"--output={out}",
                      "--no_pamr"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert Image.open(out).size == (48, 40)
  shares = [float(l.split(":")[1].split("%")[0]) for l in r.stdout.splitlines() if "% of pixels" in l]
  assert len(shares) == 3 and abs(sum(shares) - 100.0) < 0.5
  (tmp_path / "bad.jpg").write_bytes(b"not an image")
  r = subprocess.run([sys.executable, "-m", "tcl_jax.demo", f"--checkpoint={tmp_path / 'ckpt'}",
                      f"--image={tmp_path / 'bad.jpg'}", "--classes=dog"], capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.startswith("error: cannot read image")
