"""A scaling report from compiled programs: per-chip FLOPs and collective bytes of the training
and evaluation steps on N fake CPU devices, and the step time they predict on TPU/GPU pods.

  python -m tcl_jax.tools.scaling --devices 8,32,128,256 [--mesh data|data,fsdp] [--fsdp 8]
      [--preset vitb16|tiny] [--batch 64] [--mfu 0.45] [--overlap 0] [--json F]

Nothing runs: for each N a subprocess with `--xla_force_host_platform_device_count=N` (it must be
set before jax starts) lowers and compiles the real training step (bench._setup: train_step's
plan_training and make_jit_train_step, bf16 compute, XLA attention, remat off) at `--batch`
images per chip, and the zero-shot window function as evaluation shards it (the model kind's
window_masks, PAMR and KP on, params replicated, 448x448 windows split over the mesh, as
zeroshot.evaluator.make_window_fn). From each compiled program:

- FLOPs per chip: XLA's cost analysis of the lowered (unoptimised) step / N, as bench counts
  model FLOPs.
- Collective bytes per chip, by kind: every all-reduce, all-gather, reduce-scatter, all-to-all
  and collective-permute op in the compiled (SPMD-partitioned, per-device) HLO text, each counted
  once at the bytes of its result shape (all elements of a tuple result). So an all-gather counts
  the gathered array, a reduce-scatter its shard, an all-reduce the reduced array. The group size
  of each op comes from its replica_groups.
- Parameter, optimizer-state and trainable-parameter bytes per chip (from the state shardings).

Predicted step time on a chip of chips.INTERCONNECTS, per op (bytes B, group of n chips, one-way
bandwidth W: the chip's link, or the cross-node link when the group is larger than the node):
all-reduce 2(n-1)/n B/W (ring), all-gather and all-to-all (n-1)/n B/W, reduce-scatter (n-1) B/W,
collective-permute B/W; bandwidth only (no per-hop latency). Compute = FLOPs / (peak x `--mfu`).
Step = compute + (1 - `--overlap`) x communication: by default nothing overlaps (an upper bound;
XLA's async collectives hide some of the gradient all-reduce behind the backward pass).
Weak-scaling efficiency = step(smallest N) / step(N); communication efficiency = compute / step.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
  "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_OP = re.compile(r"=\s+(?P<shape>.*?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: an array `f32[8,4]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def _group_size(line: str, num_devices: int) -> int:
  m = _MESH_GROUPS.search(line)  # replica_groups=mesh['data'=8,'fsdp'=2] {'data'}
  if m:
    sizes = dict((k.strip("'"), int(v)) for k, v in re.findall(r"('[^']*')=(\d+)", m.group(1)))
    n = 1
    for axis in re.findall(r"'([^']*)'", m.group(2)):
      n *= sizes[axis]
    return n
  m = _IOTA_GROUPS.search(line)  # replica_groups=[2,4]<=[8]: 2 groups of 4
  if m:
    return int(m.group(1).split(",")[-1])
  m = _LIST_GROUPS.search(line)  # replica_groups={{0,1,2,3},{4,5,6,7}}
  if m and m.group(1):
    return len(m.group(1).split(","))
  return num_devices  # replica_groups={}: every device


def collectives(hlo_text: str, num_devices: int) -> list[dict]:
  """Every collective op of a compiled module's HLO text: kind, result bytes, group size.
  An async pair (`-start`/`-done`, GPU/TPU) counts once, at its start's last result (the CPU
  backend emits synchronous ops)."""
  ops = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    shape = m.group("shape")
    if m.group("start") and m.group("op") in ("all-gather", "collective-permute"):
      arrays = _ARRAY.findall(shape)  # (operand, result[, context]): the result
      shape = f"{arrays[1][0]}[{arrays[1][1]}]" if len(arrays) > 1 else shape
    ops.append(
      {
        "kind": m.group("op"),
        "bytes": shape_bytes(shape),
        "group": _group_size(line, num_devices),
        "name": line.split("=", 1)[0].strip().lstrip("%"),
      }
    )
  return ops


def by_kind(ops) -> dict:
  out = {k: {"ops": 0, "bytes": 0} for k in COLLECTIVES}
  for op in ops:
    out[op["kind"]]["ops"] += 1
    out[op["kind"]]["bytes"] += op["bytes"]
  return out


def comm_seconds(ops, chip) -> float:
  """Bandwidth-only time of the ops on `chip` (chips.Interconnect), see the module docstring."""
  total = 0.0
  for op in ops:
    n, b = op["group"], op["bytes"]
    if n <= 1:
      continue
    w = chip.link_bytes_per_s if n <= chip.domain_size else chip.cross_node_bytes_per_s
    factor = {
      "all-reduce": 2 * (n - 1) / n,
      "all-gather": (n - 1) / n,
      "all-to-all": (n - 1) / n,
      "reduce-scatter": n - 1,
      "collective-permute": 1.0,
    }[op["kind"]]
    total += factor * b / w
  return total


# ----------------------------------------------------------------------------------------------
# The worker: one N, in its own process (jax imported after XLA_FLAGS is set)
# ----------------------------------------------------------------------------------------------


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


def measure(preset: str, per_chip_batch: int, mesh_axes, fsdp: int, eval_windows: int) -> dict:
  """Compile the training and evaluation steps on this process's (fake) devices; per-chip
  counts. Needs jax already started with the wanted device count."""
  import jax  # pylint: disable=g-import-not-at-top

  from tcl_jax import bench  # pylint: disable=g-import-not-at-top
  from tcl_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from tcl_jax.models import tcl as tcl_lib  # pylint: disable=g-import-not-at-top
  from tcl_jax.train import optim  # pylint: disable=g-import-not-at-top
  from tcl_jax.zeroshot import protocol as protocol_lib  # pylint: disable=g-import-not-at-top

  n = jax.device_count()
  if mesh_axes == ("data",):
    mesh_config = bench.MESH
  else:  # the recipe's data x fsdp mesh and rules (configs/tcl.py:fsdp=K)
    from tcl_jax.configs import common  # pylint: disable=g-import-not-at-top

    mesh_config = common.mesh_config(fsdp)
  cfg, res = bench.preset(preset)
  out = {"devices": n, "mesh": dict(zip(mesh_axes, (n // fsdp, fsdp) if fsdp > 1 else (n,)))}
  # The accelerators' program: XLA attention (bench's FLOP count) and native convolutions (on CPU
  # the decoder runs im2col/sub-pixel matmuls, whose gradient all-reduce carries 16-tap kernels).
  with clip_lib.force_attention("xla"), tcl_lib.force_native_conv():
    mesh, step, state, batch = bench._setup(  # pylint: disable=protected-access
      cfg,
      res,
      per_chip_batch * n,
      "bfloat16",
      remat=False,
      materialize=False,
      mesh_config=mesh_config,
    )
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      lowered = step.lower(state, batch)
      flops = bench._flops(lowered.cost_analysis())  # pylint: disable=protected-access
      compiled = lowered.compile()
      compile_s = time.perf_counter() - t0
  ops = collectives(compiled.as_text(), n)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  labels = optim.param_labels(state.params, bench.OPTIM.frozen_regex, bench.OPTIM.ust_regex)
  trainable = [
    x for x, l in zip(jax.tree.leaves(state.params), jax.tree.leaves(labels)) if l != optim.FROZEN
  ]
  out["train"] = {
    "per_chip_batch": per_chip_batch,
    "global_batch": per_chip_batch * n,
    "resolution": res,
    "dtype": "bfloat16",
    "compile_s": compile_s,
    "flops_per_chip": flops / n if flops else None,
    "collectives": by_kind(ops),
    "ops": ops,
    "param_bytes_per_chip": _per_chip_bytes(state.params, state_sharding.params),
    "opt_state_bytes_per_chip": _per_chip_bytes(state.opt_state, state_sharding.opt_state),
    "trainable_param_bytes": sum(x.size * x.dtype.itemsize for x in trainable),
  }
  if eval_windows:
    with tcl_lib.force_native_conv():
      out["eval"] = _measure_eval(cfg, mesh, state.params, eval_windows, protocol_lib.Protocol())
  return out


def _measure_eval(cfg, mesh, abstract_params, per_chip: int, protocol) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from tcl_jax import bench  # pylint: disable=g-import-not-at-top
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
    flops = bench._flops(lowered.cost_analysis())  # pylint: disable=protected-access
    compiled = lowered.compile()
  ops = collectives(compiled.as_text(), n)
  return {
    "windows_per_chip": per_chip,
    "window": c,
    "classes": 21,
    "pamr": bool(protocol.pamr),
    "dtype": "float32",
    "compile_s": time.perf_counter() - t0,
    "flops_per_chip": flops / n if flops else None,
    "collectives": by_kind(ops),
    "ops": ops,
  }


# ----------------------------------------------------------------------------------------------
# The parent: one subprocess per N, then the prediction
# ----------------------------------------------------------------------------------------------


def predict(results, mfu: float, overlap: float) -> dict:
  """{chip: [{devices, compute_s, comm_s, step_s, efficiency, comm_efficiency}]} for every chip
  of chips.INTERCONNECTS, efficiency relative to the smallest N measured."""
  from tcl_jax.perf import chips  # pylint: disable=g-import-not-at-top

  out = {}
  for key, chip in chips.INTERCONNECTS.items():
    rows = []
    for r in sorted(results, key=lambda r: r["devices"]):
      t = r["train"]
      compute = t["flops_per_chip"] / (chip.peak_bf16_flops * mfu)
      comm = comm_seconds(t["ops"], chip)
      step = compute + (1 - overlap) * comm
      rows.append(
        {
          "devices": r["devices"],
          "compute_s": compute,
          "comm_s": comm,
          "step_s": step,
          "comm_by_kind_s": {
            k: comm_seconds([o for o in t["ops"] if o["kind"] == k], chip) for k in COLLECTIVES
          },
        }
      )
    for row in rows:
      row["efficiency"] = rows[0]["step_s"] / row["step_s"]
      row["comm_efficiency"] = row["compute_s"] / row["step_s"]
    out[key] = {"chip": chip.name, "rows": rows}
  return out


def _run_worker(n: int, args) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "tcl_jax.tools.scaling", "--worker", "--preset", args.preset]
  cmd += ["--batch", str(args.batch), "--mesh", args.mesh, "--fsdp", str(args.fsdp)]
  cmd += ["--eval-windows", str(args.eval_windows)]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if r.returncode:
    tail = r.stderr.strip().splitlines()[-3:]
    raise RuntimeError(f"{n} devices: worker exited {r.returncode}: " + " | ".join(tail))
  return json.loads(r.stdout.strip().splitlines()[-1])


def _fmt_bytes(b: float) -> str:
  return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def print_report(results, prediction) -> None:
  print("devices  TFLOP/chip  " + "  ".join(f"{k:>14}" for k in COLLECTIVES) + "  params/opt/chip")
  for r in results:
    t = r["train"]
    c = t["collectives"]
    print(
      f"{r['devices']:>7}  {t['flops_per_chip'] / 1e12:10.3f}  "
      + "  ".join(f"{_fmt_bytes(c[k]['bytes']):>14}" for k in COLLECTIVES)
      + f"  {_fmt_bytes(t['param_bytes_per_chip'])}/{_fmt_bytes(t['opt_state_bytes_per_chip'])}"
    )
  for p in prediction.values():
    print(f"# {p['chip']}")
    for row in p["rows"]:
      print(
        f"{row['devices']:>7}  step {row['step_s'] * 1e3:8.1f} ms  compute "
        f"{row['compute_s'] * 1e3:8.1f} ms  comm {row['comm_s'] * 1e3:7.2f} ms  weak-scaling "
        f"{100 * row['efficiency']:5.1f}%  comm-eff {100 * row['comm_efficiency']:5.1f}%"
      )


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
    prog="python -m tcl_jax.tools.scaling",
    description=__doc__.split("\n\n")[0],  # a whole sentence
  )
  ap.add_argument("--devices", default="8,32,128,256", help="comma-separated device counts")
  ap.add_argument(
    "--mesh",
    default="data",
    choices=["data", "data,fsdp"],
    help="data parallel, or the recipe's data x fsdp mesh (default data)",
  )
  ap.add_argument("--fsdp", type=int, default=8, help="fsdp axis size with --mesh data,fsdp")
  ap.add_argument(
    "--preset", default="vitb16", choices=["vitb16", "tiny"], help="model dims (default vitb16)"
  )
  ap.add_argument("--batch", type=int, default=64, help="training images per chip")
  ap.add_argument("--eval-windows", type=int, default=1, help="448x448 windows per chip (0: none)")
  ap.add_argument("--mfu", type=float, default=0.45, help="assumed model FLOPs utilisation")
  ap.add_argument("--overlap", type=float, default=0.0, help="fraction of comm hidden by compute")
  ap.add_argument("--json", dest="json_out", default=None, help="also write the report here")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  return ap


def main(argv=None) -> int:
  from tcl_jax.cli.config_files import usage_error  # pylint: disable=g-import-not-at-top

  args = _parser().parse_args(argv)
  try:
    devices = [int(d) for d in args.devices.split(",") if d.strip()]
  except ValueError:
    usage_error(f"--devices {args.devices!r}: give comma-separated integers, e.g. 8,32,128")
  if not devices or min(devices) < 1:
    usage_error("--devices: give at least one device count >= 1")
  fsdp = args.fsdp if args.mesh == "data,fsdp" else 1
  if fsdp < 1 or any(n % fsdp for n in devices):
    usage_error(f"--fsdp {args.fsdp} must be >= 1 and divide every --devices count")
  if args.batch < 1 or args.eval_windows < 0:
    usage_error("--batch must be >= 1 and --eval-windows >= 0")
  if not 0 < args.mfu <= 1 or not 0 <= args.overlap <= 1:
    usage_error("--mfu must be in (0, 1] and --overlap in [0, 1]")
  if args.worker:
    r = measure(args.preset, args.batch, tuple(args.mesh.split(",")), fsdp, args.eval_windows)
    print(json.dumps(r))
    return 0
  results = []
  for n in devices:
    t0 = time.perf_counter()
    try:
      results.append(_run_worker(n, args))
    except RuntimeError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    results[-1]["wall_s"] = time.perf_counter() - t0
    print(f"# {n} devices lowered and compiled in {results[-1]['wall_s']:.0f} s", flush=True)
  prediction = predict(results, args.mfu, args.overlap)
  print_report(results, prediction)
  if args.json_out:
    import platform  # pylint: disable=g-import-not-at-top

    from tcl_jax.perf import chips  # pylint: disable=g-import-not-at-top

    commit = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    report = {
      "what": "tcl_jax.tools.scaling: per-chip FLOPs and collective bytes of the compiled "
      "training and evaluation steps on fake CPU devices, and predicted step times",
      "command": "python -m tcl_jax.tools.scaling " + " ".join(argv or sys.argv[1:]),
      "machine": f"{os.cpu_count()}-core {chips._cpu_model()}, CPU only, {platform.platform()}",  # pylint: disable=protected-access
      "date": time.strftime("%Y-%m-%d", time.gmtime()),
      "commit": commit or None,
      "assumptions": {"mfu": args.mfu, "overlap": args.overlap},
      "result": {"measured": results, "prediction": prediction},
    }
    with open(args.json_out, "w") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
