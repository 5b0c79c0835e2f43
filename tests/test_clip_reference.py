"""The converter's name mapping, checked without any fixture: a CLIP state dict in OpenAI's key
layout, built here with random values for every tensor (LayerNorm gains and biases included, so
that each tensor's place matters), written as a PyTorch file (tests/torch_files.py), converted by
`tcl_jax.weights.loading.load_torch`, and run by our towers, against a float64 numpy forward of OpenAI's
CLIP written from its model.py (pre-LN residual blocks: x + attn(ln_1(x)), x + mlp(ln_2(x)),
QuickGELU; class token + ln_post + proj; causal text tower, ln_final, EOT pooling, projection)."""

import math

import jax
import numpy as np
import pytest
import torch_files  # tests/torch_files.py: PyTorch zip checkpoints without torch

from tcl_jax.models import clip as clip_lib
from tcl_jax.weights import loading

# Small dims; two heads per tower, so the head split matters.
EMBED, RES, PATCH, VW, VL, VH = 16, 32, 8, 32, 2, 2
CTX, VOCAB, TW, TL, TH = 12, 50, 24, 2, 2


def _ln_params(rng, prefix, w):
  """A LayerNorm's weight and bias, away from their 1 / 0 init."""
  return {
    prefix + "weight": 1 + 0.3 * rng.normal(size=w),
    prefix + "bias": 0.3 * rng.normal(size=w),
  }


def _linear(rng, prefix, n_out, n_in, weight="weight", bias="bias"):
  return {
    prefix + weight: rng.normal(size=(n_out, n_in)) * n_in**-0.5,
    prefix + bias: 0.1 * rng.normal(size=n_out),
  }


def _block(rng, prefix, w):
  return {
    **_ln_params(rng, prefix + "ln_1.", w),
    **_linear(rng, prefix + "attn.", 3 * w, w, "in_proj_weight", "in_proj_bias"),
    **_linear(rng, prefix + "attn.out_proj.", w, w),
    **_ln_params(rng, prefix + "ln_2.", w),
    **_linear(rng, prefix + "mlp.c_fc.", 4 * w, w),
    **_linear(rng, prefix + "mlp.c_proj.", w, 4 * w),
  }


def openai_state_dict(seed=0) -> dict:
  """Every tensor of OpenAI's ViT CLIP state dict (model.py's names and shapes), random."""
  rng = np.random.default_rng(seed)
  g = RES // PATCH
  sd = {
    "visual.conv1.weight": rng.normal(size=(VW, 3, PATCH, PATCH)) * (3 * PATCH * PATCH) ** -0.5,
    "visual.class_embedding": rng.normal(size=VW),
    "visual.positional_embedding": rng.normal(size=(g * g + 1, VW)),
    **_ln_params(rng, "visual.ln_pre.", VW),
    **_ln_params(rng, "visual.ln_post.", VW),
    "visual.proj": rng.normal(size=(VW, EMBED)) * VW**-0.5,
    "token_embedding.weight": rng.normal(size=(VOCAB, TW)),
    "positional_embedding": 0.3 * rng.normal(size=(CTX, TW)),
    **_ln_params(rng, "ln_final.", TW),
    "text_projection": rng.normal(size=(TW, EMBED)) * TW**-0.5,
    "logit_scale": np.asarray(np.log(1 / 0.07)),
  }
  for i in range(VL):
    sd.update(_block(rng, f"visual.transformer.resblocks.{i}.", VW))
  for i in range(TL):
    sd.update(_block(rng, f"transformer.resblocks.{i}.", TW))
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


# ---- OpenAI's CLIP in float64 numpy -----------------------------------------------------------


def _ln(x, sd, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * sd[p + "weight"] + sd[p + "bias"]


def _attention(x, sd, p, heads, causal):
  b, l, w = x.shape
  qkv = x @ sd[p + "in_proj_weight"].T + sd[p + "in_proj_bias"]
  q, k, v = (t.reshape(b, l, heads, w // heads).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, -1))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(w // heads)
  if causal:  # model.py's build_attention_mask: -inf above the diagonal
    logits = logits + np.triu(np.full((l, l), -np.inf), 1)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  y = (a @ v).transpose(0, 2, 1, 3).reshape(b, l, w)
  return y @ sd[p + "out_proj.weight"].T + sd[p + "out_proj.bias"]


_ERF = np.vectorize(math.erf)
ACTS = {
  "quick_gelu": lambda h: h * (1 / (1 + np.exp(-1.702 * h))),  # OpenAI's QuickGELU
  "gelu": lambda h: 0.5 * h * (1 + _ERF(h / np.sqrt(2))),  # torch's exact nn.GELU()
}


def _resblock(x, sd, p, heads, causal, act="quick_gelu"):
  x = x + _attention(_ln(x, sd, p + "ln_1."), sd, p + "attn.", heads, causal)
  h = _ln(x, sd, p + "ln_2.") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
  h = ACTS[act](h)
  return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def reference_image_embedding(sd, images_nhwc, act="quick_gelu"):
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  b, h, w, _ = images_nhwc.shape
  g = h // PATCH
  x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)  # NCHW as torch
  # [b, gy, gx, c, py, px]: the stride-PATCH conv1 as one contraction per patch.
  patches = x.reshape(b, 3, g, PATCH, g, PATCH).transpose(0, 2, 4, 1, 3, 5)
  x = np.einsum("byxcij,ocij->byxo", patches, sd["visual.conv1.weight"]).reshape(b, g * g, VW)
  x = np.concatenate([np.broadcast_to(sd["visual.class_embedding"], (b, 1, VW)), x], 1)
  x = _ln(x + sd["visual.positional_embedding"], sd, "visual.ln_pre.")
  for i in range(VL):
    x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", VH, causal=False, act=act)
  return _ln(x[:, 0], sd, "visual.ln_post.") @ sd["visual.proj"]


def reference_text_embedding(sd, tokens):
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
  for i in range(TL):
    x = _resblock(x, sd, f"transformer.resblocks.{i}.", TH, causal=True)
  x = _ln(x, sd, "ln_final.")
  return x[np.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


# ---- The comparison ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  sd = openai_state_dict()
  path = tmp_path_factory.mktemp("clip") / "clip_openai.pt"
  torch_files.save(torch_files.state_dict(sd), path)
  cfg, params = loading.load_torch(str(path), vision_heads=VH, text_heads=TH)
  return sd, cfg, params


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_converted_image_tower_computes_openai_clip(converted):
  sd, cfg, params = converted
  assert (
    cfg.clip.vision_width,
    cfg.clip.vision_layers,
    cfg.clip.vision_heads,
    cfg.clip.image_resolution,
  ) == (VW, VL, VH, RES)
  images = np.random.default_rng(1).normal(size=(3, RES, RES, 3)).astype(np.float32)
  want = reference_image_embedding(sd, images)
  with jax.default_matmul_precision("highest"):
    got = clip_lib.encode_image(params["clip"], cfg.clip, images)
  # float32 against float64: measured 3.5e-7 relative; a misplaced tensor moves it by O(1).
  assert _rel(got, want) < 1e-5, _rel(got, want)


def test_converted_text_tower_computes_openai_clip(converted):
  sd, cfg, params = converted
  assert (
    cfg.clip.transformer_width,
    cfg.clip.transformer_layers,
    cfg.clip.transformer_heads,
    cfg.clip.context_length,
    cfg.clip.vocab_size,
  ) == (TW, TL, TH, CTX, VOCAB)
  rng = np.random.default_rng(2)
  tokens = np.zeros((4, CTX), np.int32)
  for i, n in enumerate((3, 5, 8, CTX - 2)):  # SOT, n words, EOT (the largest id), padding
    tokens[i, 0], tokens[i, n + 1] = VOCAB - 2, VOCAB - 1
    tokens[i, 1 : n + 1] = rng.integers(1, VOCAB - 2, n)
  want = reference_text_embedding(sd, tokens)
  with jax.default_matmul_precision("highest"):
    got = clip_lib.encode_text(params["clip"], cfg.clip, tokens)
  assert _rel(got, want) < 1e-5, _rel(got, want)


def test_reference_forward_sees_each_layernorm(converted):
  # The reference is not blind to the swap it guards against: exchanging one block's ln_1 and
  # ln_2 moves the embedding by far more than the tolerance above.
  sd, _, _ = converted
  images = np.random.default_rng(1).normal(size=(3, RES, RES, 3)).astype(np.float32)
  swapped = dict(sd)
  p = "visual.transformer.resblocks.0."
  for t in ("weight", "bias"):
    swapped[p + "ln_1." + t], swapped[p + "ln_2." + t] = sd[p + "ln_2." + t], sd[p + "ln_1." + t]
  moved = _rel(reference_image_embedding(swapped, images), reference_image_embedding(sd, images))
  assert moved > 1e-2, moved


def test_a_gelu_clip_computes_the_exact_gelu(tmp_path):
  # transformers CLIPs may use hidden_act "gelu" (torch's exact GELU), stated in their config;
  # hidden_act reaches every block (here through the converter's override, as hf_clip sets it).
  sd = openai_state_dict()
  path = tmp_path / "clip_openai.pt"
  torch_files.save(torch_files.state_dict(sd), path)
  cfg, params = loading.load_torch(str(path), vision_heads=VH, text_heads=TH, hidden_act="gelu")
  assert cfg.clip.hidden_act == "gelu"
  images = np.random.default_rng(1).normal(size=(3, RES, RES, 3)).astype(np.float32)
  want = reference_image_embedding(sd, images, act="gelu")
  with jax.default_matmul_precision("highest"):
    got = clip_lib.encode_image(params["clip"], cfg.clip, images)
  assert _rel(got, want) < 1e-5, _rel(got, want)
  # The two activations are told apart far beyond that tolerance.
  assert _rel(reference_image_embedding(sd, images), want) > 1e-3
