"""The TCL model kind (`config.model_kind = "tcl"`, the default): TCL's objective for training, its
masks (PAMR, KP branch) for zero-shot segmentation."""

import dataclasses
import functools

import jax

from tcl_jax.kinds import base
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.models import tcl_inference
from tcl_jax.weights import loading


@functools.partial(jax.jit, static_argnames=("cfg", "pamr", "kp_w", "simmaps"))
def _window_masks(params, text_emb, windows, *, cfg, pamr, kp_w, simmaps):
  return tcl_inference.window_outputs(
    params, cfg, windows, text_emb, apply_pamr=bool(pamr), kp_w=float(kp_w), simmaps=simmaps
  )


def zero_shot(cfg: tcl_lib.TCLConfig) -> base.ZeroShotModel:
  return base.ZeroShotModel(
    cfg=cfg,
    text_embedding=functools.partial(_text_embedding, cfg=cfg),
    window_masks=functools.partial(_window_masks, cfg=cfg),
    min_size=cfg.patch_size,
  )


def _text_embedding(params, tokens, *, cfg):
  return tcl_inference.build_text_embedding(params, cfg, tokens)


def build(config) -> base.Model:
  """The TCL model from `config.model` (TCLConfig fields)."""
  cfg = tcl_lib.TCLConfig.from_dict(config.model.to_dict())
  dtype = base.resolve_compute_dtype(config.get("compute_dtype", "auto"))
  remat = bool(config.get("remat", False))

  def loss(params, batch, rng):
    # An optional "gumbel_uniform" batch entry replays given Gumbel noise instead of drawing it
    # from the step rng: only the parity tool's trajectory replay uses it, never training.
    uniform = batch.get("gumbel_uniform")
    return tcl_lib.tcl_loss(
      params,
      cfg,
      batch["image"],
      batch["text_tokens"],
      rng=None if uniform is not None else rng,
      uniform=uniform,
      compute_dtype=dtype,
      remat=remat,
    )

  def load(path):
    # Attention heads cannot be read off tensor shapes, and a CLIP-only file has no masker:
    # the config says what the model is; conversion fails loudly if the file disagrees.
    overrides = {k: v for k, v in cfg.to_dict().items() if k != "clip"}
    ckpt_cfg, params = loading.load_any(
      path,
      vision_heads=cfg.clip.vision_heads,
      text_heads=cfg.clip.transformer_heads,
      seed=int(config.seed),
      **overrides,
    )
    if type(ckpt_cfg) is not tcl_lib.TCLConfig:  # e.g. a CoDe checkpoint: its tree is another
      raise ValueError(
        f"init_checkpoint {path} holds a {type(ckpt_cfg).__name__} model, not TCL: train it with "
        "its own model_kind (configs/code.py for CoDe)"
      )
    differ = [
      f"--config.model.clip.{f.name}={getattr(ckpt_cfg.clip, f.name)}"
      for f in dataclasses.fields(ckpt_cfg.clip)
      if getattr(ckpt_cfg.clip, f.name) != getattr(cfg.clip, f.name)
    ]
    if ckpt_cfg.ie_freeze != cfg.ie_freeze:
      differ.append(f"--config.model.ie_freeze={ckpt_cfg.ie_freeze}")
    if differ:  # the flags that say what the checkpoint holds (not two configs' reprs)
      raise ValueError(f"init_checkpoint {path} holds another model: set {' '.join(differ)}")
    return params

  return base.Model(
    cfg=cfg,
    init=lambda rng: tcl_lib.init_params(cfg, rng),
    loss=loss,
    load=load,
    zero_shot=zero_shot(cfg),
  )


KIND = base.ModelKind(name="tcl", build=build, config_type=tcl_lib.TCLConfig, zero_shot=zero_shot)
