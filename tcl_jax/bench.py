"""Benchmark the jitted TCL loss + gradient (the training step without the optimizer update).

  python -m tcl_jax.bench [--preset tiny,vitb16] [--steps 5] [--dtype float32|bfloat16] [--remat]
  python -m tcl_jax.bench --train vitb16 --batch 8 --steps 4   # the full training step

`--train` runs `train_and_evaluate` (configs/tcl.py, random weights, synthetic in-memory batches,
no eval/checkpoint) over all visible devices, e.g. 8 fake CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=8, and reports time to first step and steps/s.

Presets: `tiny` = the shared fixture's dims, batch 4 at 96x96; `vitb16` = real ViT-B/16 dims
(random weights), batch 4 at 224x224, ie_freeze 11. Compile time is reported apart from the median
step time. Reference (the original PyTorch TCL, forward+backward, same dims and batch, on the 2-core
CPU of the development machines): 0.057 s/step (tiny), 9.2 s/step (ViT-B/16).
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from tcl_jax.models import clip as clip_lib
from tcl_jax.models import tcl as tcl_lib

TORCH_CPU_REFERENCE_S = {"tiny": 0.057, "vitb16": 9.2}


def preset(name: str):
  if name == "tiny":
    return tcl_lib.tiny_config(), 4, 96
  if name == "vitb16":
    cfg = tcl_lib.TCLConfig(
        clip=clip_lib.CLIPConfig(embed_dim=512, image_resolution=224, vision_layers=12,
                                 vision_width=768, vision_patch_size=16, vision_heads=12,
                                 context_length=77, vocab_size=49408, transformer_width=512,
                                 transformer_heads=8, transformer_layers=12),
        ie_freeze=11)
    return cfg, 4, 224
  raise ValueError(f"unknown preset {name!r} (tiny, vitb16)")


def run(name: str, steps: int, dtype, remat: bool) -> dict:
  cfg, batch, res = preset(name)
  params = tcl_lib.init_params(cfg, jax.random.key(0))
  frozen = params["clip"]
  trainable = {k: v for k, v in params.items() if k != "clip"}
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, res, res, 3)), jnp.float32)
  tokens = np.zeros((batch, cfg.clip.context_length), np.int32)
  tokens[:, 0] = 49406
  tokens[:, 1:9] = rng.integers(300, 40000, (batch, 8))
  tokens[:, 9] = 49407
  tokens = jnp.asarray(tokens)

  def loss_and_grad(tr, clip_params, key):
    f = lambda t: tcl_lib.tcl_loss(dict(t, clip=clip_params), cfg, images, tokens, rng=key,
                                   compute_dtype=dtype, remat=remat)
    (loss, _), grads = jax.value_and_grad(f, has_aux=True)(tr)
    return loss, grads

  t0 = time.perf_counter()
  compiled = jax.jit(loss_and_grad).lower(trainable, frozen, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    loss, grads = compiled(trainable, frozen, jax.random.key(i))
    jax.block_until_ready((loss, grads))
    if i:  # the first call also pays one-off runtime setup
      times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  ref = TORCH_CPU_REFERENCE_S[name]
  return {"preset": name, "batch": batch, "resolution": res, "dtype": jnp.dtype(dtype).name,
          "remat": remat, "compile_s": round(compile_s, 2), "median_step_s": round(med, 4),
          "torch_cpu_reference_s": ref, "ratio_vs_torch": round(med / ref, 3),
          "loss": float(loss), "device": jax.devices()[0].device_kind,
          "cpu_count": jax.local_device_count() if jax.default_backend() != "cpu" else __import__("os").cpu_count()}


class _RandomBatches:
  """In-memory random batches for the training benchmark (no input pipeline cost)."""

  def __init__(self, batch, res, seed=0):
    self.batch, self.res, self.i, self.seed = batch, res, 0, seed

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.i])
    self.i += 1
    tokens = np.zeros((self.batch, 77), np.int32)
    tokens[:, 0] = 49406
    tokens[:, 1:9] = rng.integers(300, 40000, (self.batch, 8))
    tokens[:, 9] = 49407
    return {"image": rng.standard_normal((self.batch, self.res, self.res, 3), np.float32),
            "text_tokens": tokens}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = int(state["i"])

  def counters(self):
    return {}


def run_train(name: str, steps: int, batch: int) -> dict:
  """Full train steps (forward, backward, AdamW update) through the training loop."""
  import os
  import tempfile
  from tcl_jax import config_files
  from tcl_jax import train
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tcl.py")
  config = config_files.load_module(path).get_config()
  cfg, _, res = preset(name)
  config.model = cfg.to_dict()
  config.init_checkpoint = ""
  config.total_steps = steps
  config.batch_size = batch
  config.log_every_steps = 1
  config.checkpoint_every_steps = 10 ** 9
  config.eval_every_steps = 0
  config.eval_at_end = False
  config.image_log_every_steps = 0
  config.input.image_size = res
  with tempfile.TemporaryDirectory() as workdir:
    _, history = train.train_and_evaluate(config, workdir, train_iter=_RandomBatches(batch, res))
  # log_every_steps=1: one history entry per step, stamped with the loop's wall time.
  t = [h["loop_time_s"] for h in history if "loop_time_s" in h]
  rate = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None
  return {"preset": name, "mode": "train_step", "global_batch": batch, "resolution": res,
          "devices": jax.device_count(), "steps": steps,
          "time_to_first_step_s": round(t[0], 2) if t else None,
          "steps_per_sec_after_first": round(rate, 4) if rate else None}


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m tcl_jax.bench", description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="tiny,vitb16", help="comma list of tiny, vitb16")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--train", default=None, help="preset for the full-train-step benchmark")
  ap.add_argument("--batch", type=int, default=8, help="global batch for --train")
  args = ap.parse_args(argv)
  if args.train:
    print(json.dumps(run_train(args.train, args.steps, args.batch)))
    return
  dtype = jnp.dtype(args.dtype)
  print(f"# {platform.processor() or platform.machine()}, backend {jax.default_backend()}, "
        f"jax {jax.__version__}")
  print(f"{'preset':<8} {'batch':>5} {'res':>4} {'dtype':<9} {'compile s':>9} {'step s':>8} "
        f"{'torch s':>8} {'ratio':>6}")
  for name in args.preset.split(","):
    r = run(name.strip(), args.steps, dtype, args.remat)
    print(f"{r['preset']:<8} {r['batch']:>5} {r['resolution']:>4} {r['dtype']:<9} "
          f"{r['compile_s']:>9.2f} {r['median_step_s']:>8.4f} {r['torch_cpu_reference_s']:>8.3f} "
          f"{r['ratio_vs_torch']:>6.2f}")
    print(json.dumps(r))


if __name__ == "__main__":
  main()
