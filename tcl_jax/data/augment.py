"""Training image augmentation in TF ops, following the original TCL recipe.

The original (``datasets/builder.py`` + ``configs/default.yml``) builds
``timm.data.create_transform(224, is_training=True, color_jitter=0.4,
auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel')``
(timm 0.6.7), i.e. in this order:

1. RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)), bilinear
   (torchvision's 10-try sampler with its centre-crop fallback),
2. horizontal flip, p=0.5,
3. RandAugment: 2 ops drawn with replacement from timm's "increasing" set,
   each applied with p=0.5, magnitude ~ N(9, 0.5) clipped to [0, 10]; fill
   colour for geometric ops is the ImageNet mean (124, 116, 104),
4. colour jitter 0.4 -- note timm only adds it when no auto-augment is given,
   so with the default config it is *not* applied (``color_jitter_with_aa``
   below reproduces that; set it True to apply both),
5. ToTensor + Normalize(ImageNet mean/std),
6. RandomErasing(p=0.25, mode='pixel': per-pixel N(0, 1) noise, area
   (0.02, 1/3), log-uniform aspect (0.3, 1/0.3), one box).

Without ``deit_aug`` the original does only 1, 2 and 5.

RandAugment ops implemented (all 15 of timm's increasing set): AutoContrast,
Equalize, Invert, Rotate (+-30 deg), PosterizeIncreasing (bits 4 - int(m*0.4)),
SolarizeIncreasing (threshold 256 - m*25.6), SolarizeAdd (+m*11 below 128),
Color/Contrast/Brightness/Sharpness (factor 1 +- m*0.09), ShearX/ShearY
(+-0.3*m/10), TranslateXRel/TranslateYRel (+-0.45*m/10 of the size).
Differences from PIL: rotate/shear always resample bilinearly (timm picks
bilinear or bicubic at random), translations are rounded to whole pixels,
arithmetic is done in float then rounded, which can differ from PIL's LUTs by
one grey level, within one pixel of the border rotate/shear blend with the
fill colour where PIL clamps to the edge pixel, and the crop is resized
without PIL's antialiasing unless ``antialias=True`` (a speed trade-off, see
``AugmentConfig``). ``tests/test_data_augment.py`` checks each op against
PIL called as timm calls it.

Every random draw is a stateless op keyed by the per-example ``seed`` (a
[2] int tensor), so results depend only on (seed, example) and not on
threading or the order examples are processed in.

Speed (``python -m tcl_jax.data.bench``; per example, one core): the input
pipeline runs :func:`train_augment_pixels` per example and
:func:`finish_batch` per batch. All of an example's random numbers come from
3 RNG ops, drawn outside XLA (XLA's RNG gives other numbers and is slow on
CPU); each RandAugment op is its own XLA computation (``AugmentConfig.xla``,
results within one grey level of plain TF) except Equalize, which runs in
numpy (exact; XLA's CPU scatter + gather made it ~2 ms, 4x the mean op);
rotate/shear use a gather-based bilinear warp equal to TF's
``ImageProjectiveTransformV3`` (which has no XLA kernel and is ~5x slower;
the shears need only 2 of its 4 gathers); the flip is left to the batch when only colour
ops follow it (they commute with it exactly); normalisation runs once per
batch; the erasing noise is drawn by Box-Muller from uniforms.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import tensorflow as tf

from tcl_jax.data import randaugment
from tcl_jax.models.clip import IMAGE_MEAN as IMAGENET_MEAN
from tcl_jax.models.clip import IMAGE_STD as IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Switches for the training augmentation (defaults = original's config)."""

  image_size: int = 224
  scale: tuple = (0.08, 1.0)
  ratio: tuple = (3 / 4, 4 / 3)
  hflip: bool = True
  deit_aug: bool = True  # False: crop + flip + normalise only
  color_jitter: float = 0.4  # 0 disables
  color_jitter_with_aa: bool = False  # timm skips jitter when RandAugment is on
  randaugment: bool = True
  ra_num_layers: int = 2
  ra_magnitude: float = 9.0
  ra_magnitude_std: float = 0.5
  ra_prob: float = 0.5
  re_prob: float = 0.25  # 0 disables random erasing
  # PIL's bilinear (the original) low-pass filters when downscaling; TF's
  # antialiased resize costs ~4x a plain bilinear one, so it is off by default
  antialias: bool = False
  # XLA-compile the RandAugment ops / colour jitter and the per-batch flip +
  # normalisation; same random draws, results equal up to float rounding
  # (+-1 grey level)
  xla: bool = True

  @property
  def use_randaugment(self) -> bool:
    return self.deit_aug and self.randaugment and self.ra_num_layers > 0

  @property
  def use_color_jitter(self) -> bool:
    return (
      self.deit_aug
      and self.color_jitter > 0
      and (not self.use_randaugment or self.color_jitter_with_aa)
    )

  @property
  def use_erasing(self) -> bool:
    return self.deit_aug and self.re_prob > 0


# ----------------------------------------------------------------------------
# RandomResizedCrop window (torchvision semantics)
# ----------------------------------------------------------------------------


def random_resized_crop_window(
  seed, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10, u=None
):
  """Return (top, left, h, w) int32 like torchvision's RandomResizedCrop.

  All ``attempts`` candidates are drawn at once; the first that fits wins,
  otherwise the centre crop with the aspect ratio clamped into ``ratio``.
  ``u``: the 2 * attempts + 2 uniform draws to use instead of ``seed``'s.
  """
  if u is None:
    u = randaugment.uniform(seed, [2 * attempts + 2])
  hf = tf.cast(height, tf.float32)
  wf = tf.cast(width, tf.float32)
  area = hf * wf
  target = area * (scale[0] + (scale[1] - scale[0]) * u[:attempts])
  lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
  log_r = lr0 + (lr1 - lr0) * u[attempts : 2 * attempts]
  aspect = tf.exp(log_r)
  cw = tf.round(tf.sqrt(target * aspect))
  ch = tf.round(tf.sqrt(target / aspect))
  fits = (cw > 0) & (cw <= wf) & (ch > 0) & (ch <= hf)
  first = tf.argmax(tf.cast(fits, tf.int32))
  any_fit = tf.reduce_any(fits)
  ch_i = tf.cast(ch[first], tf.int32)
  cw_i = tf.cast(cw[first], tf.int32)
  # randint(0, H - h + 1) as floor(u * (H - h + 1))
  top = tf.cast(tf.floor(u[2 * attempts] * tf.cast(height - ch_i + 1, tf.float32)), tf.int32)
  left = tf.cast(tf.floor(u[2 * attempts + 1] * tf.cast(width - cw_i + 1, tf.float32)), tf.int32)
  top = tf.minimum(top, height - ch_i)
  left = tf.minimum(left, width - cw_i)

  in_ratio = wf / hf
  fb_w = tf.where(
    in_ratio < ratio[0], wf, tf.where(in_ratio > ratio[1], tf.round(hf * ratio[1]), wf)
  )
  fb_h = tf.where(in_ratio < ratio[0], tf.round(wf / ratio[0]), hf)
  fb_w = tf.cast(fb_w, tf.int32)
  fb_h = tf.cast(fb_h, tf.int32)
  fb_top = (height - fb_h) // 2
  fb_left = (width - fb_w) // 2
  return (
    tf.where(any_fit, top, fb_top),
    tf.where(any_fit, left, fb_left),
    tf.where(any_fit, ch_i, fb_h),
    tf.where(any_fit, cw_i, fb_w),
  )


def decode_crop(image_bytes, seed, cfg: AugmentConfig, u=None):
  """Decode + RandomResizedCrop + resize; returns float32 [S, S, 3] in 0..255.

  JPEGs are decoded only inside the crop window (``decode_and_crop_jpeg``),
  which is most of this pipeline's speed advantage on large images.
  """
  size = cfg.image_size

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    t, l, h, w = random_resized_crop_window(seed, shape[0], shape[1], cfg.scale, cfg.ratio, u=u)
    return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([t, l, h, w]), channels=3)

  def other():
    img = tf.io.decode_png(image_bytes, channels=3)
    shape = tf.shape(img)
    t, l, h, w = random_resized_crop_window(seed, shape[0], shape[1], cfg.scale, cfg.ratio, u=u)
    return img[t : t + h, l : l + w]

  crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  out = tf.image.resize(crop, [size, size], method="bilinear", antialias=cfg.antialias)
  # plain bilinear stays within 0..255; the antialias kernel can overshoot
  return tf.clip_by_value(out, 0.0, 255.0) if cfg.antialias else out


def decode_center(image_bytes, image_size: int, antialias: bool = True):
  """Deterministic path: resize the short side to ``image_size``, centre crop.

  An image that already is ``image_size`` square comes back pixel-exact.
  """
  img = tf.image.decode_image(image_bytes, channels=3, expand_animations=False)
  shape = tf.shape(img)
  h, w = shape[0], shape[1]
  scale = tf.cast(image_size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
  nh = tf.maximum(image_size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
  nw = tf.maximum(image_size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
  img = tf.cast(img, tf.float32)
  img = tf.cond(
    (nh == h) & (nw == w),
    lambda: img,
    lambda: tf.image.resize(img, [nh, nw], "bilinear", antialias=antialias),
  )
  top = (nh - image_size) // 2
  left = (nw - image_size) // 2
  img = img[top : top + image_size, left : left + image_size]
  img = tf.ensure_shape(img, [image_size, image_size, 3])
  return tf.clip_by_value(tf.round(img), 0.0, 255.0)


def color_jitter_params(seed, strength: float, u=None):
  u = randaugment.uniform(seed, [6]) if u is None else u
  lo = max(0.0, 1 - strength)
  factors = lo + (1 + strength - lo) * u[:3]
  order = tf.argsort(u[3:6])
  return factors, tf.cast(order, tf.int32)


def apply_color_jitter(img, params):
  factors, order = params
  fns = [
    lambda x, f: randaugment.blend(0.0, x, f),
    lambda x, f: randaugment.blend(tf.reduce_mean(randaugment.gray(x)), x, f),
    lambda x, f: randaugment.blend(randaugment.gray(x), x, f),
  ]
  for k in range(3):
    j = order[k]
    img = tf.switch_case(
      j, [lambda fn=fn, jj=jj: fn(img, factors[jj]) for jj, fn in enumerate(fns)]
    )
  return img


def color_jitter(img, seed, strength: float):
  """torchvision ColorJitter(b, c, s) with strength for all three, random order."""
  return apply_color_jitter(img, color_jitter_params(seed, strength))


def normalize(img):
  # one multiply-add: (img - mean) / std
  scale = tf.constant([1 / (255 * s) for s in IMAGENET_STD], tf.float32)
  shift = tf.constant([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], tf.float32)
  return img * scale + shift


def _finish(images, flips):
  images = tf.where(tf.reshape(flips, [-1, 1, 1, 1]), tf.reverse(images, [2]), images)
  return normalize(images)


# Per batch: 32 examples' flip + normalise in one fused loop. Unfused, the
# [.., 3]-broadcasting multiply-add alone costs ~0.4 ms per image on one core.
_finish_xla = tf.function(_finish, jit_compile=True, autograph=False, reduce_retracing=True)


def finish_batch(images, flips, xla: bool = True):
  """Second half of the training transform, on a batch: ``images`` f32
  [B, S, S, 3] in pixel scale and ``flips`` bool [B] from
  :func:`train_augment_pixels` -> flipped where asked, ImageNet-normalised."""
  return (_finish_xla if xla else _finish)(images, flips)


def random_erasing_params(
  seed, height, width, prob: float, attempts: int = 10, u=None, noise_seed=None
):
  """The draws of :func:`random_erasing`: (do, top, left, h, w, noise seed)
  (from ``seed``, or from 2 * attempts + 3 uniform draws ``u`` and ``noise_seed``)."""
  if u is None:
    s = randaugment.split(seed, 2)
    u, noise_seed = randaugment.uniform(s[0], [2 * attempts + 3]), s[1]
  area = tf.cast(height * width, tf.float32)
  target = area * (0.02 + (1 / 3 - 0.02) * u[:attempts])
  a0, a1 = math.log(0.3), math.log(1 / 0.3)
  aspect = tf.exp(a0 + (a1 - a0) * u[attempts : 2 * attempts])
  eh = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  ew = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (ew < width) & (eh < height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  bh, bw = eh[first], ew[first]
  top = tf.cast(tf.floor(u[2 * attempts] * tf.cast(height - bh + 1, tf.float32)), tf.int32)
  left = tf.cast(tf.floor(u[2 * attempts + 1] * tf.cast(width - bw + 1, tf.float32)), tf.int32)
  do = (u[2 * attempts + 2] < prob) & tf.reduce_any(fits)
  return do, top, left, bh, bw, noise_seed


def normal_noise(n, seed):
  """[n, 3] N(0, 1) draws by Box-Muller from stateless uniforms (exact; TF's
  stateless_normal kernel is ~2x slower, it is not vectorised)."""
  half = (3 * n + 1) // 2
  u = tf.random.stateless_uniform([2, half], seed)
  r = tf.sqrt(-2.0 * tf.math.log(1.0 - u[0]))  # 1 - u in (0, 1]
  theta = (2 * math.pi) * u[1]
  z = tf.concat([r * tf.cos(theta), r * tf.sin(theta)], 0)
  return tf.reshape(z[: 3 * n], [n, 3])


def apply_random_erasing(img, params, pixel_scale: bool = False):
  do, top, left, bh, bw, noise_seed = params

  def erase():
    # noise only for the box (drawing it for the whole image costs more
    # than the rest of the augmentation), concatenated into place
    noise = normal_noise(bh * bw, noise_seed)  # [bh * bw, 3]
    if pixel_scale:
      # per-channel scale + shift as a 3x3 diagonal matmul + bias_add:
      # Eigen's generic [..., 3] broadcasts are several times slower
      diag = tf.linalg.diag(tf.constant([255 * v for v in IMAGENET_STD], tf.float32))
      noise = tf.nn.bias_add(
        tf.matmul(noise, diag), tf.constant([255 * v for v in IMAGENET_MEAN], tf.float32)
      )
    noise = tf.reshape(noise, [bh, bw, 3])
    mid = tf.concat([img[top : top + bh, :left], noise, img[top : top + bh, left + bw :]], 1)
    return tf.concat([img[:top], mid, img[top + bh :]], 0)

  return tf.cond(do, erase, lambda: img)


def random_erasing(img, seed, prob: float, attempts: int = 10, pixel_scale: bool = False):
  """timm RandomErasing(mode='pixel', count=1) on a normalised HWC image.

  ``pixel_scale``: ``img`` is not normalised yet (0..255); the noise is
  written as the pixel values that :func:`normalize` maps to the N(0, 1)
  draws (exact up to float rounding).
  """
  shape = tf.shape(img)
  params = random_erasing_params(seed, shape[0], shape[1], prob, attempts)
  return apply_random_erasing(img, params, pixel_scale)


_ATTEMPTS = 10  # RandomResizedCrop's and RandomErasing's tries

# RandAugment ops that move pixels: a flip does not commute with them
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@functools.lru_cache(maxsize=None)
def compiled(fn, xla: bool):
  if fn is randaugment.equalize:  # faster in numpy than compiled (see _equalize_np)
    return randaugment.equalize_fast if xla else fn
  # One XLA computation per op: XLA fuses each op's dozens of small per-pixel
  # TF ops into a few loops (in a tf.data map, op dispatch and Eigen's slow
  # [..., 3] broadcasts otherwise cost more than the arithmetic). Dispatching
  # between the ops stays outside XLA: a 15-way XLA conditional costs more
  # per call than the average op.
  return tf.function(fn, jit_compile=xla, autograph=False, reduce_retracing=True)


def _apply_randaugment_fast(img, params, xla: bool):
  op, apply, mag, sign = params
  size = img.shape
  for i in range(op.shape[0]):
    branches = [
      lambda f=f, i=i: tf.ensure_shape(compiled(f, xla)(img, mag[i], sign[i]), size)
      for _, f in randaugment.RANDAUGMENT_OPS
    ]
    img = tf.cond(apply[i], lambda: tf.switch_case(op[i], branches), lambda: img)
  return img


def train_augment_pixels(image_bytes, seed, cfg: AugmentConfig):
  """Per-example part of :func:`train_augment`: returns (image f32 [S, S, 3]
  in pixel scale, flip bool) for :func:`finish_batch`, which flips and
  normalises whole batches at once.

  The flip is left to the batch unless a geometric RandAugment op or an
  erasing box comes after it (colour ops commute with a flip exactly), so
  every result equals the per-example order crop -> flip -> RandAugment ->
  normalise -> erase.
  """
  # All of an example's random draws come from 3 RNG ops (one per kind):
  # each stateless RNG op costs a few microseconds in a tf.data map.
  s = randaugment.split(seed, 3)
  nl = cfg.ra_num_layers
  sizes = [2 * _ATTEMPTS + 2, 1, 3 * nl, 6, 2 * _ATTEMPTS + 3]  # crop flip RA jitter erase
  u_crop, u_flip, u_ra, u_cj, u_er = tf.split(randaugment.uniform(s[0], [sum(sizes)]), sizes)
  img = decode_crop(image_bytes, None, cfg, u=u_crop)
  size = cfg.image_size
  img = tf.ensure_shape(img, [size, size, 3])
  flip = u_flip[0] < 0.5 if cfg.hflip else tf.constant(False)
  if not (cfg.use_randaugment or cfg.use_color_jitter or cfg.use_erasing):
    return img, flip
  needs_flip = tf.constant(False)
  if cfg.use_randaugment:
    ra = randaugment.randaugment_params(None, cfg, u_ra, tf.random.stateless_normal([nl], s[1]))
    geometric = tf.constant([name in _GEOMETRIC for name, _ in randaugment.RANDAUGMENT_OPS])
    needs_flip |= tf.reduce_any(ra[1] & tf.gather(geometric, ra[0]))
  if cfg.use_erasing:
    er = random_erasing_params(None, size, size, cfg.re_prob, _ATTEMPTS, u_er, s[2])
    needs_flip |= er[0]
  flip_now = flip & needs_flip
  img = tf.cond(flip_now, lambda: tf.reverse(img, [1]), lambda: img)
  if cfg.use_randaugment:
    img = _apply_randaugment_fast(img, ra, cfg.xla)
  if cfg.use_color_jitter:
    img = compiled(apply_color_jitter, cfg.xla)(
      img, color_jitter_params(None, cfg.color_jitter, u_cj)
    )
  if cfg.use_erasing:
    img = apply_random_erasing(img, er, pixel_scale=True)
  return img, flip & ~flip_now


def train_augment(image_bytes, seed, cfg: AugmentConfig):
  """Full training transform: encoded bytes -> normalised float32 [S, S, 3].

  (The input pipeline runs the two halves, :func:`train_augment_pixels` per
  example and :func:`finish_batch` per batch.)
  """
  img, flip = train_augment_pixels(image_bytes, seed, cfg)
  return finish_batch(img[None], flip[None], cfg.xla)[0]
