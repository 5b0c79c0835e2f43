"""Resizing with PyTorch's `F.interpolate` semantics, as separable interpolation matrices.

The original resizes with torch kernels (bicubic positional embeddings, bilinear masks, nearest
mask upsampling), and `jax.image.resize` differs from them (different cubic coefficient, antialias
when shrinking). Each 1-D resize here is a dense [out, in] matrix built in numpy for static sizes,
so the result equals torch's up to float rounding and stays cheap and jit-friendly.
"""

import functools

import jax.numpy as jnp
import numpy as np


def _cubic_weights(t, a=-0.75):
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
    w = _cubic_weights(src - i0)
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


def upsample_nearest_2x(x):
  """torch `F.interpolate(x, scale_factor=2)` (nearest) on NHWC.

  Broadcast + reshape rather than jnp.repeat: its gradient is then a plain reduction (repeat's
  lowers to a much slower gather/scatter on CPU).
  """
  *lead, h, w, c = x.shape
  x = jnp.broadcast_to(x[..., :, None, :, None, :], (*lead, h, 2, w, 2, c))
  return x.reshape(*lead, 2 * h, 2 * w, c)
