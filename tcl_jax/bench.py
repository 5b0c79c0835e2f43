"""Training and evaluation throughput of tcl_jax on this host's devices, with MFU.

  python -m tcl_jax.bench                          # ViT-B/16 dims, the full training step + eval
  python -m tcl_jax.bench --batch 64 --remat       # per-device batch, rematerialised blocks
  python -m tcl_jax.bench --max-batch              # at the largest per-device batch that fits
  python -m tcl_jax.bench --torch-ref DIR          # + the original PyTorch TCL, same device/batch
  python -m tcl_jax.bench --no-train --eval-images 4 --torch-ref DIR --torch-python VENV/bin/python
  python -m tcl_jax.bench --json out.json

Training: the jitted `tcl_jax.train.step.train_step` (forward, backward, clipping, AdamW update) on a
data-parallel mesh over all local devices, random weights and in-memory random batches, the
masker backbone trainable (after UST). Compute is bfloat16 on accelerators and float32 on CPU
(`--dtype` overrides), parameters float32. Reported: step time (mean over `--steps` steps after
two warm-up steps), images/s, compile time, peak device memory, and MFU = model FLOPs per step /
(step time x devices x the chip's peak bf16 FLOP/s). Model FLOPs come from XLA's cost analysis of
the lowered step with remat off and XLA attention (cuDNN's fused attention is opaque to it), so
remat's recomputation does not count as useful work. On CPU no MFU is given.

Evaluation windows: `generate_masks` (the zero-shot protocol's per-window call, float32 as
evaluate.py runs it) on batches of 448x448 windows with 21 classes (VOC + background), with and
without PAMR.

Evaluation per image (`--eval-images N`, `--eval-sizes HxW,...`): the whole zero-shot protocol
as tcl_jax.zeroshot runs it, `pipeline.predict` with the tcl kind's window function
(`evaluator.make_window_fn`) and `Protocol`'s defaults: keep-ratio resize to img_scale
(2048, 448), 448 crop / 224 stride windows (8 per model call), PAMR, KP 0.3, background 0.4,
window averaging, resize back, argmax to a host label map; one device, float32 at "highest"
matmul precision (as evaluate_tasks). Synthetic BGR images cycling through the sizes (default
VOC's 500x375 both ways: 448x597 / 597x448 after the resize, 2 windows each), 20 text classes +
background, random weights. A warm-up pass over one image of each size compiles first. Reported
(`"what": "eval_image"`): s/image, images/s, windows/s, warm-up time. Needs OpenCV and the
engine's imports (Pillow, tqdm, tokenizers); where they are missing this part is skipped with
a `# eval per image skipped` line.

`--torch-ref DIR` times the original first, in subprocesses, on the same device: its training
step at the same per-device batch (tcl_jax.perf.bench_torch), and, for the per-image evaluation, its
own path on the same images (tcl_jax.perf.bench_torch_eval: mmseg's test pipeline, then
slide_inference feeding one window at a time to TCLSegInference.encode_decode, float32, with as
many CPU threads as there are cores). It prints our images/s over the original's for each
(`ratio_vs_original` in our records). `--torch-python` names the interpreter for those
subprocesses (one with torch, einops and OpenCV), if not this one. Without `--torch-ref` no
ratio is printed: a figure measured on another machine is not a ratio. `--no-train` skips the
training step (and its reference).

Needs only jax, flax, optax and numpy: no TensorFlow, clu, ml_collections or dataset (and no
OpenCV, except for the per-image evaluation).
"""

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax import kinds
from tcl_jax import sharding
from tcl_jax.kinds import base
from tcl_jax.models import clip as clip_lib
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.perf import bench_torch_eval
from tcl_jax.perf import chips
from tcl_jax.train import step as step_lib

# The original's forward+backward on CPU (shared/reference/time_reference.py), for context only.
ORIGINAL_CPU_REFERENCE = (
  "original PyTorch TCL, ViT-B/16 dims, batch 4 at 224x224, float32 "
  "forward+backward: 9.2 s/step on a 2-core Intel Xeon (Sapphire Rapids) VM"
)


class Fields(dict):
  """A dict that reads like an ml_collections.ConfigDict (attributes, .get, .to_dict): the few
  config fields train/optim/sharding read, without needing ml_collections here."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  def to_dict(self):
    return {k: v.to_dict() if isinstance(v, Fields) else v for k, v in self.items()}


# configs/common.py:tcl_optim() (tests/test_bench.py keeps the two equal), with UST off so that
# the masker backbone trains as after step 30k: the full step.
OPTIM = Fields(
  base_lr=3e-4,
  min_lr=4e-5,
  lr_scale_reference_batch=4096,
  warmup_steps=15000,
  warmup_start_factor=1e-4,
  ust_steps=0,
  weight_decay=0.05,
  clip_grad=5.0,
  b1=0.9,
  b2=0.999,
  eps=1e-6,
  frozen_regex=r"^clip/",
  ust_regex=r"^masker/backbone/",
)
MESH = Fields(shape=(-1,), axes=("data",), axis_types="auto", param_rules=((".*", "replicate"),))


def preset(name: str) -> tuple[tcl_lib.TCLConfig, int]:
  """(model config, training resolution): `vitb16` = the paper's dims (configs/tcl.py), `tiny` =
  the shared fixture's (tests)."""
  if name == "tiny":
    return tcl_lib.tiny_config(), 96
  if name == "vitb16":
    return tcl_lib.TCLConfig(clip=clip_lib.CLIPConfig(), ie_freeze=11), 224
  raise ValueError(f"unknown preset {name!r} (tiny, vitb16)")


def _random_batch(batch: int, res: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch, 77), np.int32)
  tokens[:, 0], tokens[:, 9] = 49406, 49407
  tokens[:, 1:9] = rng.integers(300, 40000, (batch, 8))
  return {"image": rng.standard_normal((batch, res, res, 3), np.float32), "text_tokens": tokens}


def _peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats()
  return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def setup(
  cfg,
  res,
  global_batch,
  dtype: str,
  remat: bool,
  materialize: bool = True,
  mesh_config=MESH,
  devices=None,
):
  """Mesh, model, optimizer, jitted step and its inputs, as train.train_and_evaluate builds them
  (with `materialize=False` the inputs are ShapeDtypeStructs, nothing allocated: enough to lower
  the step; tcl_jax.tools.scaling lowers it so on other meshes, or on a TPU topology's
  compile-only `devices`)."""
  config = Fields(
    model=Fields(cfg.to_dict()),
    compute_dtype=dtype,
    remat=remat,
    optim=OPTIM,
    mesh=mesh_config,
    seed=0,
    total_steps=50_000,
    batch_size=global_batch,
  )
  return setup_config(config, res, materialize, devices)


def setup_config(config, res: int, materialize: bool = True, devices=None):
  """`setup` from a run's config (model, compute_dtype, remat, optim, mesh, seed, total_steps,
  batch_size), at `res`x`res` images: tcl_jax.tools.scaling compiles a user's config so."""
  global_batch = config.batch_size
  model = kinds.build_model(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  batch_sharding, repl = sharding.data_sharding(mesh), sharding.repl_sharding(mesh)
  plan = step_lib.plan_training(config, model, mesh)
  abstract_state, state_sharding = plan.abstract_state, plan.state_sharding
  step = step_lib.make_jit_train_step(
    model=model,
    tx=plan.tx,
    labels=plan.labels,
    schedule=plan.schedule,
    config=config,
    state_sharding=state_sharding,
    batch_sharding=batch_sharding,
    repl=repl,
  )
  if not materialize:
    spec = lambda x, s, n=None: jax.ShapeDtypeStruct(
      x.shape if n is None else (n,) + x.shape[1:], x.dtype, sharding=s
    )
    one = _random_batch(1, res)  # an example's shapes (the global batch could fill host memory)
    return (
      mesh,
      step,
      jax.tree.map(spec, abstract_state, state_sharding),
      jax.tree.map(lambda x: spec(x, batch_sharding, global_batch), one),
    )
  with jax.set_mesh(mesh):
    init_rng, state_rng = step_lib.init_rngs(config)
    params = jax.jit(model.init, out_shardings=state_sharding.params)(init_rng)
    create = functools.partial(step_lib.create_train_state, tx=plan.tx)
    state = jax.jit(create, out_shardings=state_sharding)(params, state_rng)
    batch = sharding.to_global(_random_batch(global_batch, res), batch_sharding)
  return mesh, step, state, batch


def model_flops(preset_name: str, per_device_batch: int, dtype: str) -> float | None:
  """Model FLOPs of one training step on the global batch: XLA's cost analysis of the lowered
  (unoptimised) step, remat off, XLA attention. No compilation. None where the backend gives no
  cost analysis of unoptimised HLO (jax 0.11's CUDA backend)."""
  cfg, res = preset(preset_name)
  global_batch = per_device_batch * jax.device_count()
  # One caption chunk: XLA's cost analysis counts a loop's body once, not per iteration.
  cfg = cfg.replace(caption_chunk=global_batch)
  with clip_lib.force_attention("xla"):
    mesh, step, state, batch = setup(cfg, res, global_batch, dtype, remat=False, materialize=False)
    with jax.set_mesh(mesh):
      cost = step.lower(state, batch).cost_analysis()
  return cost_flops(cost)


def cost_flops(cost) -> float | None:
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def train_bench(
  preset_name: str = "vitb16",
  per_device_batch: int = 8,
  steps: int = 10,
  dtype: str = "auto",
  remat: bool = False,
) -> dict:
  """The full training step: compile time, step time, images/s, peak memory, MFU."""
  cfg, res = preset(preset_name)
  dtype = base.resolve_compute_dtype(dtype).name
  n = jax.device_count()
  global_batch = per_device_batch * n
  mesh, step, state, batch = setup(cfg, res, global_batch, dtype, remat)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    for _ in range(2):  # warm-up (first-run allocations, autotuning)
      state, metrics, _ = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics, _ = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
  flops, flops_source = (
    model_flops(preset_name, per_device_batch, dtype),
    "XLA cost analysis of the lowered step (remat off, XLA attention)",
  )
  if flops is None and not remat:  # the compiled step's count (fusions, cuDNN kernels unseen),
    per_device = cost_flops(compiled.cost_analysis())  # which is per device (the SPMD partition)
    flops = per_device * n if per_device is not None else None
    flops_source = "XLA cost analysis of the compiled step"
  peak = chips.peak_flops_per_chip()
  return {
    "what": "train_step",
    "preset": preset_name,
    "device": chips.device_label(),
    "devices": n,
    "per_device_batch": per_device_batch,
    "global_batch": global_batch,
    "resolution": res,
    "dtype": dtype,
    "remat": remat,
    "compile_s": compile_s,
    "step_s": step_s,
    "images_per_s": global_batch / step_s,
    "peak_memory_gib": _peak_memory_gib(),
    # XLA's buffer assignment for the step (per device): arguments + outputs + temporaries
    "step_memory_gib": (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
      + mem.temp_size_in_bytes
    )
    / 2**30,
    "model_flops_per_step": flops,
    "flops_source": flops_source if flops else None,
    "mfu": flops / (step_s * n * peak) if peak and flops else None,
    "loss": float(jax.device_get(metrics["loss"])),
  }


def max_batch(
  preset_name: str,
  dtype: str,
  remat: bool,
  probe: int = 32,
  multiple: int = 8,
  headroom: float = 0.9,
) -> int:
  """Largest per-device batch (a multiple of `multiple`) predicted to fit in device memory.

  One compilation at batch `probe`; XLA's buffer assignment then gives the step's memory as
  fixed (parameters, optimizer state) + per-example (activations, the batch), which is linear in
  the batch. `headroom` leaves room for fragmentation. Needs a device that reports its memory
  limit (GPU, TPU).
  """
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    raise ValueError("--max-batch needs a device that reports its memory limit (GPU, TPU)")
  cfg, res = preset(preset_name)
  dtype = base.resolve_compute_dtype(dtype).name
  mesh, step, state, batch = setup(
    cfg, res, probe * jax.device_count(), dtype, remat, materialize=False
  )
  with jax.set_mesh(mesh):
    mem = step.lower(state, batch).compile().memory_analysis()
  batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) / jax.device_count()
  fixed = mem.argument_size_in_bytes - batch_bytes
  per_example = (
    mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + batch_bytes
  ) / probe
  fit = (headroom * stats["bytes_limit"] - fixed) / per_example
  return max(int(fit) // multiple * multiple, 0)


def eval_bench(
  preset_name: str = "vitb16",
  windows: int = 8,
  steps: int = 5,
  res: int = 448,
  num_classes: int = 21,
) -> list[dict]:
  """448x448 windows/s of mask inference with and without PAMR (KP branch on, kp_w 0.3)."""
  cfg, _ = preset(preset_name)
  params = tcl_lib.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((windows, res, res, 3)), jnp.float32)
  text = rng.standard_normal((num_classes, cfg.clip.embed_dim)).astype(np.float32)
  text = jnp.asarray(text / np.linalg.norm(text, axis=-1, keepdims=True))
  out = []
  for apply_pamr in (False, True):
    fn = functools.partial(
      kinds.zero_shot_model(cfg).window_masks, params, pamr=apply_pamr, kp_w=0.3, simmaps=False
    )
    t0 = time.perf_counter()
    jax.block_until_ready(fn(text, images))  # compile + first run
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      masks = fn(text, images)
    jax.block_until_ready(masks)
    dt = (time.perf_counter() - t0) / steps
    out.append(
      {
        "what": "eval_windows",
        "preset": preset_name,
        "device": chips.device_label(),
        "windows": windows,
        "resolution": res,
        "classes": num_classes,
        "pamr": apply_pamr,
        "dtype": "float32",
        "first_call_s": first_s,
        "batch_s": dt,
        "windows_per_s": windows / dt,
      }
    )
  return out


def eval_image_bench(
  preset_name: str = "vitb16",
  images: int = 4,
  sizes=bench_torch_eval.VOC_SIZES,
  num_classes: int = 20,
  protocol=None,
  seed: int = 0,
) -> dict:
  """The zero-shot protocol per image, end to end as tcl_jax.zeroshot runs it: `pipeline.predict`
  (keep-ratio resize, normalisation, sliding windows through the tcl kind's window function from
  `evaluator.make_window_fn`, window averaging, resize back, argmax) with the Protocol's defaults
  (or `protocol`), on one device, at "highest" matmul precision as evaluate_tasks. `num_classes`
  text classes plus the background channel; random weights; the images and class embeddings are
  bench_torch_eval's, which the original is timed on. A warm-up pass over one image of each size
  compiles every shape first."""
  from tcl_jax.zeroshot import evaluator  # pylint: disable=g-import-not-at-top
  from tcl_jax.zeroshot import pipeline  # pylint: disable=g-import-not-at-top  (OpenCV)

  protocol = protocol or pipeline.Protocol()
  cfg, _ = preset(preset_name)
  model = kinds.zero_shot_model(cfg)
  params = tcl_lib.init_params(cfg, jax.random.key(seed))
  text = jnp.asarray(bench_torch_eval.synthetic_text(num_classes, cfg.clip.embed_dim, seed))
  imgs = bench_torch_eval.synthetic_images(images, sizes, seed)
  warm = bench_torch_eval.synthetic_images(len(sizes), sizes, seed + 7)
  resized = [pipeline.mmcv_rescale_size(w, h, protocol.img_scale)[::-1] for h, w in sizes]
  with jax.default_matmul_precision("highest"):
    window_fn = evaluator.make_window_fn(model, params, text, protocol)
    predict = functools.partial(
      pipeline.predict,
      window_fn=window_fn,
      num_classes=num_classes,
      protocol=protocol,
      background=True,
    )
    t0 = time.perf_counter()
    for img in warm:
      predict(img)
    warm_s = time.perf_counter() - t0
    shapes, times = bench_torch_eval.time_images(lambda img: predict(img).labels, imgs)
  if shapes != [tuple(img.shape[:2]) for img in imgs]:
    raise RuntimeError(f"label maps of sizes {shapes} for images {[i.shape for i in imgs]}")
  windows = sum(
    len(pipeline.slide_windows(*resized[i % len(sizes)], protocol.crop, protocol.stride))
    for i in range(images)
  )
  return {
    "what": "eval_image",
    "impl": "tcl_jax",
    "preset": preset_name,
    "device": chips.device_label(),
    "threads": os.cpu_count() if jax.default_backend() == "cpu" else None,
    "precision": "float32 (matmul precision highest)",
    "images": images,
    "sizes": [list(s) for s in sizes],
    "resized": [list(s) for s in resized],
    "windows": windows,
    "classes": num_classes + 1,
    "window_batch": protocol.batch,
    "img_scale": list(protocol.img_scale),
    "crop": protocol.crop,
    "stride": protocol.stride,
    "pamr": protocol.pamr,
    "kp_w": protocol.kp_w,
    "bg_thresh": protocol.bg_thresh,
    **bench_torch_eval.timing_fields(warm_s, times, windows),
  }


def _run_module(module: str, args: list, python: str | None = None) -> dict:
  """`python -m module args` in a subprocess; its last stdout line as JSON. `python` (default
  this interpreter) may be another environment's, one with torch: the repo root goes on its
  PYTHONPATH so that it finds tcl_jax."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  r = subprocess.run(
    [python or sys.executable, "-m", module, *args], capture_output=True, text=True, env=env
  )
  if r.returncode:
    lines = r.stderr.strip().splitlines()
    raise RuntimeError(
      lines[-1].removeprefix("error: ") if lines else f"{module} exited {r.returncode}"
    )
  return json.loads(r.stdout.strip().splitlines()[-1])


def torch_eval_reference(
  ref_repo: str, images: int, sizes, num_classes: int, python: str | None = None
) -> dict:
  """The original's evaluation per image (tcl_jax.perf.bench_torch_eval) in a subprocess, with as
  many CPU threads as XLA's CPU client uses (all cores)."""
  args = ["--ref-repo", ref_repo, "--images", str(images), "--classes", str(num_classes)]
  args += ["--sizes", ",".join(f"{h}x{w}" for h, w in sizes), "--threads", str(os.cpu_count())]
  return _run_module("tcl_jax.perf.bench_torch_eval", args, python)


def torch_reference(
  ref_repo: str, per_device_batch: int, steps: int, res: int, python: str | None = None
) -> dict:
  """The original's training step in a subprocess (before JAX claims the device's memory)."""
  args = ["--ref-repo", ref_repo, "--batch", str(per_device_batch), "--steps", str(steps)]
  return _run_module("tcl_jax.perf.bench_torch", args + ["--resolution", str(res)], python)


def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m tcl_jax.bench", description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="vitb16", choices=["vitb16", "tiny"])
  ap.add_argument(
    "--batch",
    type=int,
    default=None,
    help="per-device training batch (default 8 on accelerators, 2 on CPU)",
  )
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
  ap.add_argument("--remat", action="store_true", help="recompute transformer blocks in backward")
  ap.add_argument(
    "--max-batch",
    action="store_true",
    help="time the largest per-device batch predicted to fit (GPU/TPU)",
  )
  ap.add_argument("--no-train", action="store_true", help="skip the training step (eval only)")
  ap.add_argument(
    "--eval-windows",
    type=int,
    default=None,
    help="448x448 windows per eval batch (default 8 on accelerators, 1 on CPU; "
    "0 skips the eval-window benchmark)",
  )
  ap.add_argument(
    "--eval-images",
    type=int,
    default=None,
    help="synthetic images through the whole zero-shot protocol (default 32 on accelerators, "
    "2 on CPU; 0 skips the eval-per-image benchmark)",
  )
  ap.add_argument(
    "--eval-sizes",
    default="375x500,500x375",
    metavar="HxW,...",
    help="the eval images' sizes before the resize, cycled (default: VOC's 500x375, both ways)",
  )
  ap.add_argument(
    "--eval-classes",
    type=int,
    default=20,
    help="text classes of the eval benchmarks, a background channel added (default 20: VOC)",
  )
  ap.add_argument(
    "--torch-ref",
    default=None,
    metavar="DIR",
    help="checkout of kakaobrain/tcl: also time the original (needs torch, einops)",
  )
  ap.add_argument(
    "--torch-python",
    default=None,
    metavar="PYTHON",
    help="interpreter that times the original (one with torch; default: this one)",
  )
  ap.add_argument("--json", dest="json_out", default=None)
  return ap


def _usage_error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def _eval_engine_missing() -> str | None:
  """Why the zero-shot engine cannot be imported here (OpenCV, Pillow, tqdm, tokenizers), or
  None: the eval-per-image benchmark is then skipped, the rest still runs on a bare image."""
  try:
    importlib.import_module("tcl_jax.zeroshot.evaluator")
  except ImportError as e:
    return str(e)
  return None


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.torch_ref and not os.path.isfile(os.path.join(args.torch_ref, "models", "tcl", "tcl.py")):
    return _usage_error(
      f"--torch-ref {args.torch_ref} is not a checkout of kakaobrain/tcl (no models/tcl/tcl.py)"
    )
  seg_file = os.path.join("segmentation", "evaluation", "tcl_seg.py")
  if args.torch_ref and not os.path.isfile(os.path.join(args.torch_ref, seg_file)):
    return _usage_error(
      f"--torch-ref {args.torch_ref} is not a checkout of kakaobrain/tcl (no {seg_file})"
    )
  if args.torch_ref and args.preset != "vitb16":
    return _usage_error("--torch-ref times the original at ViT-B/16; use it with --preset vitb16")
  if args.torch_python and not args.torch_ref:
    return _usage_error("--torch-python is the interpreter for --torch-ref; give --torch-ref too")
  if args.torch_python and not os.access(args.torch_python, os.X_OK):
    return _usage_error(f"--torch-python {args.torch_python} is not an executable")
  if args.steps < 1 or (args.batch is not None and args.batch < 1):
    return _usage_error("--steps and --batch must be >= 1")
  if (args.eval_images or 0) < 0 or (args.eval_windows or 0) < 0 or args.eval_classes < 1:
    return _usage_error("--eval-images and --eval-windows must be >= 0, --eval-classes >= 1")
  try:
    sizes = bench_torch_eval.parse_sizes(args.eval_sizes)
  except ValueError as e:
    return _usage_error(f"--eval-sizes: {e}")
  on_cpu = jax.default_backend() == "cpu"
  batch = args.batch or (2 if on_cpu else 8)
  if not args.no_train and not args.max_batch and batch * jax.device_count() < 2:
    # Checked here, not after a 40 s compile: each image's negatives are the batch's others.
    return _usage_error(
      f"--batch {batch} on {jax.device_count()} device: TCL's contrastive loss needs a global "
      "batch of at least 2; give --batch 2 or more"
    )
  _, res = preset(args.preset)
  eval_images = args.eval_images if args.eval_images is not None else (2 if on_cpu else 32)
  missing = _eval_engine_missing() if eval_images else None
  if missing:
    print(f"# eval per image skipped: the zero-shot engine needs what is missing here ({missing})")
    eval_images = 0

  results = []
  theirs = theirs_eval = None
  # The original first, in subprocesses: JAX keeps the device memory it takes until exit.
  if args.torch_ref and not args.no_train:
    try:
      theirs = torch_reference(args.torch_ref, batch, args.steps, res, args.torch_python)
    except RuntimeError as e:
      print(f"error: timing the original failed: {e}", file=sys.stderr)
      return 1
    results.append(theirs)
    print(json.dumps(theirs), flush=True)  # kept even if our step fails later
  if args.torch_ref and eval_images:
    try:
      theirs_eval = torch_eval_reference(
        args.torch_ref, eval_images, sizes, args.eval_classes, args.torch_python
      )
    except RuntimeError as e:
      print(f"error: timing the original's evaluation failed: {e}", file=sys.stderr)
      return 1
    results.append(theirs_eval)
    print(json.dumps(theirs_eval), flush=True)

  print(
    f"# {chips.device_label()}, backend {jax.default_backend()}, jax {jax.__version__}"
    + ("  (CPU: no MFU)" if on_cpu else "")
  )
  if not args.no_train:
    status = _train_and_report(args, batch, theirs, results, on_cpu)
    if status:
      return status

  if eval_images:
    ours = eval_image_bench(args.preset, eval_images, sizes, args.eval_classes)
    results.append(ours)
    shapes = ", ".join(
      f"{h}x{w}->{rh}x{rw}" for (h, w), (rh, rw) in zip(ours["sizes"], ours["resized"])
    )
    print(
      f"eval image  {ours['images']} images ({shapes}; {ours['windows']} windows of "
      f"{ours['crop']}² / stride {ours['stride']}), {ours['classes']} classes, PAMR, KP "
      f"{ours['kp_w']}: {ours['s_per_image']:.3f} s/image, {ours['images_per_s']:.3f} images/s, "
      f"{ours['windows_per_s']:.3f} windows/s (median image {ours['median_s_per_image']:.3f} s, "
      f"warm-up {ours['warmup_s']:.1f} s)"
    )
    if theirs_eval:
      ours["ratio_vs_original"] = ours["images_per_s"] / theirs_eval["images_per_s"]
      # Robust to one image slowed by another job on a shared host:
      ours["ratio_vs_original_median"] = (
        theirs_eval["median_s_per_image"] / ours["median_s_per_image"]
      )
      threads = f", {theirs_eval['threads']} threads" if theirs_eval["threads"] else ""
      print(
        f"original    same images and device{threads}, one window per encode_decode: "
        f"{theirs_eval['s_per_image']:.3f} s/image, {theirs_eval['images_per_s']:.3f} images/s, "
        f"{theirs_eval['windows_per_s']:.3f} windows/s (median image "
        f"{theirs_eval['median_s_per_image']:.3f} s)  ->  tcl_jax / original = "
        f"{ours['ratio_vs_original']:.2f}x (same run; "
        f"{ours['ratio_vs_original_median']:.2f}x on the median images)"
      )
  windows = args.eval_windows if args.eval_windows is not None else (1 if on_cpu else 8)
  if windows:
    for r in eval_bench(args.preset, windows, steps=max(1, args.steps // 2)):
      results.append(r)
      print(
        f"eval        {r['windows']} windows of {r['resolution']}², {r['classes']} classes, "
        f"PAMR {'on ' if r['pamr'] else 'off'}: {r['windows_per_s']:.2f} windows/s "
        f"(first call {r['first_call_s']:.1f} s)"
      )
  for r in results:
    if r is not theirs and r is not theirs_eval:  # (printed when measured)
      print(json.dumps(r))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=1)
  return 0


def _train_and_report(args, batch, theirs, results, on_cpu) -> int:
  """The training step (at the largest batch with --max-batch), printed; a non-zero exit status
  on a usage error or when nothing fits."""
  if args.max_batch:
    try:
      batch = max_batch(args.preset, args.dtype, args.remat)
    except ValueError as e:
      return _usage_error(str(e))
    print(f"# largest per-device batch predicted to fit: {batch}")
    if not batch:
      print("error: not even a per-device batch of 8 fits in device memory", file=sys.stderr)
      return 1
  ours = None
  while ours is None:
    try:
      ours = train_bench(args.preset, batch, args.steps, args.dtype, args.remat)
    except Exception as e:  # pylint: disable=broad-except
      if not ("RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()):
        raise
      if not args.max_batch or batch <= 8:
        print(
          f"error: per-device batch {batch} does not fit in device memory; try --max-batch",
          file=sys.stderr,
        )
        return 1
      batch = max(8, int(batch * 0.85) // 8 * 8)  # the prediction was optimistic
      print(f"# out of memory; retrying at per-device batch {batch}")
  results.append(ours)
  print(
    f"train step  {ours['preset']} batch {ours['global_batch']} ({batch}/device) at "
    f"{ours['resolution']}², {ours['dtype']}, remat {ours['remat']}: "
    f"{ours['step_s']:.4f} s/step, {ours['images_per_s']:.1f} images/s, "
    f"compile {ours['compile_s']:.1f} s, peak memory {_fmt(ours['peak_memory_gib'], '.2f')} GiB "
    f"(step buffers {ours['step_memory_gib']:.2f} GiB/device), "
    f"{_fmt(ours['model_flops_per_step'] and ours['model_flops_per_step'] / 1e12, '.3f')} "
    f"model TFLOP/step, "
    f"MFU {_fmt(ours['mfu'] and 100 * ours['mfu'], '.1f')}%"
  )
  if theirs:
    ours["ratio_vs_original"] = ours["images_per_s"] / theirs["images_per_s"]
    print(
      f"original    same device, batch {theirs['batch']}, {theirs['precision']}: "
      f"{theirs['step_s']:.4f} s/step, {theirs['images_per_s']:.1f} images/s  ->  "
      f"tcl_jax / original = {ours['ratio_vs_original']:.2f}x (same run)"
    )
  elif on_cpu and args.preset == "vitb16":
    print(
      f"reference   {ORIGINAL_CPU_REFERENCE} (another machine and step: no ratio; "
      f"--torch-ref DIR measures the original here)"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
