"""The name and layout maps between PyTorch checkpoints (the official TCL, OpenAI's CLIP) and
tcl_jax's parameter tree, and the model config read off a state dict's shapes (the original's
build_model, plus TCL's masker layout). Used by tcl_jax.convert and the parity tools."""

import re
from typing import Optional

import jax
import numpy as np

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.weights.model_files import ConversionError

# Layout changes torch -> flax, and their inverses (flax -> torch, e.g. to name gradients).
_T, _CONV, _ID = "linear", "conv", "identity"
TO_FLAX = {
  _T: lambda a: a.T,  # torch Linear [out, in] -> flax kernel [in, out]
  _CONV: lambda a: a.transpose(2, 3, 1, 0),  # [O, I, kh, kw] -> [kh, kw, I, O]
  _ID: lambda a: a,
}
TO_TORCH = {
  _T: lambda a: a.T,
  _CONV: lambda a: a.transpose(3, 2, 0, 1),
  _ID: lambda a: a,
}


# ----------------------------------------------------------------------------------------------
# Key maps: flax path (tuple) -> (torch key, transform)
# ----------------------------------------------------------------------------------------------


def _block_map(prefix: str):
  return {
    ("ln_1", "scale"): (prefix + "ln_1.weight", _ID),
    ("ln_1", "bias"): (prefix + "ln_1.bias", _ID),
    ("attn", "in_proj", "kernel"): (prefix + "attn.in_proj_weight", _T),
    ("attn", "in_proj", "bias"): (prefix + "attn.in_proj_bias", _ID),
    ("attn", "out_proj", "kernel"): (prefix + "attn.out_proj.weight", _T),
    ("attn", "out_proj", "bias"): (prefix + "attn.out_proj.bias", _ID),
    ("ln_2", "scale"): (prefix + "ln_2.weight", _ID),
    ("ln_2", "bias"): (prefix + "ln_2.bias", _ID),
    ("c_fc", "kernel"): (prefix + "mlp.c_fc.weight", _T),
    ("c_fc", "bias"): (prefix + "mlp.c_fc.bias", _ID),
    ("c_proj", "kernel"): (prefix + "mlp.c_proj.weight", _T),
    ("c_proj", "bias"): (prefix + "mlp.c_proj.bias", _ID),
  }


def _ln(flax_prefix, torch_prefix):
  return {
    flax_prefix + ("scale",): (torch_prefix + "weight", _ID),
    flax_prefix + ("bias",): (torch_prefix + "bias", _ID),
  }


def _with_prefix(flax_prefix, m):
  return {flax_prefix + k: v for k, v in m.items()}


def clip_key_map(cfg: clip_lib.CLIPConfig, layout: str) -> dict:
  """Flax path -> torch key for the CLIP towers, in the 'openai' or 'tcl' layout."""
  if layout == "openai":
    vis, vis_proj_ln, vis_proj, txt = "visual.", "visual.ln_post.", "visual.proj", ""
  else:
    vis = "clip_image_encoder.clip_visual."
    vis_proj_ln = "clip_image_encoder.clip_proj.ln."
    vis_proj = "clip_image_encoder.clip_proj.proj"
    txt = "clip_text_encoder."
  m = {
    ("visual", "conv1", "kernel"): (vis + "conv1.weight", _CONV),
    ("visual", "class_embedding"): (vis + "class_embedding", _ID),
    ("visual", "positional_embedding"): (vis + "positional_embedding", _ID),
    ("visual", "proj"): (vis_proj, _ID),
    ("text", "token_embedding", "embedding"): (txt + "token_embedding.weight", _ID),
    ("text", "positional_embedding"): (txt + "positional_embedding", _ID),
    ("text", "text_projection"): (txt + "text_projection", _ID),
  }
  m.update(_ln(("visual", "ln_pre"), vis + "ln_pre."))
  m.update(_ln(("visual", "ln_post"), vis_proj_ln))
  m.update(_ln(("text", "ln_final"), txt + "ln_final."))
  for i in range(cfg.vision_layers):
    m.update(
      _with_prefix(("visual", f"resblocks_{i}"), _block_map(f"{vis}transformer.resblocks.{i}."))
    )
  for i in range(cfg.transformer_layers):
    m.update(
      _with_prefix(("text", f"resblocks_{i}"), _block_map(f"{txt}transformer.resblocks.{i}."))
    )
  return m


def masker_key_map(cfg: tcl_lib.TCLConfig) -> dict:
  """Flax path (under params['masker'], plus the logit scales) -> torch key, official layout."""
  enc = "masker.image_encoder."
  m = {}
  for i in range(cfg.ie_freeze, cfg.clip.vision_layers):
    m.update(
      _with_prefix(
        ("masker", "backbone", f"resblocks_{i}"),
        _block_map(f"{enc}backbone.transformer.resblocks.{i}."),
      )
    )
  convs = ("conv", "conv2") if cfg.decoder_double else ("conv",)
  for j in range(cfg.decoder_n_layers):
    for c in convs:
      t = f"{enc}decoder.decoder.net.{j}.{c}."
      f = ("masker", "decoder", f"net_{j}", c)
      if cfg.decoder_norm == "ln":
        m.update(_ln(f + ("norm",), t + "norm."))
      m[f + ("conv", "kernel")] = (t + "conv.weight", _CONV)
      m[f + ("conv", "bias")] = (t + "conv.bias", _ID)
      m[f + ("gate",)] = (t + "gate.gate", _ID)
  m.update(_ln(("masker", "image_proj", "ln"), enc + "decoder.image_proj.ln."))
  m[("masker", "image_proj", "proj")] = (enc + "decoder.image_proj.proj", _ID)
  m[("masker", "sim2mask", "w")] = ("masker.sim2mask.w", _ID)
  m[("masker", "sim2mask", "b")] = ("masker.sim2mask.b", _ID)
  m[("tcli_logit_scale",)] = ("tcli_loss.logit_scale", _ID)
  m[("tclf_logit_scale",)] = ("tclf_loss.logit_scale", _ID)
  return m


def tcl_key_map(cfg: tcl_lib.TCLConfig) -> dict:
  """Flax path tuple -> (official TCL state_dict key, layout), for every TCL parameter."""
  m = {("clip",) + k: v for k, v in clip_key_map(cfg.clip, "tcl").items()}
  m.update(masker_key_map(cfg))
  return m


def to_torch_state_dict(cfg: tcl_lib.TCLConfig, tree) -> dict:
  """A params-shaped tree (parameters or their gradients) -> {official TCL key: torch-layout
  numpy array}, for the leaves present in `tree`."""
  key_map = tcl_key_map(cfg)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    tkey, layout = key_map[tuple(p.key for p in path)]
    out[tkey] = np.array(TO_TORCH[layout](np.asarray(leaf)), order="C")
  return out


# ----------------------------------------------------------------------------------------------
# Config inference (the original's build_model, plus TCL's masker layout)
# ----------------------------------------------------------------------------------------------


def detect_layout(sd: dict) -> str:
  if any(k.startswith("masker.") for k in sd):
    return "tcl"
  if "visual.proj" in sd and "token_embedding.weight" in sd:
    return "openai"
  if "visual.attnpool.positional_embedding" in sd:
    raise ConversionError("this is a ResNet CLIP checkpoint; TCL supports ViT CLIP models only")
  sample = ", ".join(list(sd)[:5])
  raise ConversionError(
    f"unrecognised checkpoint layout (neither official TCL nor OpenAI ViT CLIP); first keys: {sample}"
  )


def _count_blocks(sd, prefix):
  pat = re.compile(re.escape(prefix) + r"(\d+)\.attn\.in_proj_weight$")
  return len({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def _shape(sd, key):
  if key not in sd:
    raise ConversionError(f"checkpoint lacks {key!r}, needed to infer the model dims")
  return tuple(sd[key].shape)


def infer_clip_config(
  sd: dict, layout: str, *, vision_heads=None, text_heads=None, hidden_act=None
):
  vis = "visual." if layout == "openai" else "clip_image_encoder.clip_visual."
  txt = "" if layout == "openai" else "clip_text_encoder."
  conv = _shape(sd, vis + "conv1.weight")
  width, patch = conv[0], conv[-1]
  grid = round((_shape(sd, vis + "positional_embedding")[0] - 1) ** 0.5)
  proj_key = "visual.proj" if layout == "openai" else "clip_image_encoder.clip_proj.proj"
  _shape(sd, proj_key)
  tw = _shape(sd, txt + "ln_final.weight")[0]
  return clip_lib.CLIPConfig(
    embed_dim=_shape(sd, txt + "text_projection")[1],
    image_resolution=patch * grid,
    vision_layers=_count_blocks(sd, vis + "transformer.resblocks."),
    vision_width=width,
    vision_patch_size=patch,
    vision_heads=_heads("vision_heads", vision_heads, width, "vision"),
    context_length=_shape(sd, txt + "positional_embedding")[0],
    vocab_size=_shape(sd, txt + "token_embedding.weight")[0],
    transformer_width=tw,
    transformer_heads=_heads("text_heads", text_heads, tw, "text"),
    transformer_layers=_count_blocks(sd, txt + "transformer.resblocks."),
    # Not in the shapes: a transformers config states it; OpenAI's files are quick_gelu.
    hidden_act=hidden_act or "quick_gelu",
  )


def _heads(name: str, given: Optional[int], width: int, tower: str) -> int:
  """The attention heads of a tower: `given`, else width // 64 as the original's build_model."""
  if given is None:
    if width < 64:
      raise ConversionError(
        f"the {tower} tower's width {width} is under 64, so its heads cannot be "
        f"assumed as width // 64; pass --{name} N ({name}=N in Python)"
      )
    return width // 64
  if given < 1 or width % given:
    raise ConversionError(
      f"--{name} {given} does not divide the {tower} tower's width {width}; "
      f"give the model's own head count, a divisor of {width}"
    )
  return given


def infer_tcl_config(sd: dict, clip_cfg, layout: str, overrides: dict) -> tcl_lib.TCLConfig:
  kw = {}
  if layout == "tcl":
    enc = "masker.image_encoder."
    idx = sorted(
      {
        int(m.group(1))
        for k in sd
        for m in [re.match(re.escape(enc) + r"backbone\.transformer\.resblocks\.(\d+)\.", k)]
        if m
      }
    )
    kw["ie_freeze"] = idx[0] if idx else clip_cfg.vision_layers
    dec = enc + "decoder.decoder.net."
    layers = {int(m.group(1)) for k in sd for m in [re.match(re.escape(dec) + r"(\d+)\.", k)] if m}
    kw["decoder_n_layers"] = len(layers)
    kw["decoder_double"] = f"{dec}0.conv2.conv.weight" in sd
    if f"{dec}0.conv.conv.weight" in sd:
      kw["decoder_kernel_size"] = sd[f"{dec}0.conv.conv.weight"].shape[-1]
    kw["decoder_norm"] = "ln" if f"{dec}0.conv.norm.weight" in sd else "none"
  else:
    # The paper's choice for ViT-B/16 is ie_freeze 11 = the last block trains as the masker.
    kw["ie_freeze"] = clip_cfg.vision_layers - 1
  kw.update({k: v for k, v in overrides.items() if v is not None})
  return tcl_lib.TCLConfig(clip=clip_cfg, **kw)
