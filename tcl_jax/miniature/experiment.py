r"""TCL in miniature: the README's default run (configs/synthetic.py).

  python -m tcl_jax.main --config=configs/synthetic.py --workdir=/tmp/tcl_synth

The paper's two stages in the shapes world (tcl_jax/data/synthetic.py), with the code a TPU pod runs:
  1. a tiny CLIP trained contrastively by the training loop (configs/miniature_clip.py). The
     package ships its weights (tcl_jax/assets/miniature_clip.npz); with
     `--config.miniature.clip_weights=` the run trains it first, in <workdir>/clip.
  2. TCL from that CLIP as the paper trains it: CLIP frozen, masker initialised from its last
     block(s), decoder gates closed, UST, the recipe's losses (tcl_jax.train.loop, configs/synthetic.py).
Zero-shot mIoU on the world's segmentation set (task "shapes", tcl_jax.evaluate) is measured for
the frozen-CLIP baseline, i.e. TCL inference at step 0 (masker = CLIP copy, gates closed: dense
MaskCLIP features), and after TCL training. Results: <workdir>/miniature.json
{"baseline_miou", "tcl_miou", "seed", "wall_s"} (percent, 2 decimals), the masks of a few
evaluation images in <workdir>/miniature_masks.png (labelled columns, a legend of the classes'
colours) and TensorBoard (`miniature/masks`). The workdir records what it was made with
(tcl_jax/miniature/record.py): another seed, step count or setting is refused, and the same
command on a finished run prints its stored figures.

Rebuild the shipped CLIP weights (the exact command that made them):

  python -m tcl_jax.miniature --rebuild_clip --workdir=/tmp/miniature_clip
"""

import dataclasses
import json
import os
import sys
import time

from absl import flags
from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
import tensorflow as tf

from tcl_jax import kinds
from tcl_jax import tokenizer
from tcl_jax import zeroshot
from tcl_jax.cli import config_files
from tcl_jax.data import synthetic
from tcl_jax.kinds import base
from tcl_jax.miniature import record as miniature_record
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import code as code_lib
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.train import checkpointing
from tcl_jax.train import inputs as train_inputs
from tcl_jax.train import loop as train
from tcl_jax.zeroshot import datasets
from tcl_jax.zeroshot import evaluator
from tcl_jax.zeroshot import pipeline
from tcl_jax.zeroshot import prompts

ASSET = config_files.packaged("assets/miniature_clip.npz")
REBUILD_COMMAND = "python -m tcl_jax.miniature --rebuild_clip --workdir=/tmp/miniature_clip"
_TOKEN_EMB = "text/token_embedding/embedding"


# ------------------------------------------------------------------------------------------------
# Stage 1: the CLIP, and its weights file
# ------------------------------------------------------------------------------------------------


def clip_config(steps: int | None = None) -> ml_collections.ConfigDict:
  """configs/miniature_clip.py (optionally with fewer steps)."""
  module = config_files.load_module(config_files.packaged("configs/miniature_clip.py"))
  return module.get_config(f"steps={steps}" if steps else None)


def train_clip(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage 1 through the training loop; returns the CLIP parameters {"visual", "text"}."""
  state, _ = train.train_and_evaluate(config, workdir)
  if int(jax.device_get(state.step)) < config.total_steps:
    raise InterruptedError(f"stage 1 stopped at step {int(state.step)} (preempted)")
  return jax.device_get(state.params["clip"])


def world_token_ids() -> np.ndarray:
  """Every token id the miniature ever feeds the text tower: caption words, punctuation, and all
  evaluation prompts of the shapes classes (every template set)."""
  texts = [" ".join(synthetic.vocabulary()) + " , ."]
  texts += [
    t.format(c) for ts in prompts.TEMPLATES.values() for t in ts for c in synthetic.CLASSES[1:]
  ]
  return np.unique(np.asarray(tokenizer.tokenize(texts)))


def save_clip(clip_params: dict, path: str, meta: dict) -> None:
  """CLIP parameters -> a compressed .npz, "a/b/c" keys. Only the token-embedding rows of
  `world_token_ids()` are stored (the other 49k rows are never read in this world): 4 MB, not 17."""
  flat = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(clip_params)[0]:
    flat["/".join(k.key for k in keypath)] = np.asarray(leaf, np.float32)
  ids = world_token_ids()
  emb = flat.pop(_TOKEN_EMB)
  flat["token_ids"], flat["token_rows"] = ids.astype(np.int32), emb[ids]
  flat["vocab_size"] = np.asarray(emb.shape[0], np.int32)
  flat["meta"] = np.asarray(json.dumps(meta))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **flat)
  os.replace(tmp, path)


def load_clip(path: str) -> dict:
  """A file written by `save_clip` -> CLIP parameters (unstored token rows are zero)."""
  try:
    with np.load(path) as z:
      flat = {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"cannot read CLIP weights {path}: {e}") from None
  ids, rows = flat.pop("token_ids"), flat.pop("token_rows")
  emb = np.zeros((int(flat.pop("vocab_size")), rows.shape[1]), np.float32)
  emb[ids] = rows
  flat[_TOKEN_EMB] = emb
  flat.pop("meta")
  tree = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def zero_shot_accuracy(clip_params: dict, clip_cfg, num_images: int = 300, seed: int = 123) -> dict:
  """What a stage-1 CLIP recognises: zero-shot classification ("a photo of a <class>.") of
  single-object evaluation-stream scenes among the 12 classes; {"colour", "shape", "class"}
  accuracy (chance 1/4, 1/3, 1/12). A CLIP that knows colour but not shape gives TCL nothing to
  ground shape with (the first shipped one: colour 1.0, shape 0.34)."""
  images, labels, i = [], [], 0
  while len(images) < num_images:
    rgb, label, objects, _ = synthetic.scene(seed, synthetic.STREAM_EVAL, i)
    i += 1
    if len(objects) == 1 and len(np.unique(label)) == 2:  # one object, wholly visible
      images.append(pipeline.normalize_image(rgb[..., ::-1]))
      labels.append(synthetic.CLASSES.index(objects[0]) - 1)
  classes = synthetic.CLASSES[1:]
  text = clip_lib.encode_text(
    clip_params, clip_cfg, np.asarray(tokenizer.tokenize([f"a photo of a {c}." for c in classes]))
  )
  image = clip_lib.encode_image(clip_params, clip_cfg, np.stack(images))
  pred = np.asarray(jax.numpy.argmax(image @ text.T, axis=-1))  # (norms do not change argmax)
  labels = np.asarray(labels)
  per = len(synthetic.SHAPES)
  return {
    "colour": float(np.mean(pred // per == labels // per)),
    "shape": float(np.mean(pred % per == labels % per)),
    "class": float(np.mean(pred == labels)),
  }


# ------------------------------------------------------------------------------------------------
# Masks to look at
# ------------------------------------------------------------------------------------------------

# A class's colour is its object's: circles in the colour itself, squares darker, triangles
# lighter; background dark grey; white where a label is none of the classes.
_SHADES = {"circle": (1.0, 0.0), "square": (0.55, 0.0), "triangle": (1.0, 0.55)}
_BACKGROUND_RGB = (60, 60, 60)
_HEADER_PX, _LEGEND_ROW_PX, _SWATCH_PX = 24, 22, 14


def class_colours(classes) -> np.ndarray:
  """uint8 [len(classes) + 1, 3]: each shapes-world class in its object's colour (the shape sets
  the shade, see `_SHADES`), background dark grey; the last row (white) is for other labels."""
  out = []
  for name in classes:
    colour, _, shape = name.partition(" ")
    if colour in synthetic.COLORS and shape in _SHADES:
      scale, to_white = _SHADES[shape]
      rgb = np.asarray(synthetic.COLORS[colour], np.float32) * scale
      out.append(rgb + (255 - rgb) * to_white)
    else:
      out.append(_BACKGROUND_RGB)
  out.append((255, 255, 255))
  return np.clip(np.round(np.asarray(out, np.float32)), 0, 255).astype(np.uint8)


def _colourise(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
  return colours[np.minimum(label, len(colours) - 1)]


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: a fixed bitmap font
    return ImageFont.load_default()


def _labelled(grid: np.ndarray, headers: list[str], classes, colours: np.ndarray) -> np.ndarray:
  """`grid` (columns of equal width) with a header over each column and, below, a legend: a
  swatch in each class's colour and its name."""
  width = grid.shape[1]
  col = width // len(headers)
  font = _font(13)
  items, x, rows = [], 8, 0
  for name, rgb in zip(classes, colours):  # lay the legend out in rows
    w = _SWATCH_PX + 6 + int(font.getlength(name)) + 16
    if x + w > width and x > 8:
      x, rows = 8, rows + 1
    items.append((x, rows, name, tuple(int(v) for v in rgb)))
    x += w
  legend_h = (rows + 1) * _LEGEND_ROW_PX + 8
  canvas = Image.new("RGB", (width, _HEADER_PX + grid.shape[0] + legend_h), (255, 255, 255))
  canvas.paste(Image.fromarray(grid), (0, _HEADER_PX))
  draw = ImageDraw.Draw(canvas)
  for i, text in enumerate(headers):
    tw = font.getlength(text)
    draw.text((i * col + (col - tw) / 2, 5), text, fill=(0, 0, 0), font=font)
  top = _HEADER_PX + grid.shape[0] + 6
  for x, row, name, rgb in items:
    y = top + row * _LEGEND_ROW_PX
    draw.rectangle([x, y + 2, x + _SWATCH_PX, y + 2 + _SWATCH_PX], fill=rgb, outline=(0, 0, 0))
    draw.text((x + _SWATCH_PX + 6, y + 2), name, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def mask_panel(
  param_sets: list, cfg, config, workdir: str, num_images: int, headers: list[str] | None = None
) -> np.ndarray:
  """uint8 grid, one row per evaluation image: the image, its ground truth, then the predicted
  class map of each parameter set, through the evaluation's own pipeline; upscaled x2, with a
  header over each column (`headers`: one per parameter set) and a legend of the class colours
  (`class_colours`: a blue square is drawn dark blue)."""
  ev = config.evals
  task = evaluator.parse_tasks(ev.tasks)[0]
  ds = datasets.SegDataset(task, checkpointing.expand_workdir(ev.data_root, workdir), num_images)
  protocol = zeroshot.Protocol.from_config(ev)
  classes = ds.spec.text_classes
  model = kinds.zero_shot_model(cfg)
  colours = class_colours(ds.spec.classes)
  fns = []
  for params in param_sets:
    text = prompts.class_text_embedding(model, params, classes, protocol.template)
    fns.append(zeroshot.make_window_fn(model, params, text, protocol))
  rows = []
  with jax.default_matmul_precision("highest"):
    for sample in ds:
      cells = [sample.image[..., ::-1], _colourise(sample.label, colours)]
      for fn in fns:
        pred = zeroshot.predict(
          sample.image, fn, len(classes), protocol, background=ds.spec.with_bg
        )
        cells.append(_colourise(pred.labels, colours))
      rows.append(np.concatenate(cells, axis=1))
  grid = np.concatenate(rows, axis=0).astype(np.uint8)
  grid = grid.repeat(2, axis=0).repeat(2, axis=1)  # 96-pixel cells are small on a screen
  headers = headers or [f"prediction {i + 1}" for i in range(len(param_sets))]
  return _labelled(grid, ["image", "truth"] + list(headers), ds.spec.classes, colours[:-1])


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _miou(results) -> float | None:
  """The mean over the evaluated tasks (shapes and shapes12: with and without background)."""
  return None if results is None else _round(results.get("average"))


def _round(value, decimals: int = 2):
  """Figures as the README's table gives them (31.42, not 31.419999999999998)."""
  if isinstance(value, dict):
    return {k: _round(v, decimals) for k, v in value.items()}
  return None if value is None else round(float(value), decimals)


def step0_params(model: base.Model, config, workdir: str):
  """The parameters the loop starts from (train_and_evaluate's own init)."""
  return train.initial_params(model, config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Stage 1 (or the shipped CLIP), baseline evaluation, stage 2, final evaluation, report.

  Returns the miniature.json dict, or None when training was preempted (rerun to resume).
  Raises ValueError when `workdir` was made with other settings (miniature_record); the time
  of a command that stops early is added to the workdir's record, and to the final wall_s.
  """
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  problem = miniature_record.problem(config, workdir, config_files.resolve)
  if problem:
    raise ValueError(problem)
  stored = miniature_record.finished(workdir)
  if stored is not None:  # finished: its figures and wall time as they were measured
    print(
      miniature_record.report_line(
        stored, stored.get("tcl_steps", config.total_steps), workdir, stored=True
      ),
      flush=True,
    )
    return stored
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    miniature_record.start(config, workdir, config_files.resolve)
  out = None
  try:
    out = _run(config, workdir, t0)
  finally:
    if out is None and jax.process_index() == 0:  # stopped: the next command adds to it
      miniature_record.add_spent(workdir, time.time() - t0)
  return out


def _run(config: ml_collections.ConfigDict, workdir: str, t0: float) -> dict | None:
  mini = config.miniature
  model = kinds.build_model(config)  # checks config.model before any long work
  cfg = model.cfg

  # Stage 1: the CLIP.
  if mini.clip_weights:
    clip = load_clip(config_files.resolve(mini.clip_weights))
  else:
    clip = train_clip(clip_config(mini.get("clip_steps") or None), os.path.join(workdir, "clip"))
    save_clip(
      clip, os.path.join(workdir, "clip", "miniature_clip.npz"), {"command": REBUILD_COMMAND}
    )
  # The kind's own init from a given CLIP (TCL's, or CoDe's, which adds its prompt and decoder).
  init_from = code_lib.init_params if isinstance(cfg, code_lib.CoDeConfig) else tcl_lib.init_params
  expected = jax.eval_shape(lambda: init_from(cfg, jax.random.key(0))["clip"])
  if jax.tree.structure(expected) != jax.tree.structure(clip) or any(
    e.shape != c.shape for e, c in zip(jax.tree.leaves(expected), jax.tree.leaves(clip))
  ):
    raise ValueError(f"CLIP weights {mini.clip_weights} do not match config.model.clip")
  model = dataclasses.replace(model, init=lambda rng: init_from(cfg, rng, clip_params=clip))

  # Baseline: TCL inference at step 0, by the evaluation the loop runs (once per workdir).
  train_inputs.prepare_synthetic_data(config, workdir)
  baseline_path = os.path.join(workdir, "miniature_baseline.json")
  if os.path.exists(baseline_path):
    with open(baseline_path) as f:
      baseline = json.load(f)
  else:
    baseline = train.run_evaluation(step0_params(model, config, workdir), model, config, workdir)
    if jax.process_index() == 0:
      with open(baseline_path, "w") as f:
        json.dump(baseline, f, indent=1)

  # Stage 2: TCL.
  state, _ = train.train_and_evaluate(config, workdir, model=model)
  if int(jax.device_get(state.step)) < config.total_steps:
    logging.warning("Stopped at step %d: rerun the same command to resume.", int(state.step))
    return None
  final = train.run_evaluation(state.params, model, config, workdir)
  if baseline is None or final is None:
    logging.info("No evaluation tasks configured: no miniature report.")
    return None

  out = {
    "baseline_miou": _miou(baseline),
    "tcl_miou": _miou(final),
    "seed": int(config.seed),
    # tcl_* name the trained model's figures, TCL's or (model_kind "code") CoDe's.
    "model_kind": str(config.get("model_kind", "tcl")),
    "tcl_steps": int(config.total_steps),
    "wall_s": round(miniature_record.spent(workdir) + time.time() - t0, 1),
    "per_task": {
      t: {
        "baseline_miou": _round(baseline[t]["miou"]),
        "tcl_miou": _round(final[t]["miou"]),
        "baseline_per_class_iou": _round(baseline[t]["per_class_iou"]),
        "tcl_per_class_iou": _round(final[t]["per_class_iou"]),
      }
      for t in final
      if t != "average"
    },
  }
  if jax.process_index() == 0 and mini.num_mask_images:
    panel = mask_panel(
      [step0_params(model, config, workdir), state.params],
      cfg,
      config,
      workdir,
      mini.num_mask_images,
      ["baseline (step 0)", f"{_kind_label(config)} ({config.total_steps} steps)"],
    )
    Image.fromarray(panel).save(os.path.join(workdir, miniature_record.MASKS))
    writer = metric_writers.create_default_writer(workdir)
    writer.write_images(config.total_steps, {"miniature/masks": panel[None]})
    writer.write_scalars(
      config.total_steps,
      {"miniature/baseline_miou": out["baseline_miou"], "miniature/tcl_miou": out["tcl_miou"]},
    )
    writer.close()
  if jax.process_index() == 0:  # last: its presence marks the run finished (miniature_record)
    out["wall_s"] = round(miniature_record.spent(workdir) + time.time() - t0, 1)
    with open(os.path.join(workdir, miniature_record.REPORT), "w") as f:
      json.dump(out, f, indent=1)
  print(miniature_record.report_line(out, config.total_steps, workdir), flush=True)
  return out


def _kind_label(config) -> str:
  return {"code": "CoDe"}.get(config.get("model_kind", "tcl"), "TCL")


def main(argv):
  """`--rebuild_clip`: stage 1 alone, writing the shipped weights file."""
  del argv
  f = flags.FLAGS
  if not f.rebuild_clip or not f.workdir:
    config_files.usage_error(f"usage: {REBUILD_COMMAND} [--output=PATH]")
  tf.config.set_visible_devices([], "GPU")  # the input pipeline must leave accelerators to JAX
  config = clip_config()
  clip = train_clip(config, f.workdir)
  acc = zero_shot_accuracy(clip, clip_lib.CLIPConfig(**config.model.clip.to_dict()))
  meta = {
    "command": REBUILD_COMMAND,
    "steps": int(config.total_steps),
    "seed": int(config.seed),
    "jax": jax.__version__,
    "zero_shot_accuracy": acc,
  }
  save_clip(clip, f.output, meta)
  print(
    f"wrote {f.output} ({os.path.getsize(f.output) / 2**20:.1f} MiB); zero-shot on "
    f"single-object scenes: colour {acc['colour']:.1%}, shape {acc['shape']:.1%}, "
    f"class {acc['class']:.1%} (chance 25%, 33%, 8.3%)"
  )
  sys.stdout.flush()
