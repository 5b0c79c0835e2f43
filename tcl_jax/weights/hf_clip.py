"""CLIP checkpoints in Hugging Face transformers' format -> OpenAI CLIP's state_dict layout.

A transformers CLIP directory is what `CLIPModel.save_pretrained` writes and what the Hub's
`openai/clip-vit-base-patch16` holds: `config.json` (read with transformers' `CLIPConfig`, which
fills in the defaults that older configs leave out; no torch needed) and the weights in
`model.safetensors` (or shards listed in `model.safetensors.index.json`, or a `pytorch_model.bin`
read by the torch-free unpickler). `load` checks the config against what tcl_jax's towers compute
and re-expresses the tensors under OpenAI's names (q/k/v fused into `in_proj`, projections
transposed), so `tcl_jax.convert` converts them as it converts OpenAI's own files. Every mismatch is
a `ValueError` whose one-line message names the config field or the tensor.
"""

import json
import os
from typing import Optional

# Before transformers is imported: without torch it warns on import that models are unavailable
# (only its configuration classes are used here).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import safetensors  # pylint: disable=g-import-not-at-top,wrong-import-position
from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top,wrong-import-position

from tcl_jax.weights import (
  torch_pickle,  # pylint: disable=g-import-not-at-top,wrong-import-position
)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
# Buffers (not parameters) that older transformers versions saved.
SKIPPED_SUFFIXES = (".position_ids",)


class HFCLIPError(ValueError):
  """A transformers checkpoint that tcl_jax's CLIP cannot represent; the message is one line."""


def read_config(directory) -> CLIPConfig:
  """transformers' CLIPConfig of `directory`, checked against what tcl_jax's towers compute."""
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as f:
      raw = json.load(f)
  except OSError as e:
    raise HFCLIPError(f"cannot read {path}: {e.strerror or e}") from None
  except ValueError as e:
    raise HFCLIPError(f"{path} is not valid JSON ({e})") from None
  model_type = raw.get("model_type") if isinstance(raw, dict) else None
  if model_type != "clip":
    raise HFCLIPError(
      f"{path}: model_type is {model_type!r}, not 'clip'; tcl_jax converts CLIP models "
      f"(transformers' CLIPModel, e.g. openai/clip-vit-base-patch16) only"
    )
  for sub in ("vision_config", "text_config"):
    if not isinstance(raw.get(sub), dict):
      raise HFCLIPError(f"{path} has no {sub}; a CLIPModel config holds both towers")
  try:
    cfg = CLIPConfig.from_dict(raw)
  except (TypeError, ValueError, KeyError) as e:
    raise HFCLIPError(f"{path}: transformers cannot read it as a CLIPConfig ({e})") from None
  _check_config(cfg, path)
  return cfg


def _check_config(cfg: CLIPConfig, path: str) -> None:
  if cfg.vision_config.hidden_act != cfg.text_config.hidden_act:
    raise HFCLIPError(
      f"{path}: vision_config.hidden_act is {cfg.vision_config.hidden_act!r} but "
      f"text_config.hidden_act is {cfg.text_config.hidden_act!r}; tcl_jax's towers share one"
    )
  for name, sub in (("vision_config", cfg.vision_config), ("text_config", cfg.text_config)):
    if sub.hidden_act not in ("quick_gelu", "gelu"):
      # tcl_jax.models.clip computes quick_gelu (OpenAI's CLIP) or the exact gelu in its blocks; a
      # model trained with another activation would convert to plausible-looking wrong outputs.
      raise HFCLIPError(
        f"{path}: {name}.hidden_act is {sub.hidden_act!r}; tcl_jax's CLIP towers compute "
        f"quick_gelu or gelu, so this model cannot be converted"
      )
    if abs(sub.layer_norm_eps - 1e-5) > 1e-12:
      raise HFCLIPError(
        f"{path}: {name}.layer_norm_eps is {sub.layer_norm_eps}; tcl_jax's "
        f"LayerNorm uses 1e-5 (OpenAI's CLIP)"
      )
    if sub.intermediate_size != 4 * sub.hidden_size:
      raise HFCLIPError(
        f"{path}: {name}.intermediate_size is {sub.intermediate_size}; tcl_jax's "
        f"MLP is 4 x hidden_size = {4 * sub.hidden_size}"
      )
    if sub.hidden_size % sub.num_attention_heads:
      raise HFCLIPError(
        f"{path}: {name}.num_attention_heads {sub.num_attention_heads} does not "
        f"divide hidden_size {sub.hidden_size}"
      )
  v, t = cfg.vision_config, cfg.text_config
  if v.num_channels != 3:
    raise HFCLIPError(
      f"{path}: vision_config.num_channels is {v.num_channels}; tcl_jax takes RGB images (3)"
    )
  if v.image_size % v.patch_size:
    raise HFCLIPError(
      f"{path}: vision_config.image_size {v.image_size} is not a multiple of "
      f"patch_size {v.patch_size}"
    )
  # Text pooling. transformers' CLIPTextTransformer pools at `input_ids.argmax(-1)` when
  # text_config.eos_token_id == 2 (the configs saved before transformers PR #24773, the Hub's
  # openai/clip-vit-* among them) and otherwise at the first position whose id equals
  # eos_token_id. tcl_jax's tower pools at argmax(ids) as OpenAI's CLIP does. The two agree when
  # eos_token_id is the largest id of the vocabulary (49407 = <|endoftext|> for OpenAI's BPE):
  # argmax returns the first position of the largest id, i.e. the first end-of-text token, for
  # any sequence that holds one (tcl_jax.tokenizer always ends a sequence with it). Any other
  # eos_token_id would pool elsewhere than the checkpoint was trained to.
  if t.eos_token_id not in (2, t.vocab_size - 1):
    raise HFCLIPError(
      f"{path}: text_config.eos_token_id is {t.eos_token_id}; tcl_jax pools the text at the "
      f"largest token id (OpenAI's CLIP), which matches transformers only for eos_token_id 2 "
      f"(legacy argmax pooling) or vocab_size - 1 = {t.vocab_size - 1}"
    )


def heads(cfg: CLIPConfig) -> dict:
  """What the config states that tensor shapes do not hold: the attention heads and the blocks'
  activation."""
  return {
    "vision_heads": cfg.vision_config.num_attention_heads,
    "text_heads": cfg.text_config.num_attention_heads,
    "hidden_act": cfg.vision_config.hidden_act,
  }


def _read_safetensors(path) -> dict:
  try:
    with safetensors.safe_open(path, framework="np") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except (safetensors.SafetensorError, OSError, TypeError, ValueError) as e:
    raise HFCLIPError(
      f"{path} is not a readable safetensors file ({e}); truncated or damaged?"
    ) from None


def load_weights(directory) -> dict:
  """{transformers name: numpy array} from model.safetensors, its shards or pytorch_model.bin."""
  single = os.path.join(directory, SAFETENSORS_FILE)
  index = os.path.join(directory, SAFETENSORS_INDEX)
  if os.path.isfile(single):
    return _read_safetensors(single)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise HFCLIPError(f"cannot read the shard list {index} ({e})") from None
    sd = {}
    for name in shards:
      sd.update(_read_safetensors(os.path.join(directory, name)))
    return sd
  torch_file = os.path.join(directory, TORCH_FILE)
  if os.path.isfile(torch_file):
    return torch_pickle.load_state_dict(torch_file)
  raise HFCLIPError(
    f"{directory} has a CLIP config.json but no weights ({SAFETENSORS_FILE}, "
    f"{SAFETENSORS_INDEX} or {TORCH_FILE})"
  )


def _expected_shapes(cfg: CLIPConfig) -> dict:
  """transformers name -> shape, for every CLIPModel parameter."""
  v, t, e = cfg.vision_config, cfg.text_config, cfg.projection_dim
  shapes = {
    "vision_model.embeddings.class_embedding": (v.hidden_size,),
    "vision_model.embeddings.patch_embedding.weight": (
      v.hidden_size,
      v.num_channels,
      v.patch_size,
      v.patch_size,
    ),
    "vision_model.embeddings.position_embedding.weight": (
      (v.image_size // v.patch_size) ** 2 + 1,
      v.hidden_size,
    ),
    "vision_model.pre_layrnorm.weight": (v.hidden_size,),
    "vision_model.pre_layrnorm.bias": (v.hidden_size,),
    "vision_model.post_layernorm.weight": (v.hidden_size,),
    "vision_model.post_layernorm.bias": (v.hidden_size,),
    "visual_projection.weight": (e, v.hidden_size),
    "text_model.embeddings.token_embedding.weight": (t.vocab_size, t.hidden_size),
    "text_model.embeddings.position_embedding.weight": (t.max_position_embeddings, t.hidden_size),
    "text_model.final_layer_norm.weight": (t.hidden_size,),
    "text_model.final_layer_norm.bias": (t.hidden_size,),
    "text_projection.weight": (e, t.hidden_size),
    "logit_scale": (),
  }
  for tower, sub in (("vision_model", v), ("text_model", t)):
    d = sub.hidden_size
    for i in range(sub.num_hidden_layers):
      p = f"{tower}.encoder.layers.{i}."
      for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes[f"{p}self_attn.{proj}.weight"] = (d, d)
        shapes[f"{p}self_attn.{proj}.bias"] = (d,)
      for ln in ("layer_norm1", "layer_norm2"):
        shapes[f"{p}{ln}.weight"] = (d,)
        shapes[f"{p}{ln}.bias"] = (d,)
      shapes[f"{p}mlp.fc1.weight"] = (4 * d, d)
      shapes[f"{p}mlp.fc1.bias"] = (4 * d,)
      shapes[f"{p}mlp.fc2.weight"] = (d, 4 * d)
      shapes[f"{p}mlp.fc2.bias"] = (d,)
  return shapes


def _block(hf: dict, src: str, dst: str, out: dict) -> None:
  """One transformers encoder layer -> OpenAI's ResidualAttentionBlock keys."""
  attn = src + "self_attn."
  # torch.nn.MultiheadAttention's in_proj stacks the q, k and v projections in that order.
  out[dst + "attn.in_proj_weight"] = np.concatenate(
    [hf[f"{attn}{n}_proj.weight"] for n in ("q", "k", "v")], axis=0
  )
  out[dst + "attn.in_proj_bias"] = np.concatenate(
    [hf[f"{attn}{n}_proj.bias"] for n in ("q", "k", "v")], axis=0
  )
  pairs = (
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
  )
  for ours, theirs in pairs:
    for leaf in ("weight", "bias"):
      out[dst + ours + leaf] = hf[src + theirs + leaf]


def to_openai(hf: dict, cfg: CLIPConfig, source: str = "the checkpoint") -> dict:
  """transformers' CLIPModel tensors -> OpenAI CLIP's state_dict (names and layouts).

  Fails, in one line listing them, on missing, unexpected or mis-shaped tensors."""
  expected = _expected_shapes(cfg)
  problems = [f"missing tensor {k}" for k in expected if k not in hf]
  problems += [
    f"tensor {k} has shape {tuple(hf[k].shape)}, the config implies {shape}"
    for k, shape in expected.items()
    if k in hf and tuple(hf[k].shape) != shape
  ]
  problems += [
    f"unexpected tensor {k}" for k in hf if k not in expected and not k.endswith(SKIPPED_SUFFIXES)
  ]
  if problems:
    more = f"; ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    raise HFCLIPError(
      f"{source} does not match its CLIP config: {len(problems)} problem(s): "
      + "; ".join(problems[:8])
      + more
    )
  v, t = "vision_model.", "text_model."
  out = {
    "visual.class_embedding": hf[v + "embeddings.class_embedding"],
    "visual.conv1.weight": hf[v + "embeddings.patch_embedding.weight"],  # OIHW in both
    "visual.positional_embedding": hf[v + "embeddings.position_embedding.weight"],
    "visual.ln_pre.weight": hf[v + "pre_layrnorm.weight"],
    "visual.ln_pre.bias": hf[v + "pre_layrnorm.bias"],
    "visual.ln_post.weight": hf[v + "post_layernorm.weight"],
    "visual.ln_post.bias": hf[v + "post_layernorm.bias"],
    # nn.Linear(width, embed, bias=False).weight [embed, width]; OpenAI's `x @ proj` [width, embed].
    "visual.proj": hf["visual_projection.weight"].T,
    "token_embedding.weight": hf[t + "embeddings.token_embedding.weight"],
    "positional_embedding": hf[t + "embeddings.position_embedding.weight"],
    "ln_final.weight": hf[t + "final_layer_norm.weight"],
    "ln_final.bias": hf[t + "final_layer_norm.bias"],
    "text_projection": hf["text_projection.weight"].T,
    "logit_scale": hf["logit_scale"],
  }
  for i in range(cfg.vision_config.num_hidden_layers):
    _block(hf, f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}.", out)
  for i in range(cfg.text_config.num_hidden_layers):
    _block(hf, f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}.", out)
  return {k: np.array(a, order="C") for k, a in out.items()}


def load(directory, source: Optional[str] = None):
  """A transformers CLIP directory -> (OpenAI-layout state_dict, heads, CLIPConfig).

  `heads` ({'vision_heads', 'text_heads'}) is what the config states; pass it to
  `tcl_jax.weights.loading.convert_state_dict`."""
  directory = os.fspath(directory)
  cfg = read_config(directory)
  sd = to_openai(load_weights(directory), cfg, source or directory)
  return sd, heads(cfg), cfg
