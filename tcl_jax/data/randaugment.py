"""RandAugment (timm's "increasing" op set, as the original's DeiT pipeline uses it) on float images
in 0..255, with stateless seeds, and the stateless random helpers augment.py shares."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tcl_jax.models.clip import IMAGE_MEAN

FILL = tuple(round(255 * m) for m in IMAGE_MEAN)  # (124, 116, 104), timm's fill


def split(seed, n):
  return tf.random.experimental.stateless_split(seed, n)


def uniform(seed, shape=(), lo=0.0, hi=1.0):
  return tf.random.stateless_uniform(shape, seed, lo, hi, dtype=tf.float32)


# ----------------------------------------------------------------------------
# RandAugment ops (timm "increasing" set) on float images in 0..255
# ----------------------------------------------------------------------------


def gray(img):
  # PIL "L" conversion weights
  return img[..., 0:1] * 0.299 + img[..., 1:2] * 0.587 + img[..., 2:3] * 0.114


def blend(degenerate, img, factor):
  return tf.clip_by_value(tf.round(degenerate + factor * (img - degenerate)), 0.0, 255.0)


def affine(img, transform):
  """Apply an output->input affine [a0 a1 a2 b0 b1 b2] with the mean fill.

  Same result as ``ImageProjectiveTransformV3`` (bilinear, constant fill:
  each of the 4 neighbours outside the image reads the fill colour) but as
  4 gathers from a padded copy: several times faster, and XLA-compilable
  (that op has no XLA kernel).
  """
  fill = tf.constant(FILL, tf.float32)
  shape = tf.shape(img)
  h, w = shape[0], shape[1]
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  a0, a1, a2, b0, b1, b2 = tf.unstack(transform)
  ys = tf.cast(tf.range(h), tf.float32)[:, None]
  xs = tf.cast(tf.range(w), tf.float32)[None, :]
  # beyond one pixel outside, all 4 neighbours are fill: clamping there is exact
  x = tf.clip_by_value(a0 * xs + a1 * ys + a2, -1.0, wf)
  y = tf.clip_by_value(b0 * xs + b1 * ys + b2, -1.0, hf)
  x0, y0 = tf.floor(x), tf.floor(y)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  # padded by 1 before and 2 after, so that floor + 1 stays inside
  wp = w + 3
  flat = tf.reshape(tf.pad(img - fill, [[1, 2], [1, 2], [0, 0]]), [-1, 3])
  idx = (tf.cast(y0, tf.int32) + 1) * wp + tf.cast(x0, tf.int32) + 1
  v00, v01 = tf.gather(flat, idx), tf.gather(flat, idx + 1)
  v10, v11 = tf.gather(flat, idx + wp), tf.gather(flat, idx + wp + 1)
  top = v00 + fx * (v01 - v00)
  bottom = v10 + fx * (v11 - v10)
  out = top + fy * (bottom - top)
  return tf.clip_by_value(tf.round(out + fill), 0.0, 255.0)


def _per_channel_rows(img):
  # [3, H*W]: per-channel reductions along rows are much faster in Eigen
  # than reducing an HWC tensor over its leading axes
  return tf.transpose(tf.reshape(img, [-1, 3]))


def channel_min_max(img):
  n = img.shape[0] * img.shape[1] if img.shape[:2].is_fully_defined() else None
  if n and n % 16 == 0:
    # [N, 48] (16 pixels a row) column reductions, then [16, 3]: XLA
    # vectorises these, not a reduction over [.., 3] (op ~2x faster)
    r = tf.reshape(img, [-1, 48])
    return (
      tf.reduce_min(tf.reshape(tf.reduce_min(r, 0), [16, 3]), 0),
      tf.reduce_max(tf.reshape(tf.reduce_max(r, 0), [16, 3]), 0),
    )
  rows = _per_channel_rows(img)
  return tf.reduce_min(rows, axis=1), tf.reduce_max(rows, axis=1)


def auto_contrast(img, m, sign):
  lo, hi = channel_min_max(img)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  off = tf.where(hi > lo, lo, 0.0)
  return tf.clip_by_value(tf.floor((img - off) * scale), 0.0, 255.0)


def equalize(img, m, sign):
  """PIL ImageOps.equalize, all three channels with one bincount."""
  v = tf.cast(img, tf.int32) + tf.constant([0, 256, 512])  # channel c -> bins c*256..
  # DenseBincount with a constant size (tf.math.bincount's size depends on
  # max(v), which XLA cannot compile)
  hist = tf.reshape(
    tf.raw_ops.DenseBincount(
      input=tf.reshape(v, [-1]), size=tf.constant(768), weights=tf.constant([], tf.int32)
    ),
    [3, 256],
  )
  # count of the last non-empty bin of each channel
  last_bin = 255 - tf.argmax(
    tf.cast(tf.reverse(hist, [1]) > 0, tf.int32), axis=1, output_type=tf.int32
  )
  last = tf.gather(hist, last_bin, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last) // 255  # [3]
  lut = (tf.cumsum(hist, axis=1, exclusive=True) + (step // 2)[:, None]) // tf.maximum(step, 1)[
    :, None
  ]
  lut = tf.where((step == 0)[:, None], tf.range(256)[None], tf.clip_by_value(lut, 0, 255))
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), v), tf.float32)


_EQ_OFFSETS = np.array([0, 256, 512], np.int16)


def _equalize_np(img):
  """:func:`equalize` in numpy (same integers): XLA's CPU gather and
  scatter make the compiled op ~4x slower than numpy's bincount + take."""
  v = img.astype(np.int16)  # truncation, as tf.cast; values are in 0..255
  v += _EQ_OFFSETS
  v = v.ravel()
  hist = np.bincount(v, minlength=768).reshape(3, 256)
  last = hist[np.arange(3), 255 - np.argmax(hist[:, ::-1] > 0, axis=1)]
  step = (hist.sum(1) - last) // 255
  lut = (np.cumsum(hist, 1) - hist + (step // 2)[:, None]) // np.maximum(step, 1)[:, None]
  lut = np.where(step[:, None] == 0, np.arange(256), lut.clip(0, 255))
  return lut.astype(np.float32).ravel().take(v).reshape(img.shape)


def equalize_fast(img, m, sign):
  out = tf.numpy_function(_equalize_np, [img], tf.float32, stateful=False)
  return tf.ensure_shape(out, img.shape)


def invert(img, m, sign):
  return 255.0 - img


def rotate(img, m, sign):
  angle = sign * m / 10.0 * 30.0 * math.pi / 180.0
  shape = tf.cast(tf.shape(img)[:2], tf.float32)
  cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
  c, s = tf.cos(angle), tf.sin(angle)
  # input = R (out - centre) + centre
  return affine(img, tf.stack([c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy]))


def posterize(img, m, sign):
  bits = 4 - tf.cast(m / 10.0 * 4.0, tf.int32)
  q = tf.cast(tf.bitwise.left_shift(1, 8 - bits), tf.float32)
  return tf.floor(img / q) * q


def solarize(img, m, sign):
  thresh = 256.0 - tf.floor(m / 10.0 * 256.0)
  return tf.where(img < thresh, img, 255.0 - img)


def solarize_add(img, m, sign):
  add = tf.floor(m / 10.0 * 110.0)
  return tf.where(img < 128.0, tf.minimum(img + add, 255.0), img)


def _enhance_factor(m, sign):
  return 1.0 + sign * m / 10.0 * 0.9


def color(img, m, sign):
  return blend(gray(img), img, _enhance_factor(m, sign))


def contrast(img, m, sign):
  mean = tf.floor(tf.reduce_mean(tf.round(gray(img))) + 0.5)
  return blend(mean, img, _enhance_factor(m, sign))


def brightness(img, m, sign):
  return blend(0.0, img, _enhance_factor(m, sign))


def sharpness(img, m, sign):
  # PIL's SMOOTH kernel [[1 1 1] [1 5 1] [1 1 1]] / 13 as shifted slices: a
  # 3x3 box sum + 4x centre (XLA's depthwise conv on CPU is ~20x slower)
  rows = img[:-2] + img[1:-1] + img[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  smooth = tf.round((box + 4.0 * img[1:-1, 1:-1]) / 13.0)
  # PIL leaves the one-pixel border untouched
  mid = tf.concat([img[1:-1, :1], smooth, img[1:-1, -1:]], 1)
  degenerate = tf.concat([img[:1], mid, img[-1:]], 0)
  return blend(degenerate, img, _enhance_factor(m, sign))


def shear_rows(img, f):
  """``affine(img, [1, f, f / 2, 0, 1, 0])``: row y read at x + f * (y + 0.5),
  as PIL's affine transform (timm's ShearX), which maps pixel centres. Rows
  stay put (the vertical weight is 0), so 2 gathers instead of 4."""
  fill = tf.constant(FILL, tf.float32)
  shape = tf.shape(img)
  h, w = shape[0], shape[1]
  ys = tf.range(h)[:, None]
  x = tf.clip_by_value(
    tf.cast(tf.range(w), tf.float32)[None, :] + f * tf.cast(ys, tf.float32) + f / 2,
    -1.0,
    tf.cast(w, tf.float32),
  )
  x0 = tf.floor(x)
  fx = (x - x0)[..., None]
  wp = w + 3  # padded by 1 before and 2 after, as in affine
  flat = tf.reshape(tf.pad(img - fill, [[0, 0], [1, 2], [0, 0]]), [-1, 3])
  idx = ys * wp + tf.cast(x0, tf.int32) + 1
  v0, v1 = tf.gather(flat, idx), tf.gather(flat, idx + 1)
  return tf.clip_by_value(tf.round(v0 + fx * (v1 - v0) + fill), 0.0, 255.0)


def shear_x(img, m, sign):
  f = sign * m / 10.0 * 0.3
  return shear_rows(img, f)


def shear_y(img, m, sign):
  f = sign * m / 10.0 * 0.3
  # = affine(img, [1, 0, 0, f, 1, f / 2]): a row shear of the transposed image
  return tf.transpose(shear_rows(tf.transpose(img, [1, 0, 2]), f), [1, 0, 2])


def _shift(img, px, axis):
  """out[i] = img[i + px] along ``axis`` with the mean fill: a translation
  rounded to whole pixels (a bilinear warp costs ~10x more)."""
  n = tf.shape(img)[axis]
  px = tf.clip_by_value(tf.cast(tf.round(px), tf.int32), -n, n)
  fill = tf.ones_like(img) * tf.constant(FILL, tf.float32)
  idx = tf.range(n) + px
  inside = (idx >= 0) & (idx < n)
  moved = tf.gather(img, tf.clip_by_value(idx, 0, n - 1), axis=axis)
  shape = [-1, 1, 1] if axis == 0 else [1, -1, 1]
  return tf.where(tf.reshape(inside, shape), moved, fill)


def translate_x(img, m, sign):
  px = sign * m / 10.0 * 0.45 * tf.cast(tf.shape(img)[1], tf.float32)
  return _shift(img, px, 1)


def translate_y(img, m, sign):
  px = sign * m / 10.0 * 0.45 * tf.cast(tf.shape(img)[0], tf.float32)
  return _shift(img, px, 0)


RANDAUGMENT_OPS = (
  ("AutoContrast", auto_contrast),
  ("Equalize", equalize),
  ("Invert", invert),
  ("Rotate", rotate),
  ("PosterizeIncreasing", posterize),
  ("SolarizeIncreasing", solarize),
  ("SolarizeAdd", solarize_add),
  ("ColorIncreasing", color),
  ("ContrastIncreasing", contrast),
  ("BrightnessIncreasing", brightness),
  ("SharpnessIncreasing", sharpness),
  ("ShearX", shear_x),
  ("ShearY", shear_y),
  ("TranslateXRel", translate_x),
  ("TranslateYRel", translate_y),
)


def randaugment_params(seed, cfg, u=None, normals=None):
  """The random draws of :func:`randaugment` (``cfg``: an augment.AugmentConfig): (op [L] i32,
  apply [L] bool, magnitude [L] f32, sign [L] f32) for its ``ra_num_layers`` layers
  (from ``seed``, or from 3L uniform and L normal draws ``u``, ``normals``)."""
  n = cfg.ra_num_layers
  if u is None:
    s = split(seed, 2)
    u, normals = uniform(s[0], [3 * n]), tf.random.stateless_normal([n], s[1])
  k = len(RANDAUGMENT_OPS)
  op = tf.minimum(tf.cast(u[:n] * k, tf.int32), k - 1)  # uniform choice of op
  apply = u[n : 2 * n] < cfg.ra_prob
  mag = tf.clip_by_value(cfg.ra_magnitude + cfg.ra_magnitude_std * normals, 0.0, 10.0)
  sign = tf.where(u[2 * n : 3 * n] < 0.5, -1.0, 1.0)  # timm's _randomly_negate
  return op, apply, mag, sign


def apply_randaugment(img, params):
  op, apply, mag, sign = params
  size = img.shape
  for i in range(op.shape[0]):
    branches = [
      lambda f=f, i=i: tf.ensure_shape(f(img, mag[i], sign[i]), size) for _, f in RANDAUGMENT_OPS
    ]
    img = tf.cond(apply[i], lambda: tf.switch_case(op[i], branches), lambda: img)
  return img


def randaugment(img, seed, cfg):
  return apply_randaugment(img, randaugment_params(seed, cfg))
