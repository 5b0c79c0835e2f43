"""What the training loop and the zero-shot engine ask of a model kind (tcl_jax.kinds)."""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ZeroShotModel:
  """A model as zero-shot segmentation sees it (tcl_jax.zeroshot): two functions of the params.

  text_embedding(params, tokens [N, T, L]) -> [N, E]: prompt-ensembled, L2-normalized class
    embeddings (T prompt templates per class).
  window_masks(params, text_emb, windows [k, h, w, 3], *, pamr, kp_w, simmaps) -> [k, N, h, w]
    scores per class at the window's size (a background channel is added by the pipeline); with
    simmaps, [k, 2N, h, w]: the scores, then similarity maps to show.
  class_text(params, classnames, templates) -> [N, D]: optional. A kind whose class features are
    not a template ensemble of one text tower (CoDe: its learned prompt on the bare name, plus a
    separate ensemble for the KP branch) builds them from the names itself; the rows are opaque
    to the pipeline (one per class) and go to window_masks as text_emb.
  """

  cfg: Any
  text_embedding: Callable[..., jax.Array]
  window_masks: Callable[..., jax.Array]
  min_size: int  # the smallest image side the model takes (one patch)
  # > 1: several models scored in one call (training-free methods sharing one CLIP forward):
  # window_masks returns [k, heads x N, h, w], head m in channels [m N, (m + 1) N); no simmaps.
  heads: int = 1
  class_text: Optional[Callable[..., jax.Array]] = None


@dataclasses.dataclass(frozen=True)
class Model:
  """What the training loop needs from a model kind (built from a training config)."""

  cfg: Any  # the model config (e.g. TCLConfig)
  init: Callable[[jax.Array], Any]  # rng -> params
  # (params, batch, rng) -> (loss, aux): every 0-d entry of aux is logged as train/<name>; an
  # optional "soft_pos_mask" [B, h, w] is drawn into the image summaries.
  loss: Callable[..., tuple[jax.Array, dict]]
  load: Optional[Callable[[str], Any]] = None  # path -> params (config.init_checkpoint)
  zero_shot: Optional[ZeroShotModel] = None  # None: this kind cannot be evaluated zero-shot
  # The batch entries `loss` reads (the input pipeline provides them; the loop shards them).
  batch_keys: tuple[str, ...] = ("image", "text_tokens")


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """A registry entry: how to build a kind's model from a training config, and which model
  configs (from checkpoints) are of this kind."""

  name: str
  build: Callable[[Any], Model]  # training config -> Model
  config_type: type  # the model config class (checkpoint configs are matched on it)
  zero_shot: Optional[Callable[[Any], ZeroShotModel]] = None  # model config -> ZeroShotModel


def resolve_compute_dtype(name: str):
  """'auto' = bfloat16 on accelerators, float32 on CPU."""
  if name == "auto":
    name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return jnp.dtype(name)
