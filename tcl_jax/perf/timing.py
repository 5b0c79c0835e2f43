"""The benchmarks' library: presets (ViT-B/16, tiny), the training step on random weights and
in-memory batches (`setup`, `setup_config`), its model FLOPs (`model_flops`, `cost_flops`), and
the timers `python -m tcl_jax.bench` runs: `train_bench`, `max_batch`, `eval_bench`,
`eval_image_bench`, and the original's own timers in subprocesses (`torch_reference`,
`torch_eval_reference`). `tcl_jax.tools.scaling` compiles the same step for pods.

Needs only jax, flax, optax and numpy (and OpenCV for the per-image evaluation).
"""

import functools
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


def _config_batch(config, model, batch: int, res: int) -> dict:
  """A random batch with every entry the config's model kind reads (`Model.batch_keys`): CoDe's
  noun entries come from the in-memory batches (tcl_jax.data.in_memory), TCL's as before."""
  # Read here, not through tcl_jax.train.inputs: the bench must run without TensorFlow.
  inp = config.get("input") or {}
  n = int(inp.get("num_nouns", 0) or 0)
  if not n:
    return _random_batch(batch, res)
  from tcl_jax.data import in_memory  # pylint: disable=g-import-not-at-top

  it = in_memory.InMemoryIterator(global_batch_size=batch, image_size=res, seed=0, num_nouns=n)
  return {k: v for k, v in next(it).items() if k in model.batch_keys}


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
    # An example's shapes (the global batch could fill host memory).
    one = _config_batch(config, model, 1, res)
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
    batch = sharding.to_global(_config_batch(config, model, global_batch, res), batch_sharding)
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
