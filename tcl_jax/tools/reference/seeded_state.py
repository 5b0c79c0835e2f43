"""Seeded weights, inputs and array summaries of the CoDe reference fixture, from numpy alone.

The fixture (code_fixture.py, run with torch) and our tests (no torch) both import this module,
so the random weights and inputs need neither torch nor a 100 MB file: a `recipe` (written into
fixture.json) regenerates every learned tensor of the authors' ImageTextCoDecomposition.

Weights (RULE): one `np.random.Generator(np.random.PCG64(seed))`; the recipe's keys in sorted
order; per key, `z = rng.standard_normal(shape)` (float64) for kinds that draw, then
  normal: center + scale * z
  like:   value[base] + scale * z    (base is a `normal` key: the masker's copies of CLIP tensors)
  const:  center                     (draws nothing)
cast to float32. The keys are the authors' state-dict names; the one CLIP they load three times
is keyed once, as `frozen_clip.*`, and `code_state_dict` expands it to all three copies.

Inputs: `generated_array(spec)` with spec {"rule", "seed", "shape"}; each spec has its own
Generator(PCG64(spec["seed"])) (seed: a list of ints, a SeedSequence entropy).

Summaries of big arrays (the compact fixture): `summarize(name, x, seed)`: the float64 norm,
`N_SAMPLE` elements at indices drawn with replacement, and `N_PROJ` projections on
standard-normal vectors, all from Generator(PCG64([seed, crc32(name)])).
"""

import zlib

import numpy as np

RULE = (
  "one np.random.Generator(np.random.PCG64(seed)); keys in sorted order; per key z = "
  "rng.standard_normal(shape) (float64) unless kind is const; normal: center + scale*z; like: "
  "value[base] + scale*z; const: center; then float32"
)
SOT_TOKEN = 49406  # <|startoftext|>
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the authors' us.DEFAULT_MEAN / DEFAULT_STD
IMAGENET_STD = (0.229, 0.224, 0.225)
LOG_INV_T = float(np.log(1 / 0.07))  # InfoNCE's and CLIP's logit-scale init
N_SAMPLE = 256
N_PROJ = 4

BLOCK_KEYS = (
  "attn.in_proj_weight",
  "attn.in_proj_bias",
  "attn.out_proj.weight",
  "attn.out_proj.bias",
  "ln_1.weight",
  "ln_1.bias",
  "mlp.c_fc.weight",
  "mlp.c_fc.bias",
  "mlp.c_proj.weight",
  "mlp.c_proj.bias",
  "ln_2.weight",
  "ln_2.bias",
)
LN_SCALE = (
  0.05  # LayerNorm weights 1 + 0.05 z, biases 0.05 z: far enough from the defaults to matter
)
BIAS_SCALE = 0.05
MASKER_OFFSET = 0.01  # the masker's copies of CLIP tensors: CLIP + 0.01 z (a "trained" masker)


def _n(shape, scale, center=0.0):
  return {"shape": list(shape), "kind": "normal", "scale": float(scale), "center": float(center)}


def _like(base, shape, scale=MASKER_OFFSET):
  return {"shape": list(shape), "kind": "like", "scale": float(scale), "base": base}


def _const(shape, value):
  return {"shape": list(shape), "kind": "const", "scale": 0.0, "center": float(value)}


def _blocks(prefix, width, layers):
  """Residual attention blocks with openai CLIP's init std (proj_std, attn_std, fc_std)."""
  proj_std = width**-0.5 * (2 * layers) ** -0.5
  out = {}
  for i in range(layers):
    p = f"{prefix}.{i}."
    out.update(
      {
        p + "attn.in_proj_weight": _n((3 * width, width), width**-0.5),
        p + "attn.in_proj_bias": _n((3 * width,), BIAS_SCALE),
        p + "attn.out_proj.weight": _n((width, width), proj_std),
        p + "attn.out_proj.bias": _n((width,), BIAS_SCALE),
        p + "ln_1.weight": _n((width,), LN_SCALE, 1.0),
        p + "ln_1.bias": _n((width,), LN_SCALE),
        p + "mlp.c_fc.weight": _n((4 * width, width), (2 * width) ** -0.5),
        p + "mlp.c_fc.bias": _n((4 * width,), BIAS_SCALE),
        p + "mlp.c_proj.weight": _n((width, 4 * width), proj_std),
        p + "mlp.c_proj.bias": _n((width,), BIAS_SCALE),
        p + "ln_2.weight": _n((width,), LN_SCALE, 1.0),
        p + "ln_2.bias": _n((width,), LN_SCALE),
      }
    )
  return out


def code_recipe(dims: dict, seed: int) -> dict:
  """The recipe of every learned tensor of the authors' model at `dims` (fixture.json -> dims)."""
  vw, vl, ps = dims["vision_width"], dims["vision_layers"], dims["vision_patch_size"]
  tw, tl, ed = dims["transformer_width"], dims["transformer_layers"], dims["embed_dim"]
  grid = dims["image_resolution"] // ps
  e = {}
  # the CLIP (OpenAI layout under frozen_clip.)
  c = "frozen_clip."
  e[c + "token_embedding.weight"] = _n((dims["vocab_size"], tw), 0.02)
  e[c + "positional_embedding"] = _n((dims["context_length"], tw), 0.01)
  e[c + "text_projection"] = _n((tw, ed), tw**-0.5)
  e[c + "ln_final.weight"] = _n((tw,), LN_SCALE, 1.0)
  e[c + "ln_final.bias"] = _n((tw,), LN_SCALE)
  e[c + "logit_scale"] = _const((), LOG_INV_T)
  e.update(_blocks(c + "transformer.resblocks", tw, tl))
  v = c + "visual."
  e[v + "conv1.weight"] = _n((vw, 3, ps, ps), (3 * ps * ps) ** -0.5)
  e[v + "class_embedding"] = _n((vw,), vw**-0.5)
  e[v + "positional_embedding"] = _n((grid * grid + 1, vw), vw**-0.5)
  e[v + "ln_pre.weight"] = _n((vw,), LN_SCALE, 1.0)
  e[v + "ln_pre.bias"] = _n((vw,), LN_SCALE)
  e[v + "ln_post.weight"] = _n((vw,), LN_SCALE, 1.0)
  e[v + "ln_post.bias"] = _n((vw,), LN_SCALE)
  e[v + "proj"] = _n((vw, ed), vw**-0.5)
  e.update(_blocks(v + "transformer.resblocks", vw, vl))
  # the masker: CLIP's blocks ie_freeze.. and its ln_post/proj (as image_proj), moved off CLIP
  m = "masker.image_encoder."
  for j in range(dims["ie_freeze"], vl):  # a slice of nn.Sequential keeps CLIP's block numbers
    for k in BLOCK_KEYS:
      base = f"{v}transformer.resblocks.{j}.{k}"
      e[f"{m}backbone.transformer.resblocks.{j}.{k}"] = _like(base, e[base]["shape"])
  for k, base in (("ln.weight", "ln_post.weight"), ("ln.bias", "ln_post.bias"), ("proj", "proj")):
    e[f"{m}decoder.image_proj.{k}"] = _like(v + base, e[v + base]["shape"])
  ks = dims.get("decoder_kernel", 3)
  convs = ("conv", "conv2") if dims.get("decoder_double", False) else ("conv",)
  for i in range(dims.get("decoder_layers", 2)):  # GDecoder on the backbone's width (no proj)
    for cv in convs:
      p = f"{m}decoder.decoder.net.{i}.{cv}."
      e[p + "norm.weight"] = _n((vw,), LN_SCALE, 1.0)
      e[p + "norm.bias"] = _n((vw,), LN_SCALE)
      e[p + "conv.weight"] = _n((vw, vw, ks, ks), (vw * ks * ks) ** -0.5)
      e[p + "conv.bias"] = _n((vw,), BIAS_SCALE)
      e[p + "gate.gate"] = _n((), 0.1, 0.5)  # the zero-init tanh gates, opened
  e["masker.sim2mask.w"] = _n((), 0.5, 10.0)
  e["masker.sim2mask.b"] = _n((), 0.2, -1.0)  # not -2.5: hard masks ~25% on, both sides exercised
  # CoDe's own tensors
  e["clip_text_encoder.prompt_learner.ctx"] = _n((dims.get("n_ctx", 16), tw), 0.02)
  e.update(_blocks("text_decoder.transformer.resblocks", tw, dims.get("text_decoder_layers", 2)))
  bg = dims.get("bg_image_size", 224)
  e["learnable_image_bg"] = _n((1, 3, bg, bg), 0.5)
  e["bg_text"] = _n((dims["context_length"], 1, tw), 0.02)
  e["text_mask_w"] = _n((), 0.5, 10.0)
  e["text_mask_b"] = _n((), 0.25, 0.5)
  e["tcli_loss.logit_scale"] = _const((), LOG_INV_T + 0.3)  # all three differ
  e["tclf_loss.logit_scale"] = _const((), LOG_INV_T - 0.2)
  e["hcl_loss.logit_scale"] = _const((), LOG_INV_T + 0.1)
  return {"seed": int(seed), "rule": RULE, "entries": {k: e[k] for k in sorted(e)}}


def state_dict_arrays(recipe: dict) -> dict:
  """{recipe key: float32 array}, regenerated by RULE."""
  rng = np.random.Generator(np.random.PCG64(recipe["seed"]))
  entries = recipe["entries"]
  out, pending = {}, {}
  for key in sorted(entries):
    ent = entries[key]
    shape = tuple(ent["shape"])
    if ent["kind"] == "const":
      out[key] = np.full(shape, ent["center"], np.float32)
      continue
    z = rng.standard_normal(shape)
    if ent["kind"] == "normal":
      out[key] = np.asarray(ent["center"] + ent["scale"] * z, np.float32)
    elif ent["kind"] == "like":
      pending[key] = z
    else:
      raise ValueError(f"{key}: unknown kind {ent['kind']!r}")
  for key, z in pending.items():  # bases are `normal` keys, all made above
    ent = entries[key]
    base = out[ent["base"]].astype(np.float64)
    out[key] = np.asarray(base + ent["scale"] * z, np.float32)
  return out


def code_state_dict(arrays: dict) -> dict:
  """The authors' state-dict names -> arrays, for everything but the pamr.* constant kernels.

  frozen_clip.* is the whole CLIP; clip_text_encoder.prompt_learner.clip_model.* its text half
  (no visual.*, no logit_scale); clip_text_encoder.text_encoder.* the same text tensors again;
  clip_image_encoder.clip_visual.* its visual tower without ln_post/proj, which live in
  clip_image_encoder.clip_proj.{ln.weight, ln.bias, proj}; prompt_learner.token_prefix is the
  token embedding of SOT, [1, 1, width].
  """
  out = dict(arrays)
  for key, x in arrays.items():
    if not key.startswith("frozen_clip."):
      continue
    k = key[len("frozen_clip.") :]
    if k.startswith("visual."):
      kv = k[len("visual.") :]
      if kv.startswith("ln_post."):
        out["clip_image_encoder.clip_proj.ln." + kv[len("ln_post.") :]] = x
      elif kv == "proj":
        out["clip_image_encoder.clip_proj.proj"] = x
      else:
        out["clip_image_encoder.clip_visual." + kv] = x
    elif k != "logit_scale":
      out["clip_text_encoder.prompt_learner.clip_model." + k] = x
      if k != "token_embedding.weight":
        out["clip_text_encoder.text_encoder." + k] = x
  emb = arrays["frozen_clip.token_embedding.weight"]
  out["clip_text_encoder.prompt_learner.token_prefix"] = emb[SOT_TOKEN][None, None].copy()
  return out


def generated_array(spec: dict) -> np.ndarray:
  """An input array from its spec: rule "image" (NCHW uniform pixels in [0, 1), normalized with
  the ImageNet mean/std, float32) or "uniform" (the Gumbel noise U, float32, clipped into
  [2^-24, 1 - 2^-24] so that log(U / (1 - U)) is finite)."""
  rng = np.random.Generator(np.random.PCG64(list(spec["seed"])))
  shape = tuple(spec["shape"])
  u = rng.random(shape)
  if spec["rule"] == "image":
    mean = np.asarray(IMAGENET_MEAN)[:, None, None]
    std = np.asarray(IMAGENET_STD)[:, None, None]
    return ((u - mean) / std).astype(np.float32)
  if spec["rule"] == "uniform":
    return np.clip(u, 2.0**-24, 1 - 2.0**-24).astype(np.float32)
  raise ValueError(f"unknown rule {spec['rule']!r}")


def _summary_rng(name: str, seed: int):
  return np.random.Generator(np.random.PCG64([int(seed), zlib.crc32(name.encode())]))


def summary_indices(name: str, size: int, seed: int, n: int = N_SAMPLE) -> np.ndarray:
  """The flat indices `summarize` samples (with replacement; the first draw of its generator)."""
  return _summary_rng(name, seed).integers(0, size, size=n)


def summarize(name: str, x, seed: int, n_sample: int = N_SAMPLE, n_proj: int = N_PROJ) -> dict:
  """{"norm", "idx", "val", "proj"} of x flattened (C order): its float64 2-norm, n_sample
  elements at seeded indices, and n_proj projections on seeded standard-normal vectors (each
  projection of an error e is ~N(0, ||e||^2), so |proj - proj_ref| / norm_ref estimates the
  relative error ||x - x_ref|| / ||x_ref||)."""
  flat = np.asarray(x, np.float64).ravel()
  rng = _summary_rng(name, seed)
  idx = rng.integers(0, flat.size, size=n_sample)
  vecs = rng.standard_normal((n_proj, flat.size))
  return {
    "norm": np.float64(np.linalg.norm(flat)),
    "idx": idx.astype(np.int64),
    "val": flat[idx].astype(np.float32),
    "proj": vecs @ flat,
  }
