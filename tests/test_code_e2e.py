"""A CoDe checkpoint in the authors' layout, end to end: `tcl_jax.convert` -> `tcl_jax.evaluate`
and `tcl_jax.demo` segment with it through the CoDe kind (its prompt on the bare class names, the
template ensemble in the KP branch); training starts CoDe from a CLIP file as the authors do; TCL
training refuses a CoDe checkpoint."""

import json
import os
import subprocess
import sys

import code_files
import jax
import numpy as np
from PIL import Image
import pytest
import torch_files

from tcl_jax import kinds
from tcl_jax.data import synthetic_segmentation
from tcl_jax.models import code as code_lib
from tcl_jax.weights import loading
from tcl_jax.weights import model_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=420):
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS=""),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("code_e2e")
  rng = np.random.default_rng(3)
  # grid 6: the tiny CLIP's native 96 x 96 (patch 16).
  clip = code_files.openai_clip(rng, grid=6)
  sd = code_files.code_state_dict(rng, clip)
  pth = torch_files.save({"model": torch_files.state_dict(sd)}, d / "code.pth")
  clip_file = torch_files.save(torch_files.state_dict(clip), d / "ViT-tiny.pt")
  ckpt = d / "ckpt"
  r = _run("tcl_jax.convert", str(pth), "--output", str(ckpt), "--text_decoder_heads", "1")
  assert r.returncode == 0, r.stderr
  return {"dir": d, "pth": pth, "clip_file": clip_file, "ckpt": ckpt}


def test_evaluate_segments_with_a_converted_code_checkpoint(files):
  d = files["dir"]
  data = str(d / "data")
  synthetic_segmentation.write_synthetic_segmentation(data, "voc", num_images=2, seed=0)
  out = d / "eval"
  r = _run(
    "tcl_jax.evaluate",
    "--config=configs/eval.py",
    f"--checkpoint={files['ckpt']}",
    f"--workdir={out}",
    f"--config.data_root={data}",
    "--config.tasks=voc",
    "--config.img_scale=(256,96)",
    "--config.crop=96",
    "--config.stride=48",
    "--config.pamr=True",
    "--config.batch=2",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((out / "results.json").read_text())
  voc = res["tasks"]["voc"] if "tasks" in res else res["voc"]
  assert 0.0 <= voc["miou"] <= 100.0 and len(voc["per_class_iou"]) == 21


def test_demo_segments_with_a_converted_code_checkpoint(files, tmp_path):
  img = np.random.default_rng(0).integers(0, 255, (120, 150, 3), np.uint8)
  Image.fromarray(img).save(tmp_path / "photo.png")
  out = tmp_path / "overlay.png"
  r = _run(
    "tcl_jax.demo",
    f"--checkpoint={files['ckpt']}",
    f"--image={tmp_path / 'photo.png'}",
    "--classes=dog, traffic light, sky",
    f"--output={out}",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert out.exists() and Image.open(out).size[0] >= 150
  assert "traffic light" in r.stdout


def test_the_code_kind_segments_with_the_prompted_names(files):
  cfg, params = model_files.load_checkpoint(files["ckpt"])
  assert type(cfg) is code_lib.CoDeConfig
  zs = kinds.zero_shot_model(cfg)
  from tcl_jax.zeroshot import prompts

  text = prompts.class_text_embedding(zs, params, ["dog", "sky"], "custom")
  want = code_lib.prompted_noun_emb(params, cfg, code_lib.noun_tokens(["dog", "sky"], cfg))
  np.testing.assert_allclose(np.asarray(text)[:, :64], np.asarray(want), atol=1e-6)


def _training_config(init):
  import importlib.util

  spec = importlib.util.spec_from_file_location("s", os.path.join(REPO, "configs", "synthetic.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("model_kind=code")
  config.init_checkpoint = str(init)
  return config


def test_code_training_starts_from_a_clip_file_as_the_authors_do(files):
  config = _training_config(files["clip_file"])
  model = kinds.build_model(config)
  params = model.load(str(files["clip_file"]))
  _, clip_params = loading.load_any(str(files["clip_file"]), vision_heads=2, text_heads=2)
  want = code_lib.init_params(model.cfg, jax.random.key(0), clip_params=clip_params["clip"])
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The masker is CLIP's last block; the prompt's context is "A photo of x ..." in its embedding.
  np.testing.assert_array_equal(
    params["masker"]["backbone"]["resblocks_3"]["c_fc"]["kernel"],
    params["clip"]["visual"]["resblocks_3"]["c_fc"]["kernel"],
  )


def test_a_code_checkpoint_continues_code_and_is_refused_by_tcl(files):
  config = _training_config(files["ckpt"])
  # The converted file's heads: width // 64 (not in the shapes), and the decoder's as converted.
  config.model.clip.transformer_heads = 1
  config.model.text_decoder_heads = 1
  params = kinds.build_model(config).load(str(files["ckpt"]))
  _, want = model_files.load_checkpoint(files["ckpt"])
  np.testing.assert_array_equal(params["prompt_ctx"], want["prompt_ctx"])
  config.model.clip.transformer_heads = 2
  with pytest.raises(ValueError, match="holds another CLIP"):
    kinds.build_model(config).load(str(files["ckpt"]))
  import importlib.util

  spec = importlib.util.spec_from_file_location("s2", os.path.join(REPO, "configs", "synthetic.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  tcl_config = mod.get_config()
  tcl_config.init_checkpoint = str(files["ckpt"])
  with pytest.raises(ValueError, match="holds a CoDeConfig model, not TCL"):
    kinds.build_model(tcl_config).load(str(files["ckpt"]))


# configs/code.py at tiny dims (text width = embedding width, as CoDe requires).
TINY = (
  "--config.model.clip.vision_layers=2",
  "--config.model.clip.vision_width=64",
  "--config.model.clip.vision_heads=2",
  "--config.model.clip.image_resolution=32",
  "--config.input.image_size=32",
  "--config.model.clip.transformer_layers=1",
  "--config.model.clip.transformer_width=32",
  "--config.model.clip.transformer_heads=2",
  "--config.model.clip.embed_dim=32",
  "--config.model.text_decoder_heads=2",
  "--config.model.ie_freeze=1",
  "--config.batch_size=4",
)


def _losses(stderr, step):
  """The loss terms the loop logged at `step`: {name: value}."""
  line = [x for x in stderr.splitlines() if f"] [{step}] " in x and "train/loss=" in x][-1]
  return {k: float(v) for k, v in (kv.split("=") for kv in line.split("] ", 2)[-1].split(", "))}


def test_code_smoke_trains_every_term(tmp_path):
  r = _run(
    "tcl_jax.main", "--config=configs/code.py:smoke", f"--workdir={tmp_path / 'wd'}", *TINY,
    "--config.log_every_steps=1",
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  logged = _losses(r.stderr, 2)
  for term in code_lib.LOSS_TERMS:
    assert np.isfinite(logged[f"train/{term}"]) and logged[f"train/{term}"] > 0, term
  assert sorted(os.listdir(tmp_path / "wd" / "checkpoints")) == ["2"]


def test_code_trains_from_noun_records(tmp_path):
  # Records as `tcl_jax.data.convert --nouns` writes them (the nouns feature); one caption has a
  # single noun and is dropped and counted.
  from tcl_jax.data import schema

  recs = [
    ("a dog on a beach", ["beach", "dog"]),
    ("two red apples on a table", ["apples", "table"]),
    ("a man riding a bicycle in a street", ["bicycle", "man", "street"]),
    ("a lonely tree", ["tree"]),
    ("birds in the sky over a lake", ["birds", "lake", "sky"]),
  ] * 4
  path = tmp_path / schema.shard_name(0, 1)
  with schema.ShardWriter(str(path)) as w:
    for i, (caption, nouns) in enumerate(recs):
      img = Image.fromarray(np.full((40, 40, 3), (i * 37) % 256, np.uint8))
      import io

      buf = io.BytesIO()
      img.save(buf, format="PNG")
      w.write(schema.make_example(buf.getvalue(), caption, f"k{i:03d}", nouns=nouns))
  r = _run(
    "tcl_jax.main", "--config=configs/code.py", f"--workdir={tmp_path / 'wd'}", *TINY,
    f"--config.input.train_files=({str(path)!r},)", "--config.init_checkpoint=",
    "--config.total_steps=2", "--config.log_every_steps=1", "--config.evals.tasks=",
    "--config.eval_every_steps=0", "--config.eval_at_end=False", "--config.checkpoint_every_steps=2",
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  logged = _losses(r.stderr, 2)
  assert logged["input/too_few_nouns"] >= 1  # "a lonely tree"
  assert np.isfinite(logged["train/loss"]) and logged["train/tseg_loss"] > 0
