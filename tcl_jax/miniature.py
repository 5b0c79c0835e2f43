r"""TCL in miniature: the README's default run (configs/synthetic.py).

  python -m tcl_jax.main --config=configs/synthetic.py --workdir=/tmp/tcl_synth

The paper's two stages in the shapes world (tcl_jax/data/synthetic.py), with the code a TPU pod runs:
  1. a tiny CLIP trained contrastively by the training loop (configs/miniature_clip.py). The
     package ships its weights (tcl_jax/assets/miniature_clip.npz); with
     `--config.miniature.clip_weights=` the run trains it first, in <workdir>/clip.
  2. TCL from that CLIP as the paper trains it: CLIP frozen, masker initialised from its last
     block(s), decoder gates closed, UST, the recipe's losses (tcl_jax.train, configs/synthetic.py).
Zero-shot mIoU on the world's segmentation set (task "shapes", tcl_jax.evaluate) is measured for
the frozen-CLIP baseline, i.e. TCL inference at step 0 (masker = CLIP copy, gates closed: dense
MaskCLIP features), and after TCL training. Results: <workdir>/miniature.json
{"baseline_miou", "tcl_miou", "seed", "wall_s"} (percent), the masks of a few evaluation images in
<workdir>/miniature_masks.png and TensorBoard (`miniature/masks`).

Rebuild the shipped CLIP weights (the exact command that made them):

  python -m tcl_jax.miniature --rebuild_clip --workdir=/tmp/miniature_clip
"""

import json
import os
import sys
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from tcl_jax import config_files
from tcl_jax import train

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "miniature_clip.npz")
REBUILD_COMMAND = "python -m tcl_jax.miniature --rebuild_clip --workdir=/tmp/miniature_clip"
_TOKEN_EMB = "text/token_embedding/embedding"


# ------------------------------------------------------------------------------------------------
# Stage 1: the CLIP, and its weights file
# ------------------------------------------------------------------------------------------------

def clip_config(steps: int | None = None) -> ml_collections.ConfigDict:
  """configs/miniature_clip.py (optionally with fewer steps)."""
  module = config_files.load_module(os.path.join(config_files.REPO, "configs",
                                                 "miniature_clip.py"))
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
  from tcl_jax import evaluate  # pylint: disable=g-import-not-at-top
  from tcl_jax import tokenizer  # pylint: disable=g-import-not-at-top
  from tcl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  texts = [" ".join(synthetic.vocabulary()) + " , ."]
  texts += [t.format(c) for ts in evaluate.TEMPLATES.values() for t in ts
            for c in synthetic.CLASSES[1:]]
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


def zero_shot_accuracy(clip_params: dict, clip_cfg, num_images: int = 300,
                       seed: int = 123) -> dict:
  """What a stage-1 CLIP recognises: zero-shot classification ("a photo of a <class>.") of
  single-object evaluation-stream scenes among the 12 classes; {"colour", "shape", "class"}
  accuracy (chance 1/4, 1/3, 1/12). A CLIP that knows colour but not shape gives TCL nothing to
  ground shape with (the first shipped one: colour 1.0, shape 0.34)."""
  from tcl_jax import evaluate  # pylint: disable=g-import-not-at-top
  from tcl_jax import tokenizer  # pylint: disable=g-import-not-at-top
  from tcl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from tcl_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  images, labels, i = [], [], 0
  while len(images) < num_images:
    rgb, label, objects, _ = synthetic.scene(seed, synthetic.STREAM_EVAL, i)
    i += 1
    if len(objects) == 1 and len(np.unique(label)) == 2:  # one object, wholly visible
      images.append(evaluate.normalize_image(rgb[..., ::-1]))
      labels.append(synthetic.CLASSES.index(objects[0]) - 1)
  classes = synthetic.CLASSES[1:]
  text = clip_lib.encode_text(clip_params, clip_cfg, np.asarray(
      tokenizer.tokenize([f"a photo of a {c}." for c in classes])))
  image = clip_lib.encode_image(clip_params, clip_cfg, np.stack(images))
  pred = np.asarray(jax.numpy.argmax(image @ text.T, axis=-1))  # (norms do not change argmax)
  labels = np.asarray(labels)
  per = len(synthetic.SHAPES)
  return {"colour": float(np.mean(pred // per == labels // per)),
          "shape": float(np.mean(pred % per == labels % per)),
          "class": float(np.mean(pred == labels))}


# ------------------------------------------------------------------------------------------------
# Masks to look at
# ------------------------------------------------------------------------------------------------

def _colourise(label: np.ndarray) -> np.ndarray:
  from tcl_jax import seg_data  # pylint: disable=g-import-not-at-top
  return seg_data.voc_palette()[label]


def mask_panel(param_sets: list, cfg, config, workdir: str, num_images: int) -> np.ndarray:
  """uint8 grid, one row per evaluation image: the image, its ground truth, then the predicted
  class map of each parameter set (VOC palette colours), through the evaluation's own pipeline;
  upscaled x2."""
  from tcl_jax import evaluate  # pylint: disable=g-import-not-at-top
  from tcl_jax import seg_data  # pylint: disable=g-import-not-at-top
  ev = config.evals
  task = evaluate.parse_tasks(ev.tasks)[0]
  ds = seg_data.SegDataset(task, ev.data_root.format(workdir=workdir), num_images)
  opts = evaluate.PipelineOptions.from_config(ev)
  classes = ds.spec.text_classes
  fns = []
  for params in param_sets:
    text = evaluate.class_text_embedding(params, cfg, classes, ev.template)
    fns.append(evaluate.make_mask_fn(params, cfg, text, pamr=ev.pamr, kp_w=ev.kp_w))
  rows = []
  with jax.default_matmul_precision("highest"):
    for sample in ds:
      cells = [sample.image[..., ::-1], _colourise(sample.label)]
      for fn in fns:
        pred = evaluate.predict_image(sample.image, fn, len(classes), opts.img_scale, opts.crop,
                                      opts.stride, opts.batch,
                                      ev.bg_thresh if ds.spec.with_bg else None)
        cells.append(_colourise(pred))
      rows.append(np.concatenate(cells, axis=1))
  panel = np.concatenate(rows, axis=0).astype(np.uint8)
  return panel.repeat(2, axis=0).repeat(2, axis=1)  # 96-pixel cells are small on a screen


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def _miou(results) -> float | None:
  """The mean over the evaluated tasks (shapes and shapes12: with and without background)."""
  return None if results is None else results.get("average")


def step0_params(model: train.Model, config):
  """The parameters the loop starts from (train_and_evaluate's init, same rng split)."""
  if config.get("init_checkpoint"):
    return model.load(config.init_checkpoint)
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  return jax.jit(model.init)(init_rng)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Stage 1 (or the shipped CLIP), baseline evaluation, stage 2, final evaluation, report.

  Returns the miniature.json dict, or None when training was preempted (rerun to resume).
  """
  from tcl_jax.models import tcl as tcl_lib  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  mini = config.miniature
  model = train.build_model(config)  # checks config.model before any long work
  cfg = model.cfg

  # Stage 1: the CLIP.
  if mini.clip_weights:
    clip = load_clip(config_files.resolve(mini.clip_weights))
  else:
    clip = train_clip(clip_config(mini.get("clip_steps") or None), os.path.join(workdir, "clip"))
    save_clip(clip, os.path.join(workdir, "clip", "miniature_clip.npz"),
              {"command": REBUILD_COMMAND})
  expected = jax.eval_shape(lambda: tcl_lib.init_params(cfg, jax.random.key(0))["clip"])
  if jax.tree.structure(expected) != jax.tree.structure(clip) or any(
      e.shape != c.shape for e, c in zip(jax.tree.leaves(expected), jax.tree.leaves(clip))):
    raise ValueError(f"CLIP weights {mini.clip_weights} do not match config.model.clip")
  model = model._replace(init=lambda rng: tcl_lib.init_params(cfg, rng, clip_params=clip))

  # Baseline: TCL inference at step 0, by the evaluation the loop runs (once per workdir).
  train.prepare_synthetic_data(config, workdir)
  baseline_path = os.path.join(workdir, "miniature_baseline.json")
  if os.path.exists(baseline_path):
    with open(baseline_path) as f:
      baseline = json.load(f)
  else:
    baseline = train.run_evaluation(step0_params(model, config), model, config, workdir)
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

  out = {"baseline_miou": _miou(baseline), "tcl_miou": _miou(final), "seed": int(config.seed),
         "wall_s": round(time.time() - t0, 1),
         "per_task": {t: {"baseline_miou": baseline[t]["miou"], "tcl_miou": final[t]["miou"],
                          "baseline_per_class_iou": baseline[t]["per_class_iou"],
                          "tcl_per_class_iou": final[t]["per_class_iou"]}
                      for t in final if t != "average"}}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "miniature.json"), "w") as f:
      json.dump(out, f, indent=1)
  if jax.process_index() == 0 and mini.num_mask_images:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    panel = mask_panel([step0_params(model, config), state.params], cfg, config, workdir,
                       mini.num_mask_images)
    Image.fromarray(panel).save(os.path.join(workdir, "miniature_masks.png"))
    writer = metric_writers.create_default_writer(workdir)
    writer.write_images(config.total_steps, {"miniature/masks": panel[None]})
    writer.write_scalars(config.total_steps, {"miniature/baseline_miou": out["baseline_miou"],
                                              "miniature/tcl_miou": out["tcl_miou"]})
    writer.close()
  tasks = ", ".join(f"{t} {v['baseline_miou']:.2f} -> {v['tcl_miou']:.2f}"
                    for t, v in out["per_task"].items())
  print(f"miniature (seed {out['seed']}): zero-shot mIoU (%) on the shapes world, frozen-CLIP "
        f"baseline (TCL at step 0) {out['baseline_miou']:.2f}, after {config.total_steps} TCL "
        f"steps {out['tcl_miou']:.2f} ({out['tcl_miou'] - out['baseline_miou']:+.2f} points; "
        f"{tasks}); {out['wall_s']:.0f} s. Masks: "
        f"{os.path.join(workdir, 'miniature_masks.png')} (image | truth | baseline | TCL)",
        flush=True)
  return out


def main(argv):
  """`--rebuild_clip`: stage 1 alone, writing the shipped weights file."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  if not f.rebuild_clip or not f.workdir:
    config_files.usage_error(f"usage: {REBUILD_COMMAND} [--output=PATH]")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # the input pipeline must leave accelerators to JAX
  config = clip_config()
  clip = train_clip(config, f.workdir)
  from tcl_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  acc = zero_shot_accuracy(clip, clip_lib.CLIPConfig(**config.model.clip.to_dict()))
  meta = {"command": REBUILD_COMMAND, "steps": int(config.total_steps), "seed": int(config.seed),
          "jax": jax.__version__, "zero_shot_accuracy": acc}
  save_clip(clip, f.output, meta)
  print(f"wrote {f.output} ({os.path.getsize(f.output) / 2**20:.1f} MiB); zero-shot on "
        f"single-object scenes: colour {acc['colour']:.1%}, shape {acc['shape']:.1%}, "
        f"class {acc['class']:.1%} (chance 25%, 33%, 8.3%)")
  sys.stdout.flush()


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_bool("rebuild_clip", False, "Train stage 1 (configs/miniature_clip.py) and write "
                    "its weights file.")
  flags.DEFINE_string("workdir", None, "Stage 1 workdir (checkpoints, logs, data).")
  flags.DEFINE_string("output", ASSET, "Where to write the weights file.")
  app.run(main)
