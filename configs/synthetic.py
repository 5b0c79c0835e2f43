r"""Synthetic end-to-end run that needs no downloads: the README's first command.

  python -m tcl_jax.main --config=configs/synthetic.py --workdir=/tmp/tcl_synth

On first start it writes a small synthetic image-caption TFRecord set and synthetic segmentation
sets into <workdir>/data, then trains a tiny random CLIP-based TCL for a few hundred steps on CPU,
evaluates, checkpoints and writes TensorBoard logs (tensorboard --logdir=/tmp/tcl_synth).
To start from the shared reference fixture instead of random weights:

  ... --config.init_checkpoint=../shared/fixtures/tcl_tiny/tcl_reference.pth
"""

import ml_collections

from tcl_jax import config_files

common = config_files.sibling(__file__, "common")
eval_configs = config_files.sibling(__file__, "eval")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, steps=300)
  config = ml_collections.ConfigDict()

  config.seed = 0
  config.total_steps = arg.steps
  config.batch_size = 16  # global
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  config.eval_every_steps = 150
  config.eval_at_end = True
  config.image_log_every_steps = 50
  config.image_log_num = 4
  config.check_finite_every_step = True
  config.debug_nan_at_step = -1
  config.init_checkpoint = ""  # random tiny CLIP (see the docstring for the fixture)
  config.compute_dtype = "auto"
  config.remat = False

  # Data written by the loop on first start (tcl_jax.train.prepare_synthetic_data).
  config.synthetic = ml_collections.ConfigDict(dict(
      num_train_examples=512, image_size=128, num_shards=4, seed=0, num_eval_images=4))
  config.input = ml_collections.ConfigDict()
  config.input.train_files = ("{workdir}/data/train/train-*.tfrecord",)
  config.input.image_size = 96  # the tiny CLIP's native resolution
  config.input.image_mean = (0.485, 0.456, 0.406)
  config.input.image_std = (0.229, 0.224, 0.225)
  # Lighter augmentation than the paper's (no RandAugment / erasing) for 2-core machines.
  config.input.augment = ml_collections.ConfigDict(dict(deit_aug=False, scale=(0.5, 1.0)))
  config.input.options = ml_collections.ConfigDict(dict(shuffle_buffer=512))

  config.model = common.tcl_model(common.clip_tiny(), ie_freeze=3)
  # No linear lr scaling at this batch size; UST for the first third, as in the recipe.
  config.optim = common.tcl_optim(
      base_lr=1e-3, min_lr=1e-5, lr_scale_reference_batch=0,
      warmup_steps=max(arg.steps // 10, 1), ust_steps=arg.steps // 3)

  config.evals = eval_configs.get_config()
  config.evals.tasks = "voc20,context59"
  config.evals.data_root = "{workdir}/data/seg"
  # Small test pipeline for the small synthetic images (48..130 px).
  config.evals.img_scale = (1024, 128)
  config.evals.crop = 128
  config.evals.stride = 64

  config.mesh = common.mesh_config(1)
  config.distributed = common.distributed_config()
  config.checkpoint = common.checkpoint_config(keep=2, keep_best=1)
  return config
