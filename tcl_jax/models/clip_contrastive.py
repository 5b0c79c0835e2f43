"""A CLIP trained from scratch with CLIP's own objective: the loop's second model kind.

`config.model_kind = "clip"` (configs/miniature_clip.py) makes `tcl_jax.kinds.build_model` return
this model: parameters {"clip": {"visual", "text"}, "logit_scale"}, loss = symmetric InfoNCE
between the pooled image and text embeddings of the global batch, temperature learned from
1/0.07 (CLIP's initialisation; clamped at 100 as TCL's own scales). Zero-shot segmentation of such
a CLIP uses MaskCLIP's dense features (`dense_scores`).
"""

import jax
import jax.numpy as jnp

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import losses
from tcl_jax.models import resize


def init_params(cfg: clip_lib.CLIPConfig, rng) -> dict:
  return {
    "clip": clip_lib.init_clip_params(cfg, rng),
    "logit_scale": jnp.asarray(clip_lib.INITIAL_LOGIT_SCALE, jnp.float32),
  }


def contrastive_loss(
  params, cfg: clip_lib.CLIPConfig, images, text_tokens, compute_dtype=jnp.float32
):
  """(loss, aux) of a batch: images [B, H, W, 3] normalized, text_tokens int [B, L]."""
  image_emb = clip_lib.encode_image(params["clip"], cfg, images, compute_dtype)
  text_emb = clip_lib.encode_text(params["clip"], cfg, text_tokens, compute_dtype)
  loss = losses.info_nce(image_emb, text_emb, params["logit_scale"])
  # Retrieval accuracy in the batch (image -> its own caption), a readable sign of learning.
  sims = (
    losses.l2_normalize(image_emb.astype(jnp.float32))
    @ losses.l2_normalize(text_emb.astype(jnp.float32)).T
  )
  acc = jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0]))
  return loss, {"clip_loss": loss, "i2t_accuracy": jax.lax.stop_gradient(acc)}


def dense_scores(params, cfg: clip_lib.CLIPConfig, windows, text_emb):
  """MaskCLIP's dense prediction (Zhou et al., 2022): windows [k, h, w, 3] normalized -> [k, N, h, w]
  cosine similarities between each patch token (the last block's attention replaced by the
  identity, then ln_post + proj) and each text embedding, bilinearly resized to the window
  (zero-padded to patch multiples first, as TCL's masks are)."""
  _, h, w, _ = windows.shape
  l, r, t, b = clip_lib.compute_padsize(h, w, cfg.vision_patch_size)
  x = jnp.pad(windows, ((0, 0), (t, b), (l, r), (0, 0)))
  visual = clip_lib.VisionTransformer(cfg)
  vparams = {"params": params["clip"]["visual"]}
  tokens, (gh, gw) = visual.apply(vparams, x, ignore_last_attn=True, method="tokens")
  dense = visual.apply(vparams, tokens[:, 1:], method="project").reshape(x.shape[0], gh, gw, -1)
  sim = jnp.einsum("khwc,nc->knhw", losses.l2_normalize(dense), text_emb)
  sim = resize.resize_hw(sim, x.shape[1:3], "bilinear", layout="NCHW")
  return sim[:, :, t : t + h, l : l + w]
