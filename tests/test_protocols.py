"""The zero-shot protocols (tcl_jax/zeroshot/protocol.py): SCLIP's readout against a numpy
rendering of SCLIP's postprocess_result, the settings each protocol takes from a config, SCLIP's
prompt ensemble, and `python -m tcl_jax.evaluate` over a protocol grid."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcl_jax import kinds
from tcl_jax import tokenizer
from tcl_jax.data import synthetic_segmentation
from tcl_jax.kinds import base
from tcl_jax.models import resize
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.weights import model_files
from tcl_jax.zeroshot import datasets
from tcl_jax.zeroshot import evaluator
from tcl_jax.zeroshot import metrics
from tcl_jax.zeroshot import pipeline
from tcl_jax.zeroshot import prompts
from tcl_jax.zeroshot import protocol as protocol_lib
from tcl_jax.zeroshot import sclip_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sclip_postprocess(logits, logit_scale, query_idx, prob_thd, area_thd):
  """SCLIP's CLIPForSegmentation.postprocess_result (clip_segmentor.py) in numpy, float64, on the
  window-averaged logits at the original size [Q, H, W]."""
  return _sclip_readout(logits, logit_scale, query_idx, prob_thd, area_thd)[0]


def _sclip_readout(logits, logit_scale, query_idx, prob_thd, area_thd):
  """(labels, the class probabilities they were read from [C, H, W])."""
  z = logit_scale * logits.astype(np.float64)
  prob = np.exp(z - z.max(0))
  prob /= prob.sum(0)
  num_cls = max(query_idx) + 1
  if num_cls != len(query_idx):
    idx = np.asarray(query_idx)
    prob = np.stack([prob[idx == c].max(0) for c in range(num_cls)])
  if area_thd:
    top = prob.argmax(0)
    area = np.array([(top == c).sum() for c in range(1, num_cls)], np.float64)
    prob[1:] *= (area > area_thd * area.sum())[:, None, None]
  pred = prob.argmax(0)
  pred[prob.max(0) < prob_thd] = 0
  return pred, prob


def test_sclip_readout_matches_its_postprocess():
  rng = np.random.default_rng(0)
  query_idx = (0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6, 6, 7)  # 14 names of 8 classes
  q, h, w = len(query_idx), 37, 45  # padded to 64 x 64 buffers: areas count the image only
  logits = 0.001 * rng.standard_normal((q, h, w)).astype(np.float32)  # rows 25+: near uniform,
  # top probabilities ~1/14, under prob_thd 0.1
  logits[0, :25] += 0.03  # class 0 leads rows 0-24
  logits[10, 5:20, 10:40] += 0.05  # class 5 wins a block (450 pixels)
  logits[6, :3, :3] += 0.1  # class 3 wins 9 pixels: under area_thd 0.1 of the others' area
  rows = resize.padded_bilinear_taps(h, h, pipeline.round_up(h, pipeline.SIZE_BUCKET))
  cols = resize.padded_bilinear_taps(w, w, pipeline.round_up(w, pipeline.SIZE_BUCKET))

  def ours(prob_thd, area_thd):
    labels = pipeline.readout_labels(
      jnp.asarray(logits), rows, cols, h, w, logit_scale=65.0, query_class=query_idx,
      num_classes=8, prob_thd=prob_thd, area_thd=area_thd,
    )  # fmt: skip
    return np.asarray(labels)[:h, :w]

  for prob_thd, area_thd in ((0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (0.1, 0.1)):
    want = _sclip_postprocess(logits, 65.0, query_idx, prob_thd, area_thd)
    np.testing.assert_array_equal(ours(prob_thd, area_thd), want, err_msg=f"{prob_thd, area_thd}")
  # Each threshold changes many pixels here, so the comparison above checks them.
  plain = _sclip_postprocess(logits, 65.0, query_idx, 0.0, 0.0)
  assert (plain[:25] == 3).sum() == 9 and (ours(0.0, 0.1)[:25] == 3).sum() == 0
  assert (plain[:25] == 5).sum() == 450 and (ours(0.0, 0.1)[:25] == 5).sum() == 450
  assert np.mean(ours(0.1, 0.0)[25:] == 0) == 1 and np.mean(plain[25:] == 0) < 0.5


# SCLIP's per-benchmark readout (wangf3014/SCLIP@b56bd30 configs/cfg_voc21.py: logit_scale=65,
# prob_thd=0.1, area_thd=0.1; cfg_context60.py: 50, 0.1), its test pipeline (Resize to (2048, 336)
# keep-ratio, SegDataPreProcessor mean/std, slide_crop 224, slide_stride 112), literal here.
SCLIP_READOUT = {"voc": (65.0, 0.1, 0.1), "context": (50.0, 0.1, 0.0)}
SCLIP_MEAN, SCLIP_STD = (122.771, 116.746, 104.094), (68.501, 66.632, 70.323)
_W = np.random.default_rng(7).standard_normal((2, 3, 64)).astype(np.float32)


def _name_logits(windows, n):
  """A model's logits of n names on windows [k, h, w, 3]: linear in the pixel, so that a
  region's colour picks its names and its brightness how sure they are (the spreads are such
  that the logit scale decides which pixels pass the probability threshold), plus a term of the
  window's mean colour, so that where the windows lie matters."""
  x = np.asarray(windows, np.float32)
  context = x.mean(axis=(1, 2), keepdims=True) @ _W[1, :, :n]  # [k, 1, 1, n]
  return np.moveaxis(0.01 * (x @ _W[0, :, :n]) + 0.004 * context, -1, 1).astype(np.float32)


def _bilinear(x, h0, w0):
  """torch F.interpolate(mode="bilinear", align_corners=False) of [C, h, w] to [C, h0, w0]."""

  def taps(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0

  r0, r1, a = taps(x.shape[1], h0)
  c0, c1, b = taps(x.shape[2], w0)
  rows = x[:, r0] * (1 - a)[:, None] + x[:, r1] * a[:, None]
  return rows[:, :, c0] * (1 - b) + rows[:, :, c1] * b


def _render_sclip(image_bgr, task):
  """SCLIP's labels of one image under _name_logits, in numpy from the literals above; also a
  mask of the pixels a float32 rounding may flip (a near tie, or a probability at prob_thd)."""
  scale, prob_thd, area_thd = SCLIP_READOUT[task]
  per_class = sclip_names.NAMES[task]
  query_idx = [c for c, names in enumerate(per_class) for _ in names]
  x = pipeline.normalize_image(
    pipeline.resize_keep_ratio(image_bgr, (2048, 336)), SCLIP_MEAN, SCLIP_STD
  )
  h, w = x.shape[:2]
  preds = np.zeros((len(query_idx), h, w))
  count = np.zeros((h, w))
  for i in range(max(h - 224 + 111, 0) // 112 + 1):  # mmseg's slide_inference
    for j in range(max(w - 224 + 111, 0) // 112 + 1):
      y2, x2 = min(i * 112 + 224, h), min(j * 112 + 224, w)
      y1, x1 = max(y2 - 224, 0), max(x2 - 224, 0)
      preds[:, y1:y2, x1:x2] += _name_logits(x[None, y1:y2, x1:x2], len(query_idx))[0]
      count[y1:y2, x1:x2] += 1
  logits = _bilinear(preds / count, *image_bgr.shape[:2])
  labels, prob = _sclip_readout(logits, scale, query_idx, prob_thd, area_thd)
  top = np.sort(prob, axis=0)[::-1]
  unsure = (top[0] - top[1] < 1e-5) | (np.abs(top[0] - prob_thd) < 1e-5)
  return labels, unsure, logits, query_idx


def test_sclip_protocol_to_labels_end_to_end(tmp_path, monkeypatch):
  # SCLIP's protocol as the evaluator runs it (its per-benchmark settings, names and readout)
  # on a model whose logits are known, against the labels rendered above in numpy.
  data = str(tmp_path / "data")
  for task in SCLIP_READOUT:
    synthetic_segmentation.write_synthetic_segmentation(data, task, num_images=2, seed=3)
  tasks = evaluator.open_datasets(",".join(SCLIP_READOUT), data)

  def text_embedding(params, tokens):
    del params
    return jnp.ones((tokens.shape[0], 2)) / np.sqrt(2.0)

  def window_masks(params, text_emb, windows, **kw):
    del params, kw
    return _name_logits(windows, text_emb.shape[0])

  model = base.ZeroShotModel(
    cfg=None, text_embedding=text_embedding, window_masks=window_masks, min_size=1
  )
  seen = []  # every prediction the metric is given, in order, with its label
  update = metrics.IoUAccumulator.update
  monkeypatch.setattr(
    metrics.IoUAccumulator,
    "update",
    lambda acc, pred, label: seen.append((np.array(pred), label)) or update(acc, pred, label),
  )
  evaluator.evaluate_tasks(model, {}, tasks, protocol_lib.SCLIP, progress=False)
  assert len(seen) == 4
  moved = {}
  for k, (task, ds) in enumerate((t, ds) for t, ds in tasks.items() for _ in range(2)):
    sample = ds.load(k % 2)
    got, label = seen[k]
    np.testing.assert_array_equal(label, sample.label)
    want, unsure, logits, query_idx = _render_sclip(sample.image, task)
    assert unsure.mean() < 0.005, (task, unsure.mean())
    np.testing.assert_array_equal(got[~unsure], want[~unsure], err_msg=task)
    # The logit scale decides many pixels here: another benchmark's, SCLIP's default or 100.
    _, prob_thd, area_thd = SCLIP_READOUT[task]
    for other in (40.0, 50.0, 65.0, 100.0):
      if other != SCLIP_READOUT[task][0]:
        o = _sclip_postprocess(logits, other, query_idx, prob_thd, area_thd)
        moved[task, other] = moved.get((task, other), 0) + (o != want).mean() / 2
  assert min(moved.values()) > 0.03, moved


def test_protocol_settings_from_a_config():
  cfg = dict(pamr=True, bg_thresh=0.4, crop=448, batch=4, img_scale=(2048, 448))  # eval.py's
  tcl = protocol_lib.Protocol.from_config(cfg)
  assert (tcl.name, tcl.crop, tcl.batch, tcl.logit_scale) == ("tcl", 448, 4, 0.0)
  # SCLIP's keeps its own values against a config's TCL defaults; takes batch and what was given.
  sclip = protocol_lib.Protocol.from_config(dict(cfg, stride=64), "sclip", given={"stride"})
  assert (sclip.crop, sclip.stride, sclip.batch, sclip.pamr) == (224, 64, 4, False)
  assert sclip.img_scale == (2048, 336) and sclip.template == "openai_imagenet"
  voc = sclip.for_task("voc")
  assert (voc.logit_scale, voc.prob_thd, voc.area_thd) == (65.0, 0.1, 0.1)
  assert sclip.for_task("cityscapes").img_scale == (2048, 560)
  assert sclip.for_task("ade20k").logit_scale == 40.0 and sclip.for_task("voc").per_task == ()
  # A field given on the command line wins over a benchmark's own value too.
  given = protocol_lib.Protocol.from_config(dict(img_scale=(512, 128)), "sclip", {"img_scale"})
  assert given.for_task("cityscapes").img_scale == (512, 128)
  with pytest.raises(ValueError, match="unknown protocol 'mmseg'; known: tcl, sclip"):
    protocol_lib.Protocol.from_config(dict(protocol="mmseg"))


def test_sclip_names_cover_each_benchmark_class():
  for task, per_class in sclip_names.NAMES.items():
    spec = datasets.get_task(task)
    assert len(per_class) == spec.num_classes, task
    names, query_class = evaluator.task_queries(spec, protocol_lib.SCLIP)
    assert len(names) == len(query_class) >= spec.num_classes
    assert sorted(set(query_class)) == list(range(spec.num_classes))
  names, qc = evaluator.task_queries(datasets.get_task("voc"), protocol_lib.SCLIP)
  assert names[:2] == ("sky", "wall") and qc[25:27] == (0, 1)  # 26 stuff names for background
  assert evaluator.task_queries(datasets.get_task("voc"), protocol_lib.Protocol()) == (
    datasets.get_task("voc").text_classes,
    None,
  )
  assert len(prompts.get_templates("openai_imagenet")) == 80


def test_ensemble_of_normalized_prompts():
  # A kind whose text hook averages raw per-prompt embeddings (the hook's contract), then
  # normalises; SCLIP's ensemble normalises each prompt's embedding before the mean.
  table = jax.random.normal(jax.random.key(1), (49408, 6)) * jnp.linspace(0.2, 3.0, 49408)[:, None]

  def raw(tokens):  # [..., L] -> [..., 6]; norms grow with the prompt's length
    tokens = jnp.asarray(tokens)
    n = jnp.sum(tokens > 0, axis=-1, keepdims=True).astype(jnp.float32)
    at = jax.random.normal(jax.random.key(2), (tokens.shape[-1], 1))  # a weight per position
    return jnp.sum(table[tokens] * at * (tokens > 0)[..., None], axis=-2) * n**2

  def text_embedding(params, tokens):
    del params
    m = raw(tokens).mean(1)
    return m / jnp.linalg.norm(m, axis=-1, keepdims=True)

  model = base.ZeroShotModel(cfg=None, text_embedding=text_embedding, window_masks=None, min_size=1)
  names = ["cat", "traffic light"]
  got = np.asarray(prompts.class_text_embedding(model, {}, names, "custom", "mean_of_normalized"))

  templates = prompts.get_templates("custom")
  toks = np.asarray(tokenizer.tokenize([t.format(c) for c in names for t in templates]))
  each = np.asarray(raw(toks), np.float64).reshape(2, len(templates), -1)
  each /= np.linalg.norm(each, axis=-1, keepdims=True)
  want = each.mean(1) / np.linalg.norm(each.mean(1), axis=-1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  plain = np.asarray(prompts.class_text_embedding(model, {}, names, "custom", "mean"))
  assert np.abs(plain - want).max() > 1e-2  # the two ensembles differ here by far more


def test_evaluate_cli_protocol_grid(tmp_path):
  data = str(tmp_path / "data")
  synthetic_segmentation.write_synthetic_segmentation(data, "voc", num_images=2, seed=3)
  cfg = tcl_lib.tiny_config()
  params = tcl_lib.init_params(cfg, jax.random.key(0))
  model_files.save_checkpoint(str(tmp_path / "ckpt"), cfg, params)
  small = dict(img_scale=(160, 64), crop=48, stride=32, batch=2)
  flags = [f"--config.{k}={v}" for k, v in small.items()]
  common = [
    sys.executable, "-m", "tcl_jax.evaluate", f"--checkpoint={tmp_path / 'ckpt'}",
    f"--config.data_root={data}", "--config.tasks=voc", "--config.pamr=False", *flags,
  ]  # fmt: skip
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # As a user runs it (no JAX_PLATFORMS): JAX looks for a TPU and a proxy backend first.
  plain = {k: v for k, v in env.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
  r = subprocess.run(
    common
    + ["--config.method=own,naclip,clearclip", "--config.protocol=tcl,sclip"]
    + [f"--workdir={tmp_path / 'out'}"],
    cwd=REPO, env=plain, capture_output=True, text=True, timeout=400,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  # Was: "Unable to initialize backend 'tpu'" / "'proxy'" lines, and six unnamed "[voc] mIoU".
  assert "Unable to initialize backend" not in r.stderr, r.stderr[-3000:]
  named = re.findall(r"\[voc\] method (\w+), protocol (\w+): mIoU of 2 images", r.stderr)
  assert named == [(m, p) for p in ("tcl", "sclip") for m in ("own", "naclip", "clearclip")]
  grid = json.load(open(tmp_path / "out" / "results.json"))["grid"]
  assert [(g["method"], g["protocol"]) for g in grid] == [
    (m, p) for p in ("tcl", "sclip") for m in ("own", "naclip", "clearclip")
  ]
  assert "naclip     sclip" in r.stdout and "own        tcl" in r.stdout, r.stdout
  # Each entry is what the engine gives under that protocol (the command line's sizes given).
  tasks = evaluator.open_datasets("voc", data)
  given = set(small) | {"pamr"}
  for g in grid[:1] + grid[3:5]:  # own x tcl, own x sclip, naclip x sclip
    model = kinds.zero_shot_model(cfg, g["method"])
    p = protocol_lib.Protocol.from_config(dict(small, pamr=False), g["protocol"], given)
    want = evaluator.evaluate_tasks(model, params, tasks, p, progress=False)["voc"]
    assert g["results"]["voc"]["union"] == want["union"], g["protocol"]
    assert g["results"]["voc"]["intersect"] == want["intersect"], g["protocol"]
  assert grid[0]["results"]["voc"]["union"] != grid[3]["results"]["voc"]["union"]
  assert grid[3]["results"]["voc"]["union"] != grid[4]["results"]["voc"]["union"]
  bad = subprocess.run(
    common + ["--config.protocol=tcl,mmseg"], cwd=REPO, env=env, capture_output=True, text=True
  )
  lines = bad.stderr.strip().splitlines()
  assert bad.returncode == 2 and len(lines) == 1 and "unknown --config.protocol 'mmseg'" in lines[0]
  # A task SCLIP gives no names for (the training split's voc20): one line before any model.
  synthetic_segmentation.write_synthetic_segmentation(data, "t_voc20", num_images=1, seed=3)
  bad = subprocess.run(
    [*common, "--config.tasks=t_voc20", "--config.protocol=tcl,sclip"],
    cwd=REPO, env=env, capture_output=True, text=True,
  )  # fmt: skip
  lines = bad.stderr.strip().splitlines()
  assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
  assert "--config.protocol=sclip: SCLIP's class names cover voc, " in lines[0], lines[0]


def test_methods_sharing_one_forward_give_each_methods_results(tmp_path):
  # One model with a head per method (the tower up to its last block run once) against each
  # method evaluated alone, under both protocols.
  data = str(tmp_path / "data")
  synthetic_segmentation.write_synthetic_segmentation(data, "voc", num_images=2, seed=5)
  tasks = evaluator.open_datasets("voc", data)
  cfg = tcl_lib.tiny_config()
  params = tcl_lib.init_params(cfg, jax.random.key(1))
  names = ("sclip", "maskclip", "naclip", "clearclip")
  shared = kinds.zero_shot_methods(names, cfg)
  assert shared.heads == 4
  for name in ("tcl", "sclip"):
    p = protocol_lib.Protocol.from_config(
      dict(img_scale=(160, 64), crop=48, stride=32, batch=2, bg_thresh=0.1, pamr=False),
      name,
      given={"img_scale", "crop", "stride", "bg_thresh", "pamr"},
    )
    together = evaluator.evaluate_tasks(shared, params, tasks, p, progress=False)
    alone = [
      evaluator.evaluate_tasks(kinds.zero_shot_model(cfg, m), params, tasks, p, progress=False)
      for m in names
    ]
    for m, a, b in zip(names, together, alone):
      assert a["voc"]["union"] == b["voc"]["union"], (name, m)
      assert a["voc"]["intersect"] == b["voc"]["intersect"], (name, m)
    # The methods' results differ here, so a head read from the wrong channels shows.
    assert len({tuple(r["voc"]["intersect"] + r["voc"]["union"]) for r in alone}) >= 3, name
