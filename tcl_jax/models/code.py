"""STUB from the weights branch, for the converter's tests only: the lead's tcl_jax/models/code.py
(the CoDe model) replaces this file on merge. It holds just what the weights code uses, as the
contract fixes it: `CoDeConfig` and `init_params` (the parameter tree's shapes)."""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import tcl as tcl_lib


@dataclasses.dataclass(frozen=True)
class CoDeConfig(tcl_lib.TCLConfig):
  decoder_double: bool = False
  n_ctx: int = 16
  text_decoder_layers: int = 2
  text_decoder_heads: int = 8
  pos_area: float = 0.25
  pos_area_w: float = 0.5
  neg_area_w: float = 0.05
  kg_w: float = 8.0
  hcl_w: float = 0.5
  tseg_w: float = 1.0
  tseg_bg_weight: float = 0.5
  bg_image_size: int = 224


def init_params(cfg: CoDeConfig, rng, clip_params: Optional[dict] = None) -> dict:
  k_tcl, k_dec, k_ctx = jax.random.split(rng, 3)
  params = tcl_lib.init_params(cfg, k_tcl, clip_params)
  w = cfg.clip.transformer_width
  dec_cfg = dataclasses.replace(
    cfg.clip, transformer_layers=cfg.text_decoder_layers, transformer_heads=cfg.text_decoder_heads
  )
  text = clip_lib.TextTransformer(dec_cfg).init(
    k_dec, jnp.zeros((1, cfg.clip.context_length), jnp.int32)
  )["params"]
  zero = jnp.zeros((), jnp.float32)
  params.update(
    prompt_ctx=jax.random.normal(k_ctx, (cfg.n_ctx, w)) * 0.02,
    text_decoder={f"resblocks_{i}": text[f"resblocks_{i}"] for i in range(cfg.text_decoder_layers)},
    bg_image=jnp.zeros((cfg.bg_image_size, cfg.bg_image_size, 3), jnp.float32),
    bg_text=jnp.zeros((cfg.clip.context_length, w), jnp.float32),
    text_mask_w=jnp.asarray(10.0, jnp.float32),
    text_mask_b=zero,
    hcl_logit_scale=jnp.asarray(clip_lib.INITIAL_LOGIT_SCALE, jnp.float32),
  )
  return params
