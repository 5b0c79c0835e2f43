"""Zero-shot evaluation over benchmark tasks: the original's protocol (zeroshot.pipeline) and mmseg's
dataset-level mIoU (zeroshot.metrics), for any model kind's window function (tcl_jax.kinds) on
the caller's devices. `python -m tcl_jax.evaluate` and the training loop both run
`evaluate_tasks`.
"""

import concurrent.futures
import logging
import math
from typing import Callable, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from tcl_jax.kinds import base
from tcl_jax.zeroshot import datasets
from tcl_jax.zeroshot import metrics
from tcl_jax.zeroshot import pipeline
from tcl_jax.zeroshot import prompts
from tcl_jax.zeroshot import sclip_names


def parse_tasks(tasks) -> list:
  """'voc, context59' or a sequence -> task names, each checked against the task registry."""
  if isinstance(tasks, str):
    names = [t.strip() for t in tasks.split(",") if t.strip()]
  else:
    names = [str(t) for t in tasks]
  for t in names:
    datasets.get_task(t)
  if not names:
    raise ValueError("no evaluation tasks given")
  return names


def make_window_fn(
  model: base.ZeroShotModel,
  params,
  text_emb,
  protocol: pipeline.Protocol,
  *,
  mesh: Optional[jax.sharding.Mesh] = None,
  simmaps: bool = False,
) -> Callable:
  """windows [n, h, w, 3] -> the model's masks [n, N(, 2N), h, w], one jitted call, cached per
  model config, N and window shape. With a mesh of several devices, windows are split over its
  first axis and the model replicated. The background channel is added by the pipeline, per
  window, as the original's encode_decode."""
  ndev = 1 if mesh is None else mesh.devices.size
  if ndev > 1:
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    params, text_emb = jax.device_put((params, text_emb), repl)

  def window_fn(windows):
    windows = np.asarray(windows, np.float32)
    n = windows.shape[0]
    if ndev > 1:
      pad = -n % ndev
      if pad:
        windows = np.concatenate([windows, np.zeros((pad,) + windows.shape[1:], windows.dtype)])
      windows = jax.device_put(windows, split)
    masks = model.window_masks(
      params,
      text_emb,
      windows,
      pamr=bool(protocol.pamr),
      kp_w=float(protocol.kp_w),
      simmaps=simmaps,
    )
    return masks[:n]

  return window_fn


def task_queries(spec: datasets.TaskSpec, protocol: pipeline.Protocol):
  """(names to embed, query_class) of a task under a protocol: the text classes and None (TCL:
  one name per class, background a constant channel), or SCLIP's names, several per class with
  the background's among them, and the class of each."""
  if protocol.class_names == "dataset":
    return tuple(spec.text_classes), None
  if protocol.class_names != "sclip":
    raise ValueError(f"unknown class_names {protocol.class_names!r}; known: dataset, sclip")
  if spec.name not in sclip_names.NAMES:
    raise ValueError(
      f"SCLIP's class names cover {', '.join(sclip_names.NAMES)}, not the task {spec.name!r}"
    )
  per_class = sclip_names.NAMES[spec.name]
  names = tuple(n for c in per_class for n in c)
  return names, tuple(i for i, c in enumerate(per_class) for _ in c)


def _prepare(ds: datasets.SegDataset, i: int, protocol: pipeline.Protocol):
  """Load sample i and run the host part of the pipeline (in a worker thread)."""
  try:
    sample = ds.load(i)
  except datasets.CorruptSample as e:
    return i, None, str(e)
  return (
    i,
    (pipeline.preprocess(sample.image, protocol), sample.image.shape[:2], sample.label),
    None,
  )


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
  """Exact sum over all processes of an int64 array (pixel counts can pass 2**31, and jax
  gathers 32-bit integers: the halves of each value travel separately)."""
  x = np.asarray(x, np.int64)
  halves = np.stack([x >> 31, x & (2**31 - 1)]).astype(np.int32)  # [2, ...]
  every = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)  # [P, 2, ...]
  return (every[:, 0].sum(0) << 31) + every[:, 1].sum(0)


def evaluate_dataset(
  ds: datasets.SegDataset,
  window_fn: Callable,
  protocol: pipeline.Protocol,
  *,
  progress: bool = True,
  workers: int = 2,
  query_class: Optional[tuple] = None,
  heads: int = 1,
  desc: Optional[str] = None,
):
  """Run the pipeline over a dataset; returns {"miou", "per_class_iou", "num_images",
  "num_skipped", "intersect", "union"} (percent; miou rounded to 2 decimals as mmseg reports
  it; intersect/union: the per-class pixel counts summed over the dataset).

  window_fn(windows) -> [n, >= len(spec.text_classes), h, w] masks of the text classes; datasets
  with background get the constant bg_thresh channel in front. With query_class (SCLIP's names,
  see task_queries), window_fn scores len(query_class) names and the protocol's logit_scale
  readout makes the labels. With heads > 1 (a ZeroShotModel scoring several models in one
  call), a list of such results, one per head.

  With several processes, process p reads and predicts images p, p + P, p + 2P, ... (its own
  share, on its own devices through window_fn), and the counts of all processes are summed: every
  process returns the same result, identical to one process evaluating every image.
  """
  spec = ds.spec
  accs = [
    metrics.IoUAccumulator(spec.num_classes, datasets.IGNORE_INDEX, spec.reduce_zero_label)
    for _ in range(heads)
  ]
  ds.num_skipped, ds.skipped = 0, []
  mine = list(range(jax.process_index(), len(ds), jax.process_count()))
  bar = (
    tqdm(total=len(mine), desc=desc or spec.name, unit="img", dynamic_ncols=True)
    if progress and jax.process_index() == 0
    else None
  )
  pending = None  # (device prediction, label) of the previous image: overlaps host and device

  def finish(item):
    preds, label = item
    for acc, pred in zip(accs, preds):
      acc.update(np.asarray(pred)[: label.shape[0], : label.shape[1]], label)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    futures = {}
    ahead = max(2, 2 * workers)
    for k in range(min(ahead, len(mine))):
      futures[k] = pool.submit(_prepare, ds, mine[k], protocol)
    for k, i in enumerate(mine):
      _, prepared, err = futures.pop(k).result()
      if k + ahead < len(mine):
        futures[k + ahead] = pool.submit(_prepare, ds, mine[k + ahead], protocol)
      if prepared is None:
        ds.num_skipped += 1
        ds.skipped.append(ds.names[i])
        logging.warning("%s: skipping %s", spec.name, err)
      else:
        x, ori_hw, label = prepared
        out = pipeline.predict_normalized(
          x,
          ori_hw,
          window_fn,
          len(spec.text_classes) if query_class is None else spec.num_classes,
          protocol,
          background=spec.with_bg and query_class is None,
          query_class=query_class,
          heads=heads,
        )
        preds = [p for p, _ in out] if heads > 1 else [out[0]]
        if pending is not None:
          finish(pending)
        pending = (preds, label)
      if bar is not None:
        bar.update(1)
    if pending is not None:
      finish(pending)
  if bar is not None:
    bar.close()

  results = [_merged_result(spec, acc, ds.num_skipped) for acc in accs]
  return results[0] if heads == 1 else results


def _merged_result(spec, acc, num_skipped: int) -> dict:
  """One model's result on a dataset, its counts summed over every process."""
  intersect, union = acc.intersect, acc.union
  num_images = acc.count
  if jax.process_count() > 1:
    intersect, union = _sum_over_processes(intersect), _sum_over_processes(union)
    num_images, num_skipped = (
      int(v) for v in _sum_over_processes(np.array([num_images, num_skipped]))
    )
  miou, iou = metrics.mean_iou(intersect, union)
  return {
    "miou": None if math.isnan(miou) else round(miou * 100, 2),
    "per_class_iou": {
      c: (None if math.isnan(v) else float(v * 100)) for c, v in zip(spec.classes, iou)
    },
    "num_images": num_images,
    "num_skipped": num_skipped,
    "intersect": [int(v) for v in intersect],
    "union": [int(v) for v in union],
  }


def open_datasets(tasks, data_root: str, max_images: int = 0) -> dict:
  """{task: SegDataset}; raises datasets.DataError (one line) when a task's data is missing."""
  return {t: datasets.SegDataset(t, data_root, max_images) for t in parse_tasks(tasks)}


def evaluate_tasks(
  model: base.ZeroShotModel,
  params,
  tasks: dict,
  protocol: pipeline.Protocol,
  *,
  mesh: Optional[jax.sharding.Mesh] = None,
  progress: bool = True,
  labels: Optional[Sequence[str]] = None,
):
  """Evaluate a model on `tasks` ({name: SegDataset}, see open_datasets).

  `labels` (one per head, e.g. "method sclip, protocol tcl") name the results in the progress
  bar and the log lines, so that a grid's lines say which cell they are.

  Returns {task: {"miou", "per_class_iou", "num_images", "num_skipped"}, "average": float}, in
  percent; "average" is the mean of the task mIoUs (as the original's val/avg_miou). For a model
  with heads > 1 (kinds.zero_shot_methods: several methods in one forward), a list of such
  results, one per head.
  """
  prompts.get_templates(protocol.template)
  heads = int(getattr(model, "heads", 1))
  per_head = [{} for _ in range(heads)]
  text_cache = {}  # voc/voc20 and context/context59 share their text classes
  # Parity with the original's float32 matmuls (no TF32/bf16 passes on accelerators).
  with jax.default_matmul_precision("highest"):
    for t, ds in tasks.items():
      p = protocol.for_task(t)
      names, query_class = task_queries(ds.spec, p)
      key = (names, p.template, p.ensemble)
      if key not in text_cache:
        text_cache[key] = prompts.class_text_embedding(
          model, params, prompts.pad_classes(names, p.class_pad), p.template, p.ensemble
        )
      window_fn = make_window_fn(model, params, text_cache[key], p, mesh=mesh)
      out = evaluate_dataset(
        ds,
        window_fn,
        p,
        progress=progress,
        query_class=query_class,
        heads=heads,
        desc=f"{t} ({'; '.join(labels)})" if labels else t,
      )
      for i, (results, r) in enumerate(zip(per_head, out if heads > 1 else [out])):
        results[t] = r
        logging.info(
          "[%s] %smIoU of %d images: %s%% (%d skipped)",
          t,
          f"{labels[i]}: " if labels else "",
          r["num_images"],
          r["miou"],
          r["num_skipped"],
        )
  for results in per_head:
    mious = [r["miou"] for r in results.values() if r["miou"] is not None]
    results["average"] = float(np.mean(mious)) if mious else None
  return per_head[0] if heads == 1 else per_head


def evaluate_config(
  model: base.ZeroShotModel,
  params,
  eval_config,
  *,
  mesh: Optional[jax.sharding.Mesh] = None,
  progress: bool = True,
) -> dict:
  """evaluate_tasks with the tasks, data and protocol of an evaluation config (configs/eval.py,
  a training config's `evals`): tasks (default: the 8 benchmarks), data_root, max_images and the
  Protocol fields."""
  tasks = open_datasets(
    _field(eval_config, "tasks", ",".join(datasets.BENCHMARKS)),
    _field(eval_config, "data_root", "data"),
    int(_field(eval_config, "max_images", 0)),
  )
  return evaluate_tasks(
    model, params, tasks, pipeline.Protocol.from_config(eval_config), mesh=mesh, progress=progress
  )


def _field(c, name, default):
  try:
    value = c[name] if isinstance(c, dict) else getattr(c, name)
  except (KeyError, AttributeError):
    return default
  return default if value is None else value
