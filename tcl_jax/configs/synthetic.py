r"""The README's default run, TCL in miniature (tcl_jax/miniature/experiment.py): needs no downloads.

  python -m tcl_jax.main --config=configs/synthetic.py --workdir=/tmp/tcl_synth

Writes the shapes world (tcl_jax/data/synthetic.py: image-caption TFRecords and a segmentation set
in the VOC layout) into <workdir>/data, measures the frozen-CLIP baseline (TCL at step 0 from the
shipped tiny CLIP, tcl_jax/assets/miniature_clip.npz), trains TCL as the paper does (frozen CLIP,
masker from its last block, UST, the recipe's losses), evaluates again and writes
<workdir>/miniature.json, <workdir>/miniature_masks.png and TensorBoard logs.

  ...:seed=1                              another seed (training data, evaluation set, masker init)
  ...:steps=100                           a shorter run
  ...:model_kind=code                     CoDe instead of TCL (same world, data and schedule)
  --config.miniature.clip_weights=        train the CLIP first (stage 1, configs/miniature_clip.py)
  --config.init_checkpoint=../shared/fixtures/tcl_tiny/tcl_reference.pth   start from the fixture
"""

import ml_collections

from tcl_jax.cli import config_files

common = config_files.sibling(__file__, "common")
eval_configs = config_files.sibling(__file__, "eval")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, steps=600, seed=0, model_kind="tcl")
  if arg.model_kind not in ("tcl", "code"):
    raise ValueError(f"model_kind must be tcl or code, got {arg.model_kind!r}")
  config = ml_collections.ConfigDict()

  config.seed = arg.seed
  config.total_steps = arg.steps
  config.batch_size = 16  # global
  config.log_every_steps = 25
  config.checkpoint_every_steps = 200
  # The miniature evaluates before and after training itself (tcl_jax/miniature/experiment.py).
  config.eval_every_steps = 0
  config.eval_at_end = False
  config.image_log_every_steps = 100
  config.image_log_num = 4
  config.check_finite_every_step = True
  config.debug_nan_at_step = -1
  config.init_checkpoint = ""  # "": the miniature CLIP below
  config.compute_dtype = "auto"
  config.remat = False

  config.miniature = ml_collections.ConfigDict(
    dict(
      clip_weights="tcl_jax/assets/miniature_clip.npz",  # "": train stage 1 in <workdir>/clip
      clip_steps=0,  # stage 1 steps when it runs (0: configs/miniature_clip.py's)
      num_mask_images=6,
    )
  )  # evaluation images in miniature_masks.png

  # The shapes world, written by the loop on first start (tcl_jax.train.inputs.prepare_synthetic_data).
  config.synthetic = ml_collections.ConfigDict(
    dict(num_train_examples=4096, image_size=96, num_shards=4, seed=arg.seed, num_eval_images=100)
  )
  config.input = ml_collections.ConfigDict()
  config.input.train_files = ("{workdir}/data/train/train-*.tfrecord",)
  config.input.image_size = 96  # the tiny CLIP's native resolution
  config.input.image_mean = (0.485, 0.456, 0.406)
  config.input.image_std = (0.229, 0.224, 0.225)
  # Lighter augmentation than the paper's (no RandAugment / erasing), mild crops (captions name
  # the objects: a crop must not cut them out).
  config.input.augment = ml_collections.ConfigDict(dict(deit_aug=False, scale=(0.8, 1.0)))
  config.input.options = ml_collections.ConfigDict(dict(shuffle_buffer=1024))

  config.model_kind = arg.model_kind
  if arg.model_kind == "code":  # CoDe in the same world: the records carry each caption's nouns
    config.model = common.code_model(common.clip_tiny(), ie_freeze=3)
    config.model.text_decoder_heads = 1  # the tiny CLIP's text width 64 (the authors: 512 / 8)
    config.input.num_nouns = 2
  else:
    config.model = common.tcl_model(common.clip_tiny(), ie_freeze=3)
  # No linear lr scaling at this batch size; UST for the first third, as in the recipe.
  config.optim = common.tcl_optim(
    base_lr=1e-3,
    min_lr=1e-5,
    lr_scale_reference_batch=0,
    warmup_steps=max(arg.steps // 10, 1),
    ust_steps=arg.steps // 3,
  )

  config.evals = eval_configs.evals_config()
  config.evals.tasks = "shapes,shapes12"  # as voc and voc20: with and without background
  config.evals.data_root = "{workdir}/data/seg"
  # The original README's setting without PAMR; one prompt, the form the captions use.
  config.evals.pamr = False
  config.evals.bg_thresh = 0.5
  config.evals.template = "simple"
  # The world's 96 x 96 images are one window of the CLIP's own resolution.
  config.evals.img_scale = (1024, 96)
  config.evals.crop = 96
  config.evals.stride = 64

  config.mesh = common.mesh_config(1)
  config.distributed = common.distributed_config()
  config.checkpoint = common.checkpoint_config(keep=2, keep_best=1)
  return config
