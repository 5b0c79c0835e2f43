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
import importlib
import json
import os
import sys

import jax

from tcl_jax.perf import bench_torch_eval
from tcl_jax.perf import chips
from tcl_jax.perf import timing


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
  _, res = timing.preset(args.preset)
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
      theirs = timing.torch_reference(args.torch_ref, batch, args.steps, res, args.torch_python)
    except RuntimeError as e:
      print(f"error: timing the original failed: {e}", file=sys.stderr)
      return 1
    results.append(theirs)
    print(json.dumps(theirs), flush=True)  # kept even if our step fails later
  if args.torch_ref and eval_images:
    try:
      theirs_eval = timing.torch_eval_reference(
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
    ours = timing.eval_image_bench(args.preset, eval_images, sizes, args.eval_classes)
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
    for r in timing.eval_bench(args.preset, windows, steps=max(1, args.steps // 2)):
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
      batch = timing.max_batch(args.preset, args.dtype, args.remat)
    except ValueError as e:
      return _usage_error(str(e))
    print(f"# largest per-device batch predicted to fit: {batch}")
    if not batch:
      print("error: not even a per-device batch of 8 fits in device memory", file=sys.stderr)
      return 1
  ours = None
  while ours is None:
    try:
      ours = timing.train_bench(args.preset, batch, args.steps, args.dtype, args.remat)
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
      f"reference   {timing.ORIGINAL_CPU_REFERENCE} (another machine and step: no ratio; "
      f"--torch-ref DIR measures the original here)"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
