"""The training-free segmenters (tcl_jax.models.training_free) against their authors' own code:
tests/fixtures/training_free/ holds what MaskCLIP's, SCLIP's, ClearCLIP's and NACLIP's
repositories compute on a random-weight CLIP (tools/reference/training_free.py makes it; its
README says from which commits). The state dict is converted with the converter's OpenAI maps."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tcl_jax import kinds
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import clip_contrastive
from tcl_jax.models import resize
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.models import training_free
from tcl_jax.weights import key_maps as convert_maps
from tcl_jax.weights import model_files
from tcl_jax.zeroshot import evaluator
from tcl_jax.zeroshot import pipeline

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "training_free")
RTOL = 1e-4  # of the largest magnitude; float32 runs agree to ~1e-6


@pytest.fixture(scope="module")
def shared():
  """(cfg, visual params, images [k, H, W, 3], text [N, E]) of the fixture."""
  d = np.load(os.path.join(FIXTURES, "clip_visual.npz"))
  cfg = clip_lib.CLIPConfig(**json.loads(str(d["config"])))
  sd = {k[len("sd/") :]: d[k] for k in d.files if k.startswith("sd/")}
  flat = {}
  for path, (key, layout) in convert_maps.clip_key_map(cfg, "openai").items():
    if path[0] == "visual":
      flat[path[1:]] = np.asarray(convert_maps.TO_FLAX[layout](sd[key]))
  assert len(flat) == len(sd), "every fixture tensor maps to a parameter"
  return cfg, model_files.unflatten(flat), d["images"], d["text"]


def rel_err(got, want):
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def reference(method):
  return np.load(os.path.join(FIXTURES, f"{method}.npz"))


@pytest.mark.parametrize("method", training_free.METHODS)
def test_matches_the_authors_code(shared, method):
  cfg, vp, images, text = shared
  ref = reference(method)
  feats = training_free.dense_features(vp, cfg, jnp.asarray(images), method)
  assert feats.shape == ref["features"].shape
  assert rel_err(feats, ref["features"]) < RTOL
  scores = training_free.dense_scores({"visual": vp}, cfg, jnp.asarray(images), text, method)
  assert scores.shape == ref["logits"].shape  # [k, N, H, W]
  assert rel_err(scores, ref["logits"]) < RTOL


def test_the_fixtures_tell_each_oddity_apart(shared, monkeypatch):
  """Each port detail is visible in its fixture far above the tolerance, so the parity tests
  above guard it: MaskCLIP's exact GELU and eps (TCL's identity-attention masks of the "clip"
  kind, CLIP's QuickGELU, differ), NACLIP's Gaussian prior, and the DINO-style +0.1 resize of
  the positional embedding (SCLIP, ClearCLIP, NACLIP) against a plain bicubic resize."""
  cfg, vp, images, text = shared
  x = jnp.asarray(images)
  tcl_masks = clip_contrastive.dense_scores({"clip": {"visual": vp}}, cfg, x, text)
  assert rel_err(tcl_masks, reference("maskclip")["logits"]) > 10 * RTOL

  def feats(method):
    return rel_err(training_free.dense_features(vp, cfg, x, method), reference(method)["features"])

  with monkeypatch.context() as m:
    m.setattr(training_free, "MASKCLIP_LN_EPS", 1e-5)
    assert feats("maskclip") > 10 * RTOL
  with monkeypatch.context() as m:
    m.setattr(training_free, "MASKCLIP_ACT", "quick_gelu")
    assert feats("maskclip") > 10 * RTOL
  with monkeypatch.context() as m:
    m.setattr(training_free, "naclip_prior", lambda gh, gw: np.zeros((gh * gw + 1,) * 2))
    assert feats("naclip") > 100 * RTOL
  with monkeypatch.context() as m:
    m.setattr(training_free, "_dino_matrix", lambda i, o: resize.interp_matrix(i, o, "bicubic"))
    for method in ("sclip", "clearclip", "naclip"):
      assert feats(method) > 10 * RTOL, method


def test_unknown_method_is_one_line(shared):
  cfg = shared[0]
  with pytest.raises(ValueError, match=r"^unknown training-free method 'sclp'; known: maskclip, "):
    kinds.zero_shot_method("sclp", cfg)
  with pytest.raises(ValueError, match="^unknown training-free method"):
    training_free.dense_features({}, cfg, jnp.zeros((1, 16, 16, 3)), "tcl")
  assert kinds.METHODS == ("maskclip", "sclip", "clearclip", "naclip")
  # A TCLConfig's CLIP is used.
  assert kinds.zero_shot_method("naclip", tcl_lib.TCLConfig(clip=cfg, ie_freeze=2)).cfg == cfg


def test_zero_shot_method_through_the_pipeline(shared):
  """The registry's zero-shot model of a method, through the evaluator's window function and
  the pipeline's windows, averaging and argmax, labels the image as its dense scores do."""
  cfg, vp, images, text = shared
  model = kinds.zero_shot_method("clearclip", cfg)
  params = {"clip": {"visual": vp}}
  protocol = pipeline.Protocol(crop=96, stride=64, pamr=False, kp_w=0.0, bg_thresh=0.1)
  window_fn = evaluator.make_window_fn(model, params, jnp.asarray(text), protocol)
  x = images[0]  # one window covers the whole 96 x 80 image
  labels, _ = pipeline.predict_normalized(
    x, x.shape[:2], window_fn, text.shape[0], protocol, background=True
  )
  scores = training_free.dense_scores({"visual": vp}, cfg, jnp.asarray(x[None]), text, "clearclip")
  want = np.asarray(jnp.argmax(pipeline.add_background(scores, 0.1)[0], axis=0))
  got = np.asarray(labels)[: x.shape[0], : x.shape[1]]
  assert len(np.unique(want)) > 1  # a labelling with several classes, not a constant
  np.testing.assert_array_equal(got, want)
