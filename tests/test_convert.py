"""Conversion of PyTorch checkpoints (official TCL layout, OpenAI CLIP plain and TorchScript)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tcl_jax import convert
from tcl_jax import torch_pickle
from tcl_jax.models import tcl as tcl_lib

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "tcl_tiny"
needs_fixture = pytest.mark.skipif(
    not FIXTURE.is_dir(), reason="../shared fixtures not present (clone without the shared fixtures)")


def _leaves(tree):
  return {"/".join(p.key for p in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@needs_fixture
def test_openai_plain_and_torchscript_give_identical_params():
  cfg_a, pa = convert.load_torch(FIXTURE / "clip_openai.pt", text_heads=2)
  cfg_b, pb = convert.load_torch(FIXTURE / "clip_openai_jit.pt", text_heads=2)
  assert cfg_a == cfg_b
  la, lb = _leaves(pa), _leaves(pb)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


@needs_fixture
def test_config_inferred_from_shapes_like_build_model():
  cfg, _ = convert.load_torch(FIXTURE / "clip_openai.pt")
  c = cfg.clip
  assert (c.embed_dim, c.image_resolution, c.vision_layers, c.vision_width, c.vision_patch_size) == (64, 96, 4, 128, 16)
  assert (c.context_length, c.vocab_size, c.transformer_width, c.transformer_layers) == (77, 49408, 64, 2)
  assert c.vision_heads == 2 and c.transformer_heads == 1  # width // 64, as the original
  assert cfg.ie_freeze == 3  # CLIP-only: last block becomes the masker (paper: 11 of 12)
  cfg_t, _ = convert.load_torch(FIXTURE / "tcl_reference.pth", text_heads=2)
  assert cfg_t.ie_freeze == 3 and cfg_t.decoder_n_layers == 2 and cfg_t.decoder_double
  assert cfg_t.clip.transformer_heads == 2


@needs_fixture
def test_tcl_and_openai_layouts_hold_the_same_clip():
  _, p_tcl = convert.load_torch(FIXTURE / "tcl_reference.pth", text_heads=2)
  _, p_oai = convert.load_torch(FIXTURE / "clip_openai.pt", text_heads=2)
  lt, lo = _leaves(p_tcl["clip"]), _leaves(p_oai["clip"])
  assert lt.keys() == lo.keys()
  for k in lt:
    np.testing.assert_array_equal(lt[k], lo[k], err_msg=k)
  # CLIP-only source: masker initialised from the CLIP as the original does.
  m = p_oai["masker"]
  np.testing.assert_array_equal(m["backbone"]["resblocks_3"]["attn"]["in_proj"]["kernel"],
                                p_oai["clip"]["visual"]["resblocks_3"]["attn"]["in_proj"]["kernel"])
  np.testing.assert_array_equal(m["image_proj"]["ln"]["scale"], p_oai["clip"]["visual"]["ln_post"]["scale"])
  assert float(m["decoder"]["net_1"]["conv2"]["gate"]) == 0.0
  # The official checkpoint's masker is its own (the fixture moved it away from the CLIP copy).
  assert not np.array_equal(p_tcl["masker"]["backbone"]["resblocks_3"]["c_fc"]["kernel"],
                            p_tcl["clip"]["visual"]["resblocks_3"]["c_fc"]["kernel"])


@needs_fixture
def test_round_trip_to_torch_layout_is_exact():
  sd = torch_pickle.load_state_dict(FIXTURE / "tcl_reference.pth")
  cfg, params = convert.convert_state_dict(sd, text_heads=2)
  back = convert.to_torch_state_dict(cfg, params)
  assert set(back) == {k for k in sd if not k.startswith("pamr.")}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


@needs_fixture
def test_tampered_state_dicts_fail_listing_every_problem():
  sd = torch_pickle.load_state_dict(FIXTURE / "tcl_reference.pth")
  bad = dict(sd)
  del bad["masker.sim2mask.b"]
  bad["masker.image_encoder.decoder.image_proj.proj"] = np.zeros((128, 65), np.float32)
  bad["masker.extra_head.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dict(bad, text_heads=2)
  msg = str(e.value)
  assert "3 problem(s)" in msg
  assert "missing key masker.sim2mask.b" in msg
  assert "shape mismatch for masker.image_encoder.decoder.image_proj.proj" in msg
  assert "unexpected key masker.extra_head.weight" in msg
  assert "pamr" not in msg  # known buffers are skipped by name
  with pytest.raises(convert.ConversionError, match="unrecognised checkpoint layout"):
    convert.convert_state_dict({"foo.weight": np.zeros(3)})


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
  f = tmp_path / "notes.pth"
  f.write_text("hello")
  with pytest.raises(ValueError):
    convert.load_torch(f)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    convert.load_checkpoint(tmp_path)


@needs_fixture
def test_cli_writes_an_orbax_checkpoint_that_loads_back(tmp_path):
  out = tmp_path / "ckpt"
  r = subprocess.run([sys.executable, "-m", "tcl_jax.convert", str(FIXTURE / "clip_openai_jit.pt"),
                      "--output", str(out), "--text_heads", "2"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "converted" in r.stdout
  assert json.loads((out / "config.json").read_text())["ie_freeze"] == 3
  cfg, params = convert.load_checkpoint(out)
  _, ref = convert.load_torch(FIXTURE / "clip_openai_jit.pt", text_heads=2)
  la, lb = _leaves(params), _leaves(ref)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
  bad = subprocess.run([sys.executable, "-m", "tcl_jax.convert", str(tmp_path / "nope.pt"),
                        "--output", str(tmp_path / "x")], capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_random_params_survive_save_and_load(tmp_path):
  cfg = tcl_lib.tiny_config()
  params = tcl_lib.init_params(cfg, jax.random.key(3))
  convert.save_checkpoint(tmp_path / "c", cfg, params)
  cfg2, p2 = convert.load_checkpoint(tmp_path / "c")
  assert cfg2 == cfg
  la, lb = _leaves(params), _leaves(p2)
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
