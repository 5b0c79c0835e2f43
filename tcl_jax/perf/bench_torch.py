"""Times the original PyTorch TCL's full training step on this machine (for `tcl_jax.bench`).

  python -m tcl_jax.perf.bench_torch --ref-repo DIR [--batch 8] [--steps 10] [--resolution 224]

DIR is a plain checkout of github.com/kakaobrain/tcl (fetched by you; never part of this repo).
Only torch and einops are needed: the original's imports of mmcv (its registry), omegaconf and its
own `utils` package (logging helpers) are stubbed here, and `sclip.load`, which would download
OpenAI's weights, builds a random-weight CLIP of ViT-B/16 dims instead. The step is the original
main.py's: zero_grad, forward under fp16 autocast on CUDA (float32 on CPU), loss sum, scaled
backward, unscale, clip_grad_norm_(5), AdamW step (decay split as utils/optimizer.py), scaler
update. The masker backbone trains (after UST), as in tcl_jax.bench. Prints one JSON line.
This module imports torch; in tcl_jax only it and bench_torch_eval (the original's evaluation,
which builds this model) do.
"""

import argparse
import importlib
import json
import logging
import os
import sys
import time
import types

# ViT-B/16 CLIP (sclip.model.CLIP's arguments) and configs/tcl.yml's model section.
CLIP_VIT_B16 = dict(
  embed_dim=512,
  image_resolution=224,
  vision_layers=12,
  vision_width=768,
  vision_patch_size=16,
  context_length=77,
  vocab_size=49408,
  transformer_width=512,
  transformer_heads=8,
  transformer_layers=12,
)
TCL_ARGS = dict(
  clip_model="ViT-B/16",
  ie_freeze=11,
  ie_ignore_last_attn=True,
  masker=dict(
    type="Masker",
    decoder=dict(type="GDecoder", double=True, n_layers=2, kernel_size=3, act="gelu", norm="ln"),
    sim2mask=dict(init_w=10.0, init_b=-2.5, gumbel_tau=1.0, learnable=True),
  ),
  tcl_w=0.1,
  area_w=0.4,
  tv_w=1.0,
)


class _Registry:
  """mmcv.utils.Registry as the original uses it: register_module() and build(cfg)."""

  def __init__(self, name):
    self.name, self.modules = name, {}

  def register_module(self, name=None):
    def register(cls):
      self.modules[name or cls.__name__] = cls
      return cls

    return register

  def build(self, cfg):
    cfg = dict(cfg)
    return self.modules[cfg.pop("type")](**cfg)


def _module(name, **attrs):
  m = types.ModuleType(name)
  m.__dict__.update(attrs)
  return m


def build_original(ref_repo: str, seed: int = 0):
  """The original TCL (random ViT-B/16 CLIP), imported from `ref_repo` with stubbed imports."""
  import torch  # pylint: disable=g-import-not-at-top

  logger = lambda *a, **k: logging.getLogger("tcl")
  mmcv_utils = _module("mmcv.utils", Registry=_Registry, get_logger=logger)
  sys.modules.update(
    {
      "mmcv": _module("mmcv", utils=mmcv_utils),
      "mmcv.utils": mmcv_utils,
      "omegaconf": _module("omegaconf", OmegaConf=None),  # only models.build_model uses it
      "utils": _module("utils", get_logger=logger),  # the original's utils: only get_logger
    }
  )
  # sclip as a bare package: its __init__ imports clip.py (torchvision, weight downloads).
  sclip = _module("sclip", __path__=[os.path.join(ref_repo, "sclip")])
  sys.modules["sclip"] = sclip
  sys.path.insert(0, ref_repo)
  clip_model = importlib.import_module("sclip.model")

  def load(name, device="cpu", **kwargs):
    del name, device, kwargs
    torch.manual_seed(seed)
    return clip_model.CLIP(**CLIP_VIT_B16).float().eval(), None

  sclip.load = load
  tcl_mod = importlib.import_module("models.tcl.tcl")
  model = tcl_mod.TCL(**TCL_ARGS)
  model.set_train(decoder_only=False, config=None)
  return model


def run(ref_repo: str, batch: int, steps: int, resolution: int = 224, seed: int = 0) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  # The original's contrastive losses all-gather over the process group: a group of one.
  os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
  os.environ.setdefault("MASTER_PORT", "29511")
  if not dist.is_initialized():
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
  model = build_original(ref_repo, seed).to(device)
  model.train()
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if p.requires_grad:
      (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
  opt = torch.optim.AdamW(
    [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
    lr=7.5e-5,
    eps=1e-6,
    weight_decay=0.05,
  )
  scaler = torch.amp.GradScaler(device, enabled=cuda)
  g = torch.Generator().manual_seed(seed)
  images = torch.randn(batch, 3, resolution, resolution, generator=g).to(device)
  text = torch.zeros(batch, 77, dtype=torch.long)
  text[:, 0], text[:, 9] = 49406, 49407
  text[:, 1:9] = torch.randint(300, 40000, (batch, 8), generator=g)
  text = text.to(device)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.float16, enabled=cuda):
      losses = model(images, text)
      loss = sum(v for k, v in losses.items() if "loss" in k)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    scaler.step(opt)
    scaler.update()
    return loss

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  for _ in range(2):  # warm-up: cuDNN autotuning, allocator growth
    step()
  sync()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  step_s = (time.perf_counter() - t0) / steps
  return {
    "impl": "pytorch original",
    "device": torch.cuda.get_device_name() if cuda else "cpu",
    "precision": "fp16 autocast" if cuda else "float32",
    "batch": batch,
    "resolution": resolution,
    "step_s": step_s,
    "images_per_s": batch / step_s,
    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    "loss": float(loss),
    "torch": torch.__version__,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(
    prog="python -m tcl_jax.perf.bench_torch", description=__doc__.split("\n")[0]
  )
  ap.add_argument("--ref-repo", required=True)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--resolution", type=int, default=224)
  args = ap.parse_args(argv)
  if not os.path.isfile(os.path.join(args.ref_repo, "models", "tcl", "tcl.py")):
    print(
      f"error: {args.ref_repo} is not a checkout of kakaobrain/tcl (no models/tcl/tcl.py)",
      file=sys.stderr,
    )
    return 2
  try:
    import einops  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    print(f"error: timing the original needs torch and einops ({e})", file=sys.stderr)
    return 1
  try:
    print(json.dumps(run(args.ref_repo, args.batch, args.steps, args.resolution)))
  except torch.cuda.OutOfMemoryError:
    print(f"error: the original runs out of device memory at batch {args.batch}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
