"""TCL in miniature: the shapes world, the CLIP model kind, the shipped CLIP file, and (slow) the
default run's claim that TCL training beats its frozen-CLIP baseline."""

import json
import os
import re
import subprocess
import sys

from conftest import REPO
from conftest import load_config_module
import jax
import numpy as np
import pytest

from tcl_jax import kinds
from tcl_jax.data import synthetic
from tcl_jax.data import synthetic_segmentation
from tcl_jax.zeroshot import datasets as seg_data

# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------


def _bbox_fill(mask):
  ys, xs = np.nonzero(mask)
  return mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def test_labels_match_the_drawn_objects():
  fills = {s: [] for s in synthetic.SHAPES}
  named_counts, shape_only = [], []
  for i in range(150):
    rgb, label, objects, caption = synthetic.scene(7, synthetic.STREAM_TRAIN, i)
    assert rgb.shape == (96, 96, 3) and label.shape == (96, 96) and label.dtype == np.uint8
    present = {synthetic.CLASSES[v] for v in np.unique(label) if v}
    assert set(objects) <= present and 1 <= len(present) <= 3
    for name in present:  # every labelled pixel has its class's colour (within the jitter)
      colour = np.asarray(synthetic.COLORS[name.split(" ")[0]])
      pix = rgb[label == synthetic.CLASSES.index(name)].astype(int)
      assert np.abs(pix - colour).max() <= 20
      assert (pix == pix[0]).all()  # one object, one fill
    # Background pixels are far from every object colour.
    bg = rgb[label == 0].astype(int)
    for colour in synthetic.COLORS.values():
      assert np.abs(bg - np.asarray(colour)).max(axis=1).min() > 20
    # The caption names only visible objects, each once: with its colour and shape, or, in some
    # captions, by its shape alone ("a circle and a square").
    named = [o for o in synthetic.CLASSES[1:] if f"a {o}" in caption]
    by_shape = sorted(s for s in synthetic.SHAPES for _ in re.finditer(rf"\ba {s}\b", caption))
    assert bool(named) != bool(by_shape), caption
    if named:
      assert set(named) <= set(objects)
    else:
      shapes = [o.split(" ")[1] for o in objects]
      assert all(by_shape.count(x) <= shapes.count(x) for x in by_shape), (caption, objects)
    shape_only.append(not named)
    named_counts.append(len(named or by_shape) / len(objects))
  for i in range(150):
    _, label, objects, _ = synthetic.scene(7, synthetic.STREAM_EVAL, i)
    if len(np.unique(label)) == 2:  # a lone object is whole: compare its region with its shape
      fills[objects[0].split(" ")[1]].append(_bbox_fill(label > 0))
  assert min(fills["square"]) > 0.97
  assert 0.72 < np.mean(fills["circle"]) < 0.85
  assert 0.4 < np.mean(fills["triangle"]) < 0.6
  assert 0 < np.mean(np.asarray(named_counts) < 1) < 0.5  # some captions name only some objects
  assert 0.15 < np.mean(shape_only) < 0.45  # synthetic.SHAPE_ONLY_CAPTIONS (0.3)


def test_world_is_deterministic_in_the_seed():
  a, b, c = (synthetic.scene(s, synthetic.STREAM_TRAIN, 3) for s in (0, 0, 1))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[3] == b[3]
  assert not np.array_equal(a[0], c[0])
  # The evaluation stream is not the training stream.
  assert not np.array_equal(a[0], synthetic.scene(0, synthetic.STREAM_EVAL, 3)[0])


def test_segmentation_set_reads_back_as_the_scenes(tmp_path):
  root = str(tmp_path)
  synthetic_segmentation.write_synthetic_segmentation(root, "shapes", num_images=5, seed=2)
  ds = seg_data.SegDataset("shapes", root)
  assert ds.spec.classes == synthetic.CLASSES and ds.spec.with_bg
  assert ds.spec.text_classes[0] == "red circle"
  samples = list(ds)
  assert len(samples) == 5 and ds.num_skipped == 0
  for i, s in enumerate(samples):
    rgb, label, _, _ = synthetic.scene(2, synthetic.STREAM_EVAL, i)
    np.testing.assert_array_equal(s.label, label)  # palette PNG: exact
    assert np.abs(s.image[..., ::-1].astype(int) - rgb).mean() < 4  # JPEG, BGR as mmseg reads


# ----------------------------------------------------------------------------------------------
# Stage 1: the CLIP model kind and its weights file
# ----------------------------------------------------------------------------------------------


def _numpy_symmetric_info_nce(img, txt, scale):
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  logits = img @ txt.T * scale

  def ce(l):
    l = l - l.max(1, keepdims=True)
    return np.mean(np.log(np.exp(l).sum(1)) - np.diag(l))

  return 0.5 * (ce(logits) + ce(logits.T))


def test_clip_kind_loss_is_symmetric_info_nce():
  from tcl_jax import tokenizer
  from tcl_jax.models import clip as clip_lib

  config = load_config_module("miniature_clip").get_config()
  model = kinds.build_model(config)
  params = model.init(jax.random.key(1))
  images = jax.random.normal(jax.random.key(2), (4, 96, 96, 3))
  tokens = tokenizer.tokenize([synthetic.scene(0, 0, i)[3] for i in range(4)])
  loss, aux = model.loss(params, {"image": images, "text_tokens": tokens}, None)
  img = np.asarray(clip_lib.encode_image(params["clip"], model.cfg, images))
  txt = np.asarray(clip_lib.encode_text(params["clip"], model.cfg, tokens))
  want = _numpy_symmetric_info_nce(img.astype(np.float64), txt.astype(np.float64), 1 / 0.07)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  assert float(aux["clip_loss"]) == float(loss) and 0 <= float(aux["i2t_accuracy"]) <= 1


def test_clip_kind_trains_every_parameter_through_the_loop(tmp_path):
  from tcl_jax.train import loop as train

  config = load_config_module("miniature_clip").get_config("steps=2")
  config.batch_size = 8
  config.log_every_steps = 1
  config.synthetic.num_train_examples = 32
  config.synthetic.num_shards = 2
  config.input.options.shuffle_buffer = 32
  model = kinds.build_model(config)
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  before = jax.device_get(model.init(init_rng))
  state, history = train.train_and_evaluate(config, str(tmp_path), model=model)
  assert int(state.step) == 2
  assert {"clip_loss", "i2t_accuracy"} <= set(history[-1])
  after = jax.device_get(state.params)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
  assert all(jax.tree.leaves(changed))  # no frozen tower, no UST group in stage 1


def test_clip_file_round_trip_keeps_every_world_token(tmp_path):
  from tcl_jax import tokenizer
  from tcl_jax.miniature import experiment as miniature
  from tcl_jax.models import clip as clip_lib
  from tcl_jax.models import tcl

  cfg = tcl.tiny_config().clip
  params = jax.device_get(clip_lib.init_clip_params(cfg, jax.random.key(0)))
  path = str(tmp_path / "clip.npz")
  miniature.save_clip(params, path, {"command": "x"})
  loaded = miniature.load_clip(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  # The text of the world (captions, evaluation prompts) encodes exactly as before.
  texts = [synthetic.scene(5, 0, i)[3] for i in range(64)] + ["a photo of a blue triangle."]
  tokens = tokenizer.tokenize(texts)
  np.testing.assert_array_equal(
    clip_lib.encode_text(loaded, cfg, tokens), clip_lib.encode_text(params, cfg, tokens)
  )
  np.testing.assert_array_equal(
    loaded["visual"]["conv1"]["kernel"], params["visual"]["conv1"]["kernel"]
  )
  assert os.path.getsize(path) < 5 * 2**20


def test_shipped_clip_matches_the_config():
  from tcl_jax.miniature import experiment as miniature
  from tcl_jax.models import tcl

  cfg = load_config_module("synthetic").get_config()
  clip = miniature.load_clip(os.path.join(REPO, cfg.miniature.clip_weights))
  expected = jax.eval_shape(lambda: tcl.init_params(tcl.tiny_config(), jax.random.key(0))["clip"])
  assert jax.tree.map(np.shape, clip) == jax.tree.map(lambda s: s.shape, expected)
  with np.load(miniature.ASSET) as z:
    assert json.loads(str(z["meta"]))["command"] == miniature.REBUILD_COMMAND


# ----------------------------------------------------------------------------------------------
# Stage 2: the claim (slow)
# ----------------------------------------------------------------------------------------------

# What the miniature shows (README): TCL beats the frozen-CLIP baseline on both tasks, by
# +11.7 mIoU points (mean of shapes and shapes12) at 200 steps and +13.7 to +14.1 at 600 (3 seeds);
# background IoU 28 -> 78. With the first shipped CLIP, which knew colour but not shape, the gain
# was +0.8 at 600 steps: these margins fail on a CLIP that cannot tell shapes apart.
SHORT_STEPS = 200
MIN_GAIN = 6.0  # mIoU points, mean of the two tasks
MIN_TASK_GAIN = 4.0  # on each task (200 steps: shapes +13.1, shapes12 +10.4)
MIN_BG_GAIN = 30.0  # background IoU points (200 steps: +48)


@pytest.mark.slow
def test_short_miniature_beats_the_frozen_clip_baseline(tmp_path):
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as the README's command
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "tcl_jax.main",
      f"--config=configs/synthetic.py:steps={SHORT_STEPS}",
      f"--workdir={tmp_path}",
      "--config.miniature.num_mask_images=2",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=3000,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / "miniature.json") as f:
    out = json.load(f)
  # The frozen CLIP's dense features carry class information on object pixels (chance: 1/12).
  assert out["per_task"]["shapes12"]["baseline_miou"] > 100 / 12, out
  assert out["tcl_miou"] >= out["baseline_miou"] + MIN_GAIN, out
  for task in ("shapes", "shapes12"):
    t = out["per_task"][task]
    assert t["tcl_miou"] >= t["baseline_miou"] + MIN_TASK_GAIN, (task, t)
  shapes = out["per_task"]["shapes"]
  bg = (shapes["baseline_per_class_iou"]["background"], shapes["tcl_per_class_iou"]["background"])
  assert bg[1] >= bg[0] + MIN_BG_GAIN, bg
  assert "frozen-CLIP baseline" in r.stdout
  assert os.path.getsize(tmp_path / "miniature_masks.png") > 0


# The same claim in the default suite, shortened: 100 TCL steps on 1600 training pairs (one pass),
# the full 100-image evaluation. Measured (seed 0, 2-core CPU under load 7): 150 s wall; baseline
# 17.28 -> TCL 26.55 (+9.27), shapes +10.0, shapes12 +8.5, background IoU 28.4 -> 71.0. With the
# update's sign flipped (gradient ascent) the masks get no better than the baseline's.
FAST_STEPS = 100
FAST_MIN_GAIN = 4.5  # about half the measured +9.3
FAST_MIN_TASK_GAIN = 3.0  # measured +10.0 / +8.5
FAST_MIN_BG_GAIN = 20.0  # measured +42.6


def test_shortened_miniature_gains_over_the_frozen_clip_baseline(tmp_path):
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as the README's command
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "tcl_jax.main",
      f"--config=configs/synthetic.py:steps={FAST_STEPS}",
      f"--workdir={tmp_path}",
      "--config.synthetic.num_train_examples=1600",
      "--config.miniature.num_mask_images=0",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / "miniature.json") as f:
    out = json.load(f)
  assert out["tcl_steps"] == FAST_STEPS
  assert out["tcl_miou"] >= out["baseline_miou"] + FAST_MIN_GAIN, out
  for task in ("shapes", "shapes12"):
    t = out["per_task"][task]
    assert t["tcl_miou"] >= t["baseline_miou"] + FAST_MIN_TASK_GAIN, (task, t)
  shapes = out["per_task"]["shapes"]
  bg = (shapes["baseline_per_class_iou"]["background"], shapes["tcl_per_class_iou"]["background"])
  assert bg[1] >= bg[0] + FAST_MIN_BG_GAIN, bg


def test_shipped_clip_knows_colour_and_shape():
  """The shipped stage-1 CLIP recognises both halves of a class name zero-shot: TCL can only
  ground what the frozen CLIP tells apart (measured: colour 1.00, shape 0.82; the first shipped
  CLIP had shape 0.34, chance 0.33)."""
  from tcl_jax.miniature import experiment as miniature
  from tcl_jax.models import clip as clip_lib

  cfg = load_config_module("synthetic").get_config()
  clip = miniature.load_clip(os.path.join(REPO, cfg.miniature.clip_weights))
  acc = miniature.zero_shot_accuracy(clip, clip_lib.CLIPConfig(**cfg.model.clip.to_dict()))
  assert acc["colour"] > 0.95 and acc["shape"] > 0.7, acc
