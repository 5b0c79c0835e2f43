"""CLIP ViT image tower and text tower in Flax, as the original TCL's `sclip/model.py` uses them.

Parameter names follow the PyTorch keys (`resblocks_3` for `resblocks.3`, `ln_1`, `attn.in_proj`,
`mlp.c_fc`, ...) so the converter is a rename plus transposes. Images are NHWC.
"""

import contextlib
import dataclasses
import functools
import math
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from tcl_jax.models import resize

# log(1 / 0.07): the initial logit scale of CLIP and of TCL's InfoNCE terms (the original's
# models/tcl/mi.py, T_init = 0.07).
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
# The image normalisation TCL's towers see, in [0, 1] units: ImageNet's mean/std, as the original's
# training (timm) and evaluation (mmseg img_norm_cfg) pipelines use, not OpenAI CLIP's own
# (0.481, 0.458, 0.408) -- an oddity of the original, kept for parity.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """OpenAI CLIP ViT dimensions (the arguments of the original's `CLIP.__init__`)."""

  embed_dim: int = 512
  image_resolution: int = 224
  vision_layers: int = 12
  vision_width: int = 768
  vision_patch_size: int = 16
  vision_heads: int = 12
  context_length: int = 77
  vocab_size: int = 49408
  transformer_width: int = 512
  transformer_heads: int = 8
  transformer_layers: int = 12
  # The blocks' MLP activation: OpenAI's CLIP uses quick_gelu; some transformers CLIPs use gelu.
  hidden_act: str = "quick_gelu"

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")

  @property
  def grid_size(self) -> int:
    return self.image_resolution // self.vision_patch_size


class LayerNorm(nn.Module):
  """LayerNorm over the last axis in float32 (the original casts to fp32 too), eps 1e-5 as torch."""

  dtype: Dtype = jnp.float32
  eps: float = 1e-5  # MaskCLIP's mmseg ViT uses 1e-6 (tcl_jax.models.training_free)

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  """torch's nn.GELU() (transformers' "gelu"): the exact, erf-based GELU."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


_forced_attention: Optional[str] = None


@contextlib.contextmanager
def force_attention(implementation: str):
  """Models traced inside use `implementation` ('xla' or 'cudnn') instead of the automatic choice
  (the benchmark counts model FLOPs with 'xla': XLA's cost analysis sees no FLOPs in cuDNN's)."""
  global _forced_attention
  previous, _forced_attention = _forced_attention, implementation
  try:
    yield
  finally:
    _forced_attention = previous


def attention_implementation(dtype) -> str:
  """'cudnn' (the fused flash-attention kernel) for 16-bit compute on an NVIDIA GPU, else 'xla'."""
  if _forced_attention:
    return _forced_attention
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


@functools.lru_cache(maxsize=None)
def _unsupported(impl: str, shapes: tuple, dtype, causal: bool) -> Optional[str]:
  """Why `impl` cannot run this attention forward *and* backward (None if it can), found by tracing
  its VJP on abstract values. The backward check matters: under remat (jax.checkpoint) cuDNN's
  training-only limits (e.g. odd sequence lengths, as ViT-B/16's 197 and the text tower's 77 are
  with jax 0.11) are checked when the step is differentiated, outside any try around the call."""

  def fwd_bwd(q, k, v):
    fn = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation=impl
    )
    y, vjp = jax.vjp(fn, q, k, v)
    return vjp(y)

  try:
    jax.eval_shape(fwd_bwd, *(jax.ShapeDtypeStruct(s, dtype) for s in shapes))
  except (NotImplementedError, RuntimeError, ValueError, TypeError) as e:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
  return None


def attention(q, k, v, *, causal: bool, implementation: Optional[str] = None):
  """softmax(q k^T / sqrt(dh)) v on [B, L, heads, dh] with `jax.nn.dot_product_attention`.

  `implementation` None picks `attention_implementation(q.dtype)`. cuDNN rejects some shapes and
  setups (head dim > 128 before Hopper, odd sequence lengths when training, no cuDNN, ROCm); those
  fall back to 'xla', which computes the logits and the softmax in float32 whatever the input dtype.
  """
  impl = implementation or attention_implementation(q.dtype)
  if impl != "xla":
    why = _unsupported(impl, (q.shape, k.shape, v.shape), jnp.dtype(q.dtype), causal)
    if why is None:
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    logging.log_first_n(
      logging.WARNING,
      "attention: %s unavailable for %s %s (%s); using xla",
      1,
      impl,
      q.shape,
      q.dtype,
      why,
    )
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (fused in_proj, out_proj) on [B, L, D]."""

  width: int
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, causal: bool = False, self_only: bool = False):
    b, l, d = x.shape
    in_proj = nn.Dense(3 * self.width, dtype=self.dtype, name="in_proj")
    out_proj = nn.Dense(self.width, dtype=self.dtype, name="out_proj")
    q, k, v = jnp.split(in_proj(x), 3, axis=-1)
    if self_only:
      # MaskCLIP trick: an additive mask of -inf off the diagonal makes each token attend only to
      # itself, i.e. the attention output is its own value vector. Same result, no L x L work.
      return out_proj(v)
    dh = self.width // self.heads
    shape = (b, l, self.heads, dh)
    y = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), causal=causal)
    return out_proj(y.reshape(b, l, d))


class ResidualAttentionBlock(nn.Module):
  width: int
  heads: int
  dtype: Dtype = jnp.float32
  act: str = "quick_gelu"  # CLIPConfig.hidden_act
  ln_eps: float = 1e-5

  @nn.compact
  def __call__(self, x, causal: bool = False, self_only: bool = False):
    # Flags are positional so nn.remat can mark them static (argnums 2, 3; self is 0).
    h = LayerNorm(self.dtype, self.ln_eps, name="ln_1")(x)
    x = x + MultiheadAttention(self.width, self.heads, self.dtype, name="attn")(
      h, causal=causal, self_only=self_only
    )
    h = LayerNorm(self.dtype, self.ln_eps, name="ln_2")(x)
    h = nn.Dense(4 * self.width, dtype=self.dtype, name="c_fc")(h)
    h = nn.Dense(self.width, dtype=self.dtype, name="c_proj")(ACTIVATIONS[self.act](h))
    return x + h


def interpolate_pos_emb(pos_emb, h: int, w: int):
  """Resize the [1 + g*g, D] positional embedding to an h x w grid (torch bicubic, as the original).

  Like the original, the table is returned unchanged when the grid already matches.
  """
  n = pos_emb.shape[0] - 1
  if h * w == n and h == w:
    return pos_emb
  g = int(round(n**0.5))
  cls_pe, grid_pe = pos_emb[:1], pos_emb[1:].reshape(g, g, -1)
  grid_pe = resize.resize_hw(grid_pe, (h, w), "bicubic")
  return jnp.concatenate([cls_pe, grid_pe.reshape(h * w, -1)], axis=0)


@jax.custom_vjp
def patch_embed(images, kernel):
  """The ViT stem's conv (kernel [p, p, C, D], stride p, VALID: floors like torch's conv), as
  flax's nn.Conv computes it. Its gradients are plain matmuls over the patches: XLA's CPU
  backend runs the input gradient of this strided conv (the transposed conv, which TCL_i needs
  through the frozen tower) as a naive loop, ~5% of the ViT-B/16 step on 2 cores."""
  p = kernel.shape[0]
  return jax.lax.conv_general_dilated(
    images, kernel, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _patch_embed_fwd(images, kernel):
  return patch_embed(images, kernel), (images, kernel)


def _patch_embed_bwd(res, g):
  images, kernel = res
  p, _, c, d = kernel.shape
  b, h, w, _ = images.shape
  gh, gw = g.shape[1:3]
  k2 = kernel.reshape(p * p * c, d)
  dx = (g.reshape(-1, d) @ k2.T).reshape(b, gh, gw, p, p, c)
  dx = dx.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * p, gw * p, c)
  dx = jnp.pad(dx, ((0, 0), (0, h - gh * p), (0, w - gw * p), (0, 0)))  # floored pixels: 0
  patches = images[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * c)
  dk = (patches.T @ g.reshape(-1, d)).reshape(kernel.shape)
  return dx.astype(images.dtype), dk.astype(kernel.dtype)


patch_embed.defvjp(_patch_embed_fwd, _patch_embed_bwd)


class PatchEmbed(nn.Module):
  """nn.Conv(features, (p, p), strides=(p, p), padding="VALID", use_bias=False) with the same
  parameter ("kernel") and initialisation, through `patch_embed`."""

  features: int
  patch: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel",
      nn.initializers.lecun_normal(),
      (self.patch, self.patch, x.shape[-1], self.features),
      jnp.float32,
    )
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return patch_embed(x, kernel)


class VisionTransformer(nn.Module):
  """CLIP ViT. `tokens` runs the stem and (some of) the blocks; `project` is ln_post + proj.

  TCL splits the tower this way: the frozen encoder's ln_post/proj become `clip_proj`, applied
  either to the class token (TCL_i) or to every spatial token (the KP branch).
  """

  cfg: CLIPConfig
  dtype: Dtype = jnp.float32
  remat: bool = False
  ln_eps: float = 1e-5  # every LayerNorm's epsilon (MaskCLIP's own ViT: 1e-6)

  def setup(self):
    c = self.cfg
    p, d = c.vision_patch_size, c.vision_width
    self.conv1 = PatchEmbed(d, p, self.dtype, name="conv1")
    scale = d**-0.5
    self.class_embedding = self.param(
      "class_embedding", lambda k: scale * jax.random.normal(k, (d,))
    )
    self.positional_embedding = self.param(
      "positional_embedding", lambda k: scale * jax.random.normal(k, (c.grid_size**2 + 1, d))
    )
    self.ln_pre = LayerNorm(self.dtype, self.ln_eps)
    block = (
      nn.remat(ResidualAttentionBlock, static_argnums=(2, 3))
      if self.remat
      else ResidualAttentionBlock
    )
    self.resblocks = [
      block(
        d, c.vision_heads, self.dtype, act=c.hidden_act, ln_eps=self.ln_eps, name=f"resblocks_{i}"
      )
      for i in range(c.vision_layers)
    ]
    self.ln_post = LayerNorm(self.dtype, self.ln_eps)
    self.proj = self.param("proj", lambda k: scale * jax.random.normal(k, (d, c.embed_dim)))

  def tokens(self, images, *, num_blocks: Optional[int] = None, ignore_last_attn: bool = False):
    """images [B, H, W, 3] -> (tokens [B, 1 + h*w, D] after `num_blocks` blocks, (h, w)).

    `ignore_last_attn` applies the MaskCLIP identity attention to the tower's last block (only
    reached when all blocks run).
    """
    p = self.cfg.vision_patch_size
    if images.shape[1] < p or images.shape[2] < p:
      raise ValueError(
        f"image {images.shape[1]}x{images.shape[2]} is smaller than one {p}x{p} patch"
      )
    x = self.conv1(images.astype(self.dtype))  # floors like torch's conv when H, W % p != 0
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + interpolate_pos_emb(self.positional_embedding, h, w).astype(self.dtype)
    x = self.ln_pre(x)
    n = len(self.resblocks) if num_blocks is None else num_blocks
    return self.run_blocks(x, 0, n, ignore_last_attn), (h, w)

  def run_blocks(self, x, start: int, stop: int, ignore_last_attn: bool = False):
    """Blocks [start, stop) on [B, L, D] tokens; MaskCLIP identity attention in the tower's last."""
    last = len(self.resblocks) - 1
    for i in range(start, stop):
      x = self.resblocks[i](x, False, ignore_last_attn and i == last)
    return x

  def project(self, x):
    """ln_post + proj on [..., D] tokens."""
    return self.ln_post(x) @ self.proj.astype(self.dtype)

  def __call__(self, images):
    """The pooled CLIP image embedding (class token, normal attention)."""
    x, _ = self.tokens(images)
    return self.project(x[:, 0])


class TextTransformer(nn.Module):
  """CLIP text tower: causal transformer, ln_final, EOT pooling (argmax of ids), projection."""

  cfg: CLIPConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    c = self.cfg
    x = nn.Embed(
      c.vocab_size,
      c.transformer_width,
      embedding_init=nn.initializers.normal(0.02),
      name="token_embedding",
    )(tokens).astype(self.dtype)
    pe = self.param(
      "positional_embedding", nn.initializers.normal(0.01), (c.context_length, c.transformer_width)
    )
    x = x + pe[: tokens.shape[1]].astype(self.dtype)
    for i in range(c.transformer_layers):
      x = ResidualAttentionBlock(
        c.transformer_width,
        c.transformer_heads,
        self.dtype,
        act=c.hidden_act,
        name=f"resblocks_{i}",
      )(x, True, False)
    x = LayerNorm(self.dtype, name="ln_final")(x)
    # The EOT token has the largest id, so argmax finds it (as the original).
    eot = jnp.argmax(tokens, axis=-1)
    x = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    proj = self.param(
      "text_projection",
      nn.initializers.normal(c.transformer_width**-0.5),
      (c.transformer_width, c.embed_dim),
    )
    return x @ proj.astype(self.dtype)


def compute_padsize(h: int, w: int, patch: int):
  """(left, right, top, bottom) zero padding up to patch multiples, extra on the right/bottom."""
  l = r = t = b = 0
  if w % patch:
    lr = patch - w % patch
    l, r = lr // 2, lr - lr // 2
  if h % patch:
    tb = patch - h % patch
    t, b = tb // 2, tb - tb // 2
  return l, r, t, b


def init_clip_params(cfg: CLIPConfig, rng) -> dict:
  """Random CLIP parameters {'visual': ..., 'text': ...} (shapes only matter for conversion)."""
  kv, kt = jax.random.split(rng)
  r = cfg.image_resolution
  visual = VisionTransformer(cfg).init(kv, jnp.zeros((1, r, r, 3)))["params"]
  text = TextTransformer(cfg).init(kt, jnp.zeros((1, cfg.context_length), jnp.int32))["params"]
  return {"visual": visual, "text": text}


def encode_image(params, cfg: CLIPConfig, images, dtype=jnp.float32):
  return VisionTransformer(cfg, dtype).apply({"params": params["visual"]}, images)


def encode_text(params, cfg: CLIPConfig, tokens, dtype=jnp.float32):
  return TextTransformer(cfg, dtype).apply({"params": params["text"]}, tokens)
