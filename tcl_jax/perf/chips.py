"""The machine a benchmark runs on: a readable label and each accelerator's dense bf16 peak, for
MFU (tcl_jax.bench); peaks and interconnect bandwidths for the scaling report's step-time model
(`INTERCONNECTS`, tcl_jax.tools.scaling)."""

import dataclasses
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


def cpu_description() -> str:
  """CPU model, family/model numbers and vector width, e.g. "AMD EPYC (family 25 model 17),
  AVX-512": float results differ between AVX2 and AVX-512 machines (XLA picks other kernels and
  summation orders), so every measured figure names the width it came from."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  flags = set(info.get("flags", "").split())
  width = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
  ident = ""
  if "cpu family" in info and "model" in info:
    ident = f" (family {info['cpu family']} model {info['model']})"
  return f"{_cpu_model()}{ident}, {width}" if flags else _cpu_model()


def device_label() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"CPU ({cpu_description()}, {os.cpu_count()} cores)"
  return f"{jax.device_count()} x {d.device_kind}"


def peak_flops(device_kind: str) -> float | None:
  """The dense bf16 peak of a device kind (PEAK_BF16_FLOPS), None if unknown."""
  for key, flops in PEAK_BF16_FLOPS:
    if key.lower() in device_kind.lower():
      return flops
  return None


def peak_flops_per_chip() -> float | None:
  d = jax.devices()[0]
  return None if d.platform == "cpu" else peak_flops(d.device_kind)


@dataclasses.dataclass(frozen=True)
class Interconnect:
  """A chip's peak and links as tcl_jax.tools.scaling's step-time model uses them.

  `link_bytes_per_s`: what one chip moves per second, one direction, to the chips of its domain
  (TPU: its whole slice over ICI; GPU: the GPUs of its node over NVLink). Groups larger than
  `domain_size` cross nodes at `cross_node_bytes_per_s` per chip.
  """

  name: str
  peak_bf16_flops: float
  link_bytes_per_s: float
  domain_size: int  # chips reached at link_bytes_per_s (a TPU slice: every chip)
  cross_node_bytes_per_s: float | None = None


# Sources (public datasheets, read 2026-12):
#   TPU v4: 275 TFLOP/s bf16; "all-reduce bandwidth per Pod 1.1 PB/s" over 4096 chips
#     = 269 GB/s per chip (cloud.google.com/tpu/docs/v4, key specifications).
#   TPU v5e: 197 TFLOP/s bf16; bidirectional ICI 400 GB/s per chip -> 200 GB/s one way, which
#     is also the pod's 51.2 TB/s all-reduce bandwidth over 256 chips (cloud.google.com/tpu/
#     docs/v5e).
#   TPU v5p: 459 TFLOP/s bf16; bidirectional ICI 1200 GB/s per chip -> 600 GB/s one way
#     (cloud.google.com/tpu/docs/v5p).
#   H100 SXM / H200 SXM: 989 TFLOP/s dense bf16; NVLink 4 900 GB/s total (bidirectional) per GPU
#     -> 450 GB/s one way, 8 GPUs per HGX node (nvidia.com H100 and H200 datasheets); across
#     nodes one 400 Gb/s NDR InfiniBand NIC per GPU = 50 GB/s (DGX H100 user guide: 8 x
#     ConnectX-7 400 Gb/s compute ports).
INTERCONNECTS = {
  "tpu-v4": Interconnect("TPU v4", peak_flops("TPU v4"), 1.1e15 / 4096, 1 << 30),
  "tpu-v5e": Interconnect("TPU v5e", peak_flops("TPU v5e"), 400e9 / 2, 256),
  "tpu-v5p": Interconnect("TPU v5p", peak_flops("TPU v5p"), 1200e9 / 2, 1 << 30),
  "h100": Interconnect("H100 SXM", peak_flops("H100"), 900e9 / 2, 8, 400e9 / 8),
  "h200": Interconnect("H200 SXM", peak_flops("H200"), 900e9 / 2, 8, 400e9 / 8),
}
