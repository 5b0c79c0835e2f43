"""CLIP checkpoints in transformers' format (tcl_jax/weights/hf_clip.py through tcl_jax.convert).

`../shared/fixtures/hf_clip_tiny` was written by transformers itself (`CLIPModel.save_pretrained`)
with its own outputs on fixed inputs; `../shared/fixtures/tcl_tiny` holds an OpenAI-layout CLIP
that a helper here re-expresses under transformers' names. No test touches the network: the Hub
tests read a Hub cache laid out in tmp_path, with HF_HUB_OFFLINE=1.
"""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch_files

from tcl_jax.models import clip as clip_lib
from tcl_jax.weights import hf_clip  # sets up transformers quietly (no torch)
from tcl_jax.weights import loading
from tcl_jax.weights import model_files
from tcl_jax.weights import torch_pickle

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
HF = SHARED / "hf_clip_tiny"
HF_DIR = HF / "hf_clip_tiny"
TCL = SHARED / "tcl_tiny"
needs_hf = pytest.mark.skipif(
  not HF.is_dir(),
  reason="../shared/fixtures/hf_clip_tiny not present (clone without the shared fixtures)",
)
# Tiny models: compile time dominates, XLA's heavy passes are not what these tests check.
pytestmark = pytest.mark.usefixtures("fast_compiles")
needs_tcl = pytest.mark.skipif(
  not TCL.is_dir(),
  reason="../shared/fixtures/tcl_tiny not present (clone without the shared fixtures)",
)


def _leaves(tree):
  return {
    "/".join(p.key for p in path): np.asarray(x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _assert_same(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    assert la[k].dtype == lb[k].dtype, k
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def _rel(ours, ref) -> float:
  """Largest deviation relative to the reference's scale."""
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _normalised(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _run(*args, env=None):
  return subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, HF_HUB_OFFLINE="1", JAX_DISABLE_MOST_OPTIMIZATIONS="1", **(env or {})),
  )


def _one_line(r, status=2) -> str:
  lines = r.stderr.strip().splitlines()
  assert r.returncode == status and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
  return lines[0]


def _copy_fixture(tmp_path, name="hf"):
  d = tmp_path / name
  shutil.copytree(HF_DIR, d)
  for f in d.iterdir():
    f.chmod(0o644)
  d.chmod(0o755)
  return d


def _edit_config(d, fn):
  cfg = json.loads((d / "config.json").read_text())
  fn(cfg)
  (d / "config.json").write_text(json.dumps(cfg))


def _edit_weights(d, fn):
  sd = safetensors.numpy.load_file(d / "model.safetensors")
  fn(sd)
  safetensors.numpy.save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# transformers' own outputs
# ----------------------------------------------------------------------------------------------


@needs_hf
def test_converted_model_reproduces_transformers_outputs():
  cfg, params = loading.load_any(HF_DIR)
  ref = np.load(HF / "hf_reference.npz")
  c, cc = params["clip"], cfg.clip
  assert (cc.vision_heads, cc.transformer_heads) == (4, 2)  # from config.json, not width // 64
  images = jnp.asarray(ref["pixel_values"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  ids = jnp.asarray(ref["input_ids"], jnp.int32)
  image_emb = clip_lib.encode_image(c, cc, images)
  text_emb = clip_lib.encode_text(c, cc, ids)
  vision_hidden = clip_lib.VisionTransformer(cc).apply(
    {"params": c["visual"]}, images, method=lambda m, x: m.tokens(x)[0]
  )
  _, state = clip_lib.TextTransformer(cc).apply(
    {"params": c["text"]}, ids, capture_intermediates=True, mutable="intermediates"
  )
  text_hidden = np.asarray(state["intermediates"]["ln_final"]["__call__"][0])

  # transformers' CLIPModel returns image_embeds / text_embeds divided by their norms (its forward
  # normalises the projected embeddings; the fixture README's "not normalised" is not what
  # transformers 5.24 returns): compare directions. Our towers return the projected embeddings.
  assert np.allclose(np.linalg.norm(ref["image_embeds"], axis=-1), 1, atol=1e-5)
  errors = {
    "image_embeds": _rel(_normalised(image_emb), ref["image_embeds"]),
    "text_embeds": _rel(_normalised(text_emb), ref["text_embeds"]),
    "vision_last_hidden": _rel(vision_hidden, ref["vision_last_hidden"]),
  }
  # Our text tower has no padding mask, only the causal one, as OpenAI's CLIP. Without a padding
  # mask transformers computes the same thing (`text_embeds_no_attention_mask`); with it, the
  # pooled end-of-text token is unchanged too, because causal attention already hides the padding
  # after it, so both match. The mask does change the hidden states *of* the padding positions
  # (their queries no longer see padding keys), so `text_last_hidden` (computed with the mask) is
  # compared where attention_mask is 1, and differs from ours on the padding.
  errors["text_embeds_no_attention_mask"] = _rel(
    _normalised(text_emb), ref["text_embeds_no_attention_mask"]
  )
  real = ref["attention_mask"].astype(bool)
  errors["text_last_hidden"] = _rel(text_hidden[real], ref["text_last_hidden"][real])
  assert _rel(text_hidden[~real], ref["text_last_hidden"][~real]) > 1e-2  # padding differs
  # logits_per_image = exp(logit_scale) * cosine, with the checkpoint's own logit_scale.
  scale = np.exp(safetensors.numpy.load_file(HF_DIR / "model.safetensors")["logit_scale"])
  logits = scale * _normalised(image_emb) @ _normalised(text_emb).T
  errors["logits_per_image"] = _rel(logits, ref["logits_per_image"])
  print("max relative errors vs transformers:", errors)
  assert all(e <= 1e-5 for e in errors.values()), errors


# ----------------------------------------------------------------------------------------------
# The same CLIP under OpenAI's and transformers' names
# ----------------------------------------------------------------------------------------------


def write_hf_clip(openai_sd: dict, directory, *, vision_heads: int, text_heads: int):
  """An OpenAI-layout CLIP state_dict -> a transformers CLIPModel directory (config.json by
  transformers' CLIPConfig, model.safetensors under its parameter names). Written from
  transformers' naming (modeling_clip: CLIPEncoderLayer.self_attn.{q,k,v,out}_proj,
  layer_norm1 before attention, layer_norm2 before the MLP fc1/fc2; Linear weights [out, in])."""
  sd = {k: np.asarray(v, np.float32) for k, v in openai_sd.items()}
  width = sd["visual.conv1.weight"].shape[0]
  patch = sd["visual.conv1.weight"].shape[-1]
  grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
  tw = sd["ln_final.weight"].shape[0]
  hf = {
    "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
    "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
    "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
    "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
    "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
    "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
    "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
    "visual_projection.weight": sd["visual.proj"].T,
    "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
    "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
    "text_model.final_layer_norm.weight": sd["ln_final.weight"],
    "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    "text_projection.weight": sd["text_projection"].T,
    "logit_scale": np.asarray(sd.get("logit_scale", np.log(1 / 0.07)), np.float32).reshape(()),
  }
  layers = {}
  for tower, ours in (
    ("vision_model", "visual.transformer.resblocks."),
    ("text_model", "transformer.resblocks."),
  ):
    n = len({k[len(ours) :].split(".")[0] for k in sd if k.startswith(ours)})
    layers[tower] = n
    for i in range(n):
      o, t = f"{ours}{i}.", f"{tower}.encoder.layers.{i}."
      w = np.split(sd[o + "attn.in_proj_weight"], 3, axis=0)
      b = np.split(sd[o + "attn.in_proj_bias"], 3, axis=0)
      for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        hf[f"{t}self_attn.{name}.weight"], hf[f"{t}self_attn.{name}.bias"] = w[j], b[j]
      for theirs, mine in (
        ("self_attn.out_proj", "attn.out_proj"),
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
      ):
        hf[f"{t}{theirs}.weight"] = sd[f"{o}{mine}.weight"]
        hf[f"{t}{theirs}.bias"] = sd[f"{o}{mine}.bias"]
  config = hf_clip.CLIPConfig(
    projection_dim=sd["text_projection"].shape[1],
    vision_config=dict(
      hidden_size=width,
      intermediate_size=4 * width,
      patch_size=patch,
      image_size=patch * grid,
      num_hidden_layers=layers["vision_model"],
      num_attention_heads=vision_heads,
      hidden_act="quick_gelu",
    ),
    text_config=dict(
      hidden_size=tw,
      intermediate_size=4 * tw,
      vocab_size=sd["token_embedding.weight"].shape[0],
      max_position_embeddings=sd["positional_embedding"].shape[0],
      num_hidden_layers=layers["text_model"],
      num_attention_heads=text_heads,
      hidden_act="quick_gelu",
      eos_token_id=49407,
    ),
  )
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(config.to_json_string())
  safetensors.numpy.save_file(
    {k: np.array(v, order="C") for k, v in hf.items()},
    directory / "model.safetensors",
    metadata={"format": "pt"},
  )
  return directory


def _tcl_heads():
  c = json.loads((TCL / "fixture.json").read_text())["clip"]
  return {
    "vision_heads": c.get("vision_heads", c["vision_width"] // 64),
    "text_heads": c["transformer_heads"],
  }


@pytest.fixture
def tcl_clip_in_hf_names(tmp_path):
  sd = torch_pickle.load_state_dict(TCL / "clip_openai.pt")
  return write_hf_clip(sd, tmp_path / "hf_clip", **_tcl_heads())


@needs_tcl
def test_openai_clip_in_hf_names_converts_to_the_same_params(tcl_clip_in_hf_names):
  cfg_hf, p_hf = loading.load_any(tcl_clip_in_hf_names)
  cfg_oai, p_oai = loading.load_torch(TCL / "clip_openai.pt", **_tcl_heads())
  assert cfg_hf == cfg_oai
  _assert_same(p_hf, p_oai)  # the CLIP towers and the masker initialised from them


@needs_tcl
def test_hf_clip_completes_the_minimal_release_file_like_the_full_file(
  tmp_path, tcl_clip_in_hf_names
):
  sd = {
    k: v
    for k, v in torch_pickle.load_state_dict(TCL / "tcl_reference.pth").items()
    if not k.startswith("clip_")
  }
  minimal = torch_files.save({"model": torch_files.state_dict(sd)}, tmp_path / "tcl.pth")
  cfg_full, full = loading.load_torch(TCL / "tcl_reference.pth", **_tcl_heads())
  cfg, params = loading.load_torch(minimal, clip=tcl_clip_in_hf_names)  # heads from config.json
  assert cfg == cfg_full
  _assert_same(params, full)
  # Given heads must agree with the config's.
  with pytest.raises(ValueError, match="--text_heads 1 disagrees with .*states 2"):
    loading.load_torch(minimal, clip=tcl_clip_in_hf_names, text_heads=1)


@needs_hf
def test_pytorch_model_bin_and_sharded_safetensors_convert_like_model_safetensors(tmp_path):
  _, want = loading.load_any(HF_DIR)
  hf = safetensors.numpy.load_file(HF_DIR / "model.safetensors")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  shutil.copy(HF_DIR / "config.json", bin_dir)
  torch_files.save(torch_files.state_dict(hf), bin_dir / "pytorch_model.bin")
  _assert_same(loading.load_any(bin_dir)[1], want)
  shard_dir = tmp_path / "shards"
  shard_dir.mkdir()
  shutil.copy(HF_DIR / "config.json", shard_dir)
  names = sorted(hf)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    f = f"model-0000{i + 1}-of-00002.safetensors"
    safetensors.numpy.save_file({k: hf[k] for k in part}, shard_dir / f)
    weight_map.update({k: f for k in part})
  (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _assert_same(loading.load_any(shard_dir)[1], want)


# ----------------------------------------------------------------------------------------------
# Mismatches: one line naming the key
# ----------------------------------------------------------------------------------------------


@needs_hf
def test_mismatches_are_one_line_naming_the_key(tmp_path):
  cases = {
    "siglip": (lambda c: c.update(model_type="siglip"), None, "model_type is 'siglip'"),
    "gelu": (  # one tower gelu, the other quick_gelu: our towers share one activation
      lambda c: c["vision_config"].update(hidden_act="gelu"),
      None,
      "vision_config.hidden_act is 'gelu' but text_config.hidden_act is 'quick_gelu'",
    ),
    "silu": (
      lambda c: [c[t].update(hidden_act="silu") for t in ("vision_config", "text_config")],
      None,
      "vision_config.hidden_act is 'silu'; tcl_jax's CLIP towers compute quick_gelu or gelu",
    ),
    "eos": (
      lambda c: c["text_config"].update(eos_token_id=7),
      None,
      "text_config.eos_token_id is 7",
    ),
    "missing": (
      None,
      lambda sd: sd.pop("vision_model.encoder.layers.1.layer_norm2.bias"),
      "missing tensor vision_model.encoder.layers.1.layer_norm2.bias",
    ),
    "shape": (
      None,
      lambda sd: sd.update({"text_projection.weight": np.zeros((48, 65), np.float32)}),
      "tensor text_projection.weight has shape (48, 65), the config implies (48, 64)",
    ),
  }
  for name, (cfg_fn, sd_fn, want) in cases.items():
    d = _copy_fixture(tmp_path, name)
    if cfg_fn:
      _edit_config(d, cfg_fn)
    if sd_fn:
      _edit_weights(d, sd_fn)
    with pytest.raises(ValueError) as e:
      loading.load_any(d)
    assert want in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
  # The command line: one line, exit 2, nothing written.
  line = _one_line(
    _run("-m", "tcl_jax.convert", str(tmp_path / "gelu"), "--output", str(tmp_path / "out"))
  )
  assert "vision_config.hidden_act is 'gelu'" in line and not (tmp_path / "out").exists()


@needs_hf
def test_a_gelu_config_converts_to_gelu_towers(tmp_path):
  # Both towers gelu (a CLIP trained with the exact GELU): converted, with the activation stated
  # in the model config (the math itself: tests/test_clip_reference.py).
  d = _copy_fixture(tmp_path, "gelu")
  _edit_config(
    d, lambda c: [c[t].update(hidden_act="gelu") for t in ("vision_config", "text_config")]
  )
  cfg, params = loading.load_any(d)
  assert cfg.clip.hidden_act == "gelu"
  quick_cfg, quick_params = loading.load_any(HF_DIR)
  assert quick_cfg.clip.hidden_act == "quick_gelu"
  _assert_same(params, quick_params)  # the same weights: only the activation differs


# ----------------------------------------------------------------------------------------------
# Command line, Hub ids, no torch
# ----------------------------------------------------------------------------------------------


def _hub_cache(root, repo_id, files):
  """A Hugging Face Hub cache (huggingface_hub's layout: refs/main -> snapshots/<commit>/) that
  holds `files` for `repo_id`, as a download would leave it."""
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = Path(root) / ("models--" + repo_id.replace("/", "--"))
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  for f in files:
    shutil.copy(f, snap / Path(f).name)
  return Path(root)


@needs_hf
def test_cli_converts_a_hub_id_offline_without_torch(tmp_path):
  cache = _hub_cache(
    tmp_path / "hub",
    "tiny-org/hf-clip-tiny",
    [HF_DIR / "config.json", HF_DIR / "model.safetensors"],
  )
  out = tmp_path / "ckpt"
  code = (
    "import sys; from tcl_jax import convert; rc = convert.main(sys.argv[1:]); "
    "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch imported'; "
    "sys.exit(rc)"
  )
  r = _run(
    "-c", code, "tiny-org/hf-clip-tiny", "--output", str(out), env={"HF_HUB_CACHE": str(cache)}
  )
  assert r.returncode == 0, r.stderr
  assert (
    "heads: vision 4 (from the transformers config), text 2 (from the transformers config)"
    in r.stdout
  ), r.stdout
  _assert_same(model_files.load_checkpoint(out)[1], loading.load_any(HF_DIR)[1])
  # A Hub id that is not in the cache, offline: one line.
  line = _one_line(
    _run(
      "-m",
      "tcl_jax.convert",
      "tiny-org/not-there",
      "--output",
      str(tmp_path / "x"),
      env={"HF_HUB_CACHE": str(cache)},
    )
  )
  assert "tiny-org/not-there" in line and "not in the local Hub cache" in line, line
