"""CoDe (Wu et al., "Image-Text Co-Decomposition for Text-Supervised Semantic Segmentation", CVPR
2024; the authors' models/tcl/{codecomposition,noun_decomposition,prompter,decoders}.py): TCL's
mask generator driven by nouns through a learned prompt, plus a text-side decomposition of the
caption into word masks, trained with 9 loss terms. TCL's towers, masker, Sim2Mask, losses and
mask inference (tcl_jax.models.tcl, losses, tcl_inference) are reused as they are.

Parameters are one plain pytree:
  {"clip": {"visual", "text"}                       frozen CLIP (the authors keep three copies of
                                                    it: frozen_clip, clip_text_encoder and
                                                    clip_image_encoder, which agree)
   "masker": TCL's masker (decoder_double=False)    trainable, backbone after UST
   "prompt_ctx": [n_ctx, W]                         the noun prompt's context vectors
   "text_decoder": {"resblocks_i"}                  2 bidirectional CLIP blocks on the caption
   "bg_image": [224, 224, 3], "bg_text": [77, W]    learned backgrounds (highlighting prompts)
   "text_mask_w", "text_mask_b": ()                 the word-mask gate
   "tcli_logit_scale", "tclf_logit_scale", "hcl_logit_scale": ()}
W is the CLIP text width (the authors hard-wire 512: ViT-B/16's); it must equal the embedding
width, as the word masks dot the decoder's tokens with the noun embeddings.

A batch is b captions with N nouns each (tcl_jax.data: noun_tokens, kg_tokens, word_labels). The
model's 2b rows are example-major (row r = caption r // N, noun r % N); the authors' are
noun-major (row k = noun k // b, caption k % b). Every term is a mean over rows, so only the row
order of intermediate arrays differs.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax import tokenizer
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import losses
from tcl_jax.models import resize
from tcl_jax.models import tcl

# The prompter's initial context: the token embeddings of "A photo of x x x ..." after SOT.
PROMPT_INIT = "A photo of" + " x" * 50


@dataclasses.dataclass(frozen=True)
class CoDeConfig(tcl.TCLConfig):
  """TCL's masker fields (decoder_double off, as the authors' default.yml) plus CoDe's.

  The loss weights are the experiment config's (configs/experiment_configs.yml over default.yml):
  its w_hcl 0.5 wins over default.yml's 0.1. tcl_w and tv_w are the authors' w_tcl and w_tv;
  TCL's area_w is unused (CoDe weighs the two area terms separately).
  """

  decoder_double: bool = False
  area_w: float = 0.0  # unused by CoDe: pos_area_w and neg_area_w
  n_ctx: int = 16  # learned prompt context vectors (PromptLearner's n_ctx)
  text_decoder_layers: int = 2
  text_decoder_heads: int = 8  # the authors' TextDecoder: Transformer(512, 2 layers, 8 heads)
  kg_w: float = 8.0  # w_kg: knowledge-guided term (prompted noun vs a templated sentence)
  pos_area: float = 0.25  # pos_area: the positive masks' area prior
  pos_area_w: float = 0.5  # w_pos_area
  neg_area_w: float = 0.05  # w_neg_area
  hcl_w: float = 0.5  # w_hcl: highlighted region-word contrastive term
  tseg_w: float = 1.0  # w_tseg: word segmentation cross-entropy
  tseg_bg_weight: float = 0.5  # the background class's CE weight (the nouns' is 1)
  bg_image_size: int = 224  # the learned background image's side (resized to the batch's)
  region_highlighting: bool = True  # use_region_highlighting_prompt: learn bg_image
  word_highlighting: bool = True  # use_word_highlighting_prompt: learn bg_text

  def __post_init__(self):
    super().__post_init__()
    c = self.clip
    if c.transformer_width != c.embed_dim:
      raise ValueError(
        f"CoDe needs the CLIP text width ({c.transformer_width}) to equal its embedding width "
        f"({c.embed_dim}): the word masks dot the text decoder's tokens with noun embeddings"
      )
    if not 1 <= self.n_ctx <= c.context_length - 3:
      raise ValueError(f"n_ctx must be in [1, {c.context_length - 3}], got {self.n_ctx}")
    if c.transformer_width % self.text_decoder_heads:
      raise ValueError(
        f"text_decoder_heads {self.text_decoder_heads} must divide the text width "
        f"{c.transformer_width}"
      )

  @property
  def noun_length(self) -> int:
    """Tokens of a prompted noun after SOT: context_length - n_ctx - 1 (60 for CLIP's 77)."""
    return self.clip.context_length - self.n_ctx - 1


def tiny_config() -> CoDeConfig:
  """tcl.tiny_config's dims (the miniature's CLIP): text width = embedding width = 64."""
  t = tcl.tiny_config()
  return CoDeConfig(clip=t.clip, ie_freeze=t.ie_freeze)


def noun_tokens(nouns, cfg: CoDeConfig) -> np.ndarray:
  """The prompter's tokens of each noun [n, noun_length]: CLIP tokens at context
  noun_length + 1, truncated, SOT dropped (PromptLearner.forward)."""
  return np.asarray(tokenizer.tokenize(list(nouns), cfg.noun_length + 1))[:, 1:]


# ----------------------------------------------------------------------------------------------
# Text tower pieces (the frozen CLIP's text tower, run from token embeddings)
# ----------------------------------------------------------------------------------------------


def _blocks(block_params, x, n, width, heads, act, causal, dtype):
  for i in range(n):
    x = clip_lib.ResidualAttentionBlock(width, heads, dtype, act=act).apply(
      {"params": block_params[f"resblocks_{i}"]}, x, causal, False
    )
  return x


def token_embed(text_params, tokens):
  return jnp.take(text_params["token_embedding"]["embedding"], tokens, axis=0)


def text_hidden(text_params, cfg: CoDeConfig, tokens, dtype=jnp.float32):
  """The last text block's output [n, L, W] (before ln_final): the text decoder's input
  (sclip's encode_text(dense_output=True)[1][-1])."""
  c = cfg.clip
  x = token_embed(text_params, tokens).astype(dtype)
  x = x + text_params["positional_embedding"][: tokens.shape[1]].astype(dtype)
  return _blocks(
    text_params, x, c.transformer_layers, c.transformer_width, c.transformer_heads,
    c.hidden_act, True, dtype,
  )  # fmt: skip


def encode_embedded(text_params, cfg: CoDeConfig, x, eot, dtype=jnp.float32):
  """CLIP's text embedding of token embeddings x [n, L, W] pooled at positions eot [n]
  (sclip's encode_text_from_wordemb; the prompter's TextEncoder)."""
  c = cfg.clip
  x = x.astype(dtype) + text_params["positional_embedding"][: x.shape[1]].astype(dtype)
  x = _blocks(
    text_params, x, c.transformer_layers, c.transformer_width, c.transformer_heads,
    c.hidden_act, True, dtype,
  )  # fmt: skip
  x = clip_lib.LayerNorm(dtype).apply({"params": text_params["ln_final"]}, x)
  x = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
  return x @ text_params["text_projection"].astype(dtype)


def _unit(x):
  """x / ||x|| without an eps (the prompter's `text_emb / text_emb.norm()`)."""
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def prompted_noun_emb(params, cfg: CoDeConfig, tokens, dtype=jnp.float32):
  """Normalized embeddings [n, E] of nouns under the learned prompt: [SOT, ctx x n_ctx, noun
  tokens (SOT dropped)] through the frozen text tower, pooled at EOT (CLIPPrompter.forward)."""
  tp = jax.lax.stop_gradient(params["clip"]["text"])
  n = tokens.shape[0]
  w = cfg.clip.transformer_width
  sot = token_embed(tp, jnp.full((n, 1), tokenizer.SOT_ID, jnp.int32))
  ctx = jnp.broadcast_to(params["prompt_ctx"][None], (n, cfg.n_ctx, w))
  x = jnp.concatenate([sot, ctx.astype(sot.dtype), token_embed(tp, tokens)], axis=1)
  eot = cfg.n_ctx + 1 + jnp.argmax(tokens, axis=-1)
  return _unit(encode_embedded(tp, cfg, x, eot, dtype).astype(jnp.float32))


def sentence_emb(params, cfg: CoDeConfig, tokens, dtype=jnp.float32):
  """Normalized plain CLIP text embeddings [n, E] (the prompter's wo_prompt_learning)."""
  tp = jax.lax.stop_gradient(params["clip"]["text"])
  return _unit(clip_lib.encode_text({"text": tp}, cfg.clip, tokens, dtype).astype(jnp.float32))


class TextDecoder(nn.Module):
  """openai CLIP's Transformer(width, layers, heads) with no attention mask: bidirectional."""

  cfg: CoDeConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    for i in range(c.text_decoder_layers):
      x = clip_lib.ResidualAttentionBlock(
        c.clip.transformer_width, c.text_decoder_heads, self.dtype, act="quick_gelu",
        name=f"resblocks_{i}",
      )(x, False, False)  # fmt: skip
    return x


def _torch_default_block_init(params, rng):
  """PyTorch's own init of the decoder's blocks (the authors leave them as constructed):
  nn.Linear kaiming_uniform(a=sqrt(5)) weights and U(+-1/sqrt(fan_in)) biases; MultiheadAttention
  xavier_uniform in_proj with zero biases (its out_proj keeps the Linear weight, bias zeroed);
  LayerNorm ones/zeros."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  keys = jax.random.split(rng, len(flat))
  out = {}
  for (path, x), k in zip(flat, keys):
    names = [p.key for p in path]
    leaf, owner = names[-1], names[-2]
    if owner.startswith("ln_"):
      v = jnp.ones_like(x) if leaf == "scale" else jnp.zeros_like(x)
    elif owner == "in_proj" and leaf == "kernel":
      fan_in, fan_out = x.shape[0], x.shape[1] // 3  # torch's [3W, W] counted as one W x 3W
      a = float(np.sqrt(6.0 / (fan_in + 3 * fan_out)))
      v = jax.random.uniform(k, x.shape, x.dtype, -a, a)
    elif leaf == "bias" and owner in ("in_proj", "out_proj"):
      v = jnp.zeros_like(x)
    else:  # Linear weight (kaiming_uniform a=sqrt(5): bound 1/sqrt(fan_in)) or bias (same bound)
      bound = 1.0 / float(np.sqrt(x.shape[0] if leaf == "kernel" else _fan_in(params, names)))
      v = jax.random.uniform(k, x.shape, x.dtype, -bound, bound)
    d = out
    for n in names[:-1]:
      d = d.setdefault(n, {})
    d[leaf] = v
  return out


def _fan_in(params, names):
  d = params
  for n in names[:-1]:
    d = d[n]
  return d["kernel"].shape[0]


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def init_params(cfg: CoDeConfig, rng, clip_params=None) -> dict:
  """CoDe's parameters as the authors construct them: TCL's masker from the CLIP, the prompt's
  context from "A photo of x x ...", a PyTorch-initialised text decoder, zero backgrounds, the
  word gate (10, 0) and three logit scales 1/0.07."""
  k_tcl, k_dec = jax.random.split(rng)
  p = tcl.init_params(cfg, k_tcl, clip_params)
  w = cfg.clip.transformer_width
  init_tokens = np.asarray(tokenizer.tokenize([PROMPT_INIT], cfg.clip.context_length))
  ctx = token_embed(p["clip"]["text"], jnp.asarray(init_tokens[0, 1 : 1 + cfg.n_ctx]))
  dec = TextDecoder(cfg).init(k_dec, jnp.zeros((1, cfg.clip.context_length, w)))["params"]
  scale = p["tcli_logit_scale"]
  p.update(
    prompt_ctx=jnp.array(ctx, jnp.float32),
    text_decoder=_torch_default_block_init(dec, k_dec),
    bg_image=jnp.zeros((cfg.bg_image_size, cfg.bg_image_size, 3), jnp.float32),
    bg_text=jnp.zeros((cfg.clip.context_length, w), jnp.float32),
    text_mask_w=jnp.asarray(10.0, jnp.float32),
    text_mask_b=jnp.asarray(0.0, jnp.float32),
    hcl_logit_scale=jnp.array(scale),
  )
  return p


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------


def word_masks(params, dense, noun_emb, n_nouns):
  """The caption's word masks from its decoded tokens dense [b, L, W] (normalized) and its nouns'
  embeddings noun_emb [b N, E]: logits [b, N + 1, L] (class 0, the background, fixed at 0) and the
  nouns' softmax probabilities [b N, L] (get_text_masks)."""
  b, l, _ = dense.shape
  sim = jnp.einsum("blc,bnc->bnl", dense, noun_emb.reshape(b, n_nouns, -1))
  logits = sim * params["text_mask_w"] + params["text_mask_b"]
  logits = jnp.concatenate([jnp.zeros((b, 1, l), logits.dtype), logits], axis=1)
  probs = jax.nn.softmax(logits, axis=1)[:, 1:]
  return logits, probs.reshape(b * n_nouns, l)


def word_seg_loss(logits, labels, bg_weight: float):
  """F.cross_entropy(logits [b, K, L], labels [b, L], ignore_index=-1, weight=[bg_weight, 1...]):
  the weighted mean over the labelled positions."""
  valid = labels >= 0
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=1)
  nll = -jnp.take_along_axis(logp, safe[:, None, :], axis=1)[:, 0]
  w = jnp.where(safe == 0, bg_weight, 1.0) * valid
  # A batch without one labelled word would divide 0 by 0 (NaN in the authors' code); the
  # pipeline keeps only captions with N nouns, so the guard only keeps a degenerate batch finite.
  return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)


def highlight_mask(probs, caption_tokens, n_nouns):
  """handle_padded_tokens: the word masks with SOT, EOT and every position after EOT set to 1."""
  pos = jnp.arange(probs.shape[1])[None]
  eot = jnp.repeat(jnp.argmax(caption_tokens, axis=-1), n_nouns)[:, None]
  return jnp.where((pos == 0) | (pos >= eot), 1.0, probs)


def code_loss(
  params,
  cfg: CoDeConfig,
  batch,
  *,
  rng=None,
  uniform=None,
  compute_dtype=jnp.float32,
  remat: bool = False,
  intermediates: bool = False,
):
  """CoDe's objective on a global batch (ImageTextCoDecomposition.forward). Returns (total, aux).

  batch: image [b, H, W, 3], text_tokens [b, L], noun_tokens [b, N, noun_length], kg_tokens
  [b, N, L], word_labels [b, L]. Exactly one of `rng` (draws the positive pairs' Gumbel noise)
  and `uniform` ([bN, bN, h, w] in the model's row order, whose diagonal is used, or [bN, h, w])
  must be given. With `intermediates`, aux["intermediates"] holds the arrays the parity tool
  compares with the authors' (rows example-major).
  """
  if (rng is None) == (uniform is None):
    raise ValueError("code_loss needs exactly one of rng= or uniform=")
  images = batch["image"]
  caption_tokens = batch["text_tokens"]
  b, n_nouns = batch["noun_tokens"].shape[:2]
  rows = b * n_nouns
  if rows < 2:
    raise ValueError(f"CoDe's contrastive terms need at least 2 rows, got {rows}")
  clip_params = jax.lax.stop_gradient(params["clip"])
  tp = clip_params["text"]

  # Nouns: prompted embeddings (trainable through the context) and the knowledge-guided target.
  noun_emb = prompted_noun_emb(
    params, cfg, batch["noun_tokens"].reshape(rows, -1), compute_dtype
  )  # [bN, E], example-major
  kg_emb = jax.lax.stop_gradient(
    sentence_emb(params, cfg, batch["kg_tokens"].reshape(rows, -1), compute_dtype)
  )
  aux = {"kg_loss": (1.0 - jnp.mean(jnp.sum(noun_emb * kg_emb, axis=-1))) * cfg.kg_w}

  # Image side: TCL's masker on frozen CLIP features, normalized (CoDe pools and applies TV on the
  # normalized map; TCL on the raw one), each image once per noun.
  feat, hw = tcl.clip_features(clip_params, cfg, images, compute_dtype)
  image_emb = tcl.masker_image_emb(
    params["masker"], cfg, jax.lax.stop_gradient(feat), hw, compute_dtype, remat
  )
  image_emb = losses.l2_normalize(image_emb.astype(jnp.float32))
  aux["tv_img_loss"] = losses.tv_loss(image_emb, axes=(1, 2)) * cfg.tv_w
  image_rep = tcl.batch_sharded(jnp.repeat(image_emb, n_nouns, axis=0))

  s2m = params["masker"]["sim2mask"]
  sim_pos = jnp.einsum("bhwc,bc->bhw", image_rep, noun_emb)
  if uniform is None:
    uniform = tcl.positive_pair_uniform(rng, sim_pos.shape)
  elif uniform.ndim == 4:
    uniform = jnp.take_along_axis(uniform, jnp.arange(rows)[:, None, None, None], axis=1)[:, 0]
  pos_mask, soft_pos = tcl.sim2mask(s2m, sim_pos, uniform=uniform, tau=cfg.gumbel_tau)
  cosine, neg_area, tv_mask = losses.all_pairs_terms(
    image_rep, noun_emb, s2m["w"], s2m["b"], cfg.caption_chunk, pin=tcl.batch_sharded
  )
  aux["hlf_noun_loss"] = (
    losses.scaled_symmetric_ce(cosine, params["tclf_logit_scale"]) * cfg.tcl_w
  )  # TCL_f
  aux["tv_mask_loss"] = tv_mask * cfg.tv_w
  aux["area_loss"] = losses.area_loss(soft_pos, cfg.pos_area) * cfg.pos_area_w
  aux["neg_area_loss"] = jnp.abs(neg_area) * cfg.neg_area_w

  # TCL_i with the region-highlighting prompt: outside the hard mask, the learned background
  # (bilinearly resized to the batch's size), not black.
  h, w = images.shape[1:3]
  bg = params["bg_image"]
  if not cfg.region_highlighting:
    bg = jax.lax.stop_gradient(bg)
  bg = resize.resize_hw(bg[None], (h, w), "bilinear")
  up = resize.resize_hw(pos_mask[..., None], (h, w), "nearest")
  fg = up * jnp.repeat(images, n_nouns, axis=0) + (1.0 - up) * bg
  fg_img_emb = clip_lib.VisionTransformer(cfg.clip, compute_dtype, remat).apply(
    {"params": clip_params["visual"]}, fg.astype(compute_dtype)
  )
  fg_img_emb = losses.l2_normalize(fg_img_emb.astype(jnp.float32))
  aux["hli_noun_loss"] = (
    losses.info_nce(fg_img_emb, noun_emb, params["tcli_logit_scale"]) * cfg.tcl_w
  )  # TCL_i

  # Text side: decode the caption's last hidden states, mask its words by each noun, and
  # highlight them over the learned background text.
  hidden = jax.lax.stop_gradient(text_hidden(tp, cfg, caption_tokens, compute_dtype))
  dense = TextDecoder(cfg, compute_dtype).apply({"params": params["text_decoder"]}, hidden)
  dense = losses.l2_normalize(dense.astype(jnp.float32))
  logits, probs = word_masks(params, dense, noun_emb, n_nouns)
  aux["tseg_loss"] = word_seg_loss(logits, batch["word_labels"], cfg.tseg_bg_weight) * cfg.tseg_w

  hm = highlight_mask(probs, caption_tokens, n_nouns)[..., None]
  bg_text = params["bg_text"]
  if not cfg.word_highlighting:
    bg_text = jax.lax.stop_gradient(bg_text)
  words = jnp.repeat(token_embed(tp, caption_tokens).astype(jnp.float32), n_nouns, axis=0)
  highlighted = words * hm + bg_text[None] * (1.0 - hm)
  eot = jnp.repeat(jnp.argmax(caption_tokens, axis=-1), n_nouns)
  fg_txt_emb = losses.l2_normalize(
    encode_embedded(tp, cfg, highlighted, eot, compute_dtype).astype(jnp.float32)
  )
  aux["hcl_loss"] = losses.info_nce(fg_img_emb, fg_txt_emb, params["hcl_logit_scale"]) * cfg.hcl_w

  total = sum(aux[k] for k in LOSS_TERMS)
  if intermediates:
    aux["intermediates"] = dict(
      noun_emb=noun_emb,
      kg_emb=kg_emb,
      image_emb=image_emb,  # [b, h, w, E] normalized (decode_feature_map)
      text_hidden=hidden,
      text_dense_emb=dense,
      text_mask_logits=logits,
      text_mask_probs=probs,
      fg_text_emb=fg_txt_emb,
      fg_image_emb=fg_img_emb,
      pos_mask=pos_mask,  # [bN, h, w] hard (straight-through)
    )
  # The first noun's mask of each image, for the image summaries (rows of the batch's images).
  aux["soft_pos_mask"] = jax.lax.stop_gradient(
    soft_pos.reshape(b, n_nouns, *soft_pos.shape[1:])[:, 0]
  )
  return total, aux


# The authors' keys (ImageTextCoDecomposition.forward's ret; every key with "loss" is summed).
LOSS_TERMS = (
  "kg_loss",
  "hlf_noun_loss",
  "tv_img_loss",
  "tv_mask_loss",
  "area_loss",
  "neg_area_loss",
  "hli_noun_loss",
  "tseg_loss",
  "hcl_loss",
)
