r"""CoDe's recipe (Wu et al., CVPR 2024; the authors' configs/default.yml + experiment_configs.yml):
CLIP ViT-B/16, CC3M + CC12M with each caption's nouns, 50k steps, model_kind "code".

  python -m tcl_jax.data.convert ... --nouns       records with their captions' nouns (NLTK)
  python -m tcl_jax.main --config=configs/code.py --workdir=/path/to/workdir \
      --config.init_checkpoint=checkpoints/ViT-B-16.pt --config.input.train_files=...

The authors train on 4 GPUs with 16 captions each (global batch 64); their main.py scales the rate
linearly, lr = base_lr * global_batch / 4096: 3.2e-4 * 64 / 4096 = 5e-6 at the peak, min_lr
6.25e-7. Each caption gives 2 nouns, so the model sees 128 image-noun rows per step. The best
checkpoint is kept by the mean mIoU of the six benchmarks, evaluated every 5k steps.

  --config=configs/code.py:smoke        2 steps of the recipe's model on random in-memory batches
"""

import ml_collections

from tcl_jax.cli import config_files

common = config_files.sibling(__file__, "common")
tcl_recipe = config_files.sibling(__file__, "tcl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, fsdp=1, smoke=False)
  config = tcl_recipe.get_config(f"fsdp={arg.fsdp}" + (",smoke" if arg.smoke else ""))
  config.model_kind = "code"

  if not arg.smoke:
    config.batch_size = 64  # data.batch_size 16 per GPU x 4 GPUs
  config.log_every_steps = 20
  config.eval_every_steps = 5000  # evaluate.eval_freq
  if not arg.smoke:  # smoke: no evaluation (configs/tcl.py's)
    config.evals.tasks = "voc,context,coco_stuff,coco_object,cityscapes,ade20k"  # eval.yml task
  config.evals.pamr = True  # eval.yml: pamr true, bg_thresh 0.4, kp_w 0.3, template custom
  config.evals.bg_thresh = 0.4
  config.evals.kp_w = 0.3
  config.evals.template = "custom"

  # img_aug: deit_aug false, img_scale [0.9, 1.0], bilinear: a mild random crop and a flip.
  config.input.augment = ml_collections.ConfigDict(
    dict(deit_aug=False, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), hflip=True)
  )
  config.input.num_nouns = 2  # data.num_words (word_type: noun)

  config.model = common.code_model(common.clip_vit_b16(), ie_freeze=11)
  if arg.smoke:
    config.optim = common.tcl_optim(base_lr=3.2e-4, min_lr=4e-5, warmup_steps=1, ust_steps=1)
  else:
    config.optim = common.tcl_optim(
      base_lr=3.2e-4,  # train.base_lr
      min_lr=4e-5,  # train.min_lr
      lr_scale_reference_batch=4096,  # main.py: * batch_size * world_size / 4096
      warmup_steps=15000,
      ust_steps=30000,  # decoder-only: the masker's CLIP blocks join after 30k
    )
  return config
