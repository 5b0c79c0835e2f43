"""The CoDe model kind (`config.model_kind = "code"`): CoDe's objective for training (it reads the
noun entries of the batch), TCL's mask inference with CoDe's text: the masker gets the learned
prompt on the bare class name, the KP branch a template ensemble whose prompts are normalized
before averaging (build_text_embedding_from_noun / _from_text_tokens)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax import tokenizer
from tcl_jax.kinds import base
from tcl_jax.models import code as code_lib
from tcl_jax.models import losses
from tcl_jax.models import tcl_inference

BATCH_KEYS = ("image", "text_tokens", "noun_tokens", "kg_tokens", "word_labels")


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prompted(params, tokens, *, cfg):
  return code_lib.prompted_noun_emb(params, cfg, tokens)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sentences(params, tokens, *, cfg):
  return code_lib.sentence_emb(params, cfg, tokens)


def class_text(params, classnames, templates, *, cfg: code_lib.CoDeConfig, chunk: int = 256):
  """[N, 2E]: the masker's class embeddings (the prompt on the bare name), then the KP branch's
  (each template's normalized embedding, averaged, normalized)."""
  names = list(classnames)
  prompted = jnp.concatenate(
    [
      _prompted(params, jnp.asarray(code_lib.noun_tokens(names[i : i + chunk], cfg)), cfg=cfg)
      for i in range(0, len(names), chunk)
    ]
  )
  sentences = [t.format(c) for c in names for t in templates]
  tokens = np.asarray(tokenizer.tokenize(sentences, cfg.clip.context_length))
  each = jnp.concatenate(
    [
      _sentences(params, jnp.asarray(tokens[i : i + chunk]), cfg=cfg)
      for i in range(0, len(tokens), chunk)
    ]
  )
  kp = losses.l2_normalize(each.reshape(len(names), len(templates), -1).mean(axis=1))
  return jnp.concatenate([prompted, kp], axis=-1)


def _text_embedding(params, tokens, *, cfg):
  # CoDe's masker embeds the bare class name under its learned prompt: template tokens alone
  # cannot give its class features (prompts.class_text_embedding calls class_text instead).
  raise ValueError("CoDe's class embeddings come from class names (class_text), not tokens")


@functools.partial(jax.jit, static_argnames=("cfg", "pamr", "kp_w", "simmaps"))
def _window_masks(params, text_emb, windows, *, cfg, pamr, kp_w, simmaps):
  e = cfg.clip.embed_dim
  return tcl_inference.window_outputs(
    params,
    cfg,
    windows,
    text_emb[:, :e],
    apply_pamr=bool(pamr),
    kp_w=float(kp_w),
    simmaps=simmaps,
    kp_text_emb=text_emb[:, e:],
  )


def zero_shot(cfg: code_lib.CoDeConfig) -> base.ZeroShotModel:
  return base.ZeroShotModel(
    cfg=cfg,
    text_embedding=functools.partial(_text_embedding, cfg=cfg),
    window_masks=functools.partial(_window_masks, cfg=cfg),
    min_size=cfg.patch_size,
    class_text=functools.partial(class_text, cfg=cfg),
  )


def build(config) -> base.Model:
  """The CoDe model from `config.model` (CoDeConfig fields)."""
  cfg = code_lib.CoDeConfig.from_dict(config.model.to_dict())
  dtype = base.resolve_compute_dtype(config.get("compute_dtype", "auto"))
  remat = bool(config.get("remat", False))

  def loss(params, batch, rng):
    # "gumbel_uniform" replays given noise (the parity tool's trajectory), never in training.
    uniform = batch.get("gumbel_uniform")
    return code_lib.code_loss(
      params,
      cfg,
      batch,
      rng=None if uniform is not None else rng,
      uniform=uniform,
      compute_dtype=dtype,
      remat=remat,
    )

  def load(path):
    from tcl_jax.weights import loading  # noqa: PLC0415 (the registry stays light)

    # Heads are not in tensor shapes: the config says them for CLIP and TCL sources.
    ckpt_cfg, params = loading.load_any(
      path,
      vision_heads=cfg.clip.vision_heads,
      text_heads=cfg.clip.transformer_heads,
      seed=int(config.seed),
    )
    if ckpt_cfg.clip != cfg.clip:
      raise ValueError(
        f"init_checkpoint {path} holds another CLIP ({loading.dims(ckpt_cfg)}): set "
        "--config.model.clip to its dims"
      )
    if type(ckpt_cfg) is code_lib.CoDeConfig:
      if ckpt_cfg.ie_freeze != cfg.ie_freeze:
        raise ValueError(
          f"init_checkpoint {path} holds a CoDe model with ie_freeze {ckpt_cfg.ie_freeze}: set "
          f"--config.model.ie_freeze={ckpt_cfg.ie_freeze}"
        )
      return params
    # A CLIP (OpenAI's ViT-B-16.pt, as the authors start from) or a TCL checkpoint: CoDe is
    # initialised from its frozen CLIP alone, as the authors' constructor does.
    return code_lib.init_params(cfg, jax.random.key(int(config.seed)), clip_params=params["clip"])

  return base.Model(
    cfg=cfg,
    init=lambda rng: code_lib.init_params(cfg, rng),
    loss=loss,
    load=load,
    zero_shot=zero_shot(cfg),
    batch_keys=BATCH_KEYS,
  )


KIND = base.ModelKind(
  name="code", build=build, config_type=code_lib.CoDeConfig, zero_shot=zero_shot
)
