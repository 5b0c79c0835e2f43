"""Benchmark the jitted TCL loss + gradient (the training step without the optimizer update).

  python -m tcl_jax.bench [--preset tiny,vitb16] [--steps 5] [--dtype float32|bfloat16] [--remat]

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


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m tcl_jax.bench", description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="tiny,vitb16", help="comma list of tiny, vitb16")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--remat", action="store_true")
  args = ap.parse_args(argv)
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
