"""TCL's mask inference (the original's models/tcl/tcl.py `generate_masks` and models/tcl/pamr.py):
soft masks for any list of text embeddings, with PAMR refinement and the KP branch."""

import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import losses
from tcl_jax.models import resize
from tcl_jax.models import tcl


def encode_text(params, cfg: tcl.TCLConfig, tokens, dtype=jnp.float32):
  return clip_lib.encode_text(params["clip"], cfg.clip, tokens, dtype)


def build_text_embedding(
  params, cfg: tcl.TCLConfig, tokens, chunk_size: int = 1024, dtype=jnp.float32
):
  """Prompt-ensembled class embeddings: tokens [N, T, L] -> mean over T of the (unnormalized)
  text embeddings, then L2-normalized [N, E] (the original's build_text_embedding)."""
  tokens = np.asarray(tokens)
  n, t, l = tokens.shape
  flat = tokens.reshape(n * t, l)
  embs = [
    _jit_encode_text(params, cfg, flat[i : i + chunk_size], dtype)
    for i in range(0, n * t, chunk_size)
  ]
  embs = jnp.concatenate(embs).astype(jnp.float32).reshape(n, t, -1).mean(axis=1)
  return losses.l2_normalize(embs)


@jax.jit(static_argnums=(1, 3))
def _jit_encode_text(params, cfg, tokens, dtype):
  return encode_text(params, cfg, tokens, dtype)


def _shifts(x, dilations, with_center: bool):
  """Neighbours of every pixel of x [B, K, H, W] at the 3x3 offsets times each dilation, with
  replicate padding: [B, K, P, H, W], P = (9 or 8) * len(dilations)."""
  h, w = x.shape[-2:]
  out = []
  for d in dilations:
    xp = jnp.pad(x, ((0, 0), (0, 0), (d, d), (d, d)), mode="edge")
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        if dy == 0 and dx == 0 and not with_center:
          continue
        out.append(xp[:, :, d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
  return jnp.stack(out, axis=2)


def pamr(image, mask, num_iter: int = 10, dilations=(1, 2, 4, 8, 12, 24)):
  """Pixel-adaptive mask refinement (the original's PAMR). image [B, K, H, W], mask [B, C, H, W]
  at the same size."""
  nb = _shifts(image, dilations, with_center=True)
  std = jnp.std(nb, axis=2, keepdims=True, ddof=1)  # torch .std is unbiased
  center = image[:, :, None]
  aff = -jnp.abs(_shifts(image, dilations, with_center=False) - center) / (1e-8 + 0.1 * std)
  aff = jax.nn.softmax(aff.mean(axis=1, keepdims=True), axis=2)
  # A loop, not unrolled: 10 unrolled propagations multiply compile time for nothing.
  step = lambda _, m: (_shifts(m, dilations, with_center=False) * aff).sum(axis=2)
  return jax.lax.fori_loop(0, num_iter, step, mask)


def generate_masks(
  params,
  cfg: tcl.TCLConfig,
  image,
  text_emb,
  *,
  apply_pamr: bool = False,
  kp_w: float = 0.3,
  dtype=jnp.float32,
  kp_text_emb=None,
):
  """Soft masks [B, N, H, W] for each text embedding (and the masker simmap [B, N, h', w']).

  kp_text_emb [N, E]: the KP branch's class embeddings when they differ from the masker's
  (CoDe's kp_branch_text_emb: templated sentences, while its masker gets prompted names).

  image [B, H, W, 3] normalized, any size of at least one patch: zero-padded to patch multiples
  (extra pixel on the right/bottom), cropped back at the end.
  """
  _, h, w, _ = image.shape
  p = cfg.patch_size
  if h < p or w < p:
    raise ValueError(f"image {h}x{w} is smaller than one {p}x{p} patch")
  l, r, t, bt = clip_lib.compute_padsize(h, w, p)
  image = jnp.pad(image, ((0, 0), (t, bt), (l, r), (0, 0)))
  ph, pw = image.shape[1:3]

  visual = tcl.visual_tower(cfg, dtype)
  vparams = {"params": params["clip"]["visual"]}
  feat, hw = visual.apply(vparams, image, num_blocks=cfg.ie_freeze, method="tokens")
  image_emb = tcl.masker_image_emb(params["masker"], cfg, feat, hw, dtype).astype(jnp.float32)
  simmap = tcl.similarity_map(image_emb, text_emb)
  _, mask = tcl.sim2mask(params["masker"]["sim2mask"], simmap)

  if apply_pamr:
    img = resize.resize_hw(
      jnp.transpose(image, (0, 3, 1, 2)),
      mask.shape[-2:],
      "bilinear",
      align_corners=True,
      layout="NCHW",
    )
    mask = pamr(img.astype(jnp.float32), mask)
  if kp_w:
    # KP branch: MaskCLIP tokens of the frozen tower (rest of the blocks, identity attention in
    # the last), projected by CLIP's ln_post/proj.
    tokens = visual.apply(
      vparams,
      feat,
      cfg.ie_freeze,
      cfg.clip.vision_layers,
      cfg.ie_ignore_last_attn,
      method="run_blocks",
    )
    b = tokens.shape[0]
    spatial = visual.apply(vparams, tokens[:, 1:], method="project")
    spatial = spatial.reshape(b, hw[0], hw[1], -1).astype(jnp.float32)
    kp_text = text_emb if kp_text_emb is None else kp_text_emb
    kp = jax.nn.sigmoid((tcl.similarity_map(spatial, kp_text) - 0.25) * 10.0)
    kp = resize.resize_hw(kp, mask.shape[-2:], "bilinear", layout="NCHW")
    mask = kp_w * kp + (1.0 - kp_w) * mask

  mask = resize.resize_hw(mask, (ph, pw), "bilinear", layout="NCHW")
  return mask[:, :, t : t + h, l : l + w], simmap


def window_outputs(
  params,
  cfg: tcl.TCLConfig,
  windows,
  text_emb,
  *,
  apply_pamr: bool,
  kp_w: float,
  simmaps: bool = False,
  kp_text_emb=None,
):
  """The zero-shot window function: windows [k, h, w, 3] -> soft masks [k, N, h, w]; with
  simmaps, [k, 2N, h, w]: the masks, then the masker's similarity maps resized to the window
  like the masks are (what the demo shows)."""
  masks, simmap = generate_masks(
    params, cfg, windows, text_emb, apply_pamr=apply_pamr, kp_w=kp_w, kp_text_emb=kp_text_emb
  )
  if not simmaps:
    return masks
  h, w = windows.shape[1:3]
  l, r, t, b = clip_lib.compute_padsize(h, w, cfg.patch_size)
  sim = resize.resize_hw(simmap, (h + t + b, w + l + r), "bilinear", layout="NCHW")
  return jnp.concatenate([masks, sim[:, :, t : t + h, l : l + w]], axis=1)
