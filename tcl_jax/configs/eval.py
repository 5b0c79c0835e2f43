"""Zero-shot segmentation evaluation (the original's configs/eval.yml).

    python -m tcl_jax.evaluate --config=configs/eval.py --checkpoint=DIR --workdir=OUT \
        [--config.tasks=voc,context59] [--config.data_root=data] [--config.pamr=False ...]

Without PAMR the original README uses bg_thresh 0.5.
"""

import ml_collections

from tcl_jax.cli import config_files
from tcl_jax.zeroshot.protocol import Protocol

common = config_files.sibling(__file__, "common")


def get_config():
  """The evaluation command's config: `evals_config()` and the multi-process settings."""
  config = evals_config()
  # Comma-separated, evaluated as a grid (one table, results.json's "grid"): zero-shot methods
  # ("" or "own": the checkpoint's own model; tcl; maskclip, sclip, clearclip, naclip: the
  # training-free methods on the checkpoint's CLIP, tcl_jax.kinds.METHODS) and protocols (tcl,
  # sclip: tcl_jax/zeroshot/protocol.py). Protocol fields set on the command line apply to every
  # protocol; the config's defaults below are TCL's and apply to protocol tcl only.
  config.method = ""
  config.protocol = "tcl"
  # Several processes, as in training (configs/common.py: jax.distributed.initialize arguments).
  config.distributed = common.distributed_config()
  return config


def evals_config():
  """Tasks, data and protocol: also a training config's `evals` (training-time evaluation)."""
  p = Protocol()  # the protocol's defaults live there (tcl_jax/zeroshot/protocol.py)
  config = ml_collections.ConfigDict()
  # Comma-separated task names: voc, voc20, context, context59, coco_stuff, coco_object,
  # cityscapes, ade20k (the paper's 8), or t_voc20, t_context59 (train splits, as in training).
  config.tasks = "voc,voc20,context,context59,coco_stuff,coco_object,cityscapes,ade20k"
  # Folder holding VOCdevkit/VOC2012, VOCdevkit/VOC2010, coco_stuff164k, cityscapes, ade.
  config.data_root = "data"
  config.pamr = p.pamr
  config.bg_thresh = p.bg_thresh
  config.kp_w = p.kp_w
  config.template = p.template  # 'custom' (9 prompts) or 'simple' ('a photo of a {}.'), ...
  config.max_images = 0  # per task; 0 = all
  # Test pipeline: keep-ratio resize bounds (long, short), sliding window crop and stride.
  config.img_scale = p.img_scale
  config.crop = p.crop
  config.stride = p.stride
  config.batch = p.batch  # windows per model call (an image's windows are split into such batches)
  # Round the number of text classes up to a multiple of this (0 = off): fewer compiled shapes
  # across tasks at the cost of computing masks for padding classes (same results).
  config.class_pad = p.class_pad
  return config
