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
one grey level, and the crop is resized without PIL's antialiasing unless
``antialias=True`` (a speed trade-off, see ``AugmentConfig``).

Every random draw is a stateless op keyed by the per-example ``seed`` (a
[2] int tensor), so results depend only on (seed, example) and not on
threading or the order examples are processed in.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104), timm's fill


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

    @property
    def use_randaugment(self) -> bool:
        return self.deit_aug and self.randaugment and self.ra_num_layers > 0

    @property
    def use_color_jitter(self) -> bool:
        return (self.deit_aug and self.color_jitter > 0
                and (not self.use_randaugment or self.color_jitter_with_aa))

    @property
    def use_erasing(self) -> bool:
        return self.deit_aug and self.re_prob > 0


def _split(seed, n):
    return tf.random.experimental.stateless_split(seed, n)


def _uniform(seed, shape=(), lo=0.0, hi=1.0):
    return tf.random.stateless_uniform(shape, seed, lo, hi, dtype=tf.float32)


# ----------------------------------------------------------------------------
# RandomResizedCrop window (torchvision semantics)
# ----------------------------------------------------------------------------

def random_resized_crop_window(seed, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               attempts: int = 10):
    """Return (top, left, h, w) int32 like torchvision's RandomResizedCrop.

    All ``attempts`` candidates are drawn at once; the first that fits wins,
    otherwise the centre crop with the aspect ratio clamped into ``ratio``.
    """
    s = _split(seed, 4)
    hf = tf.cast(height, tf.float32)
    wf = tf.cast(width, tf.float32)
    area = hf * wf
    target = area * _uniform(s[0], [attempts], scale[0], scale[1])
    log_r = _uniform(s[1], [attempts], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_r)
    cw = tf.round(tf.sqrt(target * aspect))
    ch = tf.round(tf.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= wf) & (ch > 0) & (ch <= hf)
    first = tf.argmax(tf.cast(fits, tf.int32))
    any_fit = tf.reduce_any(fits)
    ch_i = tf.cast(ch[first], tf.int32)
    cw_i = tf.cast(cw[first], tf.int32)
    # randint(0, H - h + 1) as floor(u * (H - h + 1))
    top = tf.cast(tf.floor(_uniform(s[2]) * tf.cast(height - ch_i + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(_uniform(s[3]) * tf.cast(width - cw_i + 1, tf.float32)), tf.int32)
    top = tf.minimum(top, height - ch_i)
    left = tf.minimum(left, width - cw_i)

    in_ratio = wf / hf
    fb_w = tf.where(in_ratio < ratio[0], wf,
                    tf.where(in_ratio > ratio[1], tf.round(hf * ratio[1]), wf))
    fb_h = tf.where(in_ratio < ratio[0], tf.round(wf / ratio[0]), hf)
    fb_w = tf.cast(fb_w, tf.int32)
    fb_h = tf.cast(fb_h, tf.int32)
    fb_top = (height - fb_h) // 2
    fb_left = (width - fb_w) // 2
    return (tf.where(any_fit, top, fb_top), tf.where(any_fit, left, fb_left),
            tf.where(any_fit, ch_i, fb_h), tf.where(any_fit, cw_i, fb_w))


def decode_crop(image_bytes, seed, cfg: AugmentConfig):
    """Decode + RandomResizedCrop + resize; returns float32 [S, S, 3] in 0..255.

    JPEGs are decoded only inside the crop window (``decode_and_crop_jpeg``),
    which is most of this pipeline's speed advantage on large images.
    """
    size = cfg.image_size

    def jpeg():
        shape = tf.image.extract_jpeg_shape(image_bytes)
        t, l, h, w = random_resized_crop_window(seed, shape[0], shape[1], cfg.scale, cfg.ratio)
        return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([t, l, h, w]), channels=3)

    def other():
        img = tf.io.decode_png(image_bytes, channels=3)
        shape = tf.shape(img)
        t, l, h, w = random_resized_crop_window(seed, shape[0], shape[1], cfg.scale, cfg.ratio)
        return img[t:t + h, l:l + w]

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
    img = tf.cond((nh == h) & (nw == w), lambda: img,
                  lambda: tf.image.resize(img, [nh, nw], "bilinear", antialias=antialias))
    top = (nh - image_size) // 2
    left = (nw - image_size) // 2
    img = img[top:top + image_size, left:left + image_size]
    img = tf.ensure_shape(img, [image_size, image_size, 3])
    return tf.clip_by_value(tf.round(img), 0.0, 255.0)


# ----------------------------------------------------------------------------
# RandAugment ops (timm "increasing" set) on float images in 0..255
# ----------------------------------------------------------------------------

def _gray(img):
    # PIL "L" conversion weights
    return img[..., 0:1] * 0.299 + img[..., 1:2] * 0.587 + img[..., 2:3] * 0.114


def _blend(degenerate, img, factor):
    return tf.clip_by_value(tf.round(degenerate + factor * (img - degenerate)), 0.0, 255.0)


def _affine(img, transform):
    """Apply an output->input affine [a0 a1 a2 b0 b1 b2] with the mean fill."""
    fill = tf.constant(_FILL, tf.float32)
    t = tf.concat([transform, tf.zeros([2], tf.float32)], 0)[None]
    shape = tf.shape(img)[:2]
    # Shifting by the fill colour lets the op's scalar fill value of 0 act as
    # a per-channel fill (bilinear interpolation commutes with the shift).
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=(img - fill)[None], transforms=t, output_shape=shape,
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    return tf.clip_by_value(tf.round(out + fill), 0.0, 255.0)


def _per_channel_rows(img):
    # [3, H*W]: per-channel reductions along rows are much faster in Eigen
    # than reducing an HWC tensor over its leading axes
    return tf.transpose(tf.reshape(img, [-1, 3]))


def _auto_contrast(img, m, sign):
    rows = _per_channel_rows(img)
    lo = tf.reduce_min(rows, axis=1)
    hi = tf.reduce_max(rows, axis=1)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    off = tf.where(hi > lo, lo, 0.0)
    return tf.clip_by_value(tf.floor((img - off) * scale), 0.0, 255.0)


def _equalize(img, m, sign):
    """PIL ImageOps.equalize, all three channels with one bincount."""
    v = tf.cast(img, tf.int32) + tf.constant([0, 256, 512])  # channel c -> bins c*256..
    hist = tf.reshape(tf.math.bincount(tf.reshape(v, [-1]), minlength=768, maxlength=768),
                      [3, 256])
    # count of the last non-empty bin of each channel
    last_bin = 255 - tf.argmax(tf.cast(tf.reverse(hist, [1]) > 0, tf.int32), axis=1,
                               output_type=tf.int32)
    last = tf.gather(hist, last_bin, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - last) // 255  # [3]
    lut = (tf.cumsum(hist, axis=1, exclusive=True) + (step // 2)[:, None]) \
        // tf.maximum(step, 1)[:, None]
    lut = tf.where((step == 0)[:, None], tf.range(256)[None], tf.clip_by_value(lut, 0, 255))
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), v), tf.float32)


def _invert(img, m, sign):
    return 255.0 - img


def _rotate(img, m, sign):
    angle = sign * m / 10.0 * 30.0 * math.pi / 180.0
    shape = tf.cast(tf.shape(img)[:2], tf.float32)
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    c, s = tf.cos(angle), tf.sin(angle)
    # input = R (out - centre) + centre
    return _affine(img, tf.stack([c, -s, cx - c * cx + s * cy,
                                  s, c, cy - s * cx - c * cy]))


def _posterize(img, m, sign):
    bits = 4 - tf.cast(m / 10.0 * 4.0, tf.int32)
    q = tf.cast(tf.bitwise.left_shift(1, 8 - bits), tf.float32)
    return tf.floor(img / q) * q


def _solarize(img, m, sign):
    thresh = 256.0 - tf.floor(m / 10.0 * 256.0)
    return tf.where(img < thresh, img, 255.0 - img)


def _solarize_add(img, m, sign):
    add = tf.floor(m / 10.0 * 110.0)
    return tf.where(img < 128.0, tf.minimum(img + add, 255.0), img)


def _enhance_factor(m, sign):
    return 1.0 + sign * m / 10.0 * 0.9


def _color(img, m, sign):
    return _blend(_gray(img), img, _enhance_factor(m, sign))


def _contrast(img, m, sign):
    mean = tf.floor(tf.reduce_mean(tf.round(_gray(img))) + 0.5)
    return _blend(mean, img, _enhance_factor(m, sign))


def _brightness(img, m, sign):
    return _blend(0.0, img, _enhance_factor(m, sign))


def _sharpness(img, m, sign):
    k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    k = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.round(tf.nn.depthwise_conv2d(img[None], k, [1, 1, 1, 1], "VALID")[0])
    # PIL leaves the one-pixel border untouched
    degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    mask = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
    degenerate = mask * degenerate + (1 - mask) * img
    return _blend(degenerate, img, _enhance_factor(m, sign))


def _shear_x(img, m, sign):
    f = sign * m / 10.0 * 0.3
    return _affine(img, tf.stack([1.0, f, 0.0, 0.0, 1.0, 0.0]))


def _shear_y(img, m, sign):
    f = sign * m / 10.0 * 0.3
    return _affine(img, tf.stack([1.0, 0.0, 0.0, f, 1.0, 0.0]))


def _shift(img, px, axis):
    """out[i] = img[i + px] along ``axis`` with the mean fill: a translation
    rounded to whole pixels (a bilinear warp costs ~10x more)."""
    n = tf.shape(img)[axis]
    px = tf.clip_by_value(tf.cast(tf.round(px), tf.int32), -n, n)
    fill = tf.ones_like(img) * tf.constant(_FILL, tf.float32)
    idx = tf.range(n) + px
    inside = (idx >= 0) & (idx < n)
    moved = tf.gather(img, tf.clip_by_value(idx, 0, n - 1), axis=axis)
    shape = [-1, 1, 1] if axis == 0 else [1, -1, 1]
    return tf.where(tf.reshape(inside, shape), moved, fill)


def _translate_x(img, m, sign):
    px = sign * m / 10.0 * 0.45 * tf.cast(tf.shape(img)[1], tf.float32)
    return _shift(img, px, 1)


def _translate_y(img, m, sign):
    px = sign * m / 10.0 * 0.45 * tf.cast(tf.shape(img)[0], tf.float32)
    return _shift(img, px, 0)


RANDAUGMENT_OPS = (
    ("AutoContrast", _auto_contrast), ("Equalize", _equalize), ("Invert", _invert),
    ("Rotate", _rotate), ("PosterizeIncreasing", _posterize),
    ("SolarizeIncreasing", _solarize), ("SolarizeAdd", _solarize_add),
    ("ColorIncreasing", _color), ("ContrastIncreasing", _contrast),
    ("BrightnessIncreasing", _brightness), ("SharpnessIncreasing", _sharpness),
    ("ShearX", _shear_x), ("ShearY", _shear_y),
    ("TranslateXRel", _translate_x), ("TranslateYRel", _translate_y),
)


def randaugment(img, seed, cfg: AugmentConfig):
    size = img.shape
    seeds = _split(seed, cfg.ra_num_layers)
    for i in range(cfg.ra_num_layers):
        s = _split(seeds[i], 4)
        op = tf.random.stateless_uniform([], s[0], 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
        apply = _uniform(s[1]) < cfg.ra_prob
        m = cfg.ra_magnitude + cfg.ra_magnitude_std * tf.random.stateless_normal([], s[2])
        m = tf.clip_by_value(m, 0.0, 10.0)
        sign = tf.where(_uniform(s[3]) < 0.5, -1.0, 1.0)  # timm's _randomly_negate
        branches = [lambda f=f: tf.ensure_shape(f(img, m, sign), size)
                    for _, f in RANDAUGMENT_OPS]
        img = tf.cond(apply, lambda: tf.switch_case(op, branches), lambda: img)
    return img


def color_jitter(img, seed, strength: float):
    """torchvision ColorJitter(b, c, s) with strength for all three, random order."""
    s = _split(seed, 4)
    factors = _uniform(s[0], [3], max(0.0, 1 - strength), 1 + strength)
    order = tf.argsort(_uniform(s[1], [3]))
    fns = [lambda x, f: _blend(0.0, x, f),
           lambda x, f: _blend(tf.reduce_mean(_gray(x)), x, f),
           lambda x, f: _blend(_gray(x), x, f)]
    for k in range(3):
        j = order[k]
        img = tf.switch_case(j, [lambda fn=fn, jj=jj: fn(img, factors[jj])
                                 for jj, fn in enumerate(fns)])
    return img


def normalize(img):
    # one multiply-add: (img - mean) / std
    scale = tf.constant([1 / (255 * s) for s in IMAGENET_STD], tf.float32)
    shift = tf.constant([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], tf.float32)
    return img * scale + shift


def random_erasing(img, seed, prob: float, attempts: int = 10):
    """timm RandomErasing(mode='pixel', count=1) on a normalised HWC image."""
    s = _split(seed, 6)
    shape = tf.shape(img)
    h, w = shape[0], shape[1]
    area = tf.cast(h * w, tf.float32)
    target = area * _uniform(s[0], [attempts], 0.02, 1 / 3)
    aspect = tf.exp(_uniform(s[1], [attempts], math.log(0.3), math.log(1 / 0.3)))
    eh = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (ew < w) & (eh < h)
    first = tf.argmax(tf.cast(fits, tf.int32))
    bh, bw = eh[first], ew[first]
    top = tf.cast(tf.floor(_uniform(s[2]) * tf.cast(h - bh + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(_uniform(s[3]) * tf.cast(w - bw + 1, tf.float32)), tf.int32)
    do = (_uniform(s[4]) < prob) & tf.reduce_any(fits)

    def erase():
        # noise only for the box (drawing it for the whole image costs more
        # than the rest of the augmentation), padded into place
        noise = tf.random.stateless_normal([bh, bw, 3], s[5])
        pads = [[top, h - top - bh], [left, w - left - bw], [0, 0]]
        box = tf.pad(tf.ones([bh, bw, 1], tf.bool), pads[:2] + [[0, 0]])
        return tf.where(box, tf.pad(noise, pads), img)

    return tf.cond(do, erase, lambda: img)


def train_augment(image_bytes, seed, cfg: AugmentConfig):
    """Full training transform: encoded bytes -> normalised float32 [S, S, 3]."""
    s = _split(seed, 5)
    img = decode_crop(image_bytes, s[0], cfg)
    img = tf.ensure_shape(img, [cfg.image_size, cfg.image_size, 3])
    if cfg.hflip:
        img = tf.cond(_uniform(s[1]) < 0.5, lambda: img[:, ::-1], lambda: img)
    if cfg.use_randaugment:
        img = randaugment(img, s[2], cfg)
    if cfg.use_color_jitter:
        img = color_jitter(img, s[3], cfg.color_jitter)
    img = normalize(img)
    if cfg.use_erasing:
        img = random_erasing(img, s[4], cfg.re_prob)
    return img
