"""The one segmentation path behind the CLI, notebook and app: same labels as evaluation, bucketed
compiles, legend, images in, CLI."""

import logging
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from tcl_jax import demo
from tcl_jax import kinds
from tcl_jax import zeroshot
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.weights import model_files

SMALL = dict(img_scale=(256, 64), crop=64, stride=32)
FIXTURE = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures", "tcl_tiny"
)


@pytest.fixture(scope="module")
def model():
  cfg = tcl_lib.tiny_config()
  return cfg, tcl_lib.init_params(cfg, jax.random.key(0))


def _image(h, w, seed=0):
  return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_labels_are_the_evaluation_labels(model):
  cfg, params = model
  img, classes = _image(50, 70), ["dog", "sky", "tree"]
  seg = demo.Segmenter(params, cfg, protocol=zeroshot.Protocol(**SMALL))(
    img, classes, bg_thresh=0.0
  )
  # The evaluator's own path: its text embedding, window function and predict.
  model = kinds.zero_shot_model(cfg)
  protocol = zeroshot.Protocol(**SMALL, pamr=True, kp_w=0.3, bg_thresh=0.0)
  emb = zeroshot.class_text_embedding(model, params, classes)
  window_fn = zeroshot.make_window_fn(model, params, emb, protocol)
  ref = zeroshot.predict(img[..., ::-1].copy(), window_fn, 3, protocol, background=True).labels
  np.testing.assert_array_equal(seg.labels, ref)
  assert len(np.unique(ref)) == 3  # every class wins somewhere: the comparison is not trivial
  assert seg.scores.shape == seg.simmaps.shape == (3, 50, 70) and seg.masks.shape == (3, 50, 70)
  np.testing.assert_array_equal(seg.masks.argmax(0) + 1, seg.labels)
  assert (seg.scores > 0).all() and (seg.scores < 1).all()  # soft masks
  assert -1 <= seg.simmaps.min() < 0 < seg.simmaps.max() <= 1  # cosine similarities
  assert seg.note() is None and abs(sum(seg.shares().values()) - 100.0) < 1e-9


def test_score_and_similarity_maps_per_class_are_the_evaluations(model):
  # 3 classes are padded to 4 inside the Segmenter (a copy of the first); the evaluation's own
  # path here runs the 3 unpadded. Each class's window-averaged soft mask and similarity map
  # must be the evaluation's, whatever the padding.
  cfg, params = model
  img, classes = _image(50, 70, 3), ["dog", "sky", "tree"]
  protocol = zeroshot.Protocol(**SMALL, pamr=False, kp_w=0.3, bg_thresh=0.2)
  seg = demo.Segmenter(params, cfg, protocol=protocol)(
    img, classes, pamr=False, kp_w=0.3, bg_thresh=0.2
  )
  zs_model = kinds.zero_shot_model(cfg)
  emb = zeroshot.class_text_embedding(zs_model, params, classes)
  window_fn = zeroshot.make_window_fn(zs_model, params, emb, protocol, simmaps=True)
  ref = zeroshot.predict(img[..., ::-1].copy(), window_fn, 3, protocol, background=True, num_maps=6)
  scores, simmaps = np.asarray(ref.maps[:3]), np.asarray(ref.maps[3:6])
  assert seg.scores.shape == seg.simmaps.shape == scores.shape == (3, 50, 70)
  for i, name in enumerate(classes):
    np.testing.assert_allclose(seg.scores[i], scores[i], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(seg.simmaps[i], simmaps[i], atol=1e-5, err_msg=name)
  # The maps tell the classes apart (a shifted slice would not go unnoticed): every two classes'
  # maps differ far more than the tolerance, and a similarity map is not a soft mask.
  for i in range(3):
    for j in range(i):
      assert np.abs(simmaps[i] - simmaps[j]).max() > 1e-2
    assert np.abs(simmaps[i] - scores[i]).max() > 1e-1


def test_background_threshold_and_note(model):
  cfg, params = model
  s = demo.Segmenter(params, cfg, protocol=zeroshot.Protocol(**SMALL))
  img = _image(50, 70)
  all_bg = s(img, ["dog", "sky"], pamr=False, bg_thresh=1.0)
  assert (all_bg.labels == 0).all() and all_bg.shares()["background"] == 100.0
  assert all_bg.note().startswith("every pixel is background")
  # A threshold between the scores' extremes splits the pixels by the best score.
  best = s(img, ["dog", "sky"], pamr=False, bg_thresh=0.0).scores.max(0)
  mid = float(np.median(best))
  part = s(img, ["dog", "sky"], pamr=False, bg_thresh=mid)
  assert 0.3 < (part.labels == 0).mean() < 0.7
  assert ((part.labels == 0) == (best <= mid)).mean() > 0.99  # (bilinear bg channel: edges differ)


def test_similar_sizes_and_other_classes_do_not_recompile(model, caplog):
  cfg, params = model
  s = demo.Segmenter(params, cfg, protocol=zeroshot.Protocol(**SMALL))
  s(_image(50, 70), ["dog", "sky", "tree"], bg_thresh=0.4)

  def compiles(fn):
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
      fn()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]

  # Another size in the same 64-pixel buckets, other classes (4 = the same power of two), another
  # bg_thresh.
  assert compiles(lambda: s(_image(52, 72, 1), ["cat", "grass", "a", "b"], bg_thresh=0.3)) == []
  # The count is real: a size in another bucket compiles the post-processing.
  assert compiles(lambda: s(_image(50, 140, 2), ["cat", "grass", "a", "b"], bg_thresh=0.3))
  assert [demo.class_bucket(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]


def test_bad_inputs(model):
  cfg, params = model
  s = demo.Segmenter(params, cfg, protocol=zeroshot.Protocol(**SMALL))
  with pytest.raises(ValueError, match="RGB uint8"):
    s(np.zeros((4, 4)), ["a"])
  with pytest.raises(ValueError, match="at least one class"):
    s(_image(20, 20), [])
  with pytest.raises(ValueError, match="too elongated"):
    s(_image(1, 3000), ["a"])
  assert demo.parse_classes(" dog, ,grass ,") == ["dog", "grass"]


def test_class_lists_split_on_commas_and_semicolons_each_class_once(model):
  # Was: "sky; grass; house" one class; "sky, grass, sky" shares summing to 52%, two legend rows.
  assert demo.parse_classes("sky; grass;house") == ["sky", "grass", "house"]
  assert demo.parse_classes("sky, grass, Sky ,sky; grass  ") == ["sky", "grass"]
  assert demo.repeated_classes("sky, grass, Sky ,sky; grass  ") == ["Sky", "sky", "grass"]
  assert demo.repeated_classes("sky, grass") == []
  # The tokenizer lower-cases and collapses spaces: these are one class to the model too.
  assert demo.parse_classes("blue  sky, Blue sky") == ["blue  sky"]
  cfg, params = model
  s = demo.Segmenter(params, cfg, protocol=zeroshot.Protocol(**SMALL))
  with pytest.raises(ValueError, match=r"class names repeat \('Sky'\); give each once"):
    s(_image(20, 20), ["sky", "grass", "Sky"])


def test_overlay_and_legend():
  img = np.full((2, 3, 3), 100, np.uint8)
  labels = np.array([[0, 1, 2], [0, 0, 21]])
  out = demo.overlay(img, labels, alpha=0.5)
  np.testing.assert_array_equal(out[0, 0], [100, 100, 100])
  np.testing.assert_array_equal(out[0, 1], np.round((100 + demo.PALETTE[0].astype(float)) / 2))
  np.testing.assert_array_equal(out[1, 2], out[0, 1])  # class 21 cycles to the first colour
  leg = demo.legend(["dog", "grass"], 300)
  assert leg.shape[1:] == (300, 3)
  for colour in demo.colours(2):  # a swatch per class
    assert (leg == colour).all(-1).sum() > 50
  assert not (leg == demo.PALETTE[2]).all(-1).any()
  assert (demo.legend(["dog", "grass"], 300) != demo.legend(["dog", "grasp"], 300)).any()
  wrapped = demo.legend([f"class number {i}" for i in range(12)], 300)
  assert wrapped.shape[0] > 3 * leg.shape[0]  # long lists wrap into rows


def test_sample_image_is_the_generated_one():
  assert os.path.getsize(demo.SAMPLE_IMAGE) < 100_000
  np.testing.assert_array_equal(np.asarray(Image.open(demo.SAMPLE_IMAGE)), demo.draw_sample())


def test_read_image(tmp_path):
  (tmp_path / "bad.jpg").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="cannot read .*bad.jpg as an image"):
    demo.read_image(str(tmp_path / "bad.jpg"))
  big, note = demo.read_image(demo.SAMPLE_IMAGE, max_side=250)
  assert big.shape == (188, 250, 3) and note.startswith("downscaled the image from 500x375")
  same, note = demo.load_image("sample", max_side=500)
  assert same.shape == (375, 500, 3) and note is None
  with pytest.raises(ValueError, match="no image file"):
    demo.load_image(str(tmp_path / "missing.png"))


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
  # Was: every value above 255 clipped by PIL's convert("RGB"): all white.
  import cv2  # pylint: disable=g-import-not-at-top

  ramp = np.linspace(0, 65535, 6 * 40).round().astype(np.uint16).reshape(6, 40)
  Image.fromarray(ramp).save(tmp_path / "pil16.png")
  cv2.imwrite(str(tmp_path / "cv16.png"), ramp)
  want = np.repeat((ramp / 257.0).round().astype(np.uint8)[..., None], 3, axis=-1)
  for name in ("pil16.png", "cv16.png"):
    assert Image.open(tmp_path / name).mode.startswith("I")  # really 16-bit on disk
    rgb, _ = demo.read_image(str(tmp_path / name))
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, want)


def _run(*args):
  return subprocess.run(
    [sys.executable, "-m", "tcl_jax.demo", *args], capture_output=True, text=True
  )


def test_cli(model, tmp_path):
  cfg, params = model
  model_files.save_checkpoint(tmp_path / "ckpt", cfg, params)
  Image.fromarray(_image(40, 48, 1)).save(tmp_path / "img.png")
  out = tmp_path / "seg.png"
  r = _run(
    f"--checkpoint={tmp_path / 'ckpt'}",
    f"--image={tmp_path / 'img.png'}",
    "--classes=dog, cat",
    f"--output={out}",
    "--no_pamr",
    "--bg_thresh=1.0",
  )
  assert r.returncode == 0, r.stderr
  written = np.asarray(Image.open(out))
  leg = demo.legend(["dog", "cat"], 48)
  assert written.shape == (40 + leg.shape[0], 48, 3)
  np.testing.assert_array_equal(written[40:], leg)
  np.testing.assert_array_equal(written[:40], _image(40, 48, 1))  # all background: no colour
  shares = [
    float(l.split(":")[1].split("%")[0]) for l in r.stdout.splitlines() if "% of pixels" in l
  ]
  assert shares == [100.0, 0.0, 0.0]
  assert "every pixel is background" in r.stdout

  for args, msg in [
    ((f"--image={out}",), "error: the following arguments are required: --checkpoint"),
    (("--checkpoint=x", "--image=y", "--classes= ,"), "error: --classes holds no"),
    (
      (f"--checkpoint={tmp_path / 'ckpt'}", f"--image={tmp_path / 'no.png'}", "--classes=dog"),
      "error: no image file at",
    ),
    (
      (f"--checkpoint={tmp_path / 'nockpt'}", f"--image={out}", "--classes=dog"),
      "error: no checkpoint at",
    ),
  ]:
    r = _run(*args)
    assert r.returncode == 2 and r.stderr.startswith(msg) and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.skipif(not os.path.isdir(FIXTURE), reason=f"needs the reference fixtures {FIXTURE}")
def test_load_model_completes_a_minimal_release_file_with_clip(tmp_path):
  import torch_files  # tests/torch_files.py: writes PyTorch zip checkpoints without torch

  from tcl_jax.weights import torch_pickle

  full = os.path.join(FIXTURE, "tcl_reference.pth")
  sd = {k: v for k, v in torch_pickle.load_state_dict(full).items() if not k.startswith("clip_")}
  minimal = torch_files.save({"model": torch_files.state_dict(sd)}, tmp_path / "tcl.pth")
  with pytest.raises(ValueError, match="--clip"):
    demo.load_model(str(minimal))
  _, want = demo.load_model(full)
  _, got = demo.load_model(str(minimal), os.path.join(FIXTURE, "clip_openai_jit.pt"))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_training_free_method_segments_as_evaluation_does(model):
  cfg, params = model
  img, classes = _image(50, 70, seed=1), ["dog", "sky", "tree"]
  segmenter = demo.Segmenter(params, cfg, protocol=zeroshot.Protocol(**SMALL))
  seg = segmenter(img, classes, bg_thresh=0.0, method="naclip")
  own = segmenter(img, classes, bg_thresh=0.0)
  # The evaluator's path with the method's zero-shot model.
  method = kinds.zero_shot_model(cfg, "naclip")
  protocol = zeroshot.Protocol(**SMALL, bg_thresh=0.0)
  emb = zeroshot.class_text_embedding(method, params, classes)
  window_fn = zeroshot.make_window_fn(method, params, emb, protocol)
  ref = zeroshot.predict(img[..., ::-1].copy(), window_fn, 3, protocol, background=True).labels
  np.testing.assert_array_equal(seg.labels, ref)
  assert np.mean(seg.labels != own.labels) > 0.05  # the method was used, not the TCL masks
  with pytest.raises(ValueError, match="unknown training-free method 'segformer'"):
    segmenter(img, classes, method="segformer")


def test_app_method_menu_reaches_the_segmenter(model):
  from tcl_jax import app as app_lib

  cfg, params = model
  segmenter = demo.Segmenter(params, cfg, protocol=zeroshot.Protocol(**SMALL))
  blocks = app_lib.build_app(segmenter)
  menu = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "method")
  assert [c[0] for c in menu.choices] == ["own", "tcl", *kinds.METHODS]
  # The Segment button's function, with the menu among its inputs, as the page calls it.
  (fn,) = [f for f in blocks.fns.values() if any(i is menu for i in f.inputs)]
  img, classes = _image(60, 80, seed=2), ["dog", "sky"]
  for name in ("own", "clearclip"):
    overlay, _, table, _ = fn.fn(img, ", ".join(classes), 0.1, False, name)
    want = segmenter(img, classes, pamr=False, bg_thresh=0.1, method=name)
    np.testing.assert_array_equal(overlay, demo.overlay_with_legend(img, want))
    assert [round(v, 2) for v in want.shares().values()] == [v for _, v in table]
