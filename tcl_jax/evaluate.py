"""Zero-shot open-vocabulary segmentation evaluation: the original's protocol (mmseg 0.27 test
pipeline, sliding-window inference, dataset-level mIoU), see /work/shared/EVAL_PROTOCOL.md.

    python -m tcl_jax.evaluate --config=configs/eval.py --checkpoint=DIR --workdir=OUT

writes OUT/results.json = {"<task>": {"miou", "per_class_iou", "num_images", "num_skipped"}, ...,
"average"} (percent). `evaluate_tasks` is the same code path for the training loop.

Per image (jitted pieces are cached per shape; window counts and post-processing sizes are padded
to buckets, which does not change the numbers, so few shapes are compiled):
  1. BGR uint8 image -> keep-ratio resize to img_scale (mmcv rounding, cv2 INTER_LINEAR on uint8)
  2. BGR->RGB, ImageNet mean/std normalization in float32
  3. sliding windows (crop, stride), batched through one jitted model function; each window's
     masks get a constant background channel (bg_thresh) for datasets with background
  4. overlap-averaged scores -> bilinear (torch, align_corners=False) resize to the original size
     -> softmax -> argmax
  5. per-class intersection / union histograms summed over the dataset; mIoU = nanmean.
"""

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax import seg_data

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# ----------------------------------------------------------------------------------------------
# Prompt templates (the original's datasets/templates.py)
# ----------------------------------------------------------------------------------------------

_SUBSET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
_MASKCLIP_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
TEMPLATES = {
    # 'custom': the 7-template ImageNet subset + many/plural (the default of configs/eval.yml).
    "custom": _SUBSET_TEMPLATES + ("a photo of many {}.", "a photo of {}s."),
    "subset": _SUBSET_TEMPLATES,
    "simple": ("a photo of a {}.",),
    "plural": ("a photo of {}s.",),
    "identity": ("{}",),
    "maskclip": _MASKCLIP_TEMPLATES,
    "subset+maskclip": _SUBSET_TEMPLATES + _MASKCLIP_TEMPLATES,
}


def get_templates(name: str) -> tuple:
  if name not in TEMPLATES:
    raise ValueError(f"unknown template set {name!r}; known: {', '.join(TEMPLATES)}")
  return TEMPLATES[name]


# ----------------------------------------------------------------------------------------------
# Test pipeline: resize and normalize (mmcv 1.6)
# ----------------------------------------------------------------------------------------------


def mmcv_rescale_size(w: int, h: int, scale=(2048, 448)) -> tuple:
  """mmcv.rescale_size with a (long, short) bound: the largest keep-ratio size with the long side
  <= max(scale) and the short side <= min(scale). Returns (new_w, new_h), rounded as mmcv
  (int(x + 0.5)); up-scaling included."""
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(h, w), short_edge / min(h, w))
  return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def resize_keep_ratio(img: np.ndarray, scale=(2048, 448)) -> np.ndarray:
  """mmseg Resize(keep_ratio=True) on a uint8 image: cv2.resize, INTER_LINEAR (fixed point)."""
  import cv2
  h, w = img.shape[:2]
  new_w, new_h = mmcv_rescale_size(w, h, scale)
  return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def normalize_image(img_bgr: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
  """mmcv.imnormalize(to_rgb=True) on mmseg's float32 mean/std, bit for bit: float32 RGB
  x - mean, then times 1/std with the product taken in float64 and rounded to float32 (what
  OpenCV's subtract/multiply with a float64 scalar do)."""
  mean32 = np.asarray(mean, np.float32)
  stdinv64 = 1.0 / np.asarray(np.asarray(std, np.float32), np.float64)
  x = img_bgr[..., ::-1].astype(np.float32) - mean32
  return (x.astype(np.float64) * stdinv64).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Sliding-window inference (mmseg 0.27 EncoderDecoder.slide_inference)
# ----------------------------------------------------------------------------------------------


def _pair(v) -> tuple:
  if isinstance(v, (tuple, list)):
    return int(v[0]), int(v[1])
  return int(v), int(v)


def slide_windows(h: int, w: int, crop=448, stride=224) -> list:
  """The windows (y1, y2, x1, x2) mmseg visits on an h x w image, in its order (rows outer).
  crop/stride: int or (h, w). The last row/column is shifted back to end at the border; a window
  is smaller than the crop only along a side where the image is."""
  h_crop, w_crop = _pair(crop)
  h_stride, w_stride = _pair(stride)
  rows = max(h - h_crop + h_stride - 1, 0) // h_stride + 1
  cols = max(w - w_crop + w_stride - 1, 0) // w_stride + 1
  out = []
  for i in range(rows):
    for j in range(cols):
      y1, x1 = i * h_stride, j * w_stride
      y2, x2 = min(y1 + h_crop, h), min(x1 + w_crop, w)
      y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
      out.append((y1, y2, x1, x2))
  return out


def add_background(scores, bg_thresh: float):
  """Prepend a channel filled with bg_thresh to scores [B, N, H, W] -> [B, N + 1, H, W]."""
  b, _, h, w = scores.shape
  bg = jnp.full((b, 1, h, w), bg_thresh, dtype=scores.dtype)
  return jnp.concatenate([bg, scores], axis=1)


def _round_up(v: int, m: int) -> int:
  return -(-v // m) * m


def _num_padded_windows(n: int, batch: int) -> int:
  """How many windows an image's n windows are padded to: the next power of two up to `batch`,
  then multiples of `batch`, so the jitted mask and post-processing functions see few shapes."""
  if n <= batch:
    return min(batch, 1 << max(n - 1, 0).bit_length())
  return _round_up(n, batch)


# Post-processing buffers are padded to multiples of this many pixels (fewer compiled shapes).
SIZE_BUCKET = 64


def _run_windows(image: np.ndarray, mask_fn: Callable, num_classes: int, crop, stride,
                 batch: int):
  """Cut the image's windows, pad their number (repeating the last), run mask_fn in chunks of
  `batch`. Returns (windows, outputs tuple of [k, C, h, w], y1, x1, valid)."""
  h, w = image.shape[:2]
  windows = slide_windows(h, w, crop, stride)
  n = len(windows)
  total = _num_padded_windows(n, batch)
  crops = np.stack([image[y1:y2, x1:x2] for (y1, y2, x1, x2) in windows])
  if total > n:
    crops = np.concatenate([crops, np.repeat(crops[-1:], total - n, axis=0)])
  outs = []
  for s in range(0, total, batch):
    chunk = crops[s:s + batch]
    out = mask_fn(chunk)
    if (out.ndim != 4 or out.shape[0] != len(chunk) or out.shape[1] < num_classes
        or tuple(out.shape[2:]) != chunk.shape[1:3]):
      raise ValueError(f"mask_fn returned {tuple(out.shape)} for windows {chunk.shape}, expected "
                       f"({len(chunk)}, >={num_classes}, {chunk.shape[1]}, {chunk.shape[2]})")
    outs.append(out)
  y1 = np.array([win[0] for win in windows] + [0] * (total - n), np.int32)
  x1 = np.array([win[2] for win in windows] + [0] * (total - n), np.int32)
  valid = np.arange(total) < n
  return windows, tuple(outs), y1, x1, valid


def _average_windows(outs, y1, x1, valid, *, num_classes, bg_thresh, hb, wb):
  """Traced: scores of every valid window (first num_classes channels, a bg_thresh channel put
  in front if given) summed into a [C, hb, wb] buffer in window order, divided by the per-pixel
  window count (mmseg's preds / count_mat)."""
  logits = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
  logits = logits[:, :num_classes]
  if bg_thresh is not None:
    logits = add_background(logits, bg_thresh)
  c, h, w = logits.shape[1:]

  def body(k, carry):
    preds, count = carry
    add = jnp.where(valid[k], logits[k], 0.0)
    cur = jax.lax.dynamic_slice(preds, (0, y1[k], x1[k]), (c, h, w))
    preds = jax.lax.dynamic_update_slice(preds, cur + add, (0, y1[k], x1[k]))
    cur = jax.lax.dynamic_slice(count, (y1[k], x1[k]), (h, w))
    count = jax.lax.dynamic_update_slice(count, cur + valid[k].astype(count.dtype), (y1[k], x1[k]))
    return preds, count

  preds = jnp.zeros((c, hb, wb), logits.dtype)
  count = jnp.zeros((hb, wb), logits.dtype)
  preds, count = jax.lax.fori_loop(0, logits.shape[0], body, (preds, count))
  return preds / jnp.where(count > 0, count, 1.0)


@functools.partial(jax.jit, static_argnames=("num_classes", "bg_thresh", "hb", "wb"))
def _average_windows_jit(outs, y1, x1, valid, *, num_classes, bg_thresh, hb, wb):
  return _average_windows(outs, y1, x1, valid, num_classes=num_classes, bg_thresh=bg_thresh,
                          hb=hb, wb=wb)


def slide_inference(image: np.ndarray, mask_fn: Callable, num_classes: int, crop=448,
                    stride=224, batch: int = 8, bg_thresh: Optional[float] = None):
  """Overlap-averaged scores [C, H, W] (jax) of an image [H, W, 3] (normalized, resized).

  mask_fn(windows [k, h, w, 3]) -> [k, >= num_classes, h, w] (extra channels are dropped: class
  padding); it gets chunks of `batch` windows, or one power-of-two chunk when fewer, padded by
  repeating the last window (padding windows are not counted). With bg_thresh, each window gets
  a constant background channel in front (C = num_classes + 1), as the original's encode_decode.
  """
  h, w = image.shape[:2]
  _, outs, y1, x1, valid = _run_windows(image, mask_fn, num_classes, crop, stride, batch)
  scores = _average_windows_jit(outs, y1, x1, valid, num_classes=num_classes,
                                bg_thresh=bg_thresh, hb=h, wb=w)
  return scores


# ----------------------------------------------------------------------------------------------
# Bilinear resize with torch semantics (align_corners=False) and the final prediction
# ----------------------------------------------------------------------------------------------


def bilinear_coeffs(in_size: int, out_size: int):
  """torch upsample_bilinear (align_corners=False) taps and weights along one axis, computed in
  float32 as torch does: src = (in/out) * (dst + 0.5) - 0.5 clamped at 0, i0 = floor(src),
  i1 = i0 + 1 unless i0 is the last index, l1 = src - i0, l0 = 1 - l1. Same sizes: identity."""
  if in_size == out_size:
    idx = np.arange(out_size, dtype=np.int64)
    return idx, idx, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = src.astype(np.int64)
  i1 = i0 + (i0 < in_size - 1)
  l1 = (src - i0.astype(np.float32)).astype(np.float32)
  l0 = (np.float32(1.0) - l1).astype(np.float32)
  return i0, i1, l0, l1


def _resize_taps(x, rows, cols):
  """Bilinear resize of the last two axes of x with precomputed taps (i0, i1, l0, l1) per axis,
  in torch's arithmetic order: l0h * (l0w * x00 + l1w * x01) + l1h * (l0w * x10 + l1w * x11)."""
  i0, i1, b0, b1 = rows
  j0, j1, a0, a1 = cols
  t0 = jnp.take(x, j0, axis=-1)
  t1 = jnp.take(x, j1, axis=-1)
  r0 = a0 * jnp.take(t0, i0, axis=-2) + a1 * jnp.take(t1, i0, axis=-2)
  r1 = a0 * jnp.take(t0, i1, axis=-2) + a1 * jnp.take(t1, i1, axis=-2)
  return b0[:, None] * r0 + b1[:, None] * r1


def resize_bilinear(x, size):
  """Resize the last two axes of x to size = (H, W) like torch F.interpolate(mode='bilinear',
  align_corners=False) (no antialias; same size = unchanged)."""
  h_in, w_in = x.shape[-2:]
  h_out, w_out = int(size[0]), int(size[1])
  if (h_in, w_in) == (h_out, w_out):
    return x
  return _resize_taps(x, bilinear_coeffs(h_in, h_out), bilinear_coeffs(w_in, w_out))


def _labels_from_scores(scores, rows, cols):
  resized = _resize_taps(scores, rows, cols)
  # mmseg's `inference` applies softmax before the argmax (ties resolve to the first index).
  return jnp.argmax(jax.nn.softmax(resized, axis=0), axis=0).astype(jnp.int32)


def scores_to_labels(scores, size):
  """[C, H, W] averaged scores -> int32 [size] class map: bilinear resize to the original size,
  softmax over classes, argmax."""
  h, w = scores.shape[-2:]
  return _labels_jit(scores, _padded_taps(h, size[0], size[0]),
                     _padded_taps(w, size[1], size[1]))


_labels_jit = jax.jit(_labels_from_scores)


def _padded_taps(in_size: int, out_size: int, padded_out: int):
  """bilinear_coeffs padded to padded_out outputs (extra outputs read index 0, weight 0)."""
  i0, i1, l0, l1 = bilinear_coeffs(in_size, out_size)
  extra = padded_out - out_size
  pad_i = lambda a: np.concatenate([a, np.zeros(extra, a.dtype)]).astype(np.int32)
  pad_f = lambda a: np.concatenate([a, np.zeros(extra, np.float32)]).astype(np.float32)
  return pad_i(i0), pad_i(i1), pad_f(l0), pad_f(l1)


@functools.partial(jax.jit, static_argnames=("num_classes", "bg_thresh", "hb", "wb"))
def _predict_jit(outs, y1, x1, valid, rows, cols, *, num_classes, bg_thresh, hb, wb):
  scores = _average_windows(outs, y1, x1, valid, num_classes=num_classes, bg_thresh=bg_thresh,
                            hb=hb, wb=wb)
  return _labels_from_scores(scores, rows, cols)


def predict_normalized(x: np.ndarray, ori_hw, mask_fn: Callable, num_classes: int, crop=448,
                       stride=224, batch: int = 8, bg_thresh: Optional[float] = None):
  """Class map (jax int32, padded to SIZE_BUCKET multiples: slice [:H0, :W0]) of a normalized,
  resized image: sliding windows, averaging, resize to ori_hw, softmax, argmax in one jitted call
  whose shapes are bucketed (the same numbers as the unpadded computation)."""
  h, w = x.shape[:2]
  h0, w0 = int(ori_hw[0]), int(ori_hw[1])
  _, outs, y1, x1, valid = _run_windows(x, mask_fn, num_classes, crop, stride, batch)
  hb, wb = _round_up(h, SIZE_BUCKET), _round_up(w, SIZE_BUCKET)
  rows = _padded_taps(h, h0, _round_up(h0, SIZE_BUCKET))
  cols = _padded_taps(w, w0, _round_up(w0, SIZE_BUCKET))
  return _predict_jit(outs, y1, x1, valid, rows, cols, num_classes=num_classes,
                      bg_thresh=bg_thresh, hb=hb, wb=wb)


def predict_image(image_bgr: np.ndarray, mask_fn: Callable, num_classes: int,
                  img_scale=(2048, 448), crop=448, stride=224, batch: int = 8,
                  bg_thresh: Optional[float] = None) -> np.ndarray:
  """The whole test pipeline for one BGR uint8 image; returns the class map (int32 [H, W])."""
  x = normalize_image(resize_keep_ratio(image_bgr, img_scale))
  h0, w0 = image_bgr.shape[:2]
  pred = predict_normalized(x, (h0, w0), mask_fn, num_classes, crop, stride, batch, bg_thresh)
  return np.asarray(pred)[:h0, :w0]


# ----------------------------------------------------------------------------------------------
# Metric (mmseg 0.27 core/evaluation/metrics.py)
# ----------------------------------------------------------------------------------------------


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """0 -> 255 (ignored), x -> x - 1, and 255 stays 255 (mmseg, on uint8)."""
  label = np.asarray(label).astype(np.int64)
  out = label - 1
  out[label == 0] = 255
  out[label == 255] = 255
  return out


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = 255, reduce_zero: bool = False):
  """Per-class (area_intersect, area_union, area_pred, area_label), int64 [num_classes].

  Pixels whose (reduced) label is ignore_index are dropped. As mmseg's histc, label values
  outside [0, num_classes) count in no label bin (their predictions still count in area_pred).
  """
  pred = np.asarray(pred).reshape(-1).astype(np.int64)
  label = np.asarray(label).reshape(-1)
  label = reduce_zero_label(label) if reduce_zero else label.astype(np.int64)
  if pred.shape != label.shape:
    raise ValueError(f"prediction has {pred.size} pixels, label {label.size}")
  keep = label != ignore_index
  pred, label = pred[keep], label[keep]
  hit = pred[pred == label]
  area_intersect = np.bincount(hit, minlength=num_classes)[:num_classes]
  area_pred = np.bincount(pred, minlength=num_classes)[:num_classes]
  in_range = (label >= 0) & (label < num_classes)
  area_label = np.bincount(label[in_range], minlength=num_classes)[:num_classes]
  area_union = area_pred + area_label - area_intersect
  return area_intersect, area_union, area_pred, area_label


def mean_iou(total_intersect: np.ndarray, total_union: np.ndarray):
  """(mIoU, per-class IoU) as fractions; a class with union 0 has IoU NaN and is left out of the
  mean (NaN if every class is)."""
  inter = np.asarray(total_intersect, np.float64)
  union = np.asarray(total_union, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / union
  iou[union == 0] = np.nan
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    miou = float(np.nanmean(iou)) if iou.size else float("nan")
  return miou, iou


class IoUAccumulator:
  """Dataset-level sums of the four histograms (exact int64; mmseg sums float32 histc counts)."""

  def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero: bool = False):
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.reduce_zero = reduce_zero
    self.intersect = np.zeros(num_classes, np.int64)
    self.union = np.zeros(num_classes, np.int64)
    self.pred = np.zeros(num_classes, np.int64)
    self.label = np.zeros(num_classes, np.int64)
    self.count = 0

  def update(self, pred, label):
    i, u, p, l = intersect_and_union(pred, label, self.num_classes, self.ignore_index,
                                     self.reduce_zero)
    self.intersect += i
    self.union += u
    self.pred += p
    self.label += l
    self.count += 1

  def result(self):
    return mean_iou(self.intersect, self.union)


# ----------------------------------------------------------------------------------------------
# Model glue
# ----------------------------------------------------------------------------------------------


def class_text_embedding(params, cfg, classnames: Sequence[str], template: str = "custom",
                         class_pad: int = 0):
  """[N, E] prompt-ensembled, normalized text embeddings of the class names (with class_pad > 0,
  N is rounded up to a multiple of it with copies of the first class, for shape reuse)."""
  from tcl_jax import tokenizer
  from tcl_jax.models import tcl
  templates = get_templates(template)
  names = list(classnames)
  if class_pad > 0:
    names += [names[0]] * (_round_up(len(names), class_pad) - len(names))
  prompts = [t.format(c) for c in names for t in templates]
  tokens = np.asarray(tokenizer.tokenize(prompts)).reshape(len(names), len(templates), -1)
  return tcl.build_text_embedding(params, cfg, tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "apply_pamr", "kp_w"))
def _window_masks(params, text_emb, windows, *, cfg, apply_pamr, kp_w):
  from tcl_jax.models import tcl
  masks, _ = tcl.generate_masks(params, cfg, windows, text_emb, apply_pamr=apply_pamr, kp_w=kp_w)
  return masks


def make_mask_fn(params, cfg, text_emb, *, pamr: bool, kp_w: float) -> Callable:
  """windows [n, h, w, 3] -> masks [n, N, h, w] (N = len(text_emb)) through one jitted function,
  cached across calls per model config, N and window shape. The background channel is added by
  the post-processing, per window, as the original's encode_decode."""

  ndev = jax.local_device_count() if jax.process_count() == 1 else 1
  if ndev > 1:
    # Several local devices: windows split over them (batch axis), the model replicated.
    mesh = jax.make_mesh((ndev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.local_devices())
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params, text_emb = jax.device_put((params, text_emb), repl)

  def mask_fn(windows):
    windows = np.asarray(windows, np.float32)
    n = windows.shape[0]
    if ndev > 1:
      pad = -n % ndev
      if pad:
        windows = np.concatenate([windows, np.zeros((pad,) + windows.shape[1:], windows.dtype)])
      windows = jax.device_put(windows, split)
    masks = _window_masks(params, text_emb, jnp.asarray(windows), cfg=cfg,
                          apply_pamr=bool(pamr), kp_w=float(kp_w))
    return masks[:n]

  return mask_fn


# ----------------------------------------------------------------------------------------------
# Evaluation loops
# ----------------------------------------------------------------------------------------------


def parse_tasks(tasks) -> list:
  if isinstance(tasks, str):
    names = [t.strip() for t in tasks.split(",") if t.strip()]
  else:
    names = [str(t) for t in tasks]
  for t in names:
    seg_data.get_task(t)
  if not names:
    raise ValueError("no evaluation tasks given")
  return names


def _get(cfg, name, default):
  try:
    value = cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  img_scale: tuple = (2048, 448)
  crop: int = 448
  stride: int = 224
  batch: int = 8

  @classmethod
  def from_config(cls, c):
    return cls(img_scale=tuple(int(v) for v in _get(c, "img_scale", (2048, 448))),
               crop=_get(c, "crop", 448), stride=_get(c, "stride", 224),
               batch=int(_get(c, "batch", 8)))


def _prepare(ds: seg_data.SegDataset, i: int, opts: PipelineOptions):
  """Load sample i and run the host part of the pipeline (in a worker thread)."""
  try:
    sample = ds.load(i)
  except seg_data.CorruptSample as e:
    return i, None, str(e)
  x = normalize_image(resize_keep_ratio(sample.image, opts.img_scale))
  return i, (x, sample.image.shape[:2], sample.label), None


def evaluate_dataset(ds: seg_data.SegDataset, mask_fn: Callable, opts: PipelineOptions, *,
                     bg_thresh: float = 0.4, progress: bool = True, workers: int = 2) -> dict:
  """Run the pipeline over a dataset; returns {"miou", "per_class_iou", "num_images",
  "num_skipped"} (percent; miou rounded to 2 decimals as mmseg reports it).

  mask_fn(windows) -> [n, >= len(spec.text_classes), h, w] masks of the text classes; datasets
  with background get the constant bg_thresh channel in front.
  """
  spec = ds.spec
  acc = IoUAccumulator(spec.num_classes, seg_data.IGNORE_INDEX, spec.reduce_zero_label)
  ds.num_skipped, ds.skipped = 0, []
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(ds), desc=spec.name, unit="img", dynamic_ncols=True)
  pending = None  # (device prediction, label) of the previous image: overlaps host and device

  def finish(item):
    pred, label = item
    acc.update(np.asarray(pred)[:label.shape[0], :label.shape[1]], label)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    futures = {}
    ahead = max(2, 2 * workers)
    for i in range(min(ahead, len(ds))):
      futures[i] = pool.submit(_prepare, ds, i, opts)
    for i in range(len(ds)):
      _, prepared, err = futures.pop(i).result()
      if i + ahead < len(ds):
        futures[i + ahead] = pool.submit(_prepare, ds, i + ahead, opts)
      if prepared is None:
        ds.num_skipped += 1
        ds.skipped.append(ds.names[i])
        logging.warning("%s: skipping %s", spec.name, err)
      else:
        x, ori_hw, label = prepared
        pred = predict_normalized(x, ori_hw, mask_fn, len(spec.text_classes), opts.crop,
                                  opts.stride, opts.batch, bg_thresh if spec.with_bg else None)
        if pending is not None:
          finish(pending)
        pending = (pred, label)
      if bar is not None:
        bar.update(1)
    if pending is not None:
      finish(pending)
  if bar is not None:
    bar.close()

  miou, iou = acc.result()
  return {
      "miou": None if math.isnan(miou) else round(miou * 100, 2),
      "per_class_iou": {c: (None if math.isnan(v) else float(v * 100))
                        for c, v in zip(spec.classes, iou)},
      "num_images": acc.count,
      "num_skipped": ds.num_skipped,
  }


def evaluate_tasks(params, cfg, eval_config, *, progress: bool = True) -> dict:
  """Evaluate a TCL model (params, TCLConfig) on eval_config.tasks (see configs/eval.py).

  Returns {task: {"miou", "per_class_iou", "num_images", "num_skipped"}, "average": float}, in
  percent; "average" is the mean of the task mIoUs (as the original's val/avg_miou). Raises
  seg_data.DataError (one line) if a task's data is missing, before any model work.
  """
  tasks = parse_tasks(_get(eval_config, "tasks", ",".join(seg_data.BENCHMARKS)))
  data_root = _get(eval_config, "data_root", "data")
  max_images = int(_get(eval_config, "max_images", 0))
  opts = PipelineOptions.from_config(eval_config)
  pamr = bool(_get(eval_config, "pamr", True))
  bg_thresh = float(_get(eval_config, "bg_thresh", 0.4))
  kp_w = float(_get(eval_config, "kp_w", 0.3))
  template = _get(eval_config, "template", "custom")
  get_templates(template)
  datasets = {t: seg_data.SegDataset(t, data_root, max_images) for t in tasks}

  class_pad = int(_get(eval_config, "class_pad", 0))
  results = {}
  text_cache = {}  # voc/voc20 and context/context59 share their text classes
  # Parity with the original's float32 matmuls (no TF32/bf16 passes on accelerators).
  with jax.default_matmul_precision("highest"):
    for t in tasks:
      ds = datasets[t]
      spec = ds.spec
      key = spec.text_classes
      if key not in text_cache:
        text_cache[key] = class_text_embedding(params, cfg, key, template, class_pad)
      mask_fn = make_mask_fn(params, cfg, text_cache[key], pamr=pamr, kp_w=kp_w)
      results[t] = evaluate_dataset(ds, mask_fn, opts, bg_thresh=bg_thresh, progress=progress)
      logging.info("[%s] mIoU of %d images: %s%% (%d skipped)", t, results[t]["num_images"],
                   results[t]["miou"], results[t]["num_skipped"])
  mious = [r["miou"] for r in results.values() if r["miou"] is not None]
  results["average"] = float(np.mean(mious)) if mious else None
  return results


# ----------------------------------------------------------------------------------------------
# Reporting and CLI
# ----------------------------------------------------------------------------------------------


def _fmt(v) -> str:
  return "  n/a" if v is None else f"{v:6.2f}"


def format_task_table(task: str, r: dict) -> str:
  names = list(r["per_class_iou"])
  width = max([len("class")] + [len(repr(n)) for n in names])
  lines = [f"{task}: per-class IoU (%)", f"  {'class':<{width}}  IoU"]
  for n, v in r["per_class_iou"].items():
    lines.append(f"  {n:<{width}}  {_fmt(v)}")
  lines.append(f"  {'mIoU':<{width}}  {_fmt(r['miou'])}   ({r['num_images']} images, "
               f"{r['num_skipped']} skipped)")
  return "\n".join(lines)


def format_summary(results: dict) -> str:
  tasks = [k for k in results if k != "average"]
  width = max([len("average")] + [len(t) for t in tasks])
  lines = [f"{'task':<{width}}  mIoU (%)  images  skipped"]
  for t in tasks:
    r = results[t]
    lines.append(f"{t:<{width}}  {_fmt(r['miou']):>8}  {r['num_images']:6d}  "
                 f"{r['num_skipped']:7d}")
  lines.append(f"{'average':<{width}}  {_fmt(results['average']):>8}")
  return "\n".join(lines)


def write_results(results: dict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "results.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, allow_nan=False)
  os.replace(tmp, path)
  return path


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  if "checkpoint" in flags.FLAGS:
    return
  config_flags.DEFINE_config_file("config", None, "Evaluation config file (default: "
                                  "configs/eval.py).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A converted tcl_jax checkpoint directory, a training "
                      "workdir (its latest step), or a PyTorch TCL file.")
  flags.DEFINE_string("workdir", None, "Folder for results.json.")


def config_for_checkpoint(config, checkpoint: str, given: set):
  """`config` with, for a training workdir, the run's own evaluation settings (config.json's
  `evals`: tasks, data_root, img_scale, crop, stride, ...) in place of those not `given` on the
  command line, so that evaluating a run reproduces its training-time numbers without flags."""
  path = os.path.join(checkpoint, "config.json")
  if not (os.path.isdir(os.path.join(checkpoint, "checkpoints")) and os.path.isfile(path)):
    return config
  with open(path) as f:
    evals = json.load(f).get("evals") or {}
  config = config.copy_and_resolve_references()
  taken = []
  for k, v in evals.items():
    if k in config and k not in given and v not in ("", None):
      if k == "data_root":  # as the training loop expands it (train._expand)
        v = v.format(workdir=os.path.abspath(checkpoint))
      v = type(config[k])(v) if isinstance(config[k], tuple) else v
      if v != config[k]:
        config[k] = v
        taken.append(f"{k}={v}")
  if taken:
    logging.info("From %s: %s", path, ", ".join(taken))
  return config


def main(argv):
  from absl import flags
  from tcl_jax import config_files
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    config_files.usage_error(f"unexpected arguments {argv[1:]}")
  if not FLAGS.checkpoint:
    config_files.usage_error("--checkpoint is required (a converted checkpoint directory, a "
                             "training workdir or a PyTorch TCL file)")
  if not os.path.exists(FLAGS.checkpoint):
    config_files.usage_error(f"--checkpoint={FLAGS.checkpoint} does not exist")
  if FLAGS.workdir and os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    config_files.usage_error(f"--workdir={FLAGS.workdir} is a file; give a directory")
  config_files.quiet_orbax_info()
  given = {f.split(".")[0] for f in config_files.overrides(sys.argv)}
  config = config_for_checkpoint(FLAGS.config, FLAGS.checkpoint, given)
  try:
    # Check every task's data before loading the model.
    for t in parse_tasks(config.tasks):
      seg_data.SegDataset(t, config.data_root, 1)
  except (seg_data.DataError, ValueError) as e:
    config_files.usage_error(str(e))
  from tcl_jax import convert
  try:
    cfg, params = convert.load_any(FLAGS.checkpoint)
  except (ValueError, OSError) as e:
    config_files.usage_error(f"cannot load checkpoint {FLAGS.checkpoint}: {e}")
  results = evaluate_tasks(params, cfg, config, progress=True)
  for t, r in results.items():
    if t != "average":
      print(format_task_table(t, r))
      print()
  print(format_summary(results))
  if FLAGS.workdir:
    print(f"wrote {write_results(results, FLAGS.workdir)}")
  sys.stdout.flush()


def run():
  from absl import app
  from tcl_jax import config_files
  _define_flags()
  app.run(main, flags_parser=functools.partial(config_files.parse_flags,
                                                default_config="configs/eval.py"))


if __name__ == "__main__":
  run()
