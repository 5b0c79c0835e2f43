"""Convert PyTorch checkpoints (official TCL, OpenAI CLIP) to tcl_jax parameters, without torch.

  python -m tcl_jax.convert SRC [--clip ViT-B-16.pt] --output DIR [--ie_freeze N] [--text_heads N]
      [--vision_heads N]

Detects (a) the official TCL layout (`{"model": state_dict}` with `masker.*` and, in a full file,
`clip_text_encoder.*`, `clip_image_encoder.*`, `tcl[if]_loss.logit_scale`; the original's training
checkpoints `checkpoint.pth` / `ckpt_*.pth` hold it under "model" too), (b) OpenAI CLIP (a
TorchScript archive like `ViT-B-16.pt`, or a plain state_dict). The released `tcl.pth` holds only
the learned weights: `--clip` supplies the frozen CLIP towers and the model dims from OpenAI's file,
and every key the TCL file holds overrides them and is checked. The model dims are read off tensor
shapes as the original's `build_model` does (heads = width // 64 unless overridden). A CLIP-only
source gets a masker initialised from the CLIP as the original does. The output directory holds
`config.json` and an orbax checkpoint of the parameters under `params/`.
"""

import argparse
import json
import os
import re
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax import torch_pickle
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import tcl as tcl_lib

# Buffers without learned state that the official checkpoint carries.
SKIPPED_PREFIXES = ("pamr.",)
# Non-parameter entries some OpenAI checkpoints carry (the original's build_model deletes them).
SKIPPED_KEYS = ("input_resolution", "context_length", "vocab_size")
# What the original's loader lets a TCL checkpoint lack (utils/checkpoint.py's whitelist): the
# frozen CLIP towers, built from OpenAI's file instead, and the two loss temperatures.
CLIP_PREFIXES = ("clip_text_encoder.", "clip_image_encoder.")
LOSS_SCALE_KEYS = ("tcli_loss.logit_scale", "tclf_loss.logit_scale")
# InfoNCE / ExtendedInfoNCE start at logit_scale = log(1 / T_init), T_init 0.07 (models/tcl/mi.py).
INITIAL_LOGIT_SCALE = np.float32(clip_lib.INITIAL_LOGIT_SCALE)
NO_CLIP = ("this TCL checkpoint has no CLIP towers (clip_text_encoder.*, clip_image_encoder.*), "
           "like the official tcl.pth: pass OpenAI's ViT-B/16 file with --clip ViT-B-16.pt "
           "(clip= in Python)")

# Layout changes torch -> flax, and their inverses (flax -> torch, e.g. to name gradients).
_T, _CONV, _ID = "linear", "conv", "identity"
_TO_FLAX = {
    _T: lambda a: a.T,  # torch Linear [out, in] -> flax kernel [in, out]
    _CONV: lambda a: a.transpose(2, 3, 1, 0),  # [O, I, kh, kw] -> [kh, kw, I, O]
    _ID: lambda a: a,
}
_TO_TORCH = {
    _T: lambda a: a.T,
    _CONV: lambda a: a.transpose(3, 2, 0, 1),
    _ID: lambda a: a,
}


class ConversionError(ValueError):
  """A checkpoint that does not fit the model; the one-line message lists the problems."""


def _listing(problems, limit=12):
  more = f"; ... and {len(problems) - limit} more" if len(problems) > limit else ""
  return "; ".join(problems[:limit]) + more


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
  return {flax_prefix + ("scale",): (torch_prefix + "weight", _ID),
          flax_prefix + ("bias",): (torch_prefix + "bias", _ID)}


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
    m.update(_with_prefix(("visual", f"resblocks_{i}"),
                          _block_map(f"{vis}transformer.resblocks.{i}.")))
  for i in range(cfg.transformer_layers):
    m.update(_with_prefix(("text", f"resblocks_{i}"),
                          _block_map(f"{txt}transformer.resblocks.{i}.")))
  return m


def masker_key_map(cfg: tcl_lib.TCLConfig) -> dict:
  """Flax path (under params['masker'], plus the logit scales) -> torch key, official layout."""
  enc = "masker.image_encoder."
  m = {}
  for i in range(cfg.ie_freeze, cfg.clip.vision_layers):
    m.update(_with_prefix(("masker", "backbone", f"resblocks_{i}"),
                          _block_map(f"{enc}backbone.transformer.resblocks.{i}.")))
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
    out[tkey] = np.array(_TO_TORCH[layout](np.asarray(leaf)), order="C")
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
      f"unrecognised checkpoint layout (neither official TCL nor OpenAI ViT CLIP); first keys: {sample}")


def _count_blocks(sd, prefix):
  pat = re.compile(re.escape(prefix) + r"(\d+)\.attn\.in_proj_weight$")
  return len({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def _shape(sd, key):
  if key not in sd:
    raise ConversionError(f"checkpoint lacks {key!r}, needed to infer the model dims")
  return tuple(sd[key].shape)


def infer_clip_config(sd: dict, layout: str, *, vision_heads=None, text_heads=None):
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
      vision_heads=vision_heads or width // 64,
      context_length=_shape(sd, txt + "positional_embedding")[0],
      vocab_size=_shape(sd, txt + "token_embedding.weight")[0],
      transformer_width=tw,
      transformer_heads=text_heads or tw // 64,
      transformer_layers=_count_blocks(sd, txt + "transformer.resblocks."),
  )


def infer_tcl_config(sd: dict, clip_cfg, layout: str, overrides: dict) -> tcl_lib.TCLConfig:
  kw = {}
  if layout == "tcl":
    enc = "masker.image_encoder."
    idx = sorted({int(m.group(1)) for k in sd
                  for m in [re.match(re.escape(enc) + r"backbone\.transformer\.resblocks\.(\d+)\.", k)] if m})
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


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------

def _fill(target_shapes, key_map: dict, sd: dict, used: set, problems: list):
  """Build a params tree shaped like target_shapes from sd through key_map."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target_shapes)[0]:
    names = tuple(p.key for p in path)
    if names not in key_map:
      problems.append(f"no torch key known for parameter {'/'.join(names)}")
      continue
    tkey, fn = key_map[names]
    if tkey not in sd:
      problems.append(f"missing key {tkey}")
      continue
    used.add(tkey)
    arr = np.array(_TO_FLAX[fn](np.asarray(sd[tkey], np.float32)), order="C")
    if arr.shape != tuple(leaf.shape):
      problems.append(f"shape mismatch for {tkey}: checkpoint {tuple(sd[tkey].shape)}, "
                      f"model expects {tuple(leaf.shape)} (after layout transpose)")
      continue
    flat[names] = arr
  return flat


def _unflatten(flat: dict) -> dict:
  tree = {}
  for names, arr in flat.items():
    d = tree
    for n in names[:-1]:
      d = d.setdefault(n, {})
    d[names[-1]] = jnp.asarray(arr)
  return tree


def _clip_in_tcl_layout(clip_sd: dict, clip_cfg) -> dict:
  """OpenAI CLIP keys -> the TCL checkpoint's names for the same tensors. Keys with no TCL name
  stay (marked) so that the conversion lists them as unexpected."""
  tcl_names = clip_key_map(clip_cfg, "tcl")
  rename = {oai: tcl_names[path][0] for path, (oai, _) in clip_key_map(clip_cfg, "openai").items()}
  out = {}
  for k, v in clip_sd.items():
    if k in rename:
      out[rename[k]] = v
    elif k not in SKIPPED_KEYS and k != "logit_scale":
      out[f"{k} (in the CLIP file)"] = v
  return out


def convert_state_dict(sd: dict, *, clip: Optional[dict] = None, ie_freeze: Optional[int] = None,
                       vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
                       seed: int = 0, **tcl_overrides):
  """state_dict (name -> numpy) -> (TCLConfig, params). Fails listing every missing, unexpected
  or mis-shaped key.

  `clip`: an OpenAI CLIP state_dict that supplies the CLIP towers and the model dims for a TCL
  state_dict that lacks them (the official tcl.pth); the TCL state_dict's own keys win.
  """
  layout = detect_layout(sd)
  if clip is not None:
    if layout != "tcl":
      raise ConversionError("--clip (clip=) completes a TCL checkpoint; this source is a CLIP")
    try:
      clip_layout = detect_layout(clip)
    except ConversionError as e:
      raise ConversionError(f"the --clip file: {e}") from None
    if clip_layout != "openai":
      raise ConversionError("the --clip file must be OpenAI's CLIP (e.g. ViT-B-16.pt), "
                            "not a TCL checkpoint")
    clip_cfg = infer_clip_config(clip, "openai", vision_heads=vision_heads, text_heads=text_heads)
    sd = {**_clip_in_tcl_layout(clip, clip_cfg), **sd}  # the TCL file's own keys win
  else:
    if layout == "tcl" and not all(any(k.startswith(p) for k in sd) for p in CLIP_PREFIXES):
      raise ConversionError(NO_CLIP)
    clip_cfg = infer_clip_config(sd, layout, vision_heads=vision_heads, text_heads=text_heads)
  notes = []
  if layout == "tcl":
    absent = [k for k in LOSS_SCALE_KEYS if k not in sd]
    if absent:
      sd = dict(sd, **{k: INITIAL_LOGIT_SCALE for k in absent})
      notes.append(f"note: the checkpoint has no {', '.join(absent)}; using the original's initial "
                   f"value log(1/0.07) = {INITIAL_LOGIT_SCALE:.4f} (it matters only for training)")
  cfg = infer_tcl_config(sd, clip_cfg, layout, dict(tcl_overrides, ie_freeze=ie_freeze))
  shapes = jax.eval_shape(lambda: tcl_lib.init_params(cfg, jax.random.key(0)))
  used, problems = set(), []
  if layout == "tcl":
    flat = _fill(shapes, tcl_key_map(cfg), sd, used, problems)
  else:
    key_map = {("clip",) + k: v for k, v in clip_key_map(clip_cfg, "openai").items()}
    flat = _fill({"clip": shapes["clip"]}, key_map, sd, used, problems)
  ignored = {k for k in sd if k.startswith(SKIPPED_PREFIXES) or k in SKIPPED_KEYS}
  if layout == "openai":
    ignored.add("logit_scale")  # CLIP's own contrastive temperature is not used by TCL
  unexpected = sorted(set(sd) - used - ignored)
  problems += [f"unexpected key {k}" for k in unexpected]
  if problems:
    raise ConversionError(f"cannot convert this {layout} checkpoint to {_dims(cfg)}: "
                          f"{len(problems)} problem(s): {_listing(problems)}")
  for note in notes:
    print(note, file=sys.stderr)
  params = _unflatten(flat)
  if layout == "openai":
    params = tcl_lib.init_params(cfg, jax.random.key(seed), clip_params=params["clip"])
  return cfg, params


def _dims(cfg):
  c = cfg.clip
  return (f"ViT (width {c.vision_width}, {c.vision_layers} layers, patch {c.vision_patch_size}), "
          f"text (width {c.transformer_width}, {c.transformer_layers} layers), ie_freeze {cfg.ie_freeze}")


def load_torch(path, clip=None, **overrides):
  """Read a PyTorch checkpoint file (no torch needed, no pickled code run) -> (TCLConfig, params).

  `clip`: OpenAI's CLIP file (e.g. ViT-B-16.pt), needed when `path` is a TCL file without the CLIP
  towers such as the official tcl.pth.
  """
  sd = torch_pickle.load_state_dict(path)
  clip_sd = None if clip is None else torch_pickle.load_state_dict(clip)
  return convert_state_dict(sd, clip=clip_sd, **overrides)


# ----------------------------------------------------------------------------------------------
# tcl_jax checkpoint directories (config.json + orbax params)
# ----------------------------------------------------------------------------------------------

def save_checkpoint(directory, cfg: tcl_lib.TCLConfig, params) -> None:
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), params, force=True)
  tmp = os.path.join(directory, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(cfg.to_dict(), f, indent=1)
  os.replace(tmp, os.path.join(directory, "config.json"))


def load_checkpoint(directory):
  """A directory written by `save_checkpoint` (or `python -m tcl_jax.convert`) -> (cfg, params)."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{directory} is not a tcl_jax checkpoint (no config.json); convert a "
                            f"PyTorch file first: python -m tcl_jax.convert SRC --output DIR")
  with open(cfg_path) as f:
    cfg = tcl_lib.TCLConfig.from_dict(json.load(f))
  target = jax.eval_shape(lambda: tcl_lib.init_params(cfg, jax.random.key(0)))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(directory, "params"), target)
  return cfg, params


def load_training_checkpoint(workdir, step: Optional[int] = None):
  """Parameters of a training run: `<workdir>/config.json` (its `model` section) and the orbax
  train state at `step` (default: the latest) -> (cfg, params)."""
  import orbax.checkpoint as ocp
  workdir = os.path.abspath(workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    model = json.load(f).get("model")
  if not model:
    raise ValueError(f"{workdir}/config.json has no 'model' section")
  cfg = tcl_lib.TCLConfig.from_dict(model)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(ckpt_dir, item_names=("state", "input")) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint yet")
    # Restore only the parameters (not the optimizer state) into the model's shapes.
    target = jax.eval_shape(lambda: tcl_lib.init_params(cfg, jax.random.key(0)))
    on_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=on_device),
                                      {"params": target}),
            partial_restore=True)))
  return cfg, restored["state"]["params"]


def load_any(path, **overrides):
  """A converted tcl_jax checkpoint directory, a training workdir (latest step), or a PyTorch
  file converted on the fly (`clip=` OpenAI's file for the official tcl.pth) -> (cfg, params)."""
  if os.path.isdir(path):
    if os.path.isdir(os.path.join(path, "checkpoints")):
      return load_training_checkpoint(path)
    return load_checkpoint(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  return load_torch(path, **overrides)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m tcl_jax.convert", description=__doc__.split("\n")[0])
  ap.add_argument("src", help="official tcl.pth, a TCL training checkpoint, OpenAI CLIP .pt "
                              "(TorchScript) or a state_dict file")
  ap.add_argument("--output", required=True, help="output directory (config.json + params/)")
  ap.add_argument("--clip", default=None,
                  help="OpenAI's CLIP file (ViT-B-16.pt): the CLIP towers and model dims for a TCL "
                       "file without them (the official tcl.pth); the TCL file's own keys win")
  ap.add_argument("--ie_freeze", type=int, default=None,
                  help="for CLIP-only sources: first CLIP block copied into the masker "
                       "(default: vision_layers - 1, the paper's 11 for ViT-B/16)")
  ap.add_argument("--vision_heads", type=int, default=None, help="override width // 64")
  ap.add_argument("--text_heads", type=int, default=None, help="override width // 64")
  ap.add_argument("--seed", type=int, default=0, help="decoder init seed for CLIP-only sources")
  args = ap.parse_args(argv)
  try:
    cfg, params = load_torch(args.src, clip=args.clip, ie_freeze=args.ie_freeze,
                             vision_heads=args.vision_heads, text_heads=args.text_heads,
                             seed=args.seed)
  except (ValueError, OSError) as e:  # a wrong path or a file that does not fit: usage error
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    save_checkpoint(args.output, cfg, params)
  except (ValueError, OSError) as e:
    print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
    return 1
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"converted {args.src} -> {args.output}: {_dims(cfg)}, {n / 1e6:.1f}M parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())
