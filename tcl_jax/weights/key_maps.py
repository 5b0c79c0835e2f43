"""The name and layout maps between PyTorch checkpoints (the official TCL, CoDe's authors' code,
OpenAI's CLIP) and tcl_jax's parameter trees, and the model config read off a state dict's shapes
(the original's build_model, plus TCL's masker layout and CoDe's additions). Used by
tcl_jax.convert and the parity tools."""

import re
from typing import Optional

import jax
import numpy as np

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import code as code_lib
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.weights.model_files import ConversionError

# Layout changes torch -> flax, and their inverses (flax -> torch, e.g. to name gradients).
_T, _CONV, _ID = "linear", "conv", "identity"
_BG_IMAGE, _BG_TEXT = "bg_image", "bg_text"  # CoDe's learned backgrounds
TO_FLAX = {
  _T: lambda a: a.T,  # torch Linear [out, in] -> flax kernel [in, out]
  _CONV: lambda a: a.transpose(2, 3, 1, 0),  # [O, I, kh, kw] -> [kh, kw, I, O]
  _ID: lambda a: a,
  _BG_IMAGE: lambda a: a[0].transpose(1, 2, 0),  # learnable_image_bg [1, 3, H, W] -> [H, W, 3]
  _BG_TEXT: lambda a: a[:, 0],  # bg_text [L, 1, W] -> [L, W]
}
TO_TORCH = {
  _T: lambda a: a.T,
  _CONV: lambda a: a.transpose(3, 2, 0, 1),
  _ID: lambda a: a,
  _BG_IMAGE: lambda a: a.transpose(2, 0, 1)[None],
  _BG_TEXT: lambda a: a[:, None],
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
  numpy array}, for the leaves present in `tree`. For a CoDe config, the authors' keys, each CLIP
  leaf under all three of its copies (code_clip_copies)."""
  if isinstance(cfg, code_lib.CoDeConfig):
    key_map = code_key_map(cfg)
    copies = {("clip",) + k: keys for k, (keys, _) in code_clip_copies(cfg.clip).items()}
  else:
    key_map, copies = tcl_key_map(cfg), {}
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = tuple(p.key for p in path)
    tkey, layout = key_map[names]
    arr = np.array(TO_TORCH[layout](np.asarray(leaf)), order="C")
    for k in copies.get(names, (tkey,)):
      out[k] = arr
  return out


# ----------------------------------------------------------------------------------------------
# CoDe (the authors' models/tcl/codecomposition.py, ImageTextCoDecomposition)
# ----------------------------------------------------------------------------------------------

# The authors' model holds the frozen CLIP three times: frozen_clip (sclip's whole CLIP),
# clip_text_encoder (CLIPPrompter: the text tower under prompt_learner.clip_model, and again, bar
# the token embedding, under text_encoder, the same modules) and clip_image_encoder (TCL's layout:
# the visual tower, its ln_post and proj moved into clip_proj). tcl_jax keeps one.
CODE_FROZEN = "frozen_clip."
CODE_PROMPT_CLIP = "clip_text_encoder.prompt_learner.clip_model."
CODE_TEXT_ENCODER = "clip_text_encoder.text_encoder."
CODE_PROMPT_CTX = "clip_text_encoder.prompt_learner.ctx"
CODE_TEXT_DECODER = "text_decoder.transformer.resblocks."
# Each copy's prefix -> the same tensor's OpenAI CLIP key prefix (the exact key, for the proj).
CODE_COPY_PREFIXES = (
  (CODE_FROZEN, ""),
  ("clip_image_encoder.clip_visual.", "visual."),
  ("clip_image_encoder.clip_proj.ln.", "visual.ln_post."),
  ("clip_image_encoder.clip_proj.proj", "visual.proj"),
  (CODE_PROMPT_CLIP, ""),
  (CODE_TEXT_ENCODER, ""),
)
# The authors' TextDecoder (models/tcl/decoders.py): clip.model.Transformer(width=512, layers=2,
# heads=8). Heads are not in the shapes; its width is the CLIP text width.
CODE_TEXT_DECODER_HEADS = 8


def code_clip_copies(cfg: clip_lib.CLIPConfig) -> dict:
  """Flax CLIP path (under params['clip']) -> (the torch keys of its copies in a CoDe state_dict,
  frozen_clip's first; layout), the same layout for every copy."""
  tcl_names = clip_key_map(cfg, "tcl")
  out = {}
  for path, (oai, layout) in clip_key_map(cfg, "openai").items():
    keys = [CODE_FROZEN + oai]
    if path[0] == "visual":
      keys.append(tcl_names[path][0])  # clip_image_encoder.*, as TCL's checkpoint names it
    else:
      keys.append(CODE_PROMPT_CLIP + oai)
      if path[1] != "token_embedding":  # TextEncoder takes all but the token embedding
        keys.append(CODE_TEXT_ENCODER + oai)
    out[path] = (tuple(keys), layout)
  return out


def code_clip_openai_key(key: str) -> Optional[str]:
  """The OpenAI CLIP key of a CoDe CLIP copy's key (frozen_clip.visual.proj -> visual.proj), or
  None for a key of no copy. By prefix alone, so it works before the dims are known."""
  for prefix, oai in CODE_COPY_PREFIXES:
    if key.startswith(prefix):
      rest = key[len(prefix) :]
      if prefix.endswith(".") or not rest:
        return oai + rest
  return None


def code_key_map(cfg: code_lib.CoDeConfig) -> dict:
  """Flax path tuple -> (the authors' CoDe state_dict key, layout), for every CoDe parameter; a
  CLIP leaf maps to its frozen_clip copy (code_clip_copies lists all three)."""
  m = {("clip",) + k: (keys[0], layout) for k, (keys, layout) in code_clip_copies(cfg.clip).items()}
  m.update(masker_key_map(cfg))  # TCL's masker, as the authors keep it; tcli/tclf logit scales
  m[("prompt_ctx",)] = (CODE_PROMPT_CTX, _ID)
  for i in range(cfg.text_decoder_layers):
    m.update(
      _with_prefix(("text_decoder", f"resblocks_{i}"), _block_map(f"{CODE_TEXT_DECODER}{i}."))
    )
  m[("bg_image",)] = ("learnable_image_bg", _BG_IMAGE)
  m[("bg_text",)] = ("bg_text", _BG_TEXT)
  m[("text_mask_w",)] = ("text_mask_w", _ID)
  m[("text_mask_b",)] = ("text_mask_b", _ID)
  m[("hcl_logit_scale",)] = ("hcl_loss.logit_scale", _ID)
  return m


# ----------------------------------------------------------------------------------------------
# Config inference (the original's build_model, plus TCL's masker layout)
# ----------------------------------------------------------------------------------------------


def detect_layout(sd: dict) -> str:
  """'code' (the authors' CoDe), 'tcl' (official TCL) or 'openai' (OpenAI CLIP)."""
  if any(k.startswith(("text_decoder.", "clip_text_encoder.prompt_learner.")) for k in sd):
    if not any(k.startswith("text_decoder.") for k in sd) and "bg_text" not in sd:
      raise ConversionError(
        "this is the authors' ImageDecomposition checkpoint (CoDe without its text decoder: no "
        "text_decoder.*, bg_text); tcl_jax ports ImageTextCoDecomposition (CoDe) only"
      )
    return "code"
  if any(k.startswith("masker.") for k in sd):
    return "tcl"
  if "visual.proj" in sd and "token_embedding.weight" in sd:
    return "openai"
  if "visual.attnpool.positional_embedding" in sd:
    raise ConversionError("this is a ResNet CLIP checkpoint; TCL supports ViT CLIP models only")
  sample = ", ".join(list(sd)[:5])
  raise ConversionError(
    "unrecognised checkpoint layout (neither official TCL, CoDe nor OpenAI ViT CLIP); "
    f"first keys: {sample}"
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
  try:
    return tcl_lib.TCLConfig(clip=clip_cfg, **kw)
  except TypeError as e:  # an override that is no TCL config field
    raise ConversionError(f"not a TCL model setting: {e}") from None


def infer_code_config(sd: dict, clip_cfg, overrides: dict) -> code_lib.CoDeConfig:
  """A CoDe model's config: the masker's dims as TCL's, the prompt's length, the text decoder's
  depth and the image background's size read off the shapes; heads given or the authors' 8."""
  tcl_cfg = infer_tcl_config(sd, clip_cfg, "tcl", {})
  kw = {
    k: getattr(tcl_cfg, k)
    for k in ("ie_freeze", "decoder_n_layers", "decoder_double", "decoder_kernel_size")
  }
  kw["decoder_norm"] = tcl_cfg.decoder_norm
  if CODE_PROMPT_CTX in sd:
    kw["n_ctx"] = _shape(sd, CODE_PROMPT_CTX)[0]
  kw["text_decoder_layers"] = _count_blocks(sd, CODE_TEXT_DECODER)
  if "learnable_image_bg" in sd:
    kw["bg_image_size"] = _shape(sd, "learnable_image_bg")[-1]
  kw.update({k: v for k, v in overrides.items() if v is not None})
  width = clip_cfg.transformer_width
  if "text_decoder_heads" in kw:
    kw["text_decoder_heads"] = _heads(
      "text_decoder_heads", kw["text_decoder_heads"], width, "text decoder"
    )
  elif width % CODE_TEXT_DECODER_HEADS:
    raise ConversionError(
      f"the text decoder is {width} wide (the text tower's width), which the authors' "
      f"{CODE_TEXT_DECODER_HEADS} heads do not divide; pass --text_decoder_heads N "
      "(text_decoder_heads=N in Python)"
    )
  else:
    kw["text_decoder_heads"] = CODE_TEXT_DECODER_HEADS
  try:
    return code_lib.CoDeConfig(clip=clip_cfg, **kw)
  except TypeError as e:  # an override that is no CoDe config field
    raise ConversionError(f"not a CoDe model setting: {e}") from None
