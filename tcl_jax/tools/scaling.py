"""A scaling report from compiled programs: per-chip memory, FLOPs and collective bytes of the
training and evaluation steps, compiled for TPU slices by the TPU compiler or on N fake CPU
devices, and the step time they predict on TPU/GPU pods.

  python -m tcl_jax.tools.scaling --target v4|v5e|v5p|h100|h200[,...] --chips 8,16,32,64,128
      [--batch 64 | --global-batch 1024] [--max-batch] [--preset vitb16|tiny] [--json F]
  python -m tcl_jax.tools.scaling --target v5e:8x8 --config=configs/tcl.py --config.batch_size=2048
  python -m tcl_jax.tools.scaling --devices 8,32,128,256 [--mesh data|data,fsdp] [--fsdp 8] ...

Nothing runs. For each slice (or N) a worker process (tools/scaling_worker.py) lowers and compiles
the real training step (perf.timing.setup: train_step's plan_training and make_jit_train_step, bf16
compute, XLA attention, native convolutions, remat off) at `--batch` images per chip (or
`--global-batch` over the slice: strong scaling), and the zero-shot window function as evaluation
shards it (the model kind's window_masks, PAMR and KP on, params replicated, 448x448 windows
split over the mesh, as zeroshot.evaluator.make_window_fn).

`--target` compiles with the target's own compiler for compile-only devices (tools/aot.py): a
TPU slice with libtpu (the `tpu` extra), H100/H200 nodes with JAX's CUDA plugin (the `gpu`
extra); neither needs the hardware. It says whether the program fits the chip's memory: on TPUs
the compiler's own verdict, a CompileTimeHbmOom being "does not fit: needs X GiB of Y"; on GPUs
(whose compiler checks no memory) memory_analysis against the 75% of the GPU's memory JAX takes.
`--max-batch` adds the largest per-chip batch that fits each slice (a bounded search over
compiles). With `--config` it compiles a user's run config (model, batch_size, mesh, remat,
compute_dtype) for one slice and answers in three lines. `--devices` compiles on N fake CPU
devices instead (a subprocess with `--xla_force_host_platform_device_count=N`): no verdict.

From each compiled program, per chip:
- memory: HLO temporaries, arguments and outputs (`memory_analysis()`), the chip's HBM as the TPU
  compiler counts it;
- FLOPs: the TPU program's cost analysis; on CPU, XLA's cost analysis of the lowered
  (unoptimised) step / N, as bench counts model FLOPs;
- collective bytes by kind: every all-reduce, all-gather, reduce-scatter, all-to-all and
  collective-permute op in the compiled (SPMD-partitioned, per-device) HLO text, each counted
  once at the bytes of its result shape (all elements of a tuple result). So an all-gather counts
  the gathered array, a reduce-scatter its shard, an all-reduce the reduced array. The group size
  of each op comes from its replica_groups;
- parameter, optimizer-state and trainable-parameter bytes (from the state shardings).

Predicted step time on a chip of chips.INTERCONNECTS (a TPU target's own chip; every chip for
fake-CPU runs), per op (bytes B, group of n chips, one-way bandwidth W: the chip's link, or the
cross-node link when the group is larger than the node): all-reduce 2(n-1)/n B/W (ring),
all-gather and all-to-all (n-1)/n B/W, reduce-scatter (n-1) B/W, collective-permute B/W;
bandwidth only (no per-hop latency). Compute = FLOPs / (peak x `--mfu`). Step = compute +
(1 - `--overlap`) x communication: by default nothing overlaps (an upper bound; XLA's async
collectives hide some of the gradient all-reduce behind the backward pass). Efficiency, relative
to the smallest slice that fits: weak scaling step(N0) / step(N); strong scaling (`--global-batch`)
N0 step(N0) / (N step(N)); communication efficiency = compute / step.
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
# The parent: one worker process per slice (or N), then the prediction
# ----------------------------------------------------------------------------------------------


def _chip_keys(row) -> list[str]:
  from tcl_jax.perf import chips  # pylint: disable=g-import-not-at-top
  from tcl_jax.tools import aot  # pylint: disable=g-import-not-at-top

  if row.get("target"):  # a TPU program predicts its own chip only
    return [aot.parse_target(row["target"])[0].interconnect]
  return list(chips.INTERCONNECTS)


def predict(results, mfu: float, overlap: float, strong: bool = False) -> dict:
  """{chip: {chip, rows: [{devices, compute_s, comm_s, step_s, efficiency, comm_efficiency}]}}
  for each chip a row was compiled for, over the rows that fit; efficiency relative to the
  smallest of them (weak scaling, or strong with `strong`)."""
  from tcl_jax.perf import chips  # pylint: disable=g-import-not-at-top

  out = {}
  for r in sorted(results, key=lambda r: r["devices"]):
    if r["train"].get("flops_per_chip") is None:  # refused by the compiler: nothing to time
      continue
    for key in _chip_keys(r):
      chip, t = chips.INTERCONNECTS[key], r["train"]
      compute = t["flops_per_chip"] / (chip.peak_bf16_flops * mfu)
      comm = comm_seconds(t["ops"], chip)
      by_kind_s = {
        k: comm_seconds([o for o in t["ops"] if o["kind"] == k], chip) for k in COLLECTIVES
      }
      row = {"devices": r["devices"], "compute_s": compute, "comm_s": comm}
      row.update(step_s=compute + (1 - overlap) * comm, comm_by_kind_s=by_kind_s)
      out.setdefault(key, {"chip": chip.name, "rows": []})["rows"].append(row)
  for p in out.values():
    first = p["rows"][0]
    for row in p["rows"]:
      scale = row["devices"] / first["devices"] if strong else 1
      row["efficiency"] = first["step_s"] / (scale * row["step_s"])
      row["comm_efficiency"] = row["compute_s"] / row["step_s"]
  return out


def _run_worker(spec: dict, n: int | None = None) -> dict:
  from tcl_jax.tools import aot  # pylint: disable=g-import-not-at-top

  env = dict(os.environ)
  if spec.get("target"):
    env.update(aot.compile_env(aot.parse_target(spec["target"])[0]))
  else:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "tcl_jax.tools.scaling_worker", json.dumps(spec)]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if r.returncode:
    lines = r.stderr.strip().splitlines()
    errors = [l for l in lines if l.startswith("error: ")]  # the worker's own usage error line
    where = spec.get("target") or f"{n} devices"
    detail = errors[-1][len("error: ") :] if errors else " | ".join(lines[-3:])
    raise RuntimeError(f"{where}: {detail}" if errors else f"{where}: worker exited "
                       f"{r.returncode}: {detail}")  # fmt: skip
  return json.loads(r.stdout.strip().splitlines()[-1])


def _fmt_bytes(b: float) -> str:
  return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def _gib(b) -> str:
  return f"{b / 2**30:.1f} GiB"


def _label(r) -> str:
  return f"{r['target']} ({r['chips']} chips)" if r.get("target") else f"{r['devices']} devices"


def print_report(results, prediction) -> None:
  from tcl_jax.tools import aot  # pylint: disable=g-import-not-at-top

  for r in results:
    t = r["train"]
    line = f"{_label(r)}, global batch {r['global_batch']} ({r['per_chip_batch']} per chip): "
    line += aot.verdict(r) if r["fits"] is not None else f"temporaries {_gib(r['temp_bytes'])}"
    if t.get("flops_per_chip") is not None:
      c = t["collectives"]
      line += f"; {t['flops_per_chip'] / 1e12:.2f} TFLOP/chip; " + ", ".join(
        f"{k} {_fmt_bytes(c[k]['bytes'])}" for k in COLLECTIVES if c[k]["ops"]
      )
    if r.get("max_batch"):
      line += f"; largest per-chip batch that fits: {r['max_batch']['max_per_chip_batch']}"
    e = r.get("eval")
    if e and e.get("flops_per_chip") is not None:
      n_ops = sum(c["ops"] for c in e["collectives"].values())
      line += (f"; evaluation {e['flops_per_chip'] / 1e12 / e['windows_per_chip']:.2f} TFLOP per "
               f"{e['window']}² window, {n_ops} collectives")  # fmt: skip
    print(line)
  for p in prediction.values():
    print(f"# {p['chip']}")
    for row in p["rows"]:
      print(
        f"{row['devices']:>7}  step {row['step_s'] * 1e3:8.1f} ms  compute "
        f"{row['compute_s'] * 1e3:8.1f} ms  comm {row['comm_s'] * 1e3:7.2f} ms  efficiency "
        f"{100 * row['efficiency']:5.1f}%  comm-eff {100 * row['comm_efficiency']:5.1f}%"
      )


def _step_cell(result, key, n) -> str:
  row = next((x for x in result["prediction"].get(key, {}).get("rows", []) if x["devices"] == n),
             None)  # fmt: skip
  if row is None:
    return "-"
  eff = f"{100 * row['efficiency']:.0f}% ({100 * row['comm_efficiency']:.0f}%)"
  return f"{row['step_s'] * 1e3:.0f} ms, {eff}"


def readme_table(result: dict) -> list[str]:
  """The README's markdown table of a report's `result` (header, rule, rows): for fake-CPU
  reports a column per chip; for TPU reports a row per slice with the compiler's verdict."""
  measured = sorted(result["measured"], key=lambda r: (r.get("target") or "", r["devices"]))
  lines = []
  if not any(r.get("target") for r in measured):
    chips_ = (("tpu-v4", "TPU v4"), ("tpu-v5e", "TPU v5e"), ("tpu-v5p", "TPU v5p"),
              ("h100", "H100/H200"))  # fmt: skip
    head = ["chips", "global batch", "TFLOP/chip", "all-gather/chip", "all-reduce/chip"]
    head += [name for _, name in chips_]
    for r in measured:
      t, c, n = r["train"], r["train"]["collectives"], r["devices"]
      cells = [str(n), str(t["global_batch"]), f"{t['flops_per_chip'] / 1e12:.2f}"]
      cells += [f"{c[k]['bytes'] / 2**20:.1f} MiB" for k in ("all-gather", "all-reduce")]
      cells += [_step_cell(result, key, n) for key, _ in chips_]
      lines.append(cells)
  else:
    head = ["slice", "chips", "global batch", "per chip", "fits (per chip)", "TFLOP/chip"]
    head += ["all-gather/chip", "all-reduce/chip", "step, efficiency (comm.)", "max per chip"]
    for r in measured:
      t = r["train"]
      fits = f"yes, {r['needs_bytes'] / 2**30:.1f} of {r['hbm_bytes'] / 2**30:.1f} GiB"
      if not r["fits"]:
        fits = f"no: needs {r['needs_bytes'] / 2**30:.1f} of {r['hbm_bytes'] / 2**30:.1f} GiB"
      cells = [r["target"], str(r["chips"]), str(r["global_batch"]), str(r["per_chip_batch"]), fits]
      if t.get("flops_per_chip") is None:
        cells += ["-", "-", "-"]
      else:
        c = t["collectives"]
        cells.append(f"{t['flops_per_chip'] / 1e12:.2f}")
        cells += [f"{c[k]['bytes'] / 2**20:.1f} MiB" for k in ("all-gather", "all-reduce")]
      cells.append(_step_cell(result, _chip_keys(r)[0], r["devices"]))
      cells.append(str(r["max_batch"]["max_per_chip_batch"]) if r.get("max_batch") else "-")
      lines.append(cells)
  rows = [head, ["---"] * len(head)] + lines
  return ["| " + " | ".join(cells) + " |" for cells in rows]


# ----------------------------------------------------------------------------------------------
# A user's config on one slice (--config)
# ----------------------------------------------------------------------------------------------


def answer(row, prediction, config_file: str, mfu: float) -> list[str]:
  """Three lines: what was compiled, the compiler's verdict, the predicted step."""
  from tcl_jax.tools import aot  # pylint: disable=g-import-not-at-top

  t = row["train"]
  mesh = " x ".join(f"{k}={v}" for k, v in row["mesh"].items())
  lines = [
    f"{config_file} on {row['target']} ({row['chips']} x {row['device_kind']}), {row['compiler']}:"
    f" global batch {row['global_batch']} ({row['per_chip_batch']} per chip), {t['dtype']}, "
    f"remat {'on' if t['remat'] else 'off'}, mesh {mesh}"
  ]
  if row["fits"]:
    lines.append(
      f"{aot.verdict(row)} per chip (temporaries {_gib(row['temp_bytes'])}, arguments "
      f"{_gib(row['argument_bytes'])}, outputs {_gib(row['output_bytes'] - t['alias_bytes'])} "
      "beyond the donated state)"
    )
    p = next(iter(prediction.values()))
    s = p["rows"][0]
    ms = lambda x: f"{x * 1e3:.3g} ms"
    lines.append(
      f"predicted step on {p['chip']}: {ms(s['step_s'])} (compute {ms(s['compute_s'])} at "
      f"{100 * mfu:.0f}% MFU, communication {ms(s['comm_s'])}), "
      f"{row['global_batch'] / s['step_s']:.0f} images/s"
    )
  else:
    why = "the TPU compiler's CompileTimeHbmOom"
    if not row["compiler"].startswith("tpu"):
      why = f"its memory_analysis over JAX's {aot.GPU_MEMORY_FRACTION:.0%} of the GPU's memory"
    lines.append(f"{aot.verdict(row)} per chip ({why})")
    lines.append("try a smaller --config.batch_size, --config.remat=True or a larger slice")
  return lines


def _split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """(the --config / --config.x=v arguments, the rest)."""
  config, rest, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if re.match(r"^--?(no)?config(\.|=|$)", arg):
      config.append(arg)
      if re.match(r"^--?config$", arg) and i + 1 < len(argv):
        config.append(argv[i + 1])
        i += 1
    else:
      rest.append(arg)
    i += 1
  return config, rest


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
    prog="python -m tcl_jax.tools.scaling",
    description=__doc__.split("\n\n")[0],  # a whole sentence
  )
  ap.add_argument("--target", default=None, help="v4,v5e,v5p,h100,h200, or one v5e:8x8 / h100:2x8")
  ap.add_argument("--chips", default=None, help="slice sizes with --target, e.g. 8,16,32,64")
  ap.add_argument("--devices", default=None, help="fake CPU device counts (default 8,32,128,256)")
  ap.add_argument("--mesh", default="data", choices=["data", "data,fsdp"])
  ap.add_argument("--fsdp", type=int, default=8, help="fsdp axis size with --mesh data,fsdp")
  ap.add_argument(
    "--preset", default="vitb16", choices=["vitb16", "tiny"], help="model dims (default vitb16)"
  )
  ap.add_argument("--batch", type=int, default=64, help="training images per chip")
  ap.add_argument("--global-batch", type=int, default=0, help="fixed global batch (strong scaling)")
  ap.add_argument("--max-batch", action="store_true", help="largest per-chip batch that fits")
  ap.add_argument("--eval-windows", type=int, default=1, help="448x448 windows per chip (0: none)")
  ap.add_argument("--mfu", type=float, default=0.45, help="assumed model FLOPs utilisation")
  ap.add_argument("--overlap", type=float, default=0.0, help="fraction of comm hidden by compute")
  ap.add_argument("--json", dest="json_out", default=None, help="also write the report here")
  return ap


def _int_list(flag: str, value: str) -> list[int]:
  from tcl_jax.cli.config_files import usage_error  # pylint: disable=g-import-not-at-top

  try:
    out = [int(d) for d in value.split(",") if d.strip()]
  except ValueError:
    usage_error(f"{flag} {value!r}: give comma-separated integers, e.g. 8,32,128")
  if not out or min(out) < 1:
    usage_error(f"{flag}: give at least one count >= 1")
  return out


def _slices(args) -> list[tuple[str | None, int]]:
  """(target spec or None, chips) per worker, checked before any work."""
  from tcl_jax.cli.config_files import usage_error  # pylint: disable=g-import-not-at-top
  from tcl_jax.tools import aot  # pylint: disable=g-import-not-at-top

  if args.target is None:
    return [(None, n) for n in _int_list("--devices", args.devices or "8,32,128,256")]
  if args.devices:
    usage_error("--devices (fake CPU devices) and --target (a TPU slice) exclude each other")
  out = []
  try:
    for spec in args.target.split(","):
      target, topology = aot.parse_target(spec)
      if topology:
        if args.chips and _int_list("--chips", args.chips) != [aot.topology_chips(topology)]:
          usage_error(f"--chips {args.chips}: --target {spec} has {aot.topology_chips(topology)}")
        out.append((f"{target.name}:{topology}", aot.topology_chips(topology)))
        continue
      for n in _int_list("--chips", args.chips or "8,32,64,128,256"):
        out.append((f"{target.name}:{aot.topology_for(target, n)}", n))
  except ValueError as e:
    usage_error(str(e))
  for platform, what in (("tpu", "the TPU compiler (libtpu)"), ("cuda", "JAX's CUDA plugin")):
    used = [s for s, _ in out if aot.parse_target(s)[0].platform == platform]
    if used and aot.compiler_version(aot.parse_target(used[0])[0]) is None:
      usage_error(
        f"--target {used[0].split(':')[0]} needs {what}, which runs on any CPU host: "
        f"{aot.INSTALL_HINT[platform]}"
      )
  return out


def main(argv=None) -> int:
  from tcl_jax.cli.config_files import usage_error  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv[1:] if argv is None else argv)
  config_args, rest = _split_config_args(argv)
  args = _parser().parse_args(rest)
  slices = _slices(args)
  fsdp = args.fsdp if args.mesh == "data,fsdp" else 1
  if fsdp < 1 or any(n % fsdp for _, n in slices):
    usage_error(f"--fsdp {args.fsdp} must be >= 1 and divide every slice's chips")
  if args.batch < 1 or args.eval_windows < 0 or args.global_batch < 0:
    usage_error("--batch must be >= 1, --global-batch and --eval-windows >= 0")
  if args.global_batch and any(args.global_batch % n for _, n in slices):
    usage_error(f"--global-batch {args.global_batch} must divide over every slice's chips")
  if not 0 < args.mfu <= 1 or not 0 <= args.overlap <= 1:
    usage_error("--mfu must be in (0, 1] and --overlap in [0, 1]")
  spec = {"preset": args.preset, "batch": args.batch, "global_batch": args.global_batch,
          "mesh": args.mesh, "fsdp": fsdp, "eval_windows": args.eval_windows,
          "max_batch": args.max_batch}  # fmt: skip
  if config_args:
    if len(slices) != 1 or slices[0][0] is None:
      usage_error("--config compiles for one TPU slice: give --target with a topology (v5e:8x8)")
    from tcl_jax.tools import scaling_worker  # pylint: disable=g-import-not-at-top

    config = scaling_worker.load_config(config_args)  # usage errors before any compile
    if config.batch_size % slices[0][1]:
      usage_error(f"batch_size {config.batch_size} does not divide over {slices[0][1]} chips")
    spec.update(config_args=config_args, eval_windows=0, batch=config.batch_size // slices[0][1])
  results = []
  for target, n in slices:
    t0 = time.perf_counter()
    try:
      results.append(_run_worker(dict(spec, target=target), n))
    except RuntimeError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    results[-1]["wall_s"] = time.perf_counter() - t0
    if not config_args:
      print(f"# {_label(results[-1])} compiled in {results[-1]['wall_s']:.0f} s", flush=True)
  prediction = predict(results, args.mfu, args.overlap, strong=bool(args.global_batch))
  if config_args:
    config_file = next(a for a in config_args if not a.startswith("--config."))
    print("\n".join(answer(results[0], prediction, config_file.split("=", 1)[-1], args.mfu)))
  else:
    print_report(results, prediction)
    print("\n".join(readme_table({"measured": results, "prediction": prediction})))  # README's
  if args.json_out:
    _write_json(args, argv, results, prediction)
  return 0


def _write_json(args, argv, results, prediction) -> None:
  import platform  # pylint: disable=g-import-not-at-top

  from tcl_jax.perf import chips  # pylint: disable=g-import-not-at-top

  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
  ).stdout.strip()
  compilers = sorted({r["compiler"] for r in results})
  report = {
    "what": "tcl_jax.tools.scaling: per-chip memory, FLOPs and collective bytes of the compiled "
    "training and evaluation steps, and predicted step times",
    "compiler": ", ".join(compilers),
    "command": "python -m tcl_jax.tools.scaling " + " ".join(argv),
    "machine": f"{os.cpu_count()}-core {chips.cpu_description()}, CPU only, {platform.platform()}",  # pylint: disable=protected-access
    "date": time.strftime("%Y-%m-%d", time.gmtime()),
    "commit": commit or None,
    "assumptions": {"mfu": args.mfu, "overlap": args.overlap},
    "scaling": "strong" if args.global_batch else "weak",
    "result": {"measured": results, "prediction": prediction},
  }
  with open(args.json_out, "w") as f:
    json.dump(report, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
