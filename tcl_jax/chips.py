"""The machine a benchmark runs on: a readable label and each accelerator's dense bf16 peak, for
MFU (tcl_jax.bench)."""

import os
import platform

import jax

# Dense bf16 peak FLOP/s per chip (vendor datasheets, no sparsity), matched in order against
# jax's device_kind: more specific names first.
PEAK_BF16_FLOPS = (
  ("H100 PCIe", 756e12),
  ("H100", 989e12),
  ("H200", 989e12),
  ("GH200", 989e12),
  ("B200", 2250e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("L4", 121e12),
  ("A10G", 70e12),
  ("V100", 125e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v6 lite", 918e12),
  ("TPU v6e", 918e12),
)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_label() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"CPU ({_cpu_model()}, {os.cpu_count()} cores)"
  return f"{jax.device_count()} x {d.device_kind}"


def peak_flops_per_chip() -> float | None:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return None
  for key, flops in PEAK_BF16_FLOPS:
    if key.lower() in d.device_kind.lower():
      return flops
  return None
