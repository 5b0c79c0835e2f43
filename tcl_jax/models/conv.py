"""The masker's convolutions as torch runs them: `Conv2d` (nn.Conv2d's init and padding; on CPU
as im2col / sub-pixel matmuls, whose gradients XLA CPU runs fast, natively on GPU/TPU or under
`force_native_conv`), and the GDecoder's `ConvBlock` / `ResConv` (the original's
models/builder.py and models/tcl/decoders.py)."""

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import resize

Dtype = Any

ACTIVATIONS = {
  "none": lambda x: x,
  "relu": jax.nn.relu,
  "lrelu": lambda x: jax.nn.leaky_relu(x, 0.2),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU is the erf form
}


def _torch_uniform_init(fan_in):
  # torch's default Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _phase_taps(k: int, phase: int):
  """For output rows 2i + phase of a kxk conv over a nearest-x2-upsampled map: the low-res row
  offsets it reads and, for each, the kernel rows that land on it."""
  r = k // 2
  groups = {}
  for t in range(k):
    groups.setdefault((phase + t - r) // 2, []).append(t)
  return sorted(groups.items())


def _im2col_matmul(slices, kernels):
  return jnp.concatenate(slices, axis=-1) @ jnp.concatenate(kernels, axis=0)


def _add_bias(y, bias, dtype):
  """y + bias in float32, cast to `dtype`. The bias gradient sums the output gradient over every
  pixel of the batch; in bfloat16 that sum loses the gradient (measured on the parity fixture:
  cosine 0.989 to float32 with a bf16 add, 0.99998 with this). The casts fuse into the add."""
  return (y.astype(jnp.float32) + bias).astype(dtype)


_forced_native_conv = False


@contextlib.contextmanager
def force_native_conv():
  """Models traced inside use the native convolution on every backend, as GPU/TPU run it
  (tcl_jax.tools.scaling compiles the accelerators' program on CPU devices)."""
  global _forced_native_conv
  previous, _forced_native_conv = _forced_native_conv, True
  try:
    yield
  finally:
    _forced_native_conv = previous


class Conv2d(nn.Module):
  """Stride-1 'same' kxk conv, zero padding; parameters as nn.Conv (kernel [k,k,Cin,Cout], bias).

  `upsampled_input`: the conv runs on the nearest-x2 upsample of `x` (the GDecoder's first conv).

  On CPU it runs as im2col + matmuls: XLA:CPU's convolution backward is several times slower than
  the matmul form at the decoder's sizes (4x56x56x768, fwd+grads: 8.6 s vs 1.9 s). With an
  upsampled input it works sub-pixel: each of the 4 output phases is a 2x2 conv of the low-res map
  with summed kernel taps, the same sums in another order at 16/36 of the FLOPs. On GPU/TPU the
  native convolution is used (im2col would cost 9x activation memory there).
  """

  features: int
  kernel_size: int
  dtype: Dtype = jnp.float32
  upsampled_input: bool = False

  @nn.compact
  def __call__(self, x):
    k, cin = self.kernel_size, x.shape[-1]
    init = _torch_uniform_init(k * k * cin)
    kernel = self.param("kernel", init, (k, k, cin, self.features)).astype(self.dtype)
    bias = self.param("bias", init, (self.features,))
    x = x.astype(self.dtype)
    r = k // 2
    if _forced_native_conv or jax.default_backend() != "cpu":
      if self.upsampled_input:
        x = resize.upsample_nearest_2x(x)
      y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), [(r, r), (r, r)], dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      return _add_bias(y, bias, self.dtype)
    b, h, w, _ = x.shape
    if not self.upsampled_input:
      xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
      slices = [xp[:, i : i + h, j : j + w] for i in range(k) for j in range(k)]
      return _add_bias(
        _im2col_matmul(slices, [kernel[i, j] for i in range(k) for j in range(k)]), bias, self.dtype
      )
    pad = (r + 1) // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = []
    for pa in (0, 1):
      cols = []
      for pb in (0, 1):
        slices, kernels = [], []
        for du, ti in _phase_taps(k, pa):
          for dv, tj in _phase_taps(k, pb):
            slices.append(xp[:, pad + du : pad + du + h, pad + dv : pad + dv + w])
            kernels.append(sum(kernel[i, j] for i in ti for j in tj))
        cols.append(_im2col_matmul(slices, kernels))
      rows.append(jnp.stack(cols, axis=3))  # [B, h, w, 2 (column phase), O]
    y = jnp.stack(rows, axis=2)  # [B, h, 2 (row phase), w, 2, O]
    return _add_bias(y.reshape(b, 2 * h, 2 * w, self.features), bias, self.dtype)


class ConvBlock(nn.Module):
  """Pre-activation conv: norm -> act -> kxk conv (zero padding) -> zero-initialised tanh gate.

  With `upsampled_input` the block acts on the nearest-x2 upsample of `x`; norm and activation are
  per pixel, so they run before the upsampling at a quarter of the cost.
  """

  channels: int
  kernel_size: int
  norm: str
  act: str
  dtype: Dtype = jnp.float32
  upsampled_input: bool = False

  @nn.compact
  def __call__(self, x):
    if self.norm == "ln":
      x = clip_lib.LayerNorm(self.dtype, name="norm")(x)  # LayerNorm2d: over channels
    x = ACTIVATIONS[self.act](x)
    x = Conv2d(self.channels, self.kernel_size, self.dtype, self.upsampled_input, name="conv")(x)
    gate = self.param("gate", nn.initializers.zeros, ())
    # In float32: the gate's gradient is a sum over every element of x (bf16 loses up to 60% of
    # it on the parity fixture). The casts fuse into the multiply.
    return (jnp.tanh(gate) * x.astype(jnp.float32)).astype(self.dtype)


class ResConv(nn.Module):
  """Nearest x2 upsample, then x + conv(x) (and x + conv2(x) when `double`)."""

  channels: int
  kernel_size: int
  norm: str
  act: str
  double: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = ConvBlock(
      self.channels,
      self.kernel_size,
      self.norm,
      self.act,
      self.dtype,
      upsampled_input=True,
      name="conv",
    )(x)
    x = resize.upsample_nearest_2x(x) + c
    if self.double:
      x = x + ConvBlock(
        self.channels, self.kernel_size, self.norm, self.act, self.dtype, name="conv2"
      )(x)
    return x
