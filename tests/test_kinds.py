"""The model registry (tcl_jax.kinds): unknown kinds fail in one line, a new kind is one module's
worth of code plus `register`, and the evaluator asks the kind, never TCL, for its masks."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tcl_jax import kinds
from tcl_jax.data import synthetic_segmentation
from tcl_jax.kinds import base
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import clip_contrastive
from tcl_jax.models import resize
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.zeroshot import datasets
from tcl_jax.zeroshot import evaluator
from tcl_jax.zeroshot import pipeline


# ---- A whole new model kind in 20 lines: "oracle-colour" scores each class by one image channel.
@dataclasses.dataclass(frozen=True)
class ColourConfig:
  channel: int = 0  # the class whose score follows the red channel


def _colour_masks(params, text_emb, windows, *, pamr, kp_w, simmaps, cfg):
  del params, pamr, kp_w, simmaps
  n = text_emb.shape[0]
  red = jnp.asarray(windows)[..., cfg.channel][:, None]  # [k, 1, h, w]
  return jnp.where(jnp.arange(n)[None, :, None, None] == 0, red, -red)


def _colour_zero_shot(cfg):
  return base.ZeroShotModel(
    cfg=cfg,
    text_embedding=lambda params, tokens: jnp.ones((tokens.shape[0], 4)),
    window_masks=lambda *a, **k: _colour_masks(*a, **k, cfg=cfg),
    min_size=1,
  )


COLOUR = base.ModelKind(
  name="colour", build=lambda config: None, config_type=ColourConfig, zero_shot=_colour_zero_shot
)
# ----


def test_unknown_kind_is_one_line():
  config = ml_collections.ConfigDict({"model_kind": "tlc"})
  with pytest.raises(ValueError, match=r"^unknown model_kind 'tlc'; known: clip, code, tcl$"):
    kinds.build_model(config)
  with pytest.raises(ValueError, match="no model kind takes a dict config"):
    kinds.zero_shot_model({})


def test_a_subclass_config_is_not_taken_by_its_parents_kind():
  """A kind whose config subclasses TCLConfig (CoDe's) is its own: TCL's kind must not segment it
  as TCL, and without its own kind registered it is no kind's."""

  @dataclasses.dataclass(frozen=True)
  class SubConfig(tcl_lib.TCLConfig):
    extra: int = 1

  cfg = SubConfig(clip=tcl_lib.tiny_config().clip, ie_freeze=3)
  with pytest.raises(ValueError, match="no model kind takes a SubConfig config"):
    kinds.zero_shot_model(cfg)
  sub = base.ModelKind(
    name="sub", build=lambda config: None, config_type=SubConfig, zero_shot=_colour_zero_shot
  )
  kinds.register(sub)
  try:
    assert kinds.zero_shot_model(cfg).window_masks.__name__ == "<lambda>"
  finally:
    del kinds.KINDS["sub"]


def test_a_registered_kind_is_evaluated_through_its_own_hooks(tmp_path):
  kinds.register(COLOUR)
  try:
    model = kinds.zero_shot_model(ColourConfig())
    synthetic_segmentation.write_synthetic_segmentation(str(tmp_path), "voc", num_images=2, seed=1)
    tasks = {"voc": datasets.SegDataset("voc", str(tmp_path))}
    protocol = pipeline.Protocol(img_scale=(128, 64), crop=32, stride=16, pamr=False)
    res = evaluator.evaluate_tasks(model, {}, tasks, protocol, progress=False)
    # The kind scores class 0 ("aeroplane", after background) by the normalized red channel and
    # every other class by its negative: red pixels are aeroplane, the rest background or a tie
    # broken to the first class. Its predictions differ from TCL's, so the pipeline used them.
    iou = res["voc"]["per_class_iou"]
    assert res["voc"]["num_images"] == 2 and iou["aeroplane"] is not None
    counted = [k for k, v in iou.items() if v is not None and v > 0]
    assert set(counted) <= {"background", "aeroplane"}, counted
  finally:
    del kinds.KINDS["colour"]


def test_the_clip_kind_segments_with_maskclip_dense_scores():
  cfg = tcl_lib.tiny_config().clip
  params = clip_contrastive.init_params(cfg, jax.random.key(0))
  model = kinds.zero_shot_model(cfg)
  text = jax.random.normal(jax.random.key(1), (3, cfg.embed_dim))
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  windows = jax.random.normal(jax.random.key(2), (2, 40, 56, 3))
  out = np.asarray(model.window_masks(params, text, windows, pamr=True, kp_w=0.3, simmaps=False))
  assert out.shape == (2, 3, 40, 56)
  # MaskCLIP: the last block's attention is the identity; each patch's projected token against
  # each class. Recomputed here from the tower's pieces at one patch (pixel 0, 0 is patch 0).
  visual = clip_lib.VisionTransformer(cfg)
  padded = jnp.pad(windows, ((0, 0), (4, 4), (4, 4), (0, 0)))  # 40x56 -> 48x64 (patch 16)
  tok, _ = visual.apply(
    {"params": params["clip"]["visual"]}, padded, ignore_last_attn=True, method="tokens"
  )
  dense = visual.apply({"params": params["clip"]["visual"]}, tok[:, 1:], method="project")
  dense = dense / jnp.linalg.norm(dense, axis=-1, keepdims=True)
  assert np.isfinite(out).all() and -1 <= out.min() and out.max() <= 1 and np.ptp(out) > 0.1
  grid = jnp.einsum("khwc,nc->knhw", dense.reshape(2, 3, 4, -1), text)
  want = resize.resize_hw(grid, (48, 64), "bilinear", layout="NCHW")[:, :, 4:44, 4:60]
  np.testing.assert_allclose(out, np.asarray(want), atol=1e-5)
