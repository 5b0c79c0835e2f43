"""tcl_jax.tools.scaling's worker: compiles the training step (and the evaluation window function)
for one mesh in its own process, and prints one JSON line of per-chip figures.

  python -m tcl_jax.tools.scaling_worker '{"target": "v4:2x2x2", "batch": 64, ...}'

Without a target the devices are this process's (fake CPU devices: the parent sets
`--xla_force_host_platform_device_count`); with one they are the TPU slice's compile-only
devices and the TPU compiler compiles (the parent sets aot.COMPILE_ENV).
"""

import json
import sys
import time

from tcl_jax.tools import aot
from tcl_jax.tools import scaling


def _per_chip_bytes(tree, shardings) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  total = 0
  for x, s in zip(leaves, shards):
    n = 1
    for d in s.shard_shape(x.shape):
      n *= d
    total += n * x.dtype.itemsize
  return total


def load_config(config_args: list[str]):
  """The run config of `--config=FILE --config.a=b ...`, checked as tcl_jax.main checks it (a
  mistake is one `error:` line, exit status 2)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from tcl_jax.cli import config_files  # pylint: disable=g-import-not-at-top

  argv = ["scaling"] + list(config_args)
  if "config" not in flags.FLAGS:  # its overrides become flags from the argv it is defined with
    config_flags.DEFINE_config_file("config", None, "Training config file.", sys_argv=argv)
  config_files.parse_flags(argv)
  return flags.FLAGS.config


class _Program:
  """The training step to compile: bench's preset (ViT-B/16 or tiny dims) or a user's config."""

  def __init__(self, spec: dict):
    from tcl_jax.perf import timing  # pylint: disable=g-import-not-at-top

    self.spec = spec
    if spec.get("config_args"):
      self.config = load_config(spec["config_args"])
      if self.config.get("compute_dtype", "auto") == "auto":  # 'auto' on the target, not here
        self.config.compute_dtype = "bfloat16"
      self.cfg, self.res = None, int(self.config.input.image_size)
    else:
      self.config = None
      self.cfg, self.res = timing.preset(spec["preset"])

  def setup(self, per_chip: int, n: int, devices, one_chunk: bool = False):
    """The step, its mesh and abstract state and batch; `one_chunk`: the objective's captions in
    one chunk (for FLOP counts: the same program without the loop)."""
    from tcl_jax.perf import timing  # pylint: disable=g-import-not-at-top

    if self.config is not None:
      config = self.config.copy_and_resolve_references()
      config.batch_size = per_chip * n
      if one_chunk:
        config.model.caption_chunk = per_chip * n
      return timing.setup_config(config, self.res, materialize=False, devices=devices)
    if self.spec["mesh"] == "data":
      mesh_config = timing.MESH
    else:  # the recipe's data x fsdp mesh and rules (configs/tcl.py:fsdp=K)
      from tcl_jax.configs import common  # pylint: disable=g-import-not-at-top

      mesh_config = common.mesh_config(self.spec["fsdp"])
    cfg = self.cfg.replace(caption_chunk=per_chip * n) if one_chunk else self.cfg
    return timing.setup(
      cfg,
      self.res,
      per_chip * n,
      "bfloat16",
      remat=False,
      materialize=False,
      mesh_config=mesh_config,
      devices=devices,
    )

  def describe(self) -> dict:
    if self.config is not None:
      return {"dtype": self.config.compute_dtype, "remat": bool(self.config.get("remat", False))}
    return {"dtype": "bfloat16", "remat": False}


def _lowered_flops(lowered) -> float | None:
  """XLA's cost analysis of the lowered (unoptimised) step, bench's model FLOPs. A target's
  compile-only client analyses compiled programs only: there the CPU client analyses the same
  HLO (jax internals; None if they moved)."""
  import jax  # pylint: disable=g-import-not-at-top

  from tcl_jax.perf import timing  # pylint: disable=g-import-not-at-top

  try:
    return timing.cost_flops(lowered.cost_analysis())
  except (jax.errors.JaxRuntimeError, NotImplementedError):
    pass
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top

    module = lowered._lowering.hlo().as_hlo_module()
    cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
    return timing.cost_flops(cost)
  except Exception:  # pylint: disable=broad-except
    return None


def _program_flops(compiled, devices, fallback):
  """The compiled program's own FLOP count per chip (the TPU's cost analysis), else `fallback`
  (the lowered step's / N: the CPU and GPU compilers give none)."""
  flops = (compiled.cost_analysis() or {}).get("flops") if devices is not None else None
  return flops or fallback


def compile_train(program: _Program, per_chip: int, devices, hbm, full: bool = True) -> dict:
  """Lower and compile the step at `per_chip` images per chip; per-chip memory and the
  compiler's verdict, and with `full` its FLOPs, collectives and state bytes."""
  import jax  # pylint: disable=g-import-not-at-top

  from tcl_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from tcl_jax.models import conv  # pylint: disable=g-import-not-at-top
  from tcl_jax.perf import timing  # pylint: disable=g-import-not-at-top
  from tcl_jax.train import optim  # pylint: disable=g-import-not-at-top

  n = len(devices) if devices else jax.device_count()
  # The accelerators' program: XLA attention (bench's FLOP count) and native convolutions (on CPU
  # the decoder runs im2col/sub-pixel matmuls, whose gradient all-reduce carries 16-tap kernels).
  with clip_lib.force_attention("xla"), conv.force_native_conv():
    mesh, step, state, batch = program.setup(per_chip, n, devices)
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      lowered = step.lower(state, batch)
      if devices is None:  # the CPU compiler has no memory limit to refuse
        compiled, oom = lowered.compile(), None
      else:
        compiled, oom = aot.compile_or_oom(lowered)
      compile_s = time.perf_counter() - t0
  out = {"per_chip_batch": per_chip, "global_batch": per_chip * n, "compile_s": compile_s}
  out.update(aot.memory_row(compiled, oom, hbm))
  if devices is None:
    out["fits"] = None  # fake CPU devices: no memory limit, no verdict
  program.mesh, program.params = mesh, state.params  # for the evaluation's compile
  if not full:
    return out
  # XLA's cost analyses count a loop's body once: the objective's caption-chunk loop would be
  # under-counted by its other iterations. The model FLOPs come from the step lowered as one
  # chunk (timing.model_flops does the same), and the TPU program's own count gets the difference.
  chunked_flops = _lowered_flops(lowered)
  with clip_lib.force_attention("xla"), conv.force_native_conv():
    _, step1, state1, batch1 = program.setup(per_chip, n, devices, one_chunk=True)
    with jax.set_mesh(mesh):
      model_flops = _lowered_flops(step1.lower(state1, batch1))
  missing = (model_flops - chunked_flops) / n if model_flops and chunked_flops else 0.0
  out["resolution"] = program.res
  out.update(program.describe())
  out["model_flops_per_chip"] = model_flops / n if model_flops else None
  if compiled is None:
    out.update(flops_per_chip=None, collectives=None, ops=None)
  else:
    # The TPU program's own count (per chip) plus the loop's uncounted iterations; on CPU, the
    # lowered step's / N as bench counts.
    program_flops = _program_flops(compiled, devices, None)
    out["flops_per_chip"] = (
      program_flops + missing if program_flops else out["model_flops_per_chip"]
    )
    ops = scaling.collectives(compiled.as_text(), n)
    out.update(collectives=scaling.by_kind(ops), ops=ops)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  optim_config = program.config.optim if program.config is not None else timing.OPTIM
  labels = optim.param_labels(state.params, optim_config.frozen_regex, optim_config.ust_regex)
  trainable = [
    x for x, l in zip(jax.tree.leaves(state.params), jax.tree.leaves(labels)) if l != optim.FROZEN
  ]
  out["param_bytes_per_chip"] = _per_chip_bytes(state.params, state_sharding.params)
  out["opt_state_bytes_per_chip"] = _per_chip_bytes(state.opt_state, state_sharding.opt_state)
  out["trainable_param_bytes"] = sum(x.size * x.dtype.itemsize for x in trainable)
  out["mesh"] = dict(zip(mesh.axis_names, (int(d) for d in mesh.devices.shape)))
  return out


def max_batch(program: _Program, start: int, devices, hbm) -> dict:
  """The largest per-chip batch whose step the TPU compiler fits on this slice (aot's
  bounded search). Memory depends on the global batch too (the objective's all-pairs terms), so
  this is per slice, not bench --max-batch's linear fit."""
  return aot.search_max_batch(
    lambda b: compile_train(program, b, devices, hbm, full=False)["fits"], start
  )


def measure_eval(cfg, mesh, abstract_params, per_chip: int, protocol, devices) -> dict:
  """The zero-shot window function as evaluation shards it (params replicated, windows split)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from tcl_jax import kinds  # pylint: disable=g-import-not-at-top

  n = mesh.devices.size
  zs = kinds.zero_shot_model(cfg)
  repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh.axis_names))
  spec = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
  params = jax.tree.map(lambda x: spec(x.shape, x.dtype, repl), abstract_params)
  text = spec((21, cfg.clip.embed_dim), "float32", repl)  # VOC's 20 classes + background
  c = protocol.crop
  windows = spec((per_chip * n, c, c, 3), "float32", split)
  fn = jax.jit(
    lambda p, t, w: zs.window_masks(
      p, t, w, pamr=bool(protocol.pamr), kp_w=float(protocol.kp_w), simmaps=False
    )
  )
  t0 = time.perf_counter()
  with jax.default_matmul_precision("highest"):  # as evaluate_tasks runs it
    lowered = fn.lower(params, text, windows)
    flops = _lowered_flops(lowered)
    if devices is None:
      compiled, oom = lowered.compile(), None
    else:
      compiled, oom = aot.compile_or_oom(lowered)
  out = {
    "windows_per_chip": per_chip,
    "window": c,
    "classes": 21,
    "pamr": bool(protocol.pamr),
    "dtype": "float32",
    "compile_s": time.perf_counter() - t0,
    "model_flops_per_chip": flops / n if flops else None,
    "fits": compiled is not None if devices is not None else None,
  }
  if compiled is not None:
    ops = scaling.collectives(compiled.as_text(), n)
    out["flops_per_chip"] = _program_flops(compiled, devices, out["model_flops_per_chip"])
    out.update(collectives=scaling.by_kind(ops), ops=ops)
    out["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
  else:
    out["needs_bytes"] = oom[0]
  return out


def measure(spec: dict) -> dict:
  """One row of the report: this process's devices or spec["target"]'s slice."""
  import jax  # pylint: disable=g-import-not-at-top

  from tcl_jax.models import conv  # pylint: disable=g-import-not-at-top
  from tcl_jax.zeroshot import protocol as protocol_lib  # pylint: disable=g-import-not-at-top

  devices, hbm = None, None
  compiler = f"cpu ({jax.device_count()} fake devices)"
  if spec.get("target"):
    target, topology = aot.parse_target(spec["target"])
    devices = aot.devices(target, topology)
    hbm = aot.hbm_bytes(target, devices[0])
    compiler = aot.compiler_version(target)
  n = len(devices) if devices else jax.device_count()
  per_chip = spec["global_batch"] // n if spec.get("global_batch") else spec["batch"]
  program = _Program(spec)
  train = compile_train(program, per_chip, devices, hbm)
  row = {"chips": n, "devices": n, "target": spec.get("target"), "compiler": compiler}
  row["device_kind"] = (devices or jax.devices())[0].device_kind
  for key in ("per_chip_batch", "global_batch", "fits", "needs_bytes", "hbm_bytes", "temp_bytes",
              "argument_bytes", "output_bytes", "mesh"):  # fmt: skip
    row[key] = train[key]
  row["train"] = train
  if spec.get("eval_windows") and program.cfg is not None:
    with conv.force_native_conv():
      row["eval"] = measure_eval(
        program.cfg,
        program.mesh,
        program.params,
        spec["eval_windows"],
        protocol_lib.Protocol(),
        devices,
      )
  if spec.get("max_batch") and devices is not None:
    row["max_batch"] = max_batch(program, max(per_chip, 1), devices, hbm)
  return row


def main(argv) -> int:
  spec = json.loads(argv[1])
  print(json.dumps(measure(spec)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
