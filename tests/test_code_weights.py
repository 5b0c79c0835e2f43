"""CoDe checkpoints: the authors' state_dict (tests/code_files.py, small random dims) converted onto
the contract's parameter tree, the three CLIP copies, `--clip` completion, and the model kind that
converted directories, exports and `from_pretrained` record and restore (TCL files unchanged)."""

import json
import os
import subprocess
import sys

import code_files
import jax
import ml_collections
import numpy as np
import omegaconf
import pytest
import safetensors
import safetensors.numpy
import torch_files

import tcl_jax
from tcl_jax import convert
from tcl_jax import export
from tcl_jax.models import code as code_lib
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.train import checkpointing
from tcl_jax.weights import key_maps
from tcl_jax.weights import loading
from tcl_jax.weights import model_files

COPIES = (
  "frozen_clip.",
  "clip_text_encoder.prompt_learner.clip_model.",
  "clip_text_encoder.text_encoder.",
  "clip_image_encoder.",
)
# Keys of no learned state: PAMR's kernels, the prompt's SOT embedding, CLIP's own temperature.
BUFFERS = ("pamr.", "clip_text_encoder.prompt_learner.token_prefix", "frozen_clip.logit_scale")


def _leaves(tree):
  return {
    "/".join(p.key for p in path): np.asarray(x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _assert_bitwise(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
    assert la[k].tobytes() == lb[k].tobytes(), k


def _save(sd, path):
  return torch_files.save({"model": torch_files.state_dict(sd)}, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("code")
  rng = np.random.default_rng(7)
  clip = code_files.openai_clip(rng)
  sd = code_files.code_state_dict(rng, clip)
  trained = {k: v for k, v in sd.items() if not k.startswith(COPIES)}
  return {
    "dir": d,
    "clip": clip,
    "sd": sd,
    "trained": trained,
    "code": _save(sd, d / "code.pth"),
    "clip_file": torch_files.save(torch_files.state_dict(clip), d / "ViT-tiny.pt"),
    "minimal": _save(trained, d / "code_trained.pth"),
  }


@pytest.fixture(scope="module")
def converted(files):
  return loading.load_torch(files["code"])


def _main(module, capsys, *args):
  """module.main in this process: (status, stdout, stderr)."""
  capsys.readouterr()
  try:
    rc = module.main([str(a) for a in args])
  except SystemExit as e:  # argparse's exit
    rc = e.code
  out, err = capsys.readouterr()
  return rc, out, err


def _one_error_line(rc, out, err) -> str:
  lines = err.strip().splitlines()
  assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
  assert "Traceback" not in err and out == ""
  return lines[0]


# ----------------------------------------------------------------------------------------------
# Where every tensor lands
# ----------------------------------------------------------------------------------------------

# One block as the authors' clip.model.ResidualAttentionBlock names it -> (our path, layout).
BLOCK = {
  "ln_1.weight": (("ln_1", "scale"), None),
  "ln_1.bias": (("ln_1", "bias"), None),
  "attn.in_proj_weight": (("attn", "in_proj", "kernel"), "T"),
  "attn.in_proj_bias": (("attn", "in_proj", "bias"), None),
  "attn.out_proj.weight": (("attn", "out_proj", "kernel"), "T"),
  "attn.out_proj.bias": (("attn", "out_proj", "bias"), None),
  "ln_2.weight": (("ln_2", "scale"), None),
  "ln_2.bias": (("ln_2", "bias"), None),
  "mlp.c_fc.weight": (("c_fc", "kernel"), "T"),
  "mlp.c_fc.bias": (("c_fc", "bias"), None),
  "mlp.c_proj.weight": (("c_proj", "kernel"), "T"),
  "mlp.c_proj.bias": (("c_proj", "bias"), None),
}


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree)


def _check_block(block, sd, prefix):
  assert set(_leaves(block)) == {"/".join(p) for p, _ in BLOCK.values()}
  for tkey, (path, layout) in BLOCK.items():
    want = sd[prefix + tkey].T if layout == "T" else sd[prefix + tkey]
    np.testing.assert_array_equal(_at(block, path), want, err_msg=prefix + tkey)


def test_config_is_read_off_the_shapes(converted):
  cfg, _ = converted
  assert type(cfg) is code_lib.CoDeConfig
  c = cfg.clip
  assert (c.vision_width, c.vision_layers, c.vision_patch_size, c.image_resolution) == (
    128,
    4,
    16,
    64,
  )
  assert (c.transformer_width, c.transformer_layers, c.embed_dim, c.vocab_size) == (
    64,
    2,
    64,
    49408,
  )
  assert (cfg.ie_freeze, cfg.decoder_n_layers, cfg.decoder_double, cfg.decoder_norm) == (
    3,
    2,
    False,
    "ln",
  )
  # The authors' TextDecoder: 2 blocks, 8 heads (not in the shapes); 16 prompt tokens; 224 px bg.
  assert (cfg.n_ctx, cfg.text_decoder_layers, cfg.text_decoder_heads, cfg.bg_image_size) == (
    16,
    2,
    8,
    224,
  )


def test_every_tensor_lands_where_the_contract_says(files, converted):
  cfg, params = converted
  sd = files["sd"]
  assert set(params) == {
    "clip",
    "masker",
    "prompt_ctx",
    "text_decoder",
    "bg_image",
    "bg_text",
    "text_mask_w",
    "text_mask_b",
    "tcli_logit_scale",
    "tclf_logit_scale",
    "hcl_logit_scale",
  }
  # The one CLIP, TCL's layout (frozen_clip's copy; the copies are equal).
  vis, txt = params["clip"]["visual"], params["clip"]["text"]
  np.testing.assert_array_equal(
    vis["conv1"]["kernel"], sd["frozen_clip.visual.conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(vis["proj"], sd["clip_image_encoder.clip_proj.proj"])
  np.testing.assert_array_equal(vis["ln_post"]["scale"], sd["frozen_clip.visual.ln_post.weight"])
  np.testing.assert_array_equal(
    vis["positional_embedding"], sd["clip_image_encoder.clip_visual.positional_embedding"]
  )
  for i in range(4):
    _check_block(vis[f"resblocks_{i}"], sd, f"frozen_clip.visual.transformer.resblocks.{i}.")
  np.testing.assert_array_equal(
    txt["token_embedding"]["embedding"],
    sd["clip_text_encoder.prompt_learner.clip_model.token_embedding.weight"],
  )
  np.testing.assert_array_equal(
    txt["text_projection"], sd["clip_text_encoder.text_encoder.text_projection"]
  )
  np.testing.assert_array_equal(txt["ln_final"]["bias"], sd["frozen_clip.ln_final.bias"])
  for i in range(2):
    _check_block(
      txt[f"resblocks_{i}"], sd, f"clip_text_encoder.text_encoder.transformer.resblocks.{i}."
    )
  # The masker: TCL's, one conv per ResConv (decoder_double=False).
  m = params["masker"]
  _check_block(
    m["backbone"]["resblocks_3"], sd, "masker.image_encoder.backbone.transformer.resblocks.3."
  )
  assert set(m["backbone"]) == {"resblocks_3"}
  for j in range(2):
    net = m["decoder"][f"net_{j}"]
    assert set(net) == {"conv"}
    t = f"masker.image_encoder.decoder.decoder.net.{j}.conv."
    np.testing.assert_array_equal(
      net["conv"]["conv"]["kernel"], sd[t + "conv.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(net["conv"]["conv"]["bias"], sd[t + "conv.bias"])
    np.testing.assert_array_equal(net["conv"]["norm"]["scale"], sd[t + "norm.weight"])
    np.testing.assert_array_equal(net["conv"]["gate"], sd[t + "gate.gate"])
  np.testing.assert_array_equal(
    m["image_proj"]["proj"], sd["masker.image_encoder.decoder.image_proj.proj"]
  )
  np.testing.assert_array_equal(
    m["image_proj"]["ln"]["scale"], sd["masker.image_encoder.decoder.image_proj.ln.weight"]
  )
  np.testing.assert_array_equal(m["sim2mask"]["w"], sd["masker.sim2mask.w"])
  np.testing.assert_array_equal(m["sim2mask"]["b"], sd["masker.sim2mask.b"])
  # CoDe's own: the prompt, the text decoder (per block as CLIP's text blocks), the backgrounds.
  np.testing.assert_array_equal(params["prompt_ctx"], sd["clip_text_encoder.prompt_learner.ctx"])
  assert set(params["text_decoder"]) == {"resblocks_0", "resblocks_1"}
  for i in range(2):
    _check_block(
      params["text_decoder"][f"resblocks_{i}"], sd, f"text_decoder.transformer.resblocks.{i}."
    )
  bg = sd["learnable_image_bg"]  # [1, 3, 224, 224] -> [224, 224, 3]
  assert params["bg_image"].shape == (224, 224, 3)
  np.testing.assert_array_equal(params["bg_image"], bg[0].transpose(1, 2, 0))
  assert params["bg_image"][5, 7, 2] == bg[0, 2, 5, 7] != bg[0, 2, 7, 5]  # rows, columns, RGB
  assert params["bg_text"].shape == (77, 64)
  np.testing.assert_array_equal(params["bg_text"], sd["bg_text"][:, 0])
  for ours, theirs in (
    ("text_mask_w", "text_mask_w"),
    ("text_mask_b", "text_mask_b"),
    ("tcli_logit_scale", "tcli_loss.logit_scale"),
    ("tclf_logit_scale", "tclf_loss.logit_scale"),
    ("hcl_logit_scale", "hcl_loss.logit_scale"),
  ):
    assert params[ours].shape == () and params[ours].dtype == np.float32, ours
    assert params[ours] == sd[theirs], ours
  # Every leaf is float32 and of the shapes the config implies.
  shapes = model_files.param_shapes(cfg)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
    lambda x: (x.shape, x.dtype), params
  )


def test_back_to_the_authors_layout_is_exact(files, converted):
  """Every tensor of the file, all three CLIP copies included, comes back bit for bit."""
  cfg, params = converted
  sd = files["sd"]
  back = key_maps.to_torch_state_dict(cfg, params)
  assert set(back) == {k for k in sd if not k.startswith(BUFFERS)}
  for k, v in back.items():
    assert v.dtype == sd[k].dtype and v.shape == sd[k].shape, k
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


# ----------------------------------------------------------------------------------------------
# The three CLIP copies, and --clip
# ----------------------------------------------------------------------------------------------


def _changed(sd, **edits):
  out = dict(sd)
  for key, fn in edits.items():
    out[key.replace("__", ".")] = fn(np.array(sd[key.replace("__", ".")]))
  return out


def _nudge(a):
  a.flat[3] += 1e-3
  return a


def test_copies_that_disagree_are_one_error_naming_the_first(files):
  sd = files["sd"]
  late = "clip_image_encoder.clip_visual.transformer.resblocks.2.mlp.c_fc.bias"
  early = "clip_text_encoder.text_encoder.ln_final.weight"
  bad = dict(sd)
  bad[late] = _nudge(np.array(sd[late]))
  bad[early] = _nudge(np.array(sd[early]))
  assert list(bad).index(early) < list(bad).index(late)
  with pytest.raises(model_files.ConversionError) as e:
    loading.convert_state_dict(bad)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(
    "the checkpoint's copies of the frozen CLIP disagree: "
  ), msg
  assert f"{early} differs from frozen_clip.ln_final.weight (max |difference| 0.001)" in msg, msg
  assert late not in msg
  del bad[early]
  bad[early] = sd[early]
  with pytest.raises(
    model_files.ConversionError,
    match=f"{late} differs from frozen_clip.visual.transformer.resblocks.2.mlp.c_fc.bias ",
  ):
    loading.convert_state_dict(bad)
  # Of another shape.
  shape = dict(
    sd,
    **{
      "clip_text_encoder.prompt_learner.clip_model.text_projection": sd[
        "frozen_clip.text_projection"
      ][:, :32]
    },
  )
  with pytest.raises(
    model_files.ConversionError, match=r"text_projection \(shape \(64, 32\) vs \(64, 64\)\)"
  ):
    loading.convert_state_dict(shape)


def test_one_copy_is_enough(files, converted):
  sd = files["sd"]
  for keep in COPIES[:1] + (("clip_text_encoder.", "clip_image_encoder."),):
    one = {k: v for k, v in sd.items() if not k.startswith(COPIES) or k.startswith(keep)}
    assert len(one) < len(sd)
    cfg, params = loading.convert_state_dict(one)
    assert cfg == converted[0]
    _assert_bitwise(params, converted[1])


def test_a_file_without_the_clip_needs_clip(files, converted, capsys):
  with pytest.raises(model_files.ConversionError) as e:
    loading.load_torch(files["minimal"])
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(
    "this CoDe checkpoint has none of the frozen CLIP's copies"
  ), msg
  assert "--clip ViT-B-16.pt" in msg
  cfg, params = loading.load_torch(files["minimal"], clip=files["clip_file"])
  assert cfg == converted[0]
  _assert_bitwise(params, converted[1])
  # Part of the CLIP in no copy: said as such, and --clip completes it.
  part = {
    k: v
    for k, v in files["sd"].items()
    if not k.startswith(("frozen_clip.", "clip_image_encoder."))
  }
  with pytest.raises(model_files.ConversionError) as e:
    loading.convert_state_dict(part)
  msg = str(e.value)
  assert "lack part of it (no copy of frozen_clip.visual.conv1.weight" in msg and "--clip" in msg, (
    msg
  )
  cfg, params = loading.convert_state_dict(part, clip=files["clip"])
  _assert_bitwise(params, converted[1])
  # The command: one line without --clip, nothing written; with it, the same model.
  out = files["dir"] / "from_minimal"
  line = _one_error_line(*_main(convert, capsys, files["minimal"], "--output", out))
  assert "--clip ViT-B-16.pt" in line and not out.exists()
  rc, stdout, err = _main(
    convert, capsys, files["minimal"], "--clip", files["clip_file"], "--output", out
  )
  assert rc == 0, err
  cfg, params = model_files.load_checkpoint(out)
  assert type(cfg) is code_lib.CoDeConfig
  _assert_bitwise(params, converted[1])


def test_the_files_own_copies_win_over_clip(files, converted):
  other = {k: (v + 1).astype(v.dtype) for k, v in files["clip"].items()}
  _, params = loading.convert_state_dict(files["sd"], clip=other)
  _assert_bitwise(params, converted[1])
  # Without the visual tower in any copy: the text tower stays the file's, the visual is --clip's.
  part = {
    k: v
    for k, v in files["sd"].items()
    if not k.startswith(("frozen_clip.", "clip_image_encoder."))
  }
  _, params = loading.convert_state_dict(part, clip=other)
  _assert_bitwise(params["clip"]["text"], converted[1]["clip"]["text"])
  np.testing.assert_array_equal(params["clip"]["visual"]["proj"], other["visual.proj"])
  _assert_bitwise(params["masker"], converted[1]["masker"])
  # What a CLIP file holds that CoDe has no place for is listed.
  extra = dict(files["clip"], **{"visual.extra": np.ones(2, np.float32)})
  with pytest.raises(
    model_files.ConversionError, match=r"unexpected key visual\.extra \(in the CLIP file\)"
  ):
    loading.convert_state_dict(files["trained"], clip=extra)
  with pytest.raises(
    model_files.ConversionError, match="must be OpenAI's CLIP .* not a CODE checkpoint"
  ):
    loading.convert_state_dict(files["trained"], clip=files["sd"])


def test_the_authors_training_checkpoint_converts_like_its_model(files, converted, tmp_path):
  """checkpoint.pth / ckpt_*.pth as their utils/checkpoint.py writes them: the model under "model",
  beside the optimizer, scheduler, scaler, step and the OmegaConf config."""
  config = omegaconf.OmegaConf.create(
    {"model": {"type": "ImageTextCoDecomposition", "w_hcl": 0.5}, "output": "output/code"}
  )
  sd = files["sd"]
  adam = {
    i: {"step": np.array(5.0, np.float32), "exp_avg": np.zeros_like(v)}
    for i, v in enumerate(v for k, v in sd.items() if k.startswith("text_decoder."))
  }
  ckpt = torch_files.save(
    {
      "model": torch_files.state_dict(sd),
      "optimizer": {"state": adam, "param_groups": [{"lr": 1e-4, "params": list(adam)}]},
      "lr_scheduler": {"last_epoch": 5},
      "scaler": {"scale": 65536.0},
      "step": 5,
      "config": config,
    },
    tmp_path / "ckpt_5_miou35.38.pth",
  )
  cfg, params = loading.load_torch(ckpt)
  assert cfg == converted[0]
  _assert_bitwise(params, converted[1])


def test_problems_are_listed_in_one_error(files, capsys):
  bad = dict(files["sd"])
  del bad["text_decoder.transformer.resblocks.1.mlp.c_fc.bias"]
  bad["bg_text"] = np.zeros((77, 64), np.float32)  # lost its middle axis
  bad["learnable_image_bg"] = np.zeros((3, 224, 224), np.float32)  # lost its batch axis
  bad["text_decoder.extra"] = np.zeros(2, np.float32)
  for k in ("hcl_loss.logit_scale", "tcli_loss.logit_scale"):
    del bad[k]
  with pytest.raises(model_files.ConversionError) as e:
    loading.convert_state_dict(bad)
  msg = str(e.value)
  assert "\n" not in msg and "4 problem(s)" in msg, msg
  assert "missing key text_decoder.transformer.resblocks.1.mlp.c_fc.bias" in msg
  assert "shape mismatch for bg_text: checkpoint (77, 64)" in msg
  assert "shape mismatch for learnable_image_bg: checkpoint (3, 224, 224)" in msg
  assert "unexpected key text_decoder.extra" in msg
  assert "pamr" not in msg and "token_prefix" not in msg and "logit_scale" not in msg
  # The loss temperatures alone missing: the original's initial value, said in one line.
  capsys.readouterr()
  part = {k: v for k, v in files["sd"].items() if not k.endswith("_loss.logit_scale")}
  _, params = loading.convert_state_dict(part)
  (note,) = capsys.readouterr().err.splitlines()
  assert note.startswith("note:") and "hcl_loss.logit_scale" in note, note
  for k in ("tcli_logit_scale", "tclf_logit_scale", "hcl_logit_scale"):
    assert params[k] == np.float32(np.log(1 / 0.07)), k


def test_text_decoder_heads(files, capsys):
  cfg, _ = loading.convert_state_dict(files["sd"], text_decoder_heads=4)
  assert cfg.text_decoder_heads == 4
  with pytest.raises(
    model_files.ConversionError,
    match="--text_decoder_heads 3 does not divide the text decoder tower's width 64",
  ):
    loading.convert_state_dict(files["sd"], text_decoder_heads=3)
  # A text tower the authors' 8 heads do not divide (their TextDecoder is as wide as it).
  rng = np.random.default_rng(1)
  narrow = code_files.code_state_dict(
    rng, code_files.openai_clip(rng, text_width=68, embed_dim=68, vocab=1000)
  )
  with pytest.raises(
    model_files.ConversionError,
    match="68 wide .* the authors' 8 heads do not divide; pass --text_decoder_heads N",
  ):
    loading.convert_state_dict(narrow, text_heads=4)
  assert (
    loading.convert_state_dict(narrow, text_heads=4, text_decoder_heads=4)[0].text_decoder_heads
    == 4
  )
  # A TCL-only setting for a CoDe file, a CoDe-only one for a CLIP: one line each.
  with pytest.raises(
    model_files.ConversionError, match="is for CoDe checkpoints; this source is a CLIP"
  ):
    loading.convert_state_dict(files["clip"], text_decoder_heads=8)
  line = _one_error_line(
    *_main(
      convert,
      capsys,
      files["clip_file"],
      "--text_decoder_heads",
      "8",
      "--output",
      files["dir"] / "x",
    )
  )
  assert "is for CoDe checkpoints" in line


def test_image_decomposition_is_named(files):
  no_text = {
    k: v
    for k, v in files["sd"].items()
    if not k.startswith(("text_decoder.", "bg_text", "text_mask_", "hcl_loss."))
  }
  with pytest.raises(
    model_files.ConversionError, match="the authors' ImageDecomposition checkpoint"
  ):
    loading.convert_state_dict(no_text)


# ----------------------------------------------------------------------------------------------
# Model kinds: converted directories, exports, workdirs, from_pretrained
# ----------------------------------------------------------------------------------------------


def test_convert_command_just_works(files, converted, tmp_path):
  out = tmp_path / "code_ckpt"
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.convert", str(files["code"]), "--output", str(out)],
    capture_output=True,
    text=True,
    env=dict(os.environ, HF_HUB_OFFLINE="1"),
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith(f"converted {files['code']} -> {out}: CoDe: ViT (width 128"), r.stdout
  assert "text decoder 8 (the authors' TextDecoder's; pass --text_decoder_heads" in r.stdout
  recorded = json.loads((out / "config.json").read_text())
  assert recorded["model_kind"] == "code" and recorded["text_decoder_heads"] == 8
  cfg, params = model_files.load_checkpoint(out)
  assert type(cfg) is code_lib.CoDeConfig and cfg == converted[0]
  _assert_bitwise(params, converted[1])
  cfg, params = tcl_jax.from_pretrained(out)
  assert type(cfg) is code_lib.CoDeConfig
  _assert_bitwise(params, converted[1])


def test_export_and_back(files, converted, tmp_path, capsys):
  cfg, params = converted
  d = tmp_path / "ckpt"
  model_files.save_checkpoint(d, cfg, params)
  f = tmp_path / "code.safetensors"
  rc, out, err = _main(export, capsys, d, "--output", f)
  assert rc == 0, err
  with safetensors.safe_open(f, framework="np") as st:
    recorded = json.loads(st.metadata()["tcl_jax_config"])
  assert recorded == {"model_kind": "code", **cfg.to_dict()}
  for load in (model_files.load_safetensors, loading.load_any, tcl_jax.from_pretrained):
    cfg2, params2 = load(f)
    assert type(cfg2) is code_lib.CoDeConfig and cfg2 == cfg
    _assert_bitwise(params2, params)
  # Straight from the authors' file, and back into a directory.
  f2 = tmp_path / "direct.safetensors"
  assert _main(export, capsys, files["code"], "--output", f2)[0] == 0
  _assert_bitwise(model_files.load_safetensors(f2)[1], params)
  rc, out, err = _main(convert, capsys, f2, "--output", tmp_path / "back")
  assert rc == 0, err
  cfg3, params3 = model_files.load_checkpoint(tmp_path / "back")
  assert type(cfg3) is code_lib.CoDeConfig
  _assert_bitwise(params3, params)


def test_a_code_workdir_loads_as_code(converted, tmp_path):
  cfg, params = converted
  mngr = checkpointing.create_checkpoint_manager(
    str(tmp_path), ml_collections.ConfigDict({"keep": 1, "async_save": False})
  )
  checkpointing.save(mngr, 5, {"params": params, "step": np.int32(5)}, {})
  mngr.wait_until_finished()
  mngr.close()
  run = {"model_kind": "code", "model": cfg.to_dict()}
  (tmp_path / "config.json").write_text(json.dumps(run))
  cfg2, params2 = loading.load_any(str(tmp_path))
  assert type(cfg2) is code_lib.CoDeConfig and cfg2 == cfg
  _assert_bitwise(params2, params)


@pytest.fixture(scope="module")
def tcl_model():
  cfg = tcl_lib.tiny_config()
  shapes = jax.eval_shape(lambda: tcl_lib.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(3)
  return cfg, jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.05).astype(s.dtype), shapes)


def test_tcl_files_without_a_kind_load_as_before(tcl_model, tmp_path):
  cfg, params = tcl_model
  d = tmp_path / "tcl"
  model_files.save_checkpoint(d, cfg, params)
  recorded = json.loads((d / "config.json").read_text())
  assert recorded == {"model_kind": "tcl", **cfg.to_dict()}
  # As written before kinds were recorded: the same config, the same bits.
  (d / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
  cfg2, params2 = model_files.load_checkpoint(d)
  assert type(cfg2) is tcl_lib.TCLConfig and cfg2 == cfg
  _assert_bitwise(params2, params)
  f = tmp_path / "old.safetensors"
  model_files.save_safetensors(f, cfg, params)
  tensors = safetensors.numpy.load_file(f)
  safetensors.numpy.save_file(
    tensors, f, metadata={"format": "tcl_jax", "tcl_jax_config": json.dumps(cfg.to_dict())}
  )
  cfg3, params3 = tcl_jax.from_pretrained(f)
  assert type(cfg3) is tcl_lib.TCLConfig and cfg3 == cfg
  _assert_bitwise(params3, params)


def test_a_kind_that_does_not_fit_is_one_line(converted, tmp_path):
  cfg, params = converted
  d = tmp_path / "c"
  model_files.save_checkpoint(d, cfg, params)
  recorded = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(recorded, model_kind="nope")))
  with pytest.raises(ValueError) as e:
    model_files.load_checkpoint(d)
  assert "records model_kind 'nope'" in str(e.value) and "\n" not in str(e.value)
  # CoDe fields without the kind read as TCL: they do not fit it.
  (d / "config.json").write_text(
    json.dumps({k: v for k, v in recorded.items() if k != "model_kind"})
  )
  with pytest.raises(
    ValueError,
    match=r"is not a tcl_jax model config \(unknown TCL config fields: \['bg_image_size'",
  ):
    model_files.load_checkpoint(d)
  assert model_files.model_kind(cfg) == "code"
  assert model_files.model_kind(tcl_lib.tiny_config()) == "tcl"
