"""The CLIP model kind (`config.model_kind = "clip"`, configs/miniature_clip.py): a CLIP trained
from scratch with symmetric InfoNCE, evaluated zero-shot with MaskCLIP's dense features."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax.kinds import base
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import clip_contrastive
from tcl_jax.models import losses


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_text(params, tokens, *, cfg):
  return clip_lib.encode_text(params["clip"], cfg, tokens)


def text_embedding(params, tokens, *, cfg):
  # The prompt ensemble as TCL's (tcl_inference.build_text_embedding): mean of the raw
  # embeddings over templates, then L2-normalized.
  n, t, l = np.shape(tokens)
  emb = _encode_text(params, jnp.asarray(tokens).reshape(n * t, l), cfg=cfg)
  return losses.l2_normalize(emb.astype(jnp.float32).reshape(n, t, -1).mean(axis=1))


@functools.partial(jax.jit, static_argnames=("cfg", "pamr", "kp_w", "simmaps"))
def _window_masks(params, text_emb, windows, *, cfg, pamr, kp_w, simmaps):
  del pamr, kp_w  # TCL's refinements; MaskCLIP's dense scores have neither
  scores = clip_contrastive.dense_scores(params, cfg, windows, text_emb)
  return jnp.concatenate([scores, scores], axis=1) if simmaps else scores


def zero_shot(cfg: clip_lib.CLIPConfig) -> base.ZeroShotModel:
  return base.ZeroShotModel(
    cfg=cfg,
    text_embedding=functools.partial(text_embedding, cfg=cfg),
    window_masks=functools.partial(_window_masks, cfg=cfg),
    min_size=cfg.vision_patch_size,
  )


def build(config) -> base.Model:
  """A CLIP from `config.model.clip` (CLIPConfig fields)."""
  cfg = clip_lib.CLIPConfig(**config.model.clip.to_dict())
  dtype = base.resolve_compute_dtype(config.get("compute_dtype", "auto"))

  def loss(params, batch, rng):
    del rng  # deterministic objective
    return clip_contrastive.contrastive_loss(
      params, cfg, batch["image"], batch["text_tokens"], dtype
    )

  return base.Model(
    cfg=cfg,
    init=lambda rng: clip_contrastive.init_params(cfg, rng),
    loss=loss,
    zero_shot=zero_shot(cfg),
  )


KIND = base.ModelKind(
  name="clip", build=build, config_type=clip_lib.CLIPConfig, zero_shot=zero_shot
)
