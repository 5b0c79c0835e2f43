"""TCL: the mask generator and the training objective (the original's models/tcl/); mask inference
is in tcl_jax/models/tcl_inference.py.

Parameters are one plain pytree:
  {"clip": {"visual", "text"},                      frozen CLIP towers
   "masker": {"backbone", "decoder", "image_proj", "sim2mask": {"w", "b"}},   trainable
   "tcli_logit_scale": (), "tclf_logit_scale": ()}  trainable
Images are NHWC, normalized with ImageNet mean/std (the original's choice); masks are [B, N, H, W].
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import conv
from tcl_jax.models import losses
from tcl_jax.models import resize
from tcl_jax.models.clip import CLIPConfig

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TCLConfig:
  """The original's `model:` section (configs/tcl.yml) plus the CLIP dimensions."""

  clip: CLIPConfig = CLIPConfig()
  ie_freeze: int = (
    11  # masker backbone = CLIP blocks [ie_freeze:]; features after block ie_freeze-1
  )
  ie_ignore_last_attn: bool = True  # MaskCLIP identity attention in the last block
  decoder_n_layers: int = 2
  decoder_kernel_size: int = 3
  decoder_act: str = "gelu"
  decoder_norm: str = "ln"
  decoder_double: bool = True
  sim2mask_init_w: float = 10.0
  sim2mask_init_b: float = -2.5
  gumbel_tau: float = 1.0
  tcl_w: float = 0.1
  area_w: float = 0.4
  tv_w: float = 1.0
  # Captions per step of the all-pairs loop (losses.all_pairs_terms): memory, not numbers.
  caption_chunk: int = 64

  def __post_init__(self):
    layers = self.clip.vision_layers
    if not 1 <= self.ie_freeze <= layers:
      raise ValueError(f"ie_freeze must be in [1, {layers}] (vision layers), got {self.ie_freeze}")
    if self.decoder_act not in conv.ACTIVATIONS:
      raise ValueError(
        f"decoder_act must be one of {sorted(conv.ACTIVATIONS)}, got {self.decoder_act!r}"
      )
    if self.decoder_norm not in ("ln", "none"):
      raise ValueError(
        f"decoder_norm must be 'ln' or 'none' (batch norms are not ported), "
        f"got {self.decoder_norm!r}"
      )
    if self.decoder_kernel_size % 2 != 1:
      raise ValueError(f"decoder_kernel_size must be odd, got {self.decoder_kernel_size}")
    if self.gumbel_tau <= 0:
      raise ValueError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
    if self.caption_chunk < 1:
      raise ValueError(f"caption_chunk must be >= 1, got {self.caption_chunk}")

  @property
  def patch_size(self) -> int:
    return self.clip.vision_patch_size

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "TCLConfig":
    d = dict(d)
    clip = d.pop("clip")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown TCL config fields: {unknown}")
    return cls(clip=clip if isinstance(clip, CLIPConfig) else CLIPConfig(**clip), **d)

  def replace(self, **kw) -> "TCLConfig":
    return dataclasses.replace(self, **kw)


def tiny_config() -> TCLConfig:
  """The shared fixture's dims: a CLIP small enough for CPU tests and the synthetic default."""
  return TCLConfig(
    clip=CLIPConfig(
      embed_dim=64,
      image_resolution=96,
      vision_layers=4,
      vision_width=128,
      vision_patch_size=16,
      vision_heads=2,
      context_length=77,
      vocab_size=49408,
      transformer_width=64,
      transformer_heads=2,
      transformer_layers=2,
    ),
    ie_freeze=3,
  )


# ----------------------------------------------------------------------------------------------
# Masker modules
# ----------------------------------------------------------------------------------------------


class GDecoder(nn.Module):
  """n_layers ResConv blocks, each upsampling x2."""

  cfg: TCLConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    for i in range(c.decoder_n_layers):
      x = conv.ResConv(
        c.clip.vision_width,
        c.decoder_kernel_size,
        c.decoder_norm,
        c.decoder_act,
        c.decoder_double,
        self.dtype,
        name=f"net_{i}",
      )(x)
    return x


class LNProj(nn.Module):
  """LayerNorm + projection matrix (CLIP's ln_post/proj, copied as the masker's image_proj)."""

  width: int
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = clip_lib.LayerNorm(self.dtype, name="ln")(x)
    proj = self.param("proj", nn.initializers.normal(self.width**-0.5), (self.width, self.out_dim))
    return x @ proj.astype(self.dtype)


class BlockStack(nn.Module):
  """CLIP blocks numbered [start, layers) (names keep the original indices: resblocks_3, ...)."""

  cfg: CLIPConfig
  start: int
  ignore_last_attn: bool
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    block_cls = clip_lib.ResidualAttentionBlock
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2, 3))
    last = self.cfg.vision_layers - 1
    for i in range(self.start, self.cfg.vision_layers):
      x = block_cls(
        self.cfg.vision_width,
        self.cfg.vision_heads,
        self.dtype,
        act=self.cfg.hidden_act,
        name=f"resblocks_{i}",
      )(x, False, self.ignore_last_attn and i == last)
    return x


class Masker(nn.Module):
  """Masker image encoder: trainable copies of the CLIP blocks [ie_freeze:], the GDecoder and the
  image projection, giving [B, 2^n h, 2^n w, embed_dim] from CLIP tokens [B, 1 + h*w, D]."""

  cfg: TCLConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, feat, hw):
    c, vc = self.cfg, self.cfg.clip
    x = BlockStack(vc, c.ie_freeze, c.ie_ignore_last_attn, self.remat, self.dtype, name="backbone")(
      feat.astype(self.dtype)
    )
    # The backbone's own ln_post/proj are Identity/None in the original (moved to image_proj).
    x = x[:, 1:].reshape(x.shape[0], hw[0], hw[1], vc.vision_width)
    x = GDecoder(c, self.dtype, name="decoder")(x)
    return LNProj(vc.vision_width, vc.embed_dim, self.dtype, name="image_proj")(x)


def _module_params(masker_params):
  return {k: v for k, v in masker_params.items() if k != "sim2mask"}


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def masker_from_clip(clip_params, cfg: TCLConfig, rng) -> dict:
  """Masker parameters initialised as the original does from a CLIP: deep copies of the visual
  blocks [ie_freeze:] and of ln_post/proj, a freshly initialised decoder (zero gates), and
  Sim2Mask's (init_w, init_b)."""
  vc = cfg.clip
  g = vc.grid_size
  feat = jnp.zeros((1, g * g + 1, vc.vision_width))
  masker = dict(Masker(cfg).init(rng, feat, (g, g))["params"])
  visual = clip_params["visual"]
  masker["backbone"] = {
    f"resblocks_{i}": visual[f"resblocks_{i}"] for i in range(cfg.ie_freeze, vc.vision_layers)
  }
  masker["image_proj"] = {"ln": visual["ln_post"], "proj": visual["proj"]}
  masker["sim2mask"] = {
    "w": jnp.asarray(cfg.sim2mask_init_w, jnp.float32),
    "b": jnp.asarray(cfg.sim2mask_init_b, jnp.float32),
  }
  return jax.tree.map(jnp.array, masker)  # copies, not aliases of the frozen CLIP


def init_params(cfg: TCLConfig, rng, clip_params: Optional[dict] = None) -> dict:
  """Full TCL parameters: random CLIP (or the given one), masker from it, logit scales 1/0.07."""
  k_clip, k_masker = jax.random.split(rng)
  if clip_params is None:
    clip_params = clip_lib.init_clip_params(cfg.clip, k_clip)
  scale = jnp.asarray(clip_lib.INITIAL_LOGIT_SCALE, jnp.float32)
  return {
    "clip": clip_params,
    "masker": masker_from_clip(clip_params, cfg, k_masker),
    "tcli_logit_scale": scale,
    "tclf_logit_scale": jnp.array(scale),
  }


# ----------------------------------------------------------------------------------------------
# Forward pieces
# ----------------------------------------------------------------------------------------------


def visual_tower(cfg: TCLConfig, dtype=jnp.float32):
  return clip_lib.VisionTransformer(cfg.clip, dtype)


def clip_features(clip_params, cfg: TCLConfig, images, dtype=jnp.float32):
  """Frozen CLIP tokens after block ie_freeze-1 (the masker's input) and the grid size."""
  return visual_tower(cfg, dtype).apply(
    {"params": clip_params["visual"]}, images, num_blocks=cfg.ie_freeze, method="tokens"
  )


def masker_image_emb(masker_params, cfg: TCLConfig, feat, hw, dtype=jnp.float32, remat=False):
  """Spatial image embedding [B, H', W', E] from CLIP features."""
  return Masker(cfg, dtype, remat).apply({"params": _module_params(masker_params)}, feat, hw)


def similarity_map(image_emb, text_emb):
  """Cosine similarity [B, N, H, W] between every pixel of image_emb [B,H,W,C] and text [N, C]."""
  image_emb = losses.l2_normalize(image_emb.astype(jnp.float32))
  text_emb = losses.l2_normalize(text_emb.astype(jnp.float32))
  return jnp.einsum("bhwc,nc->bnhw", image_emb, text_emb)


def sim2mask(sim2mask_params, simmap, *, uniform=None, tau: float = 1.0):
  """Sim2Mask: (hard mask, soft mask). With `uniform` noise U the hard mask is Gumbel-sigmoid
  (logistic noise log(U/(1-U))) thresholded at 0.5 with a straight-through gradient; without it,
  the deterministic mode thresholds the soft mask at 0.5."""
  logits = simmap * sim2mask_params["w"] + sim2mask_params["b"]
  soft = jax.nn.sigmoid(logits)
  if uniform is None:
    return (soft > 0.5).astype(soft.dtype), soft
  y = jax.nn.sigmoid((logits + jnp.log(uniform / (1.0 - uniform))) / tau)
  hard = (y > 0.5).astype(y.dtype)
  return hard - jax.lax.stop_gradient(y) + y, soft


def gumbel_uniform(rng, shape):
  """U(0, 1) noise for Sim2Mask, kept off 0 so the logistic noise stays finite."""
  return jax.random.uniform(rng, shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)


def positive_pair_uniform(rng, shape):
  """The positive pairs' noise [B, H', W']: example i's from fold_in(rng, i), so its values do not
  depend on the batch size, the mesh or the caption chunk."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(shape[0]))
  return jax.vmap(lambda k: gumbel_uniform(k, shape[1:]))(keys)


def batch_sharded(x, replicated=False):
  """x with its leading (batch) axis split over every axis of the mesh in context, as the batch
  is (sharding.data_sharding), or `replicated`; x itself without an auto-sharded mesh. Pins what
  GSPMD's propagation otherwise may choose: with native convolutions it all-gathered the global
  batch's image embeddings [B, H', W', C] for the similarity map, and it gathered the text
  embeddings for the caption chunks piecewise, in groups of 16 and 2 (tcl_jax.tools.scaling).
  Values are unchanged."""
  mesh = jax.sharding.get_abstract_mesh()
  if (
    mesh.empty
    or mesh.size == 1
    or x.shape[0] % mesh.size
    or any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types)
  ):
    return x
  spec = () if replicated else (mesh.axis_names,)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def tcl_loss(
  params,
  cfg: TCLConfig,
  images,
  text_tokens,
  *,
  rng=None,
  uniform=None,
  compute_dtype=jnp.float32,
  remat: bool = False,
):
  """The TCL training objective on a (global) batch. Returns (total_loss, aux).

  images [B, H, W, 3] normalized; text_tokens int [B, L]. Exactly one of `rng` (draws the Gumbel
  noise) and `uniform` (replays given noise: the original's [B, B, H', W'], of which the positive
  pairs' [B, H', W'] diagonal is used, or that diagonal itself) must be given. Frozen CLIP gets no
  gradient; gradients reach the masker through TCL_i via the frozen image tower.
  """
  if (rng is None) == (uniform is None):
    raise ValueError("tcl_loss needs exactly one of rng= or uniform=")
  clip_params = jax.lax.stop_gradient(params["clip"])
  b = images.shape[0]
  if b < 2:
    raise ValueError(f"TCL's contrastive terms need a batch of at least 2, got {b}")

  # Frozen CLIP (no_grad in the original).
  feat, hw = clip_features(clip_params, cfg, images, compute_dtype)
  feat = jax.lax.stop_gradient(feat)
  text_emb = jax.lax.stop_gradient(
    clip_lib.encode_text(clip_params, cfg.clip, text_tokens, compute_dtype)
  ).astype(jnp.float32)

  # Masker: image embedding, then its positive pair's masks. The hard (Gumbel) mask is only used
  # there, so the noise is [B, H', W'], not the original's [B, B, H', W'].
  s2m = params["masker"]["sim2mask"]
  image_emb = masker_image_emb(params["masker"], cfg, feat, hw, compute_dtype, remat)
  image_emb = batch_sharded(image_emb.astype(jnp.float32))
  sim_pos = batch_sharded(
    jnp.einsum(
      "bhwc,bc->bhw", losses.l2_normalize(image_emb), batch_sharded(losses.l2_normalize(text_emb))
    )
  )
  if uniform is None:
    uniform = positive_pair_uniform(rng, sim_pos.shape)
  elif uniform.ndim == 4:
    # The diagonal taken along axis 1 only: with the batch sharded, entry (i, i) is on row i's
    # device (uniform[diag, diag] made GSPMD all-reduce it; tcl_jax.tools.scaling).
    uniform = jnp.take_along_axis(uniform, jnp.arange(b)[:, None, None, None], axis=1)[:, 0]
  pos_mask, soft_pos = sim2mask(s2m, sim_pos, uniform=uniform, tau=cfg.gumbel_tau)

  # Every image with every caption: TCL_f, the negative pairs' area and the masks' TV, reduced
  # caption chunk by caption chunk (memory flat in the global batch).
  cosine, neg_area, tv_mask = losses.all_pairs_terms(
    image_emb,
    batch_sharded(text_emb, replicated=True),  # every caption: one all-gather of [B, E]
    s2m["w"],
    s2m["b"],
    cfg.caption_chunk,
    pin=batch_sharded,
  )
  aux = {}
  aux["area_loss"] = losses.area_loss(soft_pos, 0.4) * cfg.area_w
  aux["neg_area_loss"] = jnp.abs(neg_area) * cfg.area_w
  aux["tclf_loss"] = losses.scaled_symmetric_ce(cosine, params["tclf_logit_scale"]) * cfg.tcl_w
  aux["tv_img_loss"] = losses.tv_loss(image_emb, axes=(1, 2)) * cfg.tv_w
  aux["tv_mask_loss"] = tv_mask * cfg.tv_w

  # TCL_i: frozen CLIP embeds the image under the (nearest-upsampled) hard positive mask.
  up = resize.resize_hw(pos_mask[..., None], images.shape[1:3], "nearest")
  masked_images = (up * images).astype(compute_dtype)
  masked_emb = clip_lib.VisionTransformer(cfg.clip, compute_dtype, remat).apply(
    {"params": clip_params["visual"]}, masked_images
  )
  aux["tcli_loss"] = losses.info_nce(masked_emb, text_emb, params["tcli_logit_scale"]) * cfg.tcl_w

  total = sum(aux[k] for k in LOSS_TERMS)
  aux["soft_pos_mask"] = jax.lax.stop_gradient(soft_pos)
  return total, aux


LOSS_TERMS = ("area_loss", "neg_area_loss", "tclf_loss", "tv_img_loss", "tv_mask_loss", "tcli_loss")
