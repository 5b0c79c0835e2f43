"""Pieces shared by the training configs."""

import ast

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses the `--config=file.py:ARG` string, 'key=value,flag,...', over `defaults`.

  A bare `flag` means True. A value must be of its default's type (`steps=ten` is refused with a
  ValueError naming the key); string defaults take the text as it is. Only keys present in
  `defaults` are accepted (typos fail loudly).
  """
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise KeyError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    if not sep:
      out[key] = True
      continue
    out[key] = _typed(key, value, defaults[key])
  return out


_TYPE_NAMES = {bool: "True or False", int: "a whole number", float: "a number"}


def _typed(key: str, value: str, default):
  """`value` as the type of `default`."""
  kind = type(default)
  if kind not in _TYPE_NAMES:
    return value
  try:
    parsed = ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    parsed = None
  ok = (
    isinstance(parsed, bool)
    if kind is bool
    else isinstance(parsed, int) and not isinstance(parsed, bool)
    if kind is int
    else isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
  )
  if not ok:
    raise ValueError(f"{key} must be {_TYPE_NAMES[kind]}, got {value!r}")
  return kind(parsed)


def mesh_config(fsdp: int = 1) -> ml_collections.ConfigDict:
  """A data x fsdp mesh: batch split over all devices, params/opt state sharded `fsdp` ways.

  `param_rules` are (regex, tactic) pairs matched (re.search) against train-state paths such as
  'params/masker/decoder/...' and 'opt_state/.../mu/masker/...'; the first match wins. "fsdp"
  leaves are replicated while the fsdp axis has size 1, so the shape alone reshapes a run: on a
  16-chip pod slice (v4-32, v5e-16), `--config.mesh.shape='(4,4)'` is 4-way data x 4-way FSDP,
  `'(-1,1)'` pure data parallel (tcl_jax/sharding.py).
  """
  return ml_collections.ConfigDict(
    dict(
      shape=(-1, fsdp),
      axes=("data", "fsdp"),
      axis_types="auto",
      param_rules=((".*", "fsdp"),),
      fsdp_min_size=2**16,
    )
  )


def distributed_config() -> ml_collections.ConfigDict:
  """jax.distributed.initialize arguments; '' / -1 = auto-detect (TPU pods, SLURM)."""
  return ml_collections.ConfigDict(
    dict(initialize=False, coordinator_address="", num_processes=-1, process_id=-1)
  )


def checkpoint_config(keep: int = 3, keep_best: int = 1) -> ml_collections.ConfigDict:
  """Keep the `keep` latest checkpoints and the `keep_best` best by eval mIoU; async saves."""
  return ml_collections.ConfigDict(dict(keep=keep, keep_best=keep_best, async_save=True))


def clip_vit_b16() -> dict:
  """OpenAI CLIP ViT-B/16 dimensions."""
  return dict(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=16,
    vision_heads=12,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,
    transformer_heads=8,
    transformer_layers=12,
  )


def clip_tiny() -> dict:
  """The shared fixture's tiny CLIP (tests/fixtures, tcl_jax.models.tcl.tiny_config)."""
  return dict(
    embed_dim=64,
    image_resolution=96,
    vision_layers=4,
    vision_width=128,
    vision_patch_size=16,
    vision_heads=2,
    context_length=77,
    vocab_size=49408,
    transformer_width=64,
    transformer_heads=2,
    transformer_layers=2,
  )


def tcl_model(clip: dict, ie_freeze: int) -> ml_collections.ConfigDict:
  """`config.model`: the fields of tcl_jax.models.tcl.TCLConfig (configs/tcl.yml's model:)."""
  return ml_collections.ConfigDict(
    dict(
      clip=clip,
      ie_freeze=ie_freeze,  # masker backbone = CLIP blocks [ie_freeze:]
      ie_ignore_last_attn=True,  # MaskCLIP
      decoder_n_layers=2,
      decoder_kernel_size=3,
      decoder_act="gelu",
      decoder_norm="ln",
      decoder_double=True,
      sim2mask_init_w=10.0,
      sim2mask_init_b=-2.5,
      gumbel_tau=1.0,
      tcl_w=0.1,
      area_w=0.4,
      tv_w=1.0,
      caption_chunk=64,  # captions per step of the all-pairs loss loop: memory, not numbers
    )
  )


def code_model(clip: dict, ie_freeze: int) -> ml_collections.ConfigDict:
  """`config.model` of CoDe: tcl_jax.models.code.CoDeConfig's fields. The authors' default.yml
  model: section, its loss weights as experiment_configs.yml overrides them (w_hcl 0.5)."""
  c = tcl_model(clip, ie_freeze)
  c.decoder_double = False  # masker.decoder.double: false
  c.tcl_w = 0.1  # w_tcl
  c.tv_w = 1.0  # w_tv
  c.area_w = 0.0  # TCL's; CoDe weighs its two area terms apart
  c.update(
    dict(
      n_ctx=16,  # PromptLearner's context vectors
      text_decoder_layers=2,  # TextDecoder: Transformer(width, 2 layers, 8 heads)
      text_decoder_heads=8,
      kg_w=8.0,  # w_kg
      pos_area=0.25,  # pos_area
      pos_area_w=0.5,  # w_pos_area
      neg_area_w=0.05,  # w_neg_area
      hcl_w=0.5,  # w_hcl (experiment_configs.yml; default.yml says 0.1)
      tseg_w=1.0,  # w_tseg
      tseg_bg_weight=0.5,  # F.cross_entropy weight of the background class
      bg_image_size=224,  # learnable_image_bg [1, 3, 224, 224]
      region_highlighting=True,  # use_region_highlighting_prompt
      word_highlighting=True,  # use_word_highlighting_prompt
    )
  )
  return c


def tcl_optim(**overrides) -> ml_collections.ConfigDict:
  """`config.optim`: configs/tcl.yml's train: section (over default.yml)."""
  c = ml_collections.ConfigDict(
    dict(
      # lr and min_lr are scaled by global_batch / lr_scale_reference_batch (main.py); 0 = off.
      base_lr=3e-4,
      min_lr=4e-5,
      lr_scale_reference_batch=4096,
      warmup_steps=15000,
      warmup_start_factor=1e-4,  # LinearLR(start_factor=1e-4)
      ust_steps=30000,  # decoder-only phase: masker backbone frozen
      weight_decay=0.05,
      clip_grad=5.0,
      b1=0.9,
      b2=0.999,
      eps=1e-6,
      frozen_regex=r"^clip/",  # CLIP towers: never trained
      ust_regex=r"^masker/backbone/",  # trained only after ust_steps
    )
  )
  c.update(overrides)
  return c
