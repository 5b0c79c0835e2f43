"""Every config under configs/ loads, locks, accepts --config.x overrides and builds a model."""

import glob
import os

from absl import flags
from conftest import REPO
from conftest import load_config_module
from ml_collections import config_flags
import numpy as np
import pytest

from tcl_jax.models import tcl as tcl_lib
from tcl_jax.train import inputs as train_inputs


def _all_configs():
  out = []
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    if name != "common":
      out.append(name)
  return out


@pytest.mark.parametrize(
  "name,arg",
  [(n, None) for n in _all_configs()]
  + [("tcl", "fsdp=4"), ("tcl", "smoke"), ("synthetic", "steps=40")],
)
def test_config_loads_and_locks(name, arg):
  module = load_config_module(name)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.no_such_field_anywhere = 1
  if "model" in config and config.get("model_kind", "tcl") == "tcl":  # a valid TCLConfig
    cfg = tcl_lib.TCLConfig.from_dict(config.model.to_dict())
    assert cfg.clip.image_resolution == config.input.image_size
    assert config.batch_size > 0 and config.total_steps > 0


def test_paper_recipe_values():
  c = load_config_module("tcl").get_config()
  assert (c.total_steps, c.batch_size, c.eval_every_steps) == (50_000, 1024, 5000)
  o = c.optim
  assert (o.base_lr, o.min_lr, o.lr_scale_reference_batch) == (3e-4, 4e-5, 4096)
  assert (o.warmup_steps, o.warmup_start_factor, o.ust_steps) == (15_000, 1e-4, 30_000)
  assert (o.weight_decay, o.clip_grad, o.b1, o.b2, o.eps) == (0.05, 5.0, 0.9, 0.999, 1e-6)
  cfg = tcl_lib.TCLConfig.from_dict(c.model.to_dict())
  assert cfg.clip == tcl_lib.CLIPConfig()  # ViT-B/16
  assert (cfg.ie_freeze, cfg.ie_ignore_last_attn) == (11, True)
  assert (
    cfg.decoder_double,
    cfg.decoder_n_layers,
    cfg.decoder_kernel_size,
    cfg.decoder_act,
    cfg.decoder_norm,
  ) == (True, 2, 3, "gelu", "ln")
  assert (cfg.sim2mask_init_w, cfg.sim2mask_init_b, cfg.gumbel_tau) == (10.0, -2.5, 1.0)
  assert (cfg.tcl_w, cfg.area_w, cfg.tv_w) == (0.1, 0.4, 1.0)
  assert [t for t in c.evals.tasks.split(",")] == ["t_voc20", "t_context59"]
  assert (c.evals.pamr, c.evals.bg_thresh, c.evals.kp_w) == (True, 0.4, 0.3)
  assert len(c.input.train_files) == 2  # gcc3m + gcc12m
  assert c.mesh.axes == ("data", "fsdp") and c.mesh.shape == (-1, 1)  # fsdp axis of size 1
  assert c.mesh.axis_types == "auto"


# The original's training augmentation (kakaobrain/tcl@bc2b551): configs/default.yml:24-33
# (img_aug: deit_aug, img_size 224, color_jitter 0.4, auto_augment rand-m9-mstd0.5-inc1 = 2 ops,
# magnitude 9, std 0.5, each op at timm's p=0.5; re_prob 0.25) through datasets/builder.py:125-133
# (timm 0.6.7 create_transform, whose RandomResizedCrop keeps its defaults scale (0.08, 1.0) =
# default.yml:27 img_scale, ratio (3/4, 4/3); horizontal flip 0.5).
ORIGINAL_AUGMENT = dict(
  image_size=224,
  deit_aug=True,
  scale=(0.08, 1.0),
  ratio=(3 / 4, 4 / 3),
  hflip=True,
  color_jitter=0.4,
  color_jitter_with_aa=False,
  randaugment=True,
  ra_num_layers=2,
  ra_magnitude=9.0,
  ra_magnitude_std=0.5,
  ra_prob=0.5,
  re_prob=0.25,
)


def test_recipe_augmentation_is_the_originals(tmp_path, monkeypatch):
  # What the training loop hands the input pipeline for configs/tcl.py (its train_files pointed
  # at a file that exists), and the AugmentConfig defaults (augment=True elsewhere).
  from tcl_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top

  (tmp_path / "train-0.tfrecord").write_bytes(b"")
  c = load_config_module("tcl").get_config()
  c.input.train_files = (str(tmp_path / "train-*.tfrecord"),)
  seen = {}
  monkeypatch.setattr(
    train_inputs.input_pipeline, "make_train_iterator", lambda *a, **kw: seen.update(kw)
  )
  train_inputs.make_train_iterator(c, str(tmp_path))
  for aug in (seen["augment"], augment_lib.AugmentConfig()):
    got = {k: getattr(aug, k) for k in ORIGINAL_AUGMENT}
    assert got == ORIGINAL_AUGMENT


def test_smoke_is_the_recipe_on_in_memory_batches(tmp_path):
  """configs/tcl.py:smoke: the recipe's model, image size and per-device batch, with batches made
  in memory (no data files or weights read; nothing written)."""
  from tcl_jax import tokenizer  # pylint: disable=g-import-not-at-top

  recipe, c = load_config_module("tcl").get_config(), load_config_module("tcl").get_config("smoke")
  assert c.model == recipe.model and c.input.image_size == recipe.input.image_size == 224
  assert c.batch_size == recipe.batch_size // 16 == 64  # per V100 in the paper
  assert c.init_checkpoint == "" and c.evals.tasks == "" and c.total_steps == 2
  it = train_inputs.make_train_iterator(c, str(tmp_path))
  first = next(it)
  assert first["image"].shape == (64, 224, 224, 3) and first["image"].dtype == "float32"
  assert first["text_tokens"].shape == (64, 77) and first["text_tokens"].dtype == "int32"
  sot, eot = tokenizer.tokenize("")[0, :2]
  assert (first["text_tokens"][:, 0] == sot).all() and (first["text_tokens"] == eot).sum() == 64
  assert os.listdir(tmp_path) == []
  state = it.get_state()
  second = next(it)
  assert not np.array_equal(first["image"], second["image"])
  it.set_state(state)  # resume: the same next batch
  again = next(it)
  np.testing.assert_array_equal(again["image"], second["image"])
  np.testing.assert_array_equal(again["text_tokens"], second["text_tokens"])


def test_fsdp_arg_adds_an_fsdp_axis():
  c = load_config_module("tcl").get_config("fsdp=4")
  assert c.mesh.shape == (-1, 4) and c.mesh.axes == ("data", "fsdp")


def test_synthetic_model_is_the_fixture_tiny_model():
  c = load_config_module("synthetic").get_config()
  assert tcl_lib.TCLConfig.from_dict(c.model.to_dict()) == tcl_lib.tiny_config()


def test_unknown_config_arg_fails():
  with pytest.raises(KeyError, match="unknown config arg"):
    load_config_module("tcl").get_config("fsdpp=2")


def _parse(argv):
  # The override flags (--config.x) are read from sys_argv, as main.py's are from sys.argv.
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "cfg", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def test_command_line_overrides():
  c = _parse(
    [
      "prog",
      f"--config={os.path.join(REPO, 'configs', 'tcl.py')}:fsdp=2",
      "--config.batch_size=512",
      "--config.optim.base_lr=0.001",
      "--config.model.ie_freeze=10",
      "--config.init_checkpoint=",
      "--config.evals.tasks=",
    ]
  )
  assert c.batch_size == 512 and c.optim.base_lr == 0.001 and c.model.ie_freeze == 10
  assert c.init_checkpoint == "" and c.evals.tasks == ""
  assert c.mesh.axes == ("data", "fsdp")
  with pytest.raises(Exception):  # a typo in a field name fails
    _parse(["prog", f"--config={os.path.join(REPO, 'configs', 'tcl.py')}", "--config.batchsize=1"])


def test_main_reports_a_bad_config_value_in_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "tcl_jax.main",
      "--config=configs/synthetic.py:steps=2",
      f"--workdir={tmp_path}",
      "--config.model.ie_freeze=9",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert r.returncode == 1  # found once the run started (tcl_jax/cli/config_files.py)
  assert "Traceback" not in r.stderr
  assert (
    r.stderr.strip().splitlines()[-1] == "error: ie_freeze must be in [1, 4] (vision layers), got 9"
  )
