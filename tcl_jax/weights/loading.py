"""Reading every checkpoint form tcl_jax takes, without torch: the official TCL layout, the CoDe
authors' layout, OpenAI CLIP (TorchScript archive or state_dict), transformers' CLIPModel (a
directory or a Hub id), and tcl_jax's own files (a converted directory, a training workdir, a
one-file `.safetensors` export).

`load_any` is what every front end calls (evaluate, demo, app, export, `tcl_jax.from_pretrained`,
the training's `init_checkpoint`); `convert_state_dict` maps a PyTorch state_dict onto tcl_jax's
tree (dims read off the shapes as the original's `build_model` does; attention heads are not in
the shapes: a transformers config states them, else they are width // 64 unless overridden).
`python -m tcl_jax.convert` is the command over it.
"""

import os
import re
import sys
from typing import Optional

import huggingface_hub
import jax
import numpy as np

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.train import checkpointing
from tcl_jax.weights import key_maps as convert_maps
from tcl_jax.weights import model_files
from tcl_jax.weights import torch_pickle

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
NO_CLIP = (
  "this TCL checkpoint has no CLIP towers (clip_text_encoder.*, clip_image_encoder.*), "
  "like the official tcl.pth: pass OpenAI's ViT-B/16 file with --clip ViT-B-16.pt "
  "(clip= in Python)"
)
# CoDe: buffers without learned state (the prompt's SOT embedding, the unused CLIP temperature).
CODE_SKIPPED_KEYS = ("clip_text_encoder.prompt_learner.token_prefix", "frozen_clip.logit_scale")
# What the model dims are read off (key_maps.infer_clip_config), in OpenAI's names.
CLIP_DIMS_KEYS = (
  "visual.conv1.weight",
  "visual.positional_embedding",
  "visual.proj",
  "token_embedding.weight",
  "positional_embedding",
  "ln_final.weight",
  "text_projection",
)
CODE_LOSS_SCALE_KEYS = LOSS_SCALE_KEYS + ("hcl_loss.logit_scale",)
CODE_NO_CLIP = (
  "this CoDe checkpoint has none of the frozen CLIP's copies (frozen_clip.*, "
  "clip_text_encoder.prompt_learner.clip_model.*, clip_text_encoder.text_encoder.*, "
  "clip_image_encoder.*), like a file of the trained weights only: pass OpenAI's ViT-B/16 file "
  "with --clip ViT-B-16.pt (clip= in Python)"
)

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
    try:
      arr = np.array(convert_maps.TO_FLAX[fn](np.asarray(sd[tkey], np.float32)), order="C")
    except (ValueError, IndexError):  # too few dims for the layout change
      arr = None
    if arr is None or arr.shape != tuple(leaf.shape):
      problems.append(
        f"shape mismatch for {tkey}: checkpoint {tuple(sd[tkey].shape)}, "
        f"model expects {tuple(leaf.shape)} (after layout transpose)"
      )
      continue
    flat[names] = arr
  return flat


def _clip_in_tcl_layout(clip_sd: dict, clip_cfg) -> dict:
  """OpenAI CLIP keys -> the TCL checkpoint's names for the same tensors. Keys with no TCL name
  stay (marked) so that the conversion lists them as unexpected."""
  tcl_names = convert_maps.clip_key_map(clip_cfg, "tcl")
  rename = {
    oai: tcl_names[path][0]
    for path, (oai, _) in convert_maps.clip_key_map(clip_cfg, "openai").items()
  }
  out = {}
  for k, v in clip_sd.items():
    if k in rename:
      out[rename[k]] = v
    elif k not in SKIPPED_KEYS and k != "logit_scale":
      out[f"{k} (in the CLIP file)"] = v
  return out


def convert_state_dict(
  sd: dict,
  *,
  clip: Optional[dict] = None,
  ie_freeze: Optional[int] = None,
  vision_heads: Optional[int] = None,
  text_heads: Optional[int] = None,
  hidden_act: Optional[str] = None,
  seed: int = 0,
  **tcl_overrides,
):
  """state_dict (name -> numpy) -> (TCLConfig, params), or (CoDeConfig, params) for the CoDe
  authors' layout (detected by its text_decoder.* / clip_text_encoder.prompt_learner.* keys).
  Fails listing every missing, unexpected or mis-shaped key.

  `clip`: an OpenAI CLIP state_dict that supplies the CLIP towers and the model dims for a TCL
  state_dict that lacks them (the official tcl.pth), or a CoDe one without its CLIP copies; the
  checkpoint's own keys win. A CoDe state_dict's three copies of the CLIP must be equal.
  """
  layout = convert_maps.detect_layout(sd)
  if clip is not None:
    if layout == "openai":
      raise model_files.ConversionError(
        "--clip (clip=) completes a TCL or CoDe checkpoint; this source is a CLIP"
      )
    try:
      clip_layout = convert_maps.detect_layout(clip)
    except model_files.ConversionError as e:
      raise model_files.ConversionError(f"the --clip file: {e}") from None
    if clip_layout != "openai":
      raise model_files.ConversionError(
        f"the --clip file must be OpenAI's CLIP (e.g. ViT-B-16.pt), not a {clip_layout.upper()} "
        "checkpoint"
      )
  if layout == "code":
    return _convert_code(
      sd,
      clip,
      heads=dict(vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act),
      overrides=dict(tcl_overrides, ie_freeze=ie_freeze),
    )
  if tcl_overrides.get("text_decoder_heads") is not None:
    what = "a TCL checkpoint" if layout == "tcl" else "a CLIP"
    raise model_files.ConversionError(
      f"--text_decoder_heads (text_decoder_heads=) is for CoDe checkpoints; this source is {what}"
    )
  tcl_overrides.pop("text_decoder_heads", None)
  if clip is not None:
    clip_cfg = convert_maps.infer_clip_config(
      clip, "openai", vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act
    )
    sd = {**_clip_in_tcl_layout(clip, clip_cfg), **sd}  # the TCL file's own keys win
  else:
    if layout == "tcl" and not all(any(k.startswith(p) for k in sd) for p in CLIP_PREFIXES):
      raise model_files.ConversionError(NO_CLIP)
    clip_cfg = convert_maps.infer_clip_config(
      sd, layout, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act
    )
  notes = []
  if layout == "tcl":
    sd = _loss_scales(sd, LOSS_SCALE_KEYS, notes)
  cfg = convert_maps.infer_tcl_config(
    sd, clip_cfg, layout, dict(tcl_overrides, ie_freeze=ie_freeze)
  )
  shapes = jax.eval_shape(lambda: tcl_lib.init_params(cfg, jax.random.key(0)))
  used, problems = set(), []
  if layout == "tcl":
    flat = _fill(shapes, convert_maps.tcl_key_map(cfg), sd, used, problems)
  else:
    key_map = {("clip",) + k: v for k, v in convert_maps.clip_key_map(clip_cfg, "openai").items()}
    flat = _fill({"clip": shapes["clip"]}, key_map, sd, used, problems)
  ignored = {k for k in sd if k.startswith(SKIPPED_PREFIXES) or k in SKIPPED_KEYS}
  if layout == "openai":
    ignored.add("logit_scale")  # CLIP's own contrastive temperature is not used by TCL
  unexpected = sorted(set(sd) - used - ignored)
  problems += [f"unexpected key {k}" for k in unexpected]
  if problems:
    raise model_files.ConversionError(
      f"cannot convert this {layout} checkpoint to {dims(cfg)}: "
      f"{len(problems)} problem(s): {model_files.listing(problems)}"
    )
  for note in notes:
    print(note, file=sys.stderr)
  params = model_files.unflatten(flat)
  if layout == "openai":
    params = tcl_lib.init_params(cfg, jax.random.key(seed), clip_params=params["clip"])
  return cfg, params


def _loss_scales(sd: dict, keys, notes: list) -> dict:
  """sd with the loss temperatures it lacks at the original's initial value, said in `notes`."""
  absent = [k for k in keys if k not in sd]
  if absent:
    sd = dict(sd, **{k: INITIAL_LOGIT_SCALE for k in absent})
    notes.append(
      f"note: the checkpoint has no {', '.join(absent)}; using the original's initial "
      f"value log(1/0.07) = {INITIAL_LOGIT_SCALE:.4f} (it matters only for training)"
    )
  return sd


def _one_clip(sd: dict, clip_cfg) -> tuple[dict, set]:
  """The key map of CoDe's one CLIP (each flax path -> the first of its copies that `sd` holds,
  else frozen_clip's name) and the copy keys it accounts for. The copies `sd` holds must be
  equal: the first (in the file's order) that differs from its path's first copy is the error."""
  key_map, copy_of, covered = {}, {}, set()
  for path, (keys, layout) in convert_maps.code_clip_copies(clip_cfg).items():
    present = [k for k in keys if k in sd]
    key_map[("clip",) + path] = ((present or keys)[0], layout)
    covered.update(present)
    copy_of.update({k: present[0] for k in present[1:]})
  for k in sd:
    ref = copy_of.get(k)
    if ref is None:
      continue
    a, b = np.asarray(sd[k], np.float32), np.asarray(sd[ref], np.float32)
    if a.shape != b.shape or not np.array_equal(a, b):
      how = (
        f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.shape != b.shape
        else f"max |difference| {float(np.max(np.abs(a - b))):.3g}"
      )
      raise model_files.ConversionError(
        f"the checkpoint's copies of the frozen CLIP disagree: {k} differs from {ref} ({how}); "
        "CoDe's frozen_clip, clip_text_encoder and clip_image_encoder hold one CLIP, so a file "
        "whose copies differ was changed after training"
      )
  return key_map, covered


def _convert_code(sd: dict, clip: Optional[dict], *, heads: dict, overrides: dict):
  """The authors' CoDe state_dict (and an OpenAI CLIP that completes it) -> (CoDeConfig, params).
  The file's CLIP copies win over `clip`, which fills only the tensors no copy holds."""
  # Every copy's tensors under their OpenAI names, the first copy's in the file's order: the dims.
  view = {}
  for k, v in sd.items():
    oai = convert_maps.code_clip_openai_key(k)
    if oai is not None and oai != "logit_scale":
      view.setdefault(oai, v)
  if clip is None:
    if not view:
      raise model_files.ConversionError(CODE_NO_CLIP)
    lacking = [k for k in CLIP_DIMS_KEYS if k not in view]
    if lacking:
      raise model_files.ConversionError(
        f"this CoDe checkpoint's copies of the frozen CLIP lack part of it (no copy of "
        f"{', '.join(convert_maps.CODE_FROZEN + k for k in lacking)}): pass OpenAI's ViT-B/16 "
        "file with --clip ViT-B-16.pt (clip= in Python) to complete it"
      )
  clip_cfg = convert_maps.infer_clip_config({**(clip or {}), **view}, "openai", **heads)
  key_map, covered = _one_clip(sd, clip_cfg)
  if clip is not None:
    # The CLIP file's tensors under the names the key map reads (frozen_clip's where no copy in
    # the file holds them); merged under the file's own keys, which win.
    own = {
      ("clip",) + p: tkey for p, (tkey, _) in convert_maps.clip_key_map(clip_cfg, "openai").items()
    }
    name = {oai: key_map[p][0] for p, oai in own.items()}
    extra = {}
    for k, v in clip.items():
      if k in name:
        extra[name[k]] = v
      elif k not in SKIPPED_KEYS and k != "logit_scale":
        extra[f"{k} (in the CLIP file)"] = v
    sd = {**extra, **sd}
  notes = []
  sd = _loss_scales(sd, CODE_LOSS_SCALE_KEYS, notes)
  cfg = convert_maps.infer_code_config(sd, clip_cfg, overrides)
  key_map.update((k, v) for k, v in convert_maps.code_key_map(cfg).items() if k[0] != "clip")
  used, problems = set(covered), []
  flat = _fill(model_files.param_shapes(cfg), key_map, sd, used, problems)
  ignored = {k for k in sd if k.startswith(SKIPPED_PREFIXES) or k in CODE_SKIPPED_KEYS}
  problems += [f"unexpected key {k}" for k in sorted(set(sd) - used - ignored)]
  if problems:
    raise model_files.ConversionError(
      f"cannot convert this CoDe checkpoint to {dims(cfg)}: "
      f"{len(problems)} problem(s): {model_files.listing(problems)}"
    )
  for note in notes:
    print(note, file=sys.stderr)
  return cfg, model_files.unflatten(flat)


def dims(cfg) -> str:
  """The model dims in one line, as the convert command reports them."""
  c = cfg.clip
  out = (
    f"ViT (width {c.vision_width}, {c.vision_layers} layers, patch {c.vision_patch_size}), "
    f"text (width {c.transformer_width}, {c.transformer_layers} layers), ie_freeze {cfg.ie_freeze}"
  )
  if model_files.model_kind(cfg) == "code":
    out = (
      f"CoDe: {out}, text decoder ({cfg.text_decoder_layers} layers, "
      f"{cfg.text_decoder_heads} heads), {cfg.n_ctx} prompt tokens"
    )
  return out


def load_torch(path, clip=None, **overrides):
  """Read a PyTorch checkpoint file (no torch needed, no pickled code run) -> (cfg, params): a
  TCLConfig, or a CoDeConfig for the CoDe authors' file.

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
  if (
    os.path.exists(s)
    or not HUB_ID.match(s)
    or s.endswith(FILE_SUFFIXES)
    or os.path.isdir(s.split("/")[0])
  ):
    return None
  return s


def _offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(repo_id: str) -> str:
  """The local directory of a Hub repository's files (downloaded into the Hub cache if needed;
  with HF_HUB_OFFLINE=1 from the cache only). Raises OSError in one line."""
  offline = _offline()

  def fetch(patterns):
    return huggingface_hub.snapshot_download(
      repo_id, allow_patterns=patterns, local_files_only=offline
    )

  try:
    local = fetch(HUB_PATTERNS)
    if not any(n.endswith(".safetensors") for n in os.listdir(local)):
      local = fetch(HUB_TORCH_PATTERNS)
  except huggingface_hub.errors.LocalEntryNotFoundError:
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hub could not be reached"
    raise FileNotFoundError(
      f"no file or directory {repo_id}, and as a Hugging Face Hub id it is not in the local "
      f"Hub cache ({why}); download it once with network access, or give a local path"
    ) from None
  except (huggingface_hub.errors.RepositoryNotFoundError, huggingface_hub.errors.GatedRepoError):
    raise FileNotFoundError(
      f"no file or directory {repo_id}, and no Hugging Face Hub repository of that name that "
      f"this machine may read (private or gated repositories need `hf auth login`)"
    ) from None
  except (
    huggingface_hub.errors.HfHubHTTPError,
    huggingface_hub.errors.HFValidationError,
    ValueError,
    OSError,
  ) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise OSError(f"cannot fetch {repo_id} from the Hugging Face Hub: {first}") from None
  return local


def resolve(path) -> str:
  """A local path for `path`: itself, or the Hub cache directory of a Hub id."""
  repo = hub_repo_id(path)
  return hub_snapshot(repo) if repo else os.fspath(path)


def _hf_clip_module():
  # tcl_jax.weights.hf_clip imports transformers (~1.5 s); only transformers sources pay for it.
  from tcl_jax.weights import hf_clip  # pylint: disable=g-import-not-at-top

  return hf_clip


def _is_hf_clip_dir(directory) -> bool:
  return (
    not model_files.is_converted(directory)
    and os.path.isfile(os.path.join(directory, "config.json"))
    and "model_type" in model_files.read_json(os.path.join(directory, "config.json"), quiet=True)
  )


def _state_dict(path, what: str):
  """(state_dict, heads the source states) of a local file or transformers CLIP directory."""
  if os.path.isdir(path):
    if _is_hf_clip_dir(path):
      sd, heads, _ = _hf_clip_module().load(path)
      return sd, heads
    if model_files.is_converted(path):
      raise ValueError(
        f"{what} {path} is already a converted tcl_jax checkpoint; load it as it "
        f"is (e.g. --checkpoint {path}), or write one file with "
        f"python -m tcl_jax.export {path} --output model.safetensors"
      )
    raise ValueError(
      f"{what} {path} is a directory, but not a transformers CLIP directory "
      f"(config.json + model.safetensors) nor a PyTorch file"
    )
  return torch_pickle.load_state_dict(path), {}


def _merge_heads(overrides: dict, stated: dict, source) -> dict:
  """Heads a config states fill in those not given; given ones must agree with it."""
  out = dict(overrides)
  for k, v in stated.items():
    if out.get(k) is None:
      out[k] = v
    elif out[k] != v:
      raise model_files.ConversionError(
        f"--{k} {out[k]} disagrees with {source}, whose config states {v}"
      )
  return out


def load_source(path, clip=None, **overrides):
  """A PyTorch file, a transformers CLIP directory or a Hub id of one (and `clip`, the same kinds)
  -> (TCLConfig, params, heads_from): `heads_from` says, per tower ('vision_heads',
  'text_heads'), where its heads came from: 'given', 'config' or 'assumed' (width // 64)."""
  given = {
    k for k in ("vision_heads", "text_heads", "text_decoder_heads") if overrides.get(k) is not None
  }
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
  heads_from = {
    k: "given" if k in given else "config" if k in stated else "assumed"
    for k in ("vision_heads", "text_heads", "text_decoder_heads")
  }
  return cfg, params, heads_from


def load_any(path, **overrides):
  """Any checkpoint the front ends take -> (cfg, params), cfg of the model kind the checkpoint
  holds (a TCLConfig or a CoDeConfig): a converted tcl_jax directory, a training workdir (latest
  step), a one-file `.safetensors` export, a PyTorch file or a transformers CLIP directory
  (converted on the fly; `clip=` completes the official tcl.pth), or a Hugging Face Hub id of a
  repository holding an export or a transformers CLIP."""
  local = resolve(path)
  if os.path.isdir(local):
    if os.path.isdir(checkpointing.checkpoints_dir(local)):
      return model_files.load_training_checkpoint(local)
    export = os.path.join(local, SAFETENSORS_NAME)
    if not model_files.is_converted(local) and model_files.is_tcl_jax_safetensors(export):
      return model_files.load_safetensors(export)
    if _is_hf_clip_dir(local):
      return load_source(local, **overrides)[:2]
    return model_files.load_checkpoint(local)
  if not os.path.exists(local):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if local.endswith(".safetensors"):
    return model_files.load_safetensors(local)
  return load_torch(local, **overrides)


def directory_problem(path) -> Optional[str]:
  """Why the local directory `path` holds none of the checkpoints `load_any` takes, judged from
  its file names alone (nothing is read; a damaged checkpoint is found when it loads); None when
  it may hold one, or is not a directory."""
  if not os.path.isdir(path) or any(
    os.path.exists(os.path.join(path, name))
    for name in (checkpointing.CHECKPOINTS, "config.json", SAFETENSORS_NAME)
  ):
    return None
  return (
    f"{path} is a folder without a checkpoint (no config.json, checkpoints/ or "
    f"{SAFETENSORS_NAME}); give a converted directory (python -m tcl_jax.convert), a training "
    "workdir, a .safetensors export, a PyTorch file or a Hugging Face Hub id"
  )


def from_pretrained(path_or_hub_id, **overrides):
  """(cfg, params) of a one-file export, a converted directory or a Hub repository holding
  `model.safetensors` (a tcl_jax export, or a transformers CLIP converted on the fly); any other
  form `load_any` takes works too. `cfg` is a TCLConfig, or a CoDeConfig for a CoDe checkpoint.
  Nothing is downloaded with HF_HUB_OFFLINE=1."""
  return load_any(path_or_hub_id, **overrides)
