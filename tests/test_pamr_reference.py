"""PAMR against a numpy transcription of the original's (models/tcl/pamr.py, as TCL builds it in
apply_pamr: 10 iterations, dilations [1, 2, 4, 8, 12, 24]), written from its convolution kernels:
LocalAffinityAbs (|centre - neighbour| at the 8 offsets of a dilated 3x3, replicate padding),
LocalStDev (unbiased std over the 9 positions), softmax over positions of the channel-mean
affinity, then `mask = sum(neighbours(mask) * affinity)` per iteration. Also the whole
`generate_masks(apply_pamr=True)` path: image resized to the mask (bilinear, align_corners=True),
PAMR, resize to the padded image, crop."""

import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.models import tcl_inference

ITERATIONS, DILATIONS = 10, (1, 2, 4, 8, 12, 24)  # TCL.apply_pamr
# LocalAffinity's kernel order: (row, col) of the -1 (or the copied neighbour) in the 3x3.
OFFSETS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
STDEV_OFFSETS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def _dilated(x, offsets, dilations):
  """F.conv2d(F.pad(x, [d] * 4, mode='replicate'), one-hot 3x3 kernels, dilation=d) for each d,
  concatenated: x [B, K, H, W] -> [B, K, P, H, W] of the neighbours at those kernel positions."""
  h, w = x.shape[-2:]
  out = []
  for d in dilations:
    xp = np.pad(x, ((0, 0), (0, 0), (d, d), (d, d)), mode="edge")
    for r, c in offsets:
      out.append(xp[:, :, r * d : r * d + h, c * d : c * d + w])
  return np.stack(out, 2)


def reference_pamr(x, mask, num_iter=ITERATIONS, dilations=DILATIONS):
  """The original's PAMR.forward on x [B, K, H, W], mask [B, C, H, W] (same size), float64."""
  x, mask = np.asarray(x, np.float64), np.asarray(mask, np.float64)
  x_std = _dilated(x, STDEV_OFFSETS, dilations).std(2, ddof=1, keepdims=True)
  aff = -np.abs(x[:, :, None] - _dilated(x, OFFSETS, dilations)) / (1e-8 + 0.1 * x_std)
  aff = aff.mean(1, keepdims=True)
  aff = np.exp(aff - aff.max(2, keepdims=True))
  aff /= aff.sum(2, keepdims=True)
  for _ in range(num_iter):
    mask = (_dilated(mask, OFFSETS, dilations) * aff).sum(2)
  return mask


def _bilinear(x, size, align_corners):
  """F.interpolate(x, size, mode='bilinear', align_corners=...) on the last two axes, float64."""

  def taps(n_in, n_out):
    d = np.arange(n_out, dtype=np.float64)
    if align_corners:
      src = d * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
      src = np.maximum((n_in / n_out) * (d + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0

  (r0, r1, ly), (c0, c1, lx) = taps(x.shape[-2], size[0]), taps(x.shape[-1], size[1])
  top = x[..., r0, :][..., c0] * (1 - lx) + x[..., r0, :][..., c1] * lx
  bottom = x[..., r1, :][..., c0] * (1 - lx) + x[..., r1, :][..., c1] * lx
  return top * (1 - ly)[:, None] + bottom * ly[:, None]


def test_pamr_is_the_originals_recurrence():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 20, 28)).astype(np.float32)
  mask = rng.uniform(size=(2, 4, 20, 28)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(tcl_inference.pamr(jnp.asarray(x), jnp.asarray(mask)))
  want = reference_pamr(x, mask)
  # float32 against float64: measured 1.7e-6 max abs. The recurrence is sensitive to what it
  # guards: 3 iterations instead of 10 move the result by 0.50, dilations (1, 2, 4) by 0.65.
  assert np.abs(got - want).max() < 1e-5
  assert np.abs(reference_pamr(x, mask, num_iter=3) - want).max() > 1e-2
  assert np.abs(reference_pamr(x, mask, dilations=(1, 2, 4)) - want).max() > 1e-2


def test_generate_masks_refines_with_the_originals_pamr():
  cfg = tcl_lib.tiny_config()
  params = tcl_lib.init_params(cfg, jax.random.key(0))
  h, w = 40, 56  # padded to 48 x 64: a 3 x 4 patch grid, masks at 12 x 16
  image = jax.random.normal(jax.random.key(1), (1, h, w, 3))
  text_emb = jax.random.normal(jax.random.key(2), (3, cfg.clip.embed_dim))
  with jax.default_matmul_precision("highest"):
    got, simmap = tcl_inference.generate_masks(
      params, cfg, image, text_emb, apply_pamr=True, kp_w=0.0
    )
  s2m = params["masker"]["sim2mask"]
  soft = 1 / (1 + np.exp(-(np.asarray(simmap, np.float64) * float(s2m["w"]) + float(s2m["b"]))))
  l, r, t, b = clip_lib.compute_padsize(h, w, cfg.patch_size)
  padded = np.pad(np.asarray(image, np.float64), ((0, 0), (t, b), (l, r), (0, 0)))
  small = _bilinear(padded.transpose(0, 3, 1, 2), soft.shape[-2:], align_corners=True)
  refined = reference_pamr(small, soft)
  want = _bilinear(refined, padded.shape[1:3], align_corners=False)[:, :, t : t + h, l : l + w]
  assert got.shape == want.shape == (1, 3, h, w)
  # Measured 8.9e-8 max abs; without PAMR the masks are 0.059 away, with 3 iterations 0.049.
  assert np.abs(np.asarray(got) - want).max() < 1e-5
  unrefined = _bilinear(soft, padded.shape[1:3], align_corners=False)[:, :, t : t + h, l : l + w]
  three = _bilinear(
    reference_pamr(small, soft, num_iter=3), padded.shape[1:3], align_corners=False
  )[:, :, t : t + h, l : l + w]
  assert np.abs(unrefined - want).max() > 1e-2 and np.abs(three - want).max() > 1e-2
