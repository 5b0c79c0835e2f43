"""Resizing with PyTorch's `F.interpolate` semantics, as separable interpolation matrices.

The original resizes with torch kernels (bicubic positional embeddings, bilinear masks, nearest
mask upsampling), and `jax.image.resize` differs from them (different cubic coefficient, antialias
when shrinking). Each 1-D resize here is a dense [out, in] matrix built in numpy for static sizes,
so the result equals torch's up to float rounding and stays cheap and jit-friendly.

The evaluation's last step, resizing class scores back to the original image size (up to
2048 pixels a side), uses bilinear taps instead (`bilinear_taps`, `resize_with_taps`): two
gathers and weights computed in float32 in torch's own order, so labels tie-break as torch's do,
and no dense [2048, 448] matrix is built per image size.
"""

import functools

import jax.numpy as jnp
import numpy as np


def cubic_weights(t, a=-0.75):
  """Torch's cubic convolution weights for taps at offsets -1, 0, 1, 2 (A = -0.75)."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=256)
def interp_matrix(in_size: int, out_size: int, mode: str, align_corners: bool = False):
  """[out_size, in_size] float64 matrix M such that resized = M @ signal (torch semantics)."""
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  o = rows.astype(np.float64)
  if mode == "nearest":
    # torch 'nearest' (legacy): src = floor(dst * in / out), clamped.
    src = np.minimum(np.floor(o * (in_size / out_size)).astype(np.int64), in_size - 1)
    m[rows, src] = 1.0
    return m
  if align_corners:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = o * scale
  else:
    src = (o + 0.5) * (in_size / out_size) - 0.5
  if mode == "bilinear":
    if not align_corners:
      src = np.maximum(src, 0.0)  # torch clamps negative source coordinates for linear modes
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    np.add.at(m, (rows, i0), 1.0 - w1)
    np.add.at(m, (rows, i1), w1)
    return m
  if mode == "bicubic":
    # No clamping of the source coordinate; taps outside the input are clamped to the border.
    i0 = np.floor(src).astype(np.int64)
    w = cubic_weights(src - i0)
    for k in range(4):
      idx = np.clip(i0 - 1 + k, 0, in_size - 1)
      np.add.at(m, (rows, idx), w[:, k])
    return m
  raise ValueError(f"unknown interpolation mode {mode!r}")


def resize_hw(x, size, mode: str, align_corners: bool = False, *, layout: str = "NHWC"):
  """Resize the spatial axes of `x` to `size` = (H, W) with torch semantics.

  layout: 'NHWC' (spatial axes -3, -2) or 'NCHW' (spatial axes -2, -1).
  """
  if layout == "NHWC":
    h_in, w_in = x.shape[-3], x.shape[-2]
  elif layout == "NCHW":
    h_in, w_in = x.shape[-2], x.shape[-1]
  else:
    raise ValueError(f"unknown layout {layout!r}")
  h_out, w_out = int(size[0]), int(size[1])
  if (h_in, w_in) == (h_out, w_out) and mode != "bicubic":
    return x
  mh = jnp.asarray(interp_matrix(h_in, h_out, mode, align_corners), x.dtype)
  mw = jnp.asarray(interp_matrix(w_in, w_out, mode, align_corners), x.dtype)
  hp = "highest"  # exact fp32 on accelerators too (TF32 would cost parity); no-op for bf16
  if layout == "NHWC":
    x = jnp.einsum("oh,...hwc->...owc", mh, x, precision=hp)
    return jnp.einsum("pw,...owc->...opc", mw, x, precision=hp)
  x = jnp.einsum("oh,...hw->...ow", mh, x, precision=hp)
  return jnp.einsum("pw,...ow->...op", mw, x, precision=hp)


def bilinear_taps(in_size: int, out_size: int):
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


def resize_with_taps(x, rows, cols):
  """Bilinear resize of the last two axes of x with precomputed taps (i0, i1, l0, l1) per axis,
  in torch's arithmetic order: l0h * (l0w * x00 + l1w * x01) + l1h * (l0w * x10 + l1w * x11)."""
  i0, i1, b0, b1 = rows
  j0, j1, a0, a1 = cols
  t0 = jnp.take(x, j0, axis=-1)
  t1 = jnp.take(x, j1, axis=-1)
  r0 = a0 * jnp.take(t0, i0, axis=-2) + a1 * jnp.take(t1, i0, axis=-2)
  r1 = a0 * jnp.take(t0, i1, axis=-2) + a1 * jnp.take(t1, i1, axis=-2)
  return b0[:, None] * r0 + b1[:, None] * r1


def padded_bilinear_taps(in_size: int, out_size: int, padded_out: int):
  """bilinear_taps padded to padded_out outputs (extra outputs read index 0, weight 0): shape
  buckets, so one compiled program serves many image sizes."""
  i0, i1, l0, l1 = bilinear_taps(in_size, out_size)
  extra = padded_out - out_size
  pad_i = lambda a: np.concatenate([a, np.zeros(extra, a.dtype)]).astype(np.int32)
  pad_f = lambda a: np.concatenate([a, np.zeros(extra, np.float32)]).astype(np.float32)
  return pad_i(i0), pad_i(i1), pad_f(l0), pad_f(l1)


def upsample_nearest_2x(x):
  """torch `F.interpolate(x, scale_factor=2)` (nearest) on NHWC.

  Broadcast + reshape rather than jnp.repeat: its gradient is then a plain reduction (repeat's
  lowers to a much slower gather/scatter on CPU).
  """
  *lead, h, w, c = x.shape
  x = jnp.broadcast_to(x[..., :, None, :, None, :], (*lead, h, 2, w, 2, c))
  return x.reshape(*lead, 2 * h, 2 * w, c)
