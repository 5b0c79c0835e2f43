r"""TCL paper recipe: CLIP ViT-B/16, CC3M + CC12M, 50k steps (configs/tcl.yml over default.yml).

  python -m tcl_jax.main --config=configs/tcl.py --workdir=/path/to/workdir \
      --config.init_checkpoint=checkpoints/ViT-B-16.pt --config.input.train_files=...

The original trains on 16 V100s with 64 images each (global batch 1024); the rate is scaled
linearly, lr = base_lr * global_batch / 4096 (7.5e-5 here) and likewise min_lr (1e-5). Variants:

  --config=configs/tcl.py:fsdp=4        params and optimizer state sharded 4 ways
  --config=configs/tcl.py:smoke         2 steps of the recipe's model (random weights) at 64 images
                                        per device on in-memory batches: a wiring and memory
                                        check that needs no data or weights; on N devices add
                                        --config.batch_size=64*N
"""

import ml_collections

from tcl_jax.cli import config_files

common = config_files.sibling(__file__, "common")
eval_configs = config_files.sibling(__file__, "eval")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, fsdp=1, smoke=False)
  config = ml_collections.ConfigDict()

  # ------------------------------------------------------------------ loop
  config.seed = 0
  config.total_steps = 50_000
  config.batch_size = 1024  # global (64 per GPU x 16 GPUs in the paper)
  config.log_every_steps = 20  # print_freq
  config.checkpoint_every_steps = 1000
  config.eval_every_steps = 5000  # eval_freq
  config.eval_at_end = True
  config.image_log_every_steps = 500  # the original's wandb mask grid
  config.image_log_num = 3
  config.check_finite_every_step = True
  config.debug_nan_at_step = -1  # >= 0: poison that step's loss (tests the non-finite stop)

  # Parameters to start from: an OpenAI CLIP file (ViT-B-16.pt; the masker is copied from it as
  # the original does), an official TCL .pth, or a converted tcl_jax directory. '' = random.
  config.init_checkpoint = "checkpoints/ViT-B-16.pt"

  # Numerics: 'auto' = bfloat16 compute on GPU/TPU (params and optimizer state stay float32),
  # float32 on CPU. remat recomputes transformer blocks in the backward pass to save memory.
  config.compute_dtype = "auto"
  config.remat = False

  # ------------------------------------------------------------------ data
  config.input = ml_collections.ConfigDict()
  # TFRecord shards (tcl_jax.data.convert); '{workdir}' expands to the workdir.
  config.input.train_files = ("data/gcc3m/train-*.tfrecord", "data/gcc12m/train-*.tfrecord")
  config.input.image_size = 224
  # The model's input normalization (the original uses ImageNet mean/std); used to draw images.
  config.input.image_mean = (0.485, 0.456, 0.406)
  config.input.image_std = (0.229, 0.224, 0.225)
  # True: random in-memory batches of the same shapes instead of files (tcl_jax.data.in_memory).
  config.input.in_memory = False
  # The original's augmentation (tcl_jax.data.augment.AugmentConfig fields; default.yml img_aug:
  # timm's create_transform with rand-m9-mstd0.5-inc1, crop scale/ratio at timm's defaults).
  config.input.augment = ml_collections.ConfigDict(
    dict(
      deit_aug=True,
      scale=(0.08, 1.0),
      ratio=(3 / 4, 4 / 3),
      hflip=True,
      color_jitter=0.4,  # not applied: timm drops it under RandAugment
      ra_num_layers=2,
      ra_magnitude=9.0,
      ra_magnitude_std=0.5,
      ra_prob=0.5,
      re_prob=0.25,
    )
  )
  # Extra keyword arguments for tcl_jax.data.input_pipeline.make_train_iterator.
  config.input.options = ml_collections.ConfigDict()

  # ------------------------------------------------------------------ model and loss
  config.model = common.tcl_model(common.clip_vit_b16(), ie_freeze=11)

  # ------------------------------------------------------------------ optimizer and schedule
  config.optim = common.tcl_optim()

  # ------------------------------------------------------------------ evaluation during training
  config.evals = eval_configs.evals_config()
  config.evals.tasks = "t_voc20,t_context59"  # configs/tcl.yml evaluate.task

  # ------------------------------------------------------------------ systems
  config.mesh = common.mesh_config(arg.fsdp)
  config.distributed = common.distributed_config()
  config.checkpoint = common.checkpoint_config(keep=3, keep_best=1)

  if arg.smoke:  # the recipe's model and shapes; nothing read from disk
    config.total_steps = 2
    config.batch_size = 64  # the paper's per-GPU batch, for one device
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 0
    config.eval_at_end = False
    config.image_log_every_steps = 0
    config.init_checkpoint = ""
    config.input.in_memory = True
    config.optim = common.tcl_optim(warmup_steps=1, ust_steps=1)
    config.evals.tasks = ""
  return config
