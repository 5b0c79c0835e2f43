"""Starting the recipe from a tcl_jax checkpoint of other dims: the model dims come from the
checkpoint (tcl_jax.train.init_dims) unless the command line sets them; a flag that contradicts it is one
line before any work; a checkpoint of other dims that states none is named with the flags to set."""

import os

import jax
import pytest
from test_main_run import _main

from tcl_jax import kinds
from tcl_jax.configs import tcl as tcl_config
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.weights import model_files

DIMS = dict(
  embed_dim=16,
  image_resolution=32,
  vision_layers=2,
  vision_width=64,
  vision_heads=2,
  transformer_width=32,
  transformer_heads=2,
  transformer_layers=1,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A converted directory (config.json + params/) of a small TCL model, as tcl_jax.convert
  writes one."""
  cfg = tcl_lib.TCLConfig(clip=clip_lib.CLIPConfig(**DIMS), ie_freeze=1)
  path = tmp_path_factory.mktemp("ckpt") / "small"
  model_files.save_checkpoint(str(path), cfg, tcl_lib.init_params(cfg, jax.random.key(0)))
  return path


def test_the_recipe_takes_the_model_dims_from_a_converted_checkpoint(converted, tmp_path):
  # Was: 8 --config.model.* flags to write by hand, and a ~700-character line without them.
  proc = _main(
    tmp_path / "wd",
    f"--config.init_checkpoint={converted}",
    "--config.input.image_size=32",
    "--config.batch_size=4",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  taken = ", ".join(f"{k}={v}" for k, v in {**DIMS, "ie_freeze": 1}.items())
  assert f"config.model from init_checkpoint {converted}: {taken}" in proc.stderr
  assert f"Initialising parameters from {converted}" in proc.stderr
  assert "0 -> 2 (2 in this run)" in proc.stdout
  with open(tmp_path / "wd" / "config.json") as f:  # what a resume builds
    assert '"vision_width": 64' in f.read()


def test_a_flag_that_contradicts_the_checkpoint_is_one_line_before_work(converted, tmp_path):
  proc = _main(
    tmp_path / "wd", f"--config.init_checkpoint={converted}", "--config.model.clip.vision_layers=3"
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
    f"error: --config.model.clip.vision_layers=3 contradicts config.init_checkpoint={converted}, "
    "whose model has vision_layers=2: leave --config.model.clip.vision_layers out to take the "
    "checkpoint's"
  ]
  assert os.listdir(tmp_path / "wd") == []


def test_a_model_of_other_dims_is_named_by_the_flags_to_set(converted):
  # As a PyTorch CLIP of other dims is met (no stated config: checked when it loads).
  config = tcl_config.get_config("smoke")
  config.model.clip.vision_width = 128
  with pytest.raises(ValueError) as e:
    kinds.build_model(config).load(str(converted))
  assert str(e.value) == (
    f"init_checkpoint {converted} holds another model: set --config.model.clip.embed_dim=16 "
    "--config.model.clip.image_resolution=32 --config.model.clip.vision_layers=2 "
    "--config.model.clip.vision_width=64 --config.model.clip.vision_heads=2 "
    "--config.model.clip.transformer_width=32 --config.model.clip.transformer_heads=2 "
    "--config.model.clip.transformer_layers=1 --config.model.ie_freeze=1"
  )
