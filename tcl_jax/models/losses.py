"""The TCL objective's terms, written on global arrays (labels are arange over the global batch).

Under `jax.jit` with a sharded batch the arrays are global, so the original's all-gathers and its
`B * rank` label offsets (models/tcl/mi.py) have no counterpart here.
"""

import jax.numpy as jnp
import optax


def l2_normalize(x, axis=-1, eps=1e-6):
  """torch `F.normalize(x, dim, eps=1e-6)`: x / max(||x||, eps) (the original's fp16-safe eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def logit_scale_value(logit_scale):
  """exp(learnable log-scale), clamped at 100 as the original."""
  return jnp.minimum(jnp.exp(logit_scale), 100.0)


def _symmetric_ce(logits):
  """0.5 * (CE(logits, arange) + CE(logits.T, arange))."""
  labels = jnp.arange(logits.shape[0])
  ce_rows = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  ce_cols = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return 0.5 * (ce_rows + ce_cols)


def info_nce(image_emb, text_emb, logit_scale):
  """InfoNCE between [B, C] image and [B, C] text embeddings (TCL_i)."""
  image_emb = l2_normalize(image_emb.astype(jnp.float32))
  text_emb = l2_normalize(text_emb.astype(jnp.float32))
  logits = image_emb @ text_emb.T * logit_scale_value(logit_scale)
  return _symmetric_ce(logits)


def extended_info_nce(image_emb, text_emb, logit_scale):
  """ExtendedInfoNCE (TCL_f): image_emb [B, N, C] holds image b pooled by caption n's mask.

  logits[b, n] = <img[b, n], txt[n]>; the text-side logits are its transpose (for caption t the
  candidates are image n pooled by t's own mask), which is what the original's gather/chunk dance
  computes when N is the global batch.
  """
  image_emb = l2_normalize(image_emb.astype(jnp.float32))
  text_emb = l2_normalize(text_emb.astype(jnp.float32))
  logits = jnp.einsum("bnc,nc->bn", image_emb, text_emb) * logit_scale_value(logit_scale)
  return _symmetric_ce(logits)


def area_loss(mask, prior: float):
  """|mean(mask) - prior| (AreaTCLLoss)."""
  return jnp.abs(jnp.mean(mask.astype(jnp.float32)) - prior)


def tv_loss(x, axes=(-2, -1)):
  """Total variation: mean |x[i+1] - x[i]| along each of the two spatial axes, summed."""
  x = x.astype(jnp.float32)
  ay, ax = axes
  dy = jnp.abs(jnp.diff(x, axis=ay)).mean()
  dx = jnp.abs(jnp.diff(x, axis=ax)).mean()
  return dx + dy


def masked_pool(spatial_emb, mask, eps=1e-6):
  """Average-pool spatial_emb [B, H, W, C] under each mask [B, N, H, W] -> [B, N, C]."""
  weight = mask / (mask.sum(axis=(2, 3), keepdims=True) + eps)
  return jnp.einsum("bhwc,bnhw->bnc", spatial_emb, weight)
