"""Training-free dense CLIP segmenters: each changes only how a pretrained CLIP ViT's image tower
turns its patch tokens into dense features (no parameter is trained or added).

Each method is ported from its authors' repository (behaviour, not code) and checked against it
on random weights (tests/test_training_free.py, fixtures made by tools/reference/training_free.py):

- maskclip (Zhou et al., ECCV 2022; chongzhou96/MaskCLIP @245d31f): the last block's attention is
  replaced by its value path, out_proj(v_proj(ln_1(x))), and everything else of the block stays:
  the residual and the FFN (mmseg/models/backbones/vit.py:94-108, `v += x`, then
  `ffn(norm2(v), identity=v)`; ln_post on v at :434-437; the head's 1x1 conv is CLIP's proj,
  decode_heads/maskclip_head.py:80). That is the identity attention of
  `clip_contrastive.dense_scores` (the "clip" kind's zero-shot masks), but MaskCLIP runs OpenAI's
  weights in its own mmseg ViT, whose config (configs/_base_/models/maskclip_vit16.py:22-23) sets
  exact GELU instead of CLIP's QuickGELU and LayerNorm eps 1e-6 instead of 1e-5, in every block.
  Both oddities are reproduced here, so "maskclip" gives MaskCLIP's numbers while the "clip" kind
  keeps TCL's (CLIP's own activation and eps; 0.6% of the logits on the fixture, the eps alone
  0.2% there, whose stem is made small to show it).
- sclip (Wang et al., 2023; wangf3014/SCLIP @b56bd30): correlative self-attention in the last
  block, softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d)), the two maps summed, not averaged
  (each row weighs 2: the attention output is doubled; clip/model.py:295-298), with the block's
  residual and FFN kept (clip/model.py:249-251).
- clearclip (Lan et al., ECCV 2024; mc-lan/ClearCLIP @ad68a40): query-query attention
  softmax(q q^T / sqrt(d)) in the last block (open_clip/transformer.py:614-616), and the block's
  output is that attention's out_proj alone: no residual, no FFN (:524-528, ignore_residual=True;
  the block is still run normally and its output dropped). Its configs/base_config.py:6 sets
  model_type='vanilla' (plain q-k attention without residual or FFN), so the repository's configs
  as shipped do not run ClearCLIP's q-q attention; "clearclip" here is model_type='ClearCLIP'.
- naclip (Hajimiri et al., WACV 2025; sinahmr/NACLIP @0cac3a6): key-key attention plus a
  Gaussian spatial prior, softmax(k k^T / sqrt(d) + G), G[p, p'] = exp(-|p - p'|^2 / (2 std^2))
  over patch-grid positions, std 5 (naclip.py:21), unnormalised (1 on the diagonal) and added to
  the logits, not as a log-prior; its "window" is 2n - 1 patches a side, so it spans the whole
  grid (clip/model.py:153-199); 0 for every pair with the class token (:173-175). As ClearCLIP,
  no residual and no FFN ("reduced" arch, clip/model.py:118-119).

All four keep the class token in the last attention (it attends and is attended), apply ln_post
and proj to the patch tokens, and leave the L2 normalisation to the caller (`dense_scores`).
SCLIP, ClearCLIP and NACLIP resize the positional embedding as DINO does: bicubic with a scale
factor of (grid + 0.1) / trained grid, not recomputed, rather than to a target size
(`_dino_matrix`; e.g. SCLIP clip/model.py:263-281; 3% of the features on the fixture); MaskCLIP
resizes to the target size (mmseg `resize`, vit.py:377-406). All four use the table unchanged
whenever the token count matches the trained one, even on a non-square grid (e.g. 7 x 28
patches for a 14 x 14 table; SCLIP clip/model.py:239, MaskCLIP vit.py:368): an oddity of all
four, reproduced.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import losses
from tcl_jax.models import resize

METHODS = ("maskclip", "sclip", "clearclip", "naclip")

# NACLIP's default Gaussian std (naclip.py:21, gaussian_std=5.; no config overrides it).
NACLIP_GAUSSIAN_STD = 5.0
# MaskCLIP's mmseg ViT: LayerNorm eps and MLP activation (configs/_base_/models/maskclip_vit16.py).
MASKCLIP_LN_EPS = 1e-6
MASKCLIP_ACT = "gelu"


def check_method(method: str) -> None:
  """ValueError (one line) for a method not in METHODS."""
  if method not in METHODS:
    raise ValueError(f"unknown training-free method {method!r}; known: {', '.join(METHODS)}")


@functools.lru_cache(maxsize=64)
def _dino_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] torch bicubic (align_corners=False) with scale_factor (out + 0.1) / in, not
  recomputed: source = (dst + 0.5) * in / (out + 0.1) - 0.5, slightly off a plain resize."""
  scale = (out_size + 0.1) / in_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) / scale - 0.5
  i0 = np.floor(src).astype(np.int64)
  w = resize.cubic_weights(src - i0)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for k in range(4):
    np.add.at(m, (rows, np.clip(i0 - 1 + k, 0, in_size - 1)), w[:, k])
  return m


def _pos_emb(table, gh: int, gw: int, method: str):
  """The [1 + gh*gw, D] positional embedding each method adds (see the module docstring)."""
  n = table.shape[0] - 1
  if gh * gw == n:  # all four: unchanged when the count matches, square or not
    return table
  g = int(round(math.sqrt(n)))
  grid = table[1:].reshape(g, g, -1)
  if method == "maskclip":
    grid = resize.resize_hw(grid, (gh, gw), "bicubic")
  else:
    mh = jnp.asarray(_dino_matrix(g, gh), jnp.float32)
    mw = jnp.asarray(_dino_matrix(g, gw), jnp.float32)
    grid = jnp.einsum("hH,wW,HWd->hwd", mh, mw, grid.astype(jnp.float32))
  return jnp.concatenate([table[:1], grid.reshape(gh * gw, -1).astype(table.dtype)], axis=0)


@functools.lru_cache(maxsize=16)
def naclip_prior(gh: int, gw: int, std: float = NACLIP_GAUSSIAN_STD) -> np.ndarray:
  """NACLIP's additive attention prior [1 + gh*gw, 1 + gh*gw]: a Gaussian of the patches' grid
  distance (not normalised: 1 on the diagonal), zero in the class token's row and column."""
  ii, jj = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  pos = np.stack([ii.ravel(), jj.ravel()], axis=-1).astype(np.float64)
  d2 = np.square(pos[:, None, :] - pos[None, :, :]).sum(-1)
  out = np.zeros((gh * gw + 1, gh * gw + 1), np.float32)
  out[1:, 1:] = np.exp(-d2 / (2 * std**2))
  return out


def _softmax_attn(a, b, scale):
  """softmax(a b^T * scale) over [B, L, heads, dh] -> [B, heads, L, L]."""
  return jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", a, b) * scale, axis=-1)


def _last_block(block_params, cfg: clip_lib.CLIPConfig, x, grid, method: str):
  """The tower's last block as `method` runs it, on tokens x [B, 1 + h*w, D]."""
  b, l, d = x.shape
  heads = cfg.vision_heads
  dh = d // heads
  h = clip_lib.LayerNorm().apply({"params": block_params["ln_1"]}, x)
  inp = block_params["attn"]["in_proj"]
  q, k, v = jnp.split(h @ inp["kernel"] + inp["bias"], 3, axis=-1)
  q, k, v = (t.reshape(b, l, heads, dh) for t in (q, k, v))
  scale = dh**-0.5
  if method == "sclip":
    attn = _softmax_attn(q, q, scale) + _softmax_attn(k, k, scale)
  elif method == "clearclip":
    attn = _softmax_attn(q, q, scale)
  elif method == "naclip":
    prior = jnp.asarray(naclip_prior(*grid))
    attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", k, k) * scale + prior, axis=-1)
  else:
    raise AssertionError(method)
  y = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, l, d)
  out = block_params["attn"]["out_proj"]
  y = y @ out["kernel"] + out["bias"]
  if method != "sclip":
    return y  # ClearCLIP, NACLIP: no residual, no FFN
  x = x + y  # SCLIP keeps the block's residual and FFN
  hn = clip_lib.LayerNorm().apply({"params": block_params["ln_2"]}, x)
  hn = hn @ block_params["c_fc"]["kernel"] + block_params["c_fc"]["bias"]
  hn = clip_lib.ACTIVATIONS[cfg.hidden_act](hn)
  return x + hn @ block_params["c_proj"]["kernel"] + block_params["c_proj"]["bias"]


def _trunk_key(method: str) -> str:
  """Methods with the same key share everything up to the last block: SCLIP, ClearCLIP and NACLIP
  (DINO-style positional embedding, CLIP's eps and activation); MaskCLIP has its own."""
  return "maskclip" if method == "maskclip" else "dino"


def _tower(cfg: clip_lib.CLIPConfig, method: str):
  """(the method's tower config, its VisionTransformer, its LayerNorm eps)."""
  eps = 1e-5
  if method == "maskclip":
    cfg = dataclasses.replace(cfg, hidden_act=MASKCLIP_ACT)
    eps = MASKCLIP_LN_EPS
  return cfg, clip_lib.VisionTransformer(cfg, ln_eps=eps), eps


def _trunk(visual_params, cfg: clip_lib.CLIPConfig, images, method: str):
  """The stem (with the method's positional embedding) and all blocks but the last:
  (tokens [k, 1 + gh*gw, D], (gh, gw))."""
  check_method(method)
  p = cfg.vision_patch_size
  k, hh, ww, _ = images.shape
  if hh % p or ww % p:
    raise ValueError(f"images {hh}x{ww} are not multiples of the {p}-pixel patch; pad them first")
  cfg, tower, eps = _tower(cfg, method)
  # The stem as VisionTransformer.tokens, with each method's positional embedding.
  x = jax.lax.conv_general_dilated(
    images.astype(jnp.float32),
    visual_params["conv1"]["kernel"],
    (p, p),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  _, gh, gw, d = x.shape
  x = x.reshape(k, gh * gw, d)
  cls = jnp.broadcast_to(visual_params["class_embedding"], (k, 1, d))
  x = jnp.concatenate([cls, x], axis=1) + _pos_emb(
    visual_params["positional_embedding"], gh, gw, method
  )
  x = clip_lib.LayerNorm(eps=eps).apply({"params": visual_params["ln_pre"]}, x)
  x = tower.apply({"params": visual_params}, x, 0, cfg.vision_layers - 1, method="run_blocks")
  return x, (gh, gw)


def _head(visual_params, cfg: clip_lib.CLIPConfig, x, grid, method: str):
  """The method's last block, then ln_post + proj on the patch tokens -> [k, gh, gw, E]."""
  cfg, tower, _ = _tower(cfg, method)
  vp = {"params": visual_params}
  n = cfg.vision_layers
  if method == "maskclip":
    x = tower.apply(vp, x, n - 1, n, True, method="run_blocks")
  else:
    x = _last_block(visual_params[f"resblocks_{n - 1}"], cfg, x, grid, method)
  return tower.apply(vp, x[:, 1:], method="project").reshape(x.shape[0], *grid, -1)


def dense_features(visual_params, cfg: clip_lib.CLIPConfig, images, method: str):
  """images [k, H, W, 3] normalized, H and W multiples of the patch -> [k, gh, gw, E] projected
  patch features (not normalized) of the training-free `method` (one of METHODS)."""
  x, grid = _trunk(visual_params, cfg, images, method)
  return _head(visual_params, cfg, x, grid, method)


def dense_features_many(visual_params, cfg: clip_lib.CLIPConfig, images, methods) -> list:
  """dense_features of several methods, the tower up to its last block run once per group of
  methods that share it (`_trunk_key`): SCLIP, ClearCLIP and NACLIP together cost one forward
  plus three last blocks. The same values as one call per method."""
  trunks = {}
  out = []
  for m in methods:
    key = _trunk_key(m)
    if key not in trunks:
      trunks[key] = _trunk(visual_params, cfg, images, m)
    out.append(_head(visual_params, cfg, *trunks[key], m))
  return out


def dense_scores(clip_params, cfg: clip_lib.CLIPConfig, windows, text_emb, method: str):
  """windows [k, h, w, 3] normalized -> [k, N, h, w] cosine similarities of `method`'s
  L2-normalized patch features with text_emb [N, E], bilinearly resized to the window (zero
  padding to patch multiples first, cropped after), as `clip_contrastive.dense_scores`."""
  return dense_scores_many(clip_params, cfg, windows, text_emb, (method,))[0]


def dense_scores_many(clip_params, cfg: clip_lib.CLIPConfig, windows, text_emb, methods) -> list:
  """dense_scores of several methods (the shared part of the tower run once, dense_features_many)."""
  _, h, w, _ = windows.shape
  l, r, t, b = clip_lib.compute_padsize(h, w, cfg.vision_patch_size)
  x = jnp.pad(windows, ((0, 0), (t, b), (l, r), (0, 0)))
  out = []
  for dense in dense_features_many(clip_params["visual"], cfg, x, methods):
    sim = jnp.einsum("khwc,nc->knhw", losses.l2_normalize(dense), text_emb)
    sim = resize.resize_hw(sim, x.shape[1:3], "bilinear", layout="NCHW")
    out.append(sim[:, :, t : t + h, l : l + w])
  return out
