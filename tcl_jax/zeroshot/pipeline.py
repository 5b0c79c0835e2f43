"""The zero-shot test pipeline of one image (mmseg 0.27's test pipeline and slide inference, see
shared/EVAL_PROTOCOL.md), shared by the evaluator, the demo, the app and the notebook.

  1. BGR uint8 image -> keep-ratio resize to img_scale (mmcv rounding, cv2 INTER_LINEAR on uint8)
  2. BGR->RGB, mean/std normalization in float32
  3. sliding windows (crop, stride), batched through the model kind's window function; each
     window's masks get a constant background channel (bg_thresh) for datasets with background
  4. overlap-averaged scores -> bilinear (torch, align_corners=False) resize to the original size
     -> softmax -> argmax

Jitted pieces are cached per shape: window counts and post-processing sizes are padded to
buckets, which does not change the numbers, so few shapes are compiled.
"""

import dataclasses
import functools
from typing import Callable, Optional

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import resize
from tcl_jax.zeroshot.protocol import Protocol

# mmseg's img_norm_cfg: the 0-255 form of the normalisation TCL's image tower was trained with.
IMAGE_MEAN_255 = tuple(255 * v for v in clip_lib.IMAGE_MEAN)
IMAGE_STD_255 = tuple(255 * v for v in clip_lib.IMAGE_STD)

# Post-processing buffers are padded to multiples of this many pixels (fewer compiled shapes).
SIZE_BUCKET = 64


# ----------------------------------------------------------------------------------------------
# Resize and normalize (mmcv 1.6)
# ----------------------------------------------------------------------------------------------


def mmcv_rescale_size(w: int, h: int, scale=Protocol.img_scale) -> tuple:
  """mmcv.rescale_size with a (long, short) bound: the largest keep-ratio size with the long side
  <= max(scale) and the short side <= min(scale). Returns (new_w, new_h), rounded as mmcv
  (int(x + 0.5)); up-scaling included."""
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(h, w), short_edge / min(h, w))
  return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def resize_keep_ratio(img: np.ndarray, scale=Protocol.img_scale) -> np.ndarray:
  """mmseg Resize(keep_ratio=True) on a uint8 image: cv2.resize, INTER_LINEAR (fixed point)."""
  h, w = img.shape[:2]
  new_w, new_h = mmcv_rescale_size(w, h, scale)
  return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def normalize_image(img_bgr: np.ndarray, mean=IMAGE_MEAN_255, std=IMAGE_STD_255) -> np.ndarray:
  """mmcv.imnormalize(to_rgb=True) on mmseg's float32 mean/std, bit for bit: float32 RGB
  x - mean, then times 1/std with the product taken in float64 and rounded to float32 (what
  OpenCV's subtract/multiply with a float64 scalar do)."""
  mean32 = np.asarray(mean, np.float32)
  stdinv64 = 1.0 / np.asarray(np.asarray(std, np.float32), np.float64)
  x = img_bgr[..., ::-1].astype(np.float32) - mean32
  return (x.astype(np.float64) * stdinv64).astype(np.float32)


def preprocess(image_bgr: np.ndarray, protocol: Protocol) -> np.ndarray:
  """Steps 1-2: the normalized, resized float32 image [h, w, 3]."""
  return normalize_image(
    resize_keep_ratio(image_bgr, protocol.img_scale),
    protocol.image_mean or IMAGE_MEAN_255,
    protocol.image_std or IMAGE_STD_255,
  )


# ----------------------------------------------------------------------------------------------
# Sliding windows (mmseg 0.27 EncoderDecoder.slide_inference)
# ----------------------------------------------------------------------------------------------


def _pair(v) -> tuple:
  if isinstance(v, (tuple, list)):
    return int(v[0]), int(v[1])
  return int(v), int(v)


def slide_windows(h: int, w: int, crop=Protocol.crop, stride=Protocol.stride) -> list:
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


def round_up(v: int, m: int) -> int:
  return -(-v // m) * m


def num_padded_windows(n: int, batch: int) -> int:
  """How many windows an image's n windows are padded to: the next power of two up to `batch`,
  then multiples of `batch`, so the jitted mask and post-processing functions see few shapes."""
  if n <= batch:
    return min(batch, 1 << max(n - 1, 0).bit_length())
  return round_up(n, batch)


@dataclasses.dataclass
class WindowOutputs:
  """The window function's outputs of one image and where each window sits."""

  outs: tuple  # of [k, C, h, w], in window order, padded to num_padded_windows
  y1: np.ndarray  # int32 [n_padded]
  x1: np.ndarray  # int32 [n_padded]
  valid: np.ndarray  # bool [n_padded]: False for the padding windows


def run_windows(
  image: np.ndarray, window_fn: Callable, num_channels: int, crop, stride, batch: int
) -> WindowOutputs:
  """Cut the image's windows, pad their number (repeating the last), run window_fn in chunks of
  `batch`; window_fn(windows [k, h, w, 3]) -> [k, >= num_channels, h, w]."""
  h, w = image.shape[:2]
  windows = slide_windows(h, w, crop, stride)
  n = len(windows)
  total = num_padded_windows(n, batch)
  crops = np.stack([image[y1:y2, x1:x2] for (y1, y2, x1, x2) in windows])
  if total > n:
    crops = np.concatenate([crops, np.repeat(crops[-1:], total - n, axis=0)])
  outs = []
  for s in range(0, total, batch):
    chunk = crops[s : s + batch]
    out = window_fn(chunk)
    if (
      out.ndim != 4
      or out.shape[0] != len(chunk)
      or out.shape[1] < num_channels
      or tuple(out.shape[2:]) != chunk.shape[1:3]
    ):
      raise ValueError(
        f"window function returned {tuple(out.shape)} for windows {chunk.shape}, "
        f"expected ({len(chunk)}, >={num_channels}, {chunk.shape[1]}, "
        f"{chunk.shape[2]})"
      )
    outs.append(out)
  y1 = np.array([win[0] for win in windows] + [0] * (total - n), np.int32)
  x1 = np.array([win[2] for win in windows] + [0] * (total - n), np.int32)
  return WindowOutputs(tuple(outs), y1, x1, np.arange(total) < n)


def average_windows(outs, y1, x1, valid, *, num_channels, bg_thresh, hb, wb):
  """Traced: scores of every valid window (first num_channels channels, a bg_thresh channel put
  in front if not None) summed into a [C, hb, wb] buffer in window order, divided by the
  per-pixel window count (mmseg's preds / count_mat)."""
  logits = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
  logits = logits[:, :num_channels]
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


def labels_from_scores(scores, rows, cols):
  """Traced: [C, H, W] scores -> int32 labels at the taps' size: bilinear resize, softmax (as
  mmseg's `inference`; it changes no argmax, but ties resolve to the first index), argmax."""
  resized = resize.resize_with_taps(scores, rows, cols)
  return jnp.argmax(jax.nn.softmax(resized, axis=0), axis=0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_classes", "bg_thresh", "hb", "wb"))
def _labels_jit(outs, y1, x1, valid, rows, cols, *, num_classes, bg_thresh, hb, wb):
  scores = average_windows(
    outs, y1, x1, valid, num_channels=num_classes, bg_thresh=bg_thresh, hb=hb, wb=wb
  )
  return labels_from_scores(scores, rows, cols)


def readout_labels(
  scores, rows, cols, h0, w0, *, logit_scale, query_class, num_classes, prob_thd, area_thd
):
  """Traced: SCLIP's postprocess_result on [Q, H, W] window-averaged scores of Q queried names ->
  int32 labels at the taps' size (valid in [:h0, :w0]): bilinear resize, softmax(logit_scale x
  scores) over the names, a class's probability the max over its names (query_class[q]: the
  class of name q; None: one name per class), then classes but 0 whose argmax area is at most
  area_thd of the other classes' pixels are zeroed, argmax, and pixels whose top probability is
  below prob_thd become class 0."""
  resized = resize.resize_with_taps(scores, rows, cols)
  prob = jax.nn.softmax(logit_scale * resized, axis=0)
  if query_class is not None:
    prob = jax.ops.segment_max(prob, jnp.asarray(query_class), num_segments=num_classes)
  if area_thd > 0:
    # Areas over the image only (the buffers are padded to SIZE_BUCKET multiples).
    valid = (jnp.arange(prob.shape[1]) < h0)[:, None] & (jnp.arange(prob.shape[2]) < w0)[None]
    top = jax.nn.one_hot(jnp.argmax(prob, axis=0), num_classes, dtype=jnp.float32)
    area = jnp.sum(jnp.where(valid[..., None], top, 0.0), axis=(0, 1))[1:]
    keep = (area > area_thd * jnp.sum(area)).astype(prob.dtype)
    prob = prob.at[1:].multiply(keep[:, None, None])
  labels = jnp.argmax(prob, axis=0).astype(jnp.int32)
  if prob_thd > 0:
    labels = jnp.where(jnp.max(prob, axis=0) < prob_thd, 0, labels)
  return labels


@functools.partial(
  jax.jit,
  static_argnames=(
    "num_scores",
    "logit_scale",
    "query_class",
    "num_classes",
    "prob_thd",
    "area_thd",
    "hb",
    "wb",
  ),
)
def _readout_jit(outs, y1, x1, valid, rows, cols, h0, w0, *, num_scores, hb, wb, **readout):
  scores = average_windows(
    outs, y1, x1, valid, num_channels=num_scores, bg_thresh=None, hb=hb, wb=wb
  )
  return readout_labels(scores, rows, cols, h0, w0, **readout)


@functools.partial(jax.jit, static_argnames=("num_classes", "num_maps", "hb", "wb"))
def _labels_and_maps_jit(
  outs, y1, x1, valid, rows, cols, bg_thresh, *, num_classes, num_maps, hb, wb
):
  # bg_thresh is traced here: the demo and app change it per call without a recompile.
  scores = average_windows(
    outs, y1, x1, valid, num_channels=num_maps, bg_thresh=bg_thresh, hb=hb, wb=wb
  )  # [1 + num_maps, hb, wb]
  labels = labels_from_scores(scores[: num_classes + 1], rows, cols)
  return labels, resize.resize_with_taps(scores[1:], rows, cols)


@dataclasses.dataclass
class Prediction:
  """One image's result at its original size [H, W]."""

  labels: np.ndarray  # int32 [H, W]: with background, 0 = background and i = class i - 1
  maps: Optional[np.ndarray] = None  # float32 [num_maps, H, W] window-averaged channels


def predict_normalized(
  x: np.ndarray,
  ori_hw,
  window_fn: Callable,
  num_classes: int,
  protocol: Protocol,
  *,
  background: bool,
  num_maps: int = 0,
  query_class: Optional[tuple] = None,
  heads: int = 1,
):
  """Steps 3-4 on a normalized, resized image x [h, w, 3]: sliding windows, averaging, resize to
  ori_hw, softmax, argmax, in one jitted call whose shapes are bucketed (the same numbers as the
  unpadded computation).

  window_fn(windows [k, h, w, 3]) -> [k, C, h, w] with C >= max(num_classes, num_maps) (extra
  channels, e.g. class padding, are dropped). With num_maps, the first num_maps channels are
  also returned window-averaged and resized (the labels come from the first num_classes).

  With protocol.logit_scale > 0 the labels are SCLIP's readout (`readout_labels`): the window
  function scores len(query_class) names (or num_classes, one per class), class c the max over
  the names q with query_class[q] == c; there is no constant background channel.

  With heads > 1, window_fn scores several models at once (e.g. training-free methods sharing
  one CLIP forward): [k, heads x C', h, w], head m in channels [m C', (m + 1) C'), each read out
  as above; the windows are cut and run once.

  Returns (labels, maps): jax arrays padded to SIZE_BUCKET multiples (slice [:H0, :W0]); maps is
  None without num_maps. With heads > 1, a list of them, one per head.
  """
  num_scores = num_classes if query_class is None else len(query_class)
  win = run_windows(
    x, window_fn, heads * max(num_scores, num_maps), protocol.crop, protocol.stride, protocol.batch
  )
  if heads == 1:
    return _labels_of_windows(
      win, x.shape[:2], ori_hw, num_classes, protocol, background, num_maps, query_class
    )
  c = win.outs[0].shape[1] // heads
  return [
    _labels_of_windows(
      dataclasses.replace(win, outs=tuple(o[:, m * c : (m + 1) * c] for o in win.outs)),
      x.shape[:2],
      ori_hw,
      num_classes,
      protocol,
      background,
      num_maps,
      query_class,
    )
    for m in range(heads)
  ]


def _labels_of_windows(win, hw, ori_hw, num_classes, protocol, background, num_maps, query_class):
  """predict_normalized's step 4 on one model's window outputs."""
  h, w = hw
  h0, w0 = int(ori_hw[0]), int(ori_hw[1])
  num_scores = num_classes if query_class is None else len(query_class)
  hb, wb = round_up(h, SIZE_BUCKET), round_up(w, SIZE_BUCKET)
  rows = resize.padded_bilinear_taps(h, h0, round_up(h0, SIZE_BUCKET))
  cols = resize.padded_bilinear_taps(w, w0, round_up(w0, SIZE_BUCKET))
  if protocol.logit_scale > 0:
    if num_maps or background:
      raise ValueError("a logit_scale readout has no maps and no constant background channel")
    labels = _readout_jit(
      win.outs,
      win.y1,
      win.x1,
      win.valid,
      rows,
      cols,
      np.int32(h0),
      np.int32(w0),
      num_scores=num_scores,
      logit_scale=float(protocol.logit_scale),
      query_class=None if query_class is None else tuple(int(c) for c in query_class),
      num_classes=num_classes,
      prob_thd=float(protocol.prob_thd),
      area_thd=float(protocol.area_thd),
      hb=hb,
      wb=wb,
    )
    return labels, None
  if not num_maps:
    labels = _labels_jit(
      win.outs,
      win.y1,
      win.x1,
      win.valid,
      rows,
      cols,
      num_classes=num_classes,
      bg_thresh=float(protocol.bg_thresh) if background else None,
      hb=hb,
      wb=wb,
    )
    return labels, None
  if not background:
    raise ValueError("num_maps needs the background channel (background=True)")
  return _labels_and_maps_jit(
    win.outs,
    win.y1,
    win.x1,
    win.valid,
    rows,
    cols,
    np.float32(protocol.bg_thresh),
    num_classes=num_classes,
    num_maps=num_maps,
    hb=hb,
    wb=wb,
  )


def predict(
  image_bgr: np.ndarray,
  window_fn: Callable,
  num_classes: int,
  protocol: Protocol,
  *,
  background: bool,
  num_maps: int = 0,
) -> Prediction:
  """The whole test pipeline for one BGR uint8 image [H, W, 3]."""
  h0, w0 = image_bgr.shape[:2]
  labels, maps = predict_normalized(
    preprocess(image_bgr, protocol),
    (h0, w0),
    window_fn,
    num_classes,
    protocol,
    background=background,
    num_maps=num_maps,
  )
  return Prediction(
    labels=np.asarray(labels)[:h0, :w0],
    maps=None if maps is None else np.asarray(maps)[:, :h0, :w0],
  )
