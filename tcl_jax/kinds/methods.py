"""Training-free CLIP segmenters as zero-shot models (tcl_jax.models.training_free): MaskCLIP,
SCLIP, ClearCLIP and NACLIP on the CLIP of any checkpoint (a TCL's or a CLIP's; both keep CLIP
under params["clip"])."""

import functools

import jax

from tcl_jax.kinds import base
from tcl_jax.kinds import clip as clip_kind
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import training_free

METHODS = training_free.METHODS


@functools.partial(jax.jit, static_argnames=("cfg", "method", "pamr", "kp_w", "simmaps"))
def _window_masks(params, text_emb, windows, *, cfg, method, pamr, kp_w, simmaps):
  del pamr, kp_w  # TCL's refinements; the protocol layer applies its own
  scores = training_free.dense_scores(params["clip"], cfg, windows, text_emb, method)
  return jax.numpy.concatenate([scores, scores], axis=1) if simmaps else scores


def zero_shot_method(name: str, cfg) -> base.ZeroShotModel:
  """The zero-shot model of training-free method `name` on the CLIP of `cfg` (a TCLConfig, whose
  .clip is used, or a CLIPConfig). Its text embedding is CLIP's prompt ensemble, as the "clip"
  kind's. ValueError (one line) for an unknown method."""
  training_free.check_method(name)
  clip_cfg = cfg if isinstance(cfg, clip_lib.CLIPConfig) else getattr(cfg, "clip", None)
  if not isinstance(clip_cfg, clip_lib.CLIPConfig):
    raise ValueError(
      f"method {name!r} needs a CLIP (a TCLConfig or CLIPConfig), got a {type(cfg).__name__}"
    )
  return base.ZeroShotModel(
    cfg=clip_cfg,
    text_embedding=functools.partial(clip_kind.text_embedding, cfg=clip_cfg),
    window_masks=functools.partial(_window_masks, cfg=clip_cfg, method=name),
    min_size=clip_cfg.vision_patch_size,
  )


@functools.partial(jax.jit, static_argnames=("cfg", "methods", "pamr", "kp_w", "simmaps"))
def _window_masks_many(params, text_emb, windows, *, cfg, methods, pamr, kp_w, simmaps):
  del pamr, kp_w
  if simmaps:
    raise ValueError("several methods in one model give no similarity maps")
  scores = training_free.dense_scores_many(params["clip"], cfg, windows, text_emb, methods)
  return jax.numpy.concatenate(scores, axis=1)


def zero_shot_methods(names, cfg) -> base.ZeroShotModel:
  """Several training-free methods as one zero-shot model with one head per method (in `names`'
  order): the CLIP tower up to its last block runs once for the methods that share it
  (training_free.dense_features_many), so a grid of methods costs little more than one. The
  evaluator returns one result per head (zeroshot.evaluate_tasks)."""
  names = tuple(names)
  one = zero_shot_method(names[0], cfg)
  for n in names[1:]:
    training_free.check_method(n)
  return base.ZeroShotModel(
    cfg=one.cfg,
    text_embedding=one.text_embedding,
    window_masks=functools.partial(_window_masks_many, cfg=one.cfg, methods=names),
    min_size=one.min_size,
    heads=len(names),
  )
