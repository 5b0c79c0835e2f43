"""Ahead-of-time compilation for a TPU slice or GPU nodes on any host, with the target's own
compiler: libtpu for TPUs (the `tpu` extra), the CUDA plugin for NVIDIA GPUs (the `gpu` extra);
both run on a CPU-only machine.

`jax.experimental.topologies.get_topology_desc` gives compile-only devices of a slice (e.g. 64 v4
chips, "v4:4x4x4") or of GPU nodes (8 H100s per node, from an XLA target config: no GPU needed);
jitted functions lower and compile for them as they would there. The TPU compiler refuses what
does not fit its HBM (`RESOURCE_EXHAUSTED: CompileTimeHbmOom`), which `compile_or_oom` turns into
a verdict. The GPU compiler checks no memory: there the verdict compares its memory_analysis with
the share of the GPU's memory JAX takes (`GPU_MEMORY_FRACTION`). tcl_jax.tools.scaling runs this
in worker processes that start with `compile_env(target)`.
"""

import dataclasses
import importlib.util
import math
import os
import re

# What a worker's environment needs for libtpu on a host without TPU chips: JAX's own backend stays
# the CPU (the topology's devices are compile-only); libtpu looks for no TPU workers or metadata
# server and prints nothing about them; several workers (or a user's other jobs) may load libtpu at
# once (its lockfile is for processes that own TPU chips).
COMPILE_ENV = {
  "JAX_PLATFORMS": "cpu",
  "TPU_SKIP_MDS_QUERY": "1",
  "TPU_WORKER_HOSTNAMES": "localhost",
  "TPU_HOST_BOUNDS": "1,1,1",
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}
INSTALL_HINT = {"tpu": 'pip install -e ".[tpu]"', "cuda": 'pip install -e ".[gpu]"'}
# JAX preallocates 75% of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION) and runs in that.
GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU generation or NVIDIA GPU as --target names it, the topologies its compiler takes, and
  its chips.INTERCONNECTS entry."""

  name: str
  platform: str  # "tpu" or "cuda"
  interconnect: str
  dims: int  # TPU: 3-D torus or 2-D; GPU: 2 (nodes x GPUs per node)
  shapes: tuple  # (chips, topology) as slices / nodes come
  prefix: str = ""  # libtpu's topology prefix ("v5" is v5p)
  chip_config: str = ""  # v4, v5p: one megacore device per chip
  memory_bytes: int = 0  # GPU: the device's memory (nvidia-smi's total)
  description: str = ""  # GPU: the device name CUDA reports


# Slice shapes as Cloud TPU makes them (MaxText's accelerator_to_spec_map lists the same).
_3D = ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"), (64, "4x4x4"), (128, "4x4x8"),
       (256, "4x8x8"), (512, "8x8x8"), (1024, "8x8x16"))  # fmt: skip
_2D = ((1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"),
       (256, "16x16"))  # fmt: skip
# GPU nodes: NODESxGPUS, 8 GPUs per HGX node.
_NODES = ((1, "1x1"), (8, "1x8"), (16, "2x8"), (32, "4x8"), (64, "8x8"), (128, "16x8"),
          (256, "32x8"))  # fmt: skip
MIB = 2**20
TARGETS = {
  "v4": Target("v4", "tpu", "tpu-v4", 3, _3D, prefix="v4", chip_config="megacore"),
  "v5e": Target("v5e", "tpu", "tpu-v5e", 2, _2D, prefix="v5e", chip_config="default"),
  "v5p": Target("v5p", "tpu", "tpu-v5p", 3, _3D, prefix="v5", chip_config="megacore"),
  "h100": Target(
    "h100", "cuda", "h100", 2, _NODES, memory_bytes=81559 * MIB, description="NVIDIA H100 80GB HBM3"
  ),  # fmt: skip
  "h200": Target(
    "h200", "cuda", "h200", 2, _NODES, memory_bytes=143771 * MIB, description="NVIDIA H200"
  ),  # fmt: skip
}


def gpu_target_config(target: Target) -> str:
  """XLA's GpuTargetConfig (text proto) of an SXM Hopper GPU: 132 SMs, compute capability 9.0 (the
  fields of XLA's gpu_specs; H100 and H200 SXM differ in memory size and bandwidth)."""
  bandwidth = {"h100": 3352320000000, "h200": 4800000000000}[target.name]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {target.memory_bytes} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{target.description}"
"""


def compile_env(target: Target) -> dict:
  """The environment a worker compiling for `target` starts with."""
  return COMPILE_ENV if target.platform == "tpu" else {"JAX_PLATFORMS": "cpu"}


def parse_target(spec: str) -> tuple[Target, str | None]:
  """`v4` or `v5e:8x8` -> (Target, topology or None); ValueError says what is wrong."""
  name, _, topology = spec.strip().partition(":")
  if name not in TARGETS:
    raise ValueError(f"--target {spec!r}: give one of {', '.join(TARGETS)}, optionally :TOPOLOGY")
  target = TARGETS[name]
  if topology and not re.fullmatch(r"\d+(x\d+){%d}" % (target.dims - 1), topology):
    example = dict(target.shapes).get(64, target.shapes[-1][1])
    raise ValueError(
      f"--target {spec!r}: a {name} topology has {target.dims} dimensions, e.g. {name}:{example}"
    )
  return target, topology or None


def topology_chips(topology: str) -> int:
  return math.prod(int(d) for d in topology.split("x"))


def topology_for(target: Target, chips: int) -> str:
  shapes = dict(target.shapes)
  if chips not in shapes:
    raise ValueError(
      f"no {target.name} slice of {chips} chips here; give one of "
      f"{', '.join(str(c) for c in shapes)} or --target {target.name}:TOPOLOGY"
    )
  return shapes[chips]


def libtpu_version() -> str | None:
  """The installed libtpu's version (or the library TPU_LIBRARY_PATH names), None without one."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top

    return getattr(libtpu, "__version__", "unknown")
  except ImportError:
    pass
  path = os.environ.get("TPU_LIBRARY_PATH")
  return f"at {path}" if path and os.path.isfile(path) else None


def cuda_plugin_version() -> str | None:
  """The installed JAX CUDA plugin's name and version, None without one."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  for name in ("jax-cuda13-plugin", "jax-cuda12-plugin"):
    try:
      if importlib.util.find_spec(name.replace("-", "_")) is not None:
        return f"{name} {metadata.version(name)}"
    except (ValueError, metadata.PackageNotFoundError):  # hidden (sys.modules) or no metadata
      continue
  return None


def compiler_version(target: Target) -> str | None:
  """The target's compiler as the report names it, None where it is not installed."""
  if target.platform == "tpu":
    v = libtpu_version()
    return v and f"tpu (libtpu {v})"
  v = cuda_plugin_version()
  return v and f"cuda ({v}, deviceless)"


def devices(target: Target, topology: str) -> list:
  """The compile-only devices of a slice or of GPU nodes (needs compile_env(target) set before
  jax starts)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  if target.platform == "cuda":  # NODESxGPUS; the plugin's topology is slices x hosts x devices
    nodes, gpus = topology.split("x")
    return topologies.get_topology_desc(
      platform="cuda", target_config=gpu_target_config(target), topology=f"1x{nodes}x{gpus}"
    ).devices
  name = f"{target.prefix}:{topology}"
  return topologies.get_topology_desc(
    platform="tpu", topology_name=name, chip_config_name=target.chip_config
  ).devices


# "... the total memory required for HLO temporaries (30.86G) exceeds available HBM (30.75G)."
# The compiler's "temporaries" here include the program's arguments (tests/test_scaling.py).
_OOM = re.compile(
  r"CompileTimeHbmOom.*?\(([\d.]+)\s*([KMGTP]?)i?B?\)\s*exceeds available HBM\s*"
  r"\(([\d.]+)\s*([KMGTP]?)i?B?\)",
  re.S,
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def parse_oom(message: str) -> tuple[int, int] | None:
  """(bytes needed, bytes available) from a CompileTimeHbmOom message, None for other errors."""
  m = _OOM.search(message)
  if not m:
    return None
  return (
    round(float(m.group(1)) * _UNITS[m.group(2)]),
    round(float(m.group(3)) * _UNITS[m.group(4)]),
  )


def compile_or_oom(lowered):
  """(compiled, None), or (None, (needed, available)) where the TPU compiler finds that the
  program does not fit the chip's HBM; any other failure raises."""
  import jax  # pylint: disable=g-import-not-at-top

  try:
    return lowered.compile(), None
  except jax.errors.JaxRuntimeError as e:
    oom = parse_oom(str(e))
    if oom is None:
      raise
    return None, oom


def hbm_bytes(target: Target, device) -> int:
  """The memory one chip offers a program. TPU: as the TPU compiler counts it (compile-only
  devices report no memory stats, so a program that needs 1 TiB is compiled for one chip and the
  refusal read). GPU: JAX's share of the device's memory."""
  if target.platform == "cuda":
    return int(GPU_MEMORY_FRACTION * target.memory_bytes)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def huge(x):
    y = jnp.sin(jnp.broadcast_to(x, (2**14, 2**14, 2**10)))  # 1 TiB of float32
    y = jax.lax.optimization_barrier(y)
    return y.sum() + y.max()

  x = jax.ShapeDtypeStruct((), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
  _, oom = compile_or_oom(jax.jit(huge).lower(x))
  if oom is None:
    raise RuntimeError("the TPU compiler accepted a 1 TiB program: cannot read its HBM size")
  return oom[1]


def memory_row(compiled, oom, hbm: int) -> dict:
  """Per-chip memory of a compiled program, or of the compiler's refusal, and the verdict."""
  if compiled is None:
    needed, available = oom
    return {"fits": False, "needs_bytes": needed, "hbm_bytes": available, "temp_bytes": None,
            "argument_bytes": None, "output_bytes": None, "alias_bytes": None}  # fmt: skip
  m = compiled.memory_analysis()
  total = (
    m.temp_size_in_bytes
    + m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.generated_code_size_in_bytes
  )
  return {
    "fits": total <= hbm if hbm else True,  # what the TPU compiler accepted fits (GPU: compared)
    "needs_bytes": total,
    "hbm_bytes": hbm,
    "temp_bytes": m.temp_size_in_bytes,
    "argument_bytes": m.argument_size_in_bytes,
    "output_bytes": m.output_size_in_bytes,
    "alias_bytes": m.alias_size_in_bytes,
  }


def verdict(row: dict) -> str:
  """'fits: 12.3 GiB of 30.8 GiB' / 'does not fit: needs 30.9 GiB of 30.8 GiB' (per chip)."""
  need, hbm = row["needs_bytes"] / 2**30, row["hbm_bytes"] / 2**30
  if row["fits"]:
    return f"fits: {need:.1f} GiB of {hbm:.1f} GiB"
  return f"does not fit: needs {need:.1f} GiB of {hbm:.1f} GiB"


def search_max_batch(fits, start: int, compiles: int = 8) -> dict:
  """The largest batch b with `fits(b)`, `fits` being monotone (a compile per call): doubling
  from `start` until it fails, then bisecting to a multiple of 8 (of 1 below 16); at most
  `compiles` calls. {max_per_chip_batch (0: none fits), smallest_refused, compiles: [...]}."""
  tried, lo, hi, b = [], 0, None, start
  while len(tried) < compiles:
    ok = bool(fits(b))
    tried.append({"per_chip_batch": b, "fits": ok})
    if ok:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)
    if hi is None:
      b *= 2
      continue
    step = 8 if lo >= 16 else 1
    if hi - lo <= step:
      break
    b = (lo + hi) // 2 if lo else max(hi // 2, 1)
    if lo >= 16:
      b = max(b // 8 * 8, lo + 8)
  return {"max_per_chip_batch": lo, "smallest_refused": hi, "compiles": tried}
