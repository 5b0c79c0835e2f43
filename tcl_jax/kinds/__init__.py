"""The model registry: each model kind (a module in this package) says how to build its model for
training and how zero-shot segmentation asks it for masks. The training loop, the evaluator, the
demo and the app look a kind up here, by `config.model_kind` or by a checkpoint's model config.

A new kind is one module defining `KIND = base.ModelKind(...)` plus its entry below (or a
`register(KIND)` call, e.g. from a test or a notebook). The training-free segmenters (MaskCLIP,
SCLIP, ClearCLIP, NACLIP) run on any kind's CLIP: `zero_shot_method(name, cfg)`, names in METHODS.
"""

from tcl_jax.kinds import base
from tcl_jax.kinds import clip
from tcl_jax.kinds import code
from tcl_jax.kinds import tcl
from tcl_jax.kinds.methods import METHODS as METHODS
from tcl_jax.kinds.methods import zero_shot_method as zero_shot_method
from tcl_jax.kinds.methods import zero_shot_methods as zero_shot_methods

KINDS: dict[str, base.ModelKind] = {k.name: k for k in (tcl.KIND, code.KIND, clip.KIND)}


def register(kind: base.ModelKind) -> None:
  KINDS[kind.name] = kind


def get(name: str) -> base.ModelKind:
  """The kind called `name`; ValueError (one line) for an unknown one."""
  if name not in KINDS:
    raise ValueError(f"unknown model_kind {name!r}; known: {', '.join(sorted(KINDS))}")
  return KINDS[name]


def build_model(config) -> base.Model:
  """The model of a training config (`config.model_kind`, default "tcl")."""
  return get(config.get("model_kind", "tcl")).build(config)


def zero_shot_model(cfg, method: str = "") -> base.ZeroShotModel:
  """The zero-shot view of a model config (e.g. a loaded checkpoint's TCLConfig): with method ""
  (or "own") the checkpoint's own model, "tcl" the same for a TCL checkpoint, else training-free
  method `method` (METHODS) on its CLIP. ValueError (one line) when no kind of that config type
  can segment, or the checkpoint lacks what the method needs."""
  if method not in ("", "own", "tcl"):
    return zero_shot_method(method, cfg)
  if method == "tcl" and type(cfg) is not tcl.KIND.config_type:
    raise ValueError(f"method tcl needs a TCL checkpoint; this one holds a {kind_of(cfg)} model")
  kind = kind_of_config(cfg)
  if kind is not None:
    if kind.zero_shot is None:
      raise ValueError(f"model kind {kind.name!r} has no zero-shot segmentation")
    return kind.zero_shot(cfg)
  raise ValueError(
    f"no model kind takes a {type(cfg).__name__} config; known kinds: {', '.join(sorted(KINDS))}"
  )


def kind_of_config(cfg):
  """The kind whose config type is exactly type(cfg) (CoDeConfig subclasses TCLConfig), or None."""
  for kind in KINDS.values():
    if type(cfg) is kind.config_type:
      return kind
  return None


def kind_of(cfg) -> str:
  kind = kind_of_config(cfg)
  return kind.name if kind is not None else type(cfg).__name__
