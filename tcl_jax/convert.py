"""Convert checkpoints (official TCL, OpenAI CLIP, transformers CLIP) to tcl_jax, without torch.

  python -m tcl_jax.convert SRC [--clip CLIP] --output DIR [--ie_freeze N] [--text_heads N]
      [--vision_heads N] [--overwrite]

SRC (and --clip) may be a PyTorch file, a transformers CLIP directory (config.json +
model.safetensors, as `CLIPModel.save_pretrained` writes it) or a Hugging Face Hub id
(`openai/clip-vit-base-patch16`, fetched into the Hub cache; with HF_HUB_OFFLINE=1 from the cache
only). Detects (a) the official TCL layout (`{"model": state_dict}` with `masker.*` and, in a full
file, `clip_text_encoder.*`, `clip_image_encoder.*`, `tcl[if]_loss.logit_scale`; the original's
training checkpoints `checkpoint.pth` / `ckpt_*.pth` hold it under "model" too), (b) OpenAI CLIP
(a TorchScript archive like `ViT-B-16.pt`, or a plain state_dict), (c) transformers' CLIPModel
(tcl_jax/hf_clip.py). The released `tcl.pth` holds only the learned weights: `--clip` supplies the
frozen CLIP towers and the model dims, and every key the TCL file holds overrides them and is
checked. The model dims are read off tensor shapes as the original's `build_model` does; attention
heads are not in the shapes: a transformers config states them, else they are width // 64 unless
overridden. A CLIP-only source gets a masker initialised from the CLIP as the original does. The
output directory holds `config.json` and an orbax checkpoint of the parameters under `params/`.

`load_any` reads every checkpoint form the front ends take: a converted directory, a training
workdir, a one-file `.safetensors` export (`python -m tcl_jax.export`), a PyTorch file, a
transformers CLIP directory, or a Hub id of a repository holding any of the last three.
"""

import argparse
import json
import os
import re
import sys
from typing import Optional

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

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
      vision_heads=_heads("vision_heads", vision_heads, width, "vision"),
      context_length=_shape(sd, txt + "positional_embedding")[0],
      vocab_size=_shape(sd, txt + "token_embedding.weight")[0],
      transformer_width=tw,
      transformer_heads=_heads("text_heads", text_heads, tw, "text"),
      transformer_layers=_count_blocks(sd, txt + "transformer.resblocks."),
  )


def _heads(name: str, given: Optional[int], width: int, tower: str) -> int:
  """The attention heads of a tower: `given`, else width // 64 as the original's build_model."""
  if given is None:
    if width < 64:
      raise ConversionError(f"the {tower} tower's width {width} is under 64, so its heads cannot be "
                            f"assumed as width // 64; pass --{name} N ({name}=N in Python)")
    return width // 64
  if given < 1 or width % given:
    raise ConversionError(f"--{name} {given} does not divide the {tower} tower's width {width}; "
                          f"give the model's own head count, a divisor of {width}")
  return given


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

  `clip`: the CLIP that completes a TCL file without the CLIP towers such as the official tcl.pth:
  OpenAI's file (e.g. ViT-B-16.pt), a transformers CLIP directory or a Hub id.
  """
  return load_source(path, clip=clip, **overrides)[:2]


# ----------------------------------------------------------------------------------------------
# Sources: local paths, transformers CLIP directories, Hugging Face Hub ids
# ----------------------------------------------------------------------------------------------

# owner/name, as the Hub spells repository ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Names that are meant as local files, never as Hub ids.
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".ckpt", ".npz")
# What a Hub repository is fetched for: a transformers CLIP (config.json + safetensors weights)
# or a one-file tcl_jax export; pytorch_model.bin only for repositories without safetensors.
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]
HUB_TORCH_PATTERNS = ["config.json", "pytorch_model.bin"]
SAFETENSORS_NAME = "model.safetensors"


def hub_repo_id(path) -> Optional[str]:
  """`path` as a Hub repository id when it names nothing on disk (and does not read as a local
  path: absolute, with a file suffix, or under a directory that exists), else None."""
  s = os.fspath(path)
  if (os.path.exists(s) or not HUB_ID.match(s) or s.endswith(FILE_SUFFIXES)
      or os.path.isdir(s.split("/")[0])):
    return None
  return s


def _offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(repo_id: str) -> str:
  """The local directory of a Hub repository's files (downloaded into the Hub cache if needed;
  with HF_HUB_OFFLINE=1 from the cache only). Raises OSError in one line."""
  offline = _offline()

  def fetch(patterns):
    return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns,
                                             local_files_only=offline)
  try:
    local = fetch(HUB_PATTERNS)
    if not any(n.endswith(".safetensors") for n in os.listdir(local)):
      local = fetch(HUB_TORCH_PATTERNS)
  except huggingface_hub.errors.LocalEntryNotFoundError:
    why = ("HF_HUB_OFFLINE=1 is set" if offline else "the Hub could not be reached")
    raise FileNotFoundError(
        f"no file or directory {repo_id}, and as a Hugging Face Hub id it is not in the local "
        f"Hub cache ({why}); download it once with network access, or give a local path") from None
  except (huggingface_hub.errors.RepositoryNotFoundError, huggingface_hub.errors.GatedRepoError):
    raise FileNotFoundError(
        f"no file or directory {repo_id}, and no Hugging Face Hub repository of that name that "
        f"this machine may read (private or gated repositories need `hf auth login`)") from None
  except (huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.HFValidationError,
          ValueError, OSError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise OSError(f"cannot fetch {repo_id} from the Hugging Face Hub: {first}") from None
  return local


def resolve(path) -> str:
  """A local path for `path`: itself, or the Hub cache directory of a Hub id."""
  repo = hub_repo_id(path)
  return hub_snapshot(repo) if repo else os.fspath(path)


def is_converted(directory) -> bool:
  """A directory written by `save_checkpoint` (config.json + params/)."""
  return (os.path.isfile(os.path.join(directory, "config.json"))
          and os.path.isdir(os.path.join(directory, "params")))


def _hf_clip_module():
  # tcl_jax.hf_clip imports transformers (~1.5 s); only transformers sources pay for it.
  from tcl_jax import hf_clip  # pylint: disable=g-import-not-at-top
  return hf_clip


def _is_hf_clip_dir(directory) -> bool:
  return (not is_converted(directory)
          and os.path.isfile(os.path.join(directory, "config.json"))
          and "model_type" in _read_json(os.path.join(directory, "config.json"), quiet=True))


def _read_json(path, quiet=False) -> dict:
  try:
    with open(path) as f:
      d = json.load(f)
  except OSError as e:
    if quiet:
      return {}
    raise OSError(f"cannot read {path}: {e.strerror or e}") from None
  except ValueError as e:
    if quiet:
      return {}
    raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
  if not isinstance(d, dict):
    if quiet:
      return {}
    raise ValueError(f"{path} holds no JSON object; the checkpoint is damaged")
  return d


def _state_dict(path, what: str):
  """(state_dict, heads the source states) of a local file or transformers CLIP directory."""
  if os.path.isdir(path):
    if _is_hf_clip_dir(path):
      sd, heads, _ = _hf_clip_module().load(path)
      return sd, heads
    if is_converted(path):
      raise ValueError(f"{what} {path} is already a converted tcl_jax checkpoint; load it as it "
                       f"is (e.g. --checkpoint {path}), or write one file with "
                       f"python -m tcl_jax.export {path} --output model.safetensors")
    raise ValueError(f"{what} {path} is a directory, but not a transformers CLIP directory "
                     f"(config.json + model.safetensors) nor a PyTorch file")
  return torch_pickle.load_state_dict(path), {}


def _merge_heads(overrides: dict, stated: dict, source) -> dict:
  """Heads a config states fill in those not given; given ones must agree with it."""
  out = dict(overrides)
  for k, v in stated.items():
    if out.get(k) is None:
      out[k] = v
    elif out[k] != v:
      raise ConversionError(f"--{k} {out[k]} disagrees with {source}, whose config states {v}")
  return out


def load_source(path, clip=None, **overrides):
  """A PyTorch file, a transformers CLIP directory or a Hub id of one (and `clip`, the same kinds)
  -> (TCLConfig, params, heads_from): `heads_from` says, per tower ('vision_heads',
  'text_heads'), where its heads came from: 'given', 'config' or 'assumed' (width // 64)."""
  given = {k for k in ("vision_heads", "text_heads") if overrides.get(k) is not None}
  local = resolve(path)
  sd, stated = _state_dict(local, "the source")
  overrides = _merge_heads(overrides, stated, path)
  clip_sd = None
  if clip is not None:
    clip_local = resolve(clip)
    clip_sd, clip_stated = _state_dict(clip_local, "--clip")
    overrides = _merge_heads(overrides, clip_stated, clip)
    stated = {**clip_stated, **stated}
  cfg, params = convert_state_dict(sd, clip=clip_sd, **overrides)
  heads_from = {k: "given" if k in given else "config" if k in stated else "assumed"
                for k in ("vision_heads", "text_heads")}
  return cfg, params, heads_from


# ----------------------------------------------------------------------------------------------
# tcl_jax checkpoint directories (config.json + orbax params) and one-file safetensors exports
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


def _config_from_dict(d: dict, where: str) -> tcl_lib.TCLConfig:
  try:
    return tcl_lib.TCLConfig.from_dict(d)
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"{where} is not a tcl_jax model config ({e}); the checkpoint is damaged "
                     f"or from another program") from None


def _root_cause(e: BaseException) -> str:
  """The innermost cause's first line (orbax wraps tensorstore's reason in pages of spec)."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return first[:300]


def _drop_closed_loop_callbacks() -> None:
  """After a failed orbax restore, tensorstore still completes the other reads in flight and calls
  back into the event loop that orbax has already closed; each callback's RuntimeError('Event
  loop is closed') reaches sys.unraisablehook, which prints a traceback for every one (dozens,
  after the error line). Drop exactly those, for the rest of the process; every other unraisable
  exception goes to the previous hook as before."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def load_checkpoint(directory):
  """A directory written by `save_checkpoint` (or `python -m tcl_jax.convert`) -> (cfg, params).

  A damaged one (a file under params/ missing or truncated, a broken config.json) raises one
  ValueError naming the directory."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{directory} is not a tcl_jax checkpoint (no config.json); convert a "
                            f"PyTorch file first: python -m tcl_jax.convert SRC --output DIR")
  cfg = _config_from_dict(_read_json(cfg_path), cfg_path)
  target = jax.eval_shape(lambda: tcl_lib.init_params(cfg, jax.random.key(0)))
  params_dir = os.path.join(directory, "params")
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{directory} is not a complete tcl_jax checkpoint: it has no params/; "
                            f"convert it again")
  # Before the restore: the callbacks can come before a failure reaches the except clause.
  _drop_closed_loop_callbacks()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, target)
  except Exception as e:  # pylint: disable=broad-except
    # orbax/tensorstore raise plain Exceptions whose text spans pages; one line is what helps.
    raise ValueError(f"the checkpoint {directory} is damaged: its params/ cannot be read "
                     f"({_root_cause(e)}); convert or copy it again") from None
  return cfg, params


def save_safetensors(path, cfg: tcl_lib.TCLConfig, params) -> None:
  """Every parameter (frozen CLIP towers included) into one safetensors file, keyed by its flax
  path joined with '/', and the model config as JSON in the file's metadata."""
  tensors = {"/".join(p.key for p in path_): np.array(x, order="C")
             for path_, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  metadata = {"format": "tcl_jax", "tcl_jax_config": json.dumps(cfg.to_dict())}
  path = os.fspath(path)
  tmp = path + ".tmp"
  safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
  os.replace(tmp, path)


def load_safetensors(path):
  """A file written by `save_safetensors` (`python -m tcl_jax.export`) -> (cfg, params), bitwise
  as saved. A truncated, foreign or mismatched file raises one ValueError naming it."""
  path = os.fspath(path)
  try:
    with safetensors.safe_open(path, framework="np") as f:
      meta = f.metadata() or {}
      if "tcl_jax_config" not in meta:
        hint = ("a transformers CLIP's weights? give its directory (with config.json) instead"
                if any(k.startswith("vision_model.") for k in f.keys()) else
                "export one with python -m tcl_jax.export CKPT --output model.safetensors")
        raise ValueError(f"{path} is not a tcl_jax checkpoint: its safetensors metadata has no "
                         f"tcl_jax_config ({hint})")
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except safetensors.SafetensorError as e:
    raise ValueError(f"{path} is not a readable safetensors file ({e}); truncated or damaged? "
                     f"export it again") from None
  try:
    raw = json.loads(meta["tcl_jax_config"])
  except ValueError as e:
    raise ValueError(f"{path}: its tcl_jax_config metadata is not valid JSON ({e})") from None
  cfg = _config_from_dict(raw, f"the tcl_jax_config metadata of {path}")
  shapes = jax.eval_shape(lambda: tcl_lib.init_params(cfg, jax.random.key(0)))
  flat, problems = {}, []
  for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(k.key for k in p)
    key = "/".join(names)
    if key not in tensors:
      problems.append(f"missing tensor {key}")
      continue
    arr = tensors.pop(key)
    if arr.shape != leaf.shape or arr.dtype != leaf.dtype:
      problems.append(f"tensor {key} is {arr.dtype}{list(arr.shape)}, the config implies "
                      f"{leaf.dtype}{list(leaf.shape)}")
    else:
      flat[names] = arr
  problems += [f"unexpected tensor {k}" for k in sorted(tensors)]
  if problems:
    raise ConversionError(f"{path} does not match its own config: {len(problems)} problem(s): "
                          f"{_listing(problems)}")
  return cfg, _unflatten(flat)


def is_tcl_jax_safetensors(path) -> bool:
  """Whether `path` is a safetensors file with tcl_jax metadata (cheap: reads the header)."""
  try:
    with safetensors.safe_open(os.fspath(path), framework="np") as f:
      return "tcl_jax_config" in (f.metadata() or {})
  except (safetensors.SafetensorError, OSError):
    return False


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
  """Any checkpoint the front ends take -> (cfg, params): a converted tcl_jax directory, a
  training workdir (latest step), a one-file `.safetensors` export, a PyTorch file or a
  transformers CLIP directory (converted on the fly; `clip=` completes the official tcl.pth), or
  a Hugging Face Hub id of a repository holding an export or a transformers CLIP."""
  local = resolve(path)
  if os.path.isdir(local):
    if os.path.isdir(os.path.join(local, "checkpoints")):
      return load_training_checkpoint(local)
    export = os.path.join(local, SAFETENSORS_NAME)
    if not is_converted(local) and is_tcl_jax_safetensors(export):
      return load_safetensors(export)
    if _is_hf_clip_dir(local):
      return load_source(local, **overrides)[:2]
    return load_checkpoint(local)
  if not os.path.exists(local):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if local.endswith(".safetensors"):
    return load_safetensors(local)
  return load_torch(local, **overrides)


def from_pretrained(path_or_hub_id, **overrides):
  """(TCLConfig, params) of a one-file export, a converted directory or a Hub repository holding
  `model.safetensors` (a tcl_jax export, or a transformers CLIP converted on the fly); any other
  form `load_any` takes works too. Nothing is downloaded with HF_HUB_OFFLINE=1."""
  return load_any(path_or_hub_id, **overrides)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
  """Usage errors as one `error: ...` line on stderr and exit status 2 (--help unchanged)."""

  def error(self, message):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def heads_summary(cfg: tcl_lib.TCLConfig, heads_from: dict) -> str:
  """'heads: vision 2 (...), text 2 (...)', saying where each count came from."""
  why = {"given": "given", "config": "from the transformers config", "stored": "as exported",
         "assumed": "assumed width // 64: heads are not stored in PyTorch files; pass --{} if "
                    "the model has others"}
  parts = []
  for tower, key, n in (("vision", "vision_heads", cfg.clip.vision_heads),
                        ("text", "text_heads", cfg.clip.transformer_heads)):
    parts.append(f"{tower} {n} ({why[heads_from[key]].format(key)})")
  return "heads: " + ", ".join(parts)


def main(argv=None):
  ap = ArgumentParser(prog="python -m tcl_jax.convert", description=__doc__.split("\n")[0])
  ap.add_argument("src", help="official tcl.pth, a TCL training checkpoint, OpenAI CLIP .pt "
                              "(TorchScript) or a state_dict file, a transformers CLIP directory "
                              "or a Hugging Face Hub id (openai/clip-vit-base-patch16)")
  ap.add_argument("--output", required=True, help="output directory (config.json + params/)")
  ap.add_argument("--clip", default=None,
                  help="the CLIP towers and model dims for a TCL file without them (the official "
                       "tcl.pth): OpenAI's ViT-B-16.pt, a transformers CLIP directory or a Hub id; "
                       "the TCL file's own keys win")
  ap.add_argument("--ie_freeze", type=int, default=None,
                  help="for CLIP-only sources: first CLIP block copied into the masker "
                       "(default: vision_layers - 1, the paper's 11 for ViT-B/16)")
  ap.add_argument("--vision_heads", type=int, default=None,
                  help="vision attention heads (default: the transformers config's, else "
                       "width // 64)")
  ap.add_argument("--text_heads", type=int, default=None,
                  help="text attention heads (default: the transformers config's, else "
                       "width // 64)")
  ap.add_argument("--seed", type=int, default=0, help="decoder init seed for CLIP-only sources")
  ap.add_argument("--overwrite", action="store_true",
                  help="replace a converted checkpoint already at --output")
  args = ap.parse_args(argv)
  for flag in ("vision_heads", "text_heads"):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  out = args.output
  if os.path.exists(out) and not os.path.isdir(out):
    ap.error(f"--output {out} is a file; give a directory")
  if os.path.isdir(out) and not args.overwrite and (
      is_converted(out) or os.path.exists(os.path.join(out, "params"))):
    ap.error(f"--output {out} already holds a converted checkpoint; pass --overwrite to replace "
             f"it, or give another directory")
  if os.path.isdir(args.src) and is_converted(args.src):
    ap.error(f"{args.src} is already a converted tcl_jax checkpoint: use it as it is (e.g. "
             f"--checkpoint {args.src}), or write one file with python -m tcl_jax.export "
             f"{args.src} --output model.safetensors")
  overrides = dict(ie_freeze=args.ie_freeze, vision_heads=args.vision_heads,
                   text_heads=args.text_heads, seed=args.seed)
  try:
    local = resolve(args.src)
    if os.path.isfile(local) and local.endswith(".safetensors") and args.clip is None:
      cfg, params = load_safetensors(local)  # a one-file export back into a directory
      heads_from = {"vision_heads": "stored", "text_heads": "stored"}
    else:
      cfg, params, heads_from = load_source(local, clip=args.clip, **overrides)
  except (ValueError, OSError) as e:  # a wrong path or a file that does not fit: usage error
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    save_checkpoint(out, cfg, params)
  except (ValueError, OSError) as e:
    print(f"error: cannot write {out}: {e}", file=sys.stderr)
    return 1
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"converted {args.src} -> {out}: {_dims(cfg)}, {n / 1e6:.1f}M parameters; "
        f"{heads_summary(cfg, heads_from)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
