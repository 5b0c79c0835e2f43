"""Test helper: state_dicts as the CoDe authors' model (github 072jiajia/Image-Text-Co-Decomposition,
models/tcl/codecomposition.py ImageTextCoDecomposition) and OpenAI's CLIP name and shape them, with
random values. Written from the authors' module structure, not from tcl_jax's key maps, so that
the converter is checked against it. Small dims by default (vision 128 wide, 4 blocks; text 64
wide, 2 blocks); the text decoder is as wide as the text tower.

Key order follows nn.Module.state_dict(): a module's own parameters, then its buffers, then its
children in the order they were assigned."""

import collections

import numpy as np


def _block(prefix: str, width: int, rng) -> dict:
  """clip.model.ResidualAttentionBlock."""
  w = width
  shapes = {
    "attn.in_proj_weight": (3 * w, w),
    "attn.in_proj_bias": (3 * w,),
    "attn.out_proj.weight": (w, w),
    "attn.out_proj.bias": (w,),
    "ln_1.weight": (w,),
    "ln_1.bias": (w,),
    "mlp.c_fc.weight": (4 * w, w),
    "mlp.c_fc.bias": (4 * w,),
    "mlp.c_proj.weight": (w, 4 * w),
    "mlp.c_proj.bias": (w,),
    "ln_2.weight": (w,),
    "ln_2.bias": (w,),
  }
  return {prefix + k: _rand(rng, s) for k, s in shapes.items()}


def _rand(rng, shape):
  return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def _ln(prefix: str, width: int, rng) -> dict:
  return {prefix + "weight": 1 + _rand(rng, (width,)), prefix + "bias": _rand(rng, (width,))}


def openai_clip(
  rng,
  *,
  vision_width=128,
  vision_layers=4,
  patch=16,
  grid=4,
  text_width=64,
  text_layers=2,
  embed_dim=64,
  vocab=49408,
  context=77,
) -> collections.OrderedDict:
  """OpenAI CLIP's state_dict (clip.model.CLIP, ViT): what ViT-B-16.pt holds, small."""
  sd = collections.OrderedDict()
  sd["positional_embedding"] = _rand(rng, (context, text_width))
  sd["text_projection"] = _rand(rng, (text_width, embed_dim))
  sd["logit_scale"] = np.array(np.log(100.0), np.float32)
  sd["visual.class_embedding"] = _rand(rng, (vision_width,))
  sd["visual.positional_embedding"] = _rand(rng, (grid * grid + 1, vision_width))
  sd["visual.proj"] = _rand(rng, (vision_width, embed_dim))
  sd["visual.conv1.weight"] = _rand(rng, (vision_width, 3, patch, patch))
  sd.update(_ln("visual.ln_pre.", vision_width, rng))
  for i in range(vision_layers):
    sd.update(_block(f"visual.transformer.resblocks.{i}.", vision_width, rng))
  sd.update(_ln("visual.ln_post.", vision_width, rng))
  for i in range(text_layers):
    sd.update(_block(f"transformer.resblocks.{i}.", text_width, rng))
  sd["token_embedding.weight"] = _rand(rng, (vocab, text_width))
  sd.update(_ln("ln_final.", text_width, rng))
  return sd


def _text_tower(clip: dict, *, token_embedding: bool) -> dict:
  """The text tower's keys of `clip` in a CLIP-without-visual's order (params, then children)."""
  out = {k: clip[k] for k in ("positional_embedding", "text_projection")}
  out.update({k: v for k, v in clip.items() if k.startswith("transformer.")})
  if token_embedding:
    out["token_embedding.weight"] = clip["token_embedding.weight"]
  out.update({k: clip[k] for k in ("ln_final.weight", "ln_final.bias")})
  return out


def code_state_dict(
  rng,
  clip: dict,
  *,
  ie_freeze=3,
  decoder_layers=2,
  n_ctx=16,
  text_decoder_layers=2,
  bg_size=224,
  copies=True,
) -> collections.OrderedDict:
  """ImageTextCoDecomposition.state_dict() with `clip` (openai_clip's) as its frozen CLIP, learned
  tensors random. `copies=False`: without any of the CLIP's three copies (the trained weights
  only)."""
  vw = clip["visual.conv1.weight"].shape[0]
  tw = clip["ln_final.weight"].shape[0]
  embed = clip["visual.proj"].shape[1]
  vision_layers = len({k.split(".")[3] for k in clip if k.startswith("visual.transformer.")})
  sd = collections.OrderedDict()
  # ImageDecomposition's and ImageTextCoDecomposition's own parameters come first.
  sd["learnable_image_bg"] = _rand(rng, (1, 3, bg_size, bg_size))
  sd["text_mask_w"] = np.array(10.0 + rng.standard_normal(), np.float32)
  sd["text_mask_b"] = np.array(rng.standard_normal(), np.float32)
  sd["bg_text"] = _rand(rng, (77, 1, tw))
  for name, n in (("aff_x", 8), ("aff_m", 8), ("aff_std", 9)):  # PAMR's kernels: buffers
    sd[f"pamr.{name}.kernel"] = _rand(rng, (n, 1, 3, 3))
  if copies:
    # frozen_clip: sclip's whole CLIP.
    sd.update({"frozen_clip." + k: v for k, v in clip.items()})
  # clip_text_encoder: CLIPPrompter(prompt_learner(ctx, token_prefix, clip_model), text_encoder)
  sd["clip_text_encoder.prompt_learner.ctx"] = _rand(rng, (n_ctx, tw))
  sot = clip["token_embedding.weight"][min(49406, len(clip["token_embedding.weight"]) - 1)]
  sd["clip_text_encoder.prompt_learner.token_prefix"] = sot[None, None].copy()
  if copies:
    pre = "clip_text_encoder.prompt_learner.clip_model."
    sd.update({pre + k: v for k, v in _text_tower(clip, token_embedding=True).items()})
    pre = "clip_text_encoder.text_encoder."
    sd.update({pre + k: v for k, v in _text_tower(clip, token_embedding=False).items()})
    # clip_image_encoder: clip_proj (ln_post, proj moved out of the tower), then clip_visual.
    sd["clip_image_encoder.clip_proj.proj"] = clip["visual.proj"]
    sd["clip_image_encoder.clip_proj.ln.weight"] = clip["visual.ln_post.weight"]
    sd["clip_image_encoder.clip_proj.ln.bias"] = clip["visual.ln_post.bias"]
    for k, v in clip.items():
      if k.startswith("visual.") and not k.startswith(("visual.ln_post.", "visual.proj")):
        sd["clip_image_encoder.clip_visual." + k[len("visual.") :]] = v
  # masker: MaskerBackbone keeps the CLIP's block numbers (nn.Sequential slicing keeps keys).
  enc = "masker.image_encoder."
  for i in range(ie_freeze, vision_layers):
    sd.update(_block(f"{enc}backbone.transformer.resblocks.{i}.", vw, rng))
  for j in range(decoder_layers):  # GDecoder(double=False): one ConvBlock per ResConv
    t = f"{enc}decoder.decoder.net.{j}.conv."
    sd.update(_ln(t + "norm.", vw, rng))
    sd[t + "conv.weight"] = _rand(rng, (vw, vw, 3, 3))
    sd[t + "conv.bias"] = _rand(rng, (vw,))
    sd[t + "gate.gate"] = np.array(rng.standard_normal(), np.float32)
  sd[f"{enc}decoder.image_proj.proj"] = _rand(rng, (vw, embed))
  sd.update(_ln(f"{enc}decoder.image_proj.ln.", vw, rng))
  sd["masker.sim2mask.w"] = np.array(10.0 + rng.standard_normal(), np.float32)
  sd["masker.sim2mask.b"] = np.array(-2.5 + rng.standard_normal(), np.float32)
  sd["tcli_loss.logit_scale"] = np.array(2.5 + rng.standard_normal(), np.float32)
  sd["tclf_loss.logit_scale"] = np.array(2.5 + rng.standard_normal(), np.float32)
  # TextDecoder: clip.model.Transformer(width, layers, heads=8).
  for i in range(text_decoder_layers):
    sd.update(_block(f"text_decoder.transformer.resblocks.{i}.", tw, rng))
  sd["hcl_loss.logit_scale"] = np.array(2.5 + rng.standard_normal(), np.float32)
  return sd
