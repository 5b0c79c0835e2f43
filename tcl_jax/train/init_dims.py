"""The model dims of a run started from a tcl_jax checkpoint, taken from the checkpoint itself.

A converted directory (config.json + params/), a training workdir (its config.json's `model`) and
a one-file safetensors export (its `tcl_jax_config` metadata) state their model. What the
parameters' shapes depend on (`config.model.clip.*` and `config.model.ie_freeze`) is taken from
there for the fields the command line does not set, so that starting the recipe from a CLIP of
other dims needs no model flags; a flag that contradicts the checkpoint is a usage error. PyTorch
files and transformers directories state no tcl_jax config: their dims are checked when they load
(kinds/tcl.py names the flags to set). Only the standard library: it runs before JAX loads.
"""

import json
import os
import struct

CONFIG = "config.json"


def _read_json(path: str):
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError):
    return None  # the load reports a damaged checkpoint in its own words
  return d if isinstance(d, dict) else None


def _safetensors_config(path: str):
  """The `tcl_jax_config` metadata of a safetensors file (its JSON header), or None."""
  try:
    with open(path, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      if size > 100_000_000:
        return None
      header = json.loads(f.read(size))
    return json.loads(header.get("__metadata__", {}).get("tcl_jax_config", "null"))
  except (OSError, ValueError, struct.error, AttributeError):
    return None


def stored_model(path: str) -> dict | None:
  """The model config (TCLConfig fields) that the checkpoint at `path` states, or None."""
  if os.path.isdir(path):
    cfg = _read_json(os.path.join(path, CONFIG))
    if cfg is None:
      return None
    if os.path.isdir(os.path.join(path, "checkpoints")):  # a training workdir
      cfg = cfg.get("model")
    elif not os.path.isdir(os.path.join(path, "params")):  # e.g. a transformers directory
      return None
  elif path.endswith(".safetensors"):
    cfg = _safetensors_config(path)
  else:
    return None
  if not isinstance(cfg, dict) or not isinstance(cfg.get("clip"), dict):
    return None
  return cfg


def _given(field: str, overrides) -> bool:
  """Whether `--config.<field>` (or a group above it) was on the command line."""
  return any(field == o or field.startswith(o + ".") for o in overrides)


def adopt(config, path: str, overrides) -> tuple[list[str], str | None]:
  """Sets config.model's shape fields from the checkpoint at `path` where `overrides` (the
  command line's `--config.` field paths) does not set them. Returns (the `field=value`s taken
  that changed the config, the one-line problem of a flag that contradicts the checkpoint)."""
  stored = stored_model(path)
  model = config.get("model") if hasattr(config, "keys") else None
  if stored is None or model is None or not hasattr(model.get("clip"), "keys"):
    return [], None
  wanted = [(f"model.clip.{k}", model.clip, k, v) for k, v in stored["clip"].items()]
  if "ie_freeze" in stored:
    wanted.append(("model.ie_freeze", model, "ie_freeze", stored["ie_freeze"]))
  taken = []
  for field, group, key, value in wanted:
    if key not in group or group[key] == value:
      continue
    if _given(field, overrides):
      return [], (
        f"--config.{field}={group[key]} contradicts config.init_checkpoint={path}, whose model "
        f"has {key}={value}: leave --config.{field} out to take the checkpoint's"
      )
    group[key] = type(group[key])(value)
    taken.append(f"{key}={value}")
  return taken, None
