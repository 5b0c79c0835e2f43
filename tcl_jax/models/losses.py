"""The TCL objective's terms, written on global arrays (labels are arange over the global batch).

Under `jax.jit` with a sharded batch the arrays are global, so the original's all-gathers and its
`B * rank` label offsets (models/tcl/mi.py) have no counterpart here.
"""

import jax
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
  return scaled_symmetric_ce(jnp.einsum("bnc,nc->bn", image_emb, text_emb), logit_scale)


def scaled_symmetric_ce(cosine, logit_scale):
  """The symmetric cross-entropy of cosine similarities [B, B] times the clamped scale."""
  return _symmetric_ce(cosine * logit_scale_value(logit_scale))


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


def all_pairs_terms(image_emb, text_emb, w, b, chunk: int, pin=lambda x: x, eps=1e-6):
  """TCL's image-to-every-caption terms without the [B, N, H, W] soft masks.

  image_emb [B, H, W, C] and text_emb [N = B, C] float32; Sim2Mask's soft mask of image i for
  caption n is sigmoid(w * cos(pixel, text n) + b). Returns (cosine [B, N] of image i pooled under
  caption n's mask with caption n (TCL_f's logits before the scale), the negative pairs' mean mask
  area, the masks' total variation). Captions go `chunk` at a time through a checkpointed scan
  body that reduces its [B, chunk, H, W] masks at once, so memory does not grow with N (the
  original's and a plain port's [B, N, H, W] tensors outgrew a TPU v4's HBM at 64 chips x 64
  images). A chunk that does not divide N is padded, the padding masked out. `pin` constrains a
  [B, ...] array's sharding (the batch's).
  """
  bsz, h, wd, c = image_emb.shape
  n = text_emb.shape[0]
  k = min(chunk, n)
  nc = -(-n // k)
  img_n = l2_normalize(image_emb)
  txt = jnp.pad(l2_normalize(text_emb), ((0, nc * k - n), (0, 0))).reshape(nc, k, c)
  rows = jnp.arange(bsz)[:, None]  # global image index

  @jax.checkpoint  # the backward pass recomputes a chunk instead of keeping its masks
  def body(sums, xs):
    t, start = xs
    cols = start + jnp.arange(k)
    valid = (cols < n)[None, :, None, None]
    soft = jax.nn.sigmoid(pin(jnp.einsum("bhwc,kc->bkhw", img_n, t)) * w + b)
    neg = valid & (cols != rows)[:, :, None, None]
    area = jnp.sum(jnp.where(neg, soft, 0.0))
    dy = jnp.sum(jnp.where(valid, jnp.abs(jnp.diff(soft, axis=2)), 0.0))
    dx = jnp.sum(jnp.where(valid, jnp.abs(jnp.diff(soft, axis=3)), 0.0))
    pooled = masked_pool(image_emb, soft, eps)  # [B, k, C]
    cosine = pin(jnp.einsum("bkc,kc->bk", l2_normalize(pooled), t))
    return sums + jnp.stack([area, dy, dx]), cosine

  sums, cosine = jax.lax.scan(body, jnp.zeros(3, jnp.float32), (txt, jnp.arange(nc) * k))
  cosine = pin(jnp.moveaxis(cosine, 0, 1).reshape(bsz, nc * k)[:, :n])
  area, dy, dx = sums[0], sums[1], sums[2]
  # Counts as Python floats: at pod batches they overflow int32 (2048 x 2047 x 56 x 56).
  neg_area = area / float(bsz * (n - 1) * h * wd)
  tv = dy / float(bsz * n * (h - 1) * wd) + dx / float(bsz * n * h * (wd - 1))
  return cosine, neg_area, tv
