"""Convert checkpoints (official TCL, CoDe, OpenAI CLIP, transformers CLIP) to tcl_jax, without torch.

  python -m tcl_jax.convert SRC [--clip CLIP] --output DIR [--ie_freeze N] [--text_heads N]
      [--vision_heads N] [--text_decoder_heads N] [--overwrite]

SRC (and --clip) may be a PyTorch file, a transformers CLIP directory (config.json +
model.safetensors, as `CLIPModel.save_pretrained` writes it) or a Hugging Face Hub id
(`openai/clip-vit-base-patch16`, fetched into the Hub cache; with HF_HUB_OFFLINE=1 from the cache
only). Detects (a) the official TCL layout (`{"model": state_dict}` with `masker.*` and, in a full
file, `clip_text_encoder.*`, `clip_image_encoder.*`, `tcl[if]_loss.logit_scale`; the original's
training checkpoints `checkpoint.pth` / `ckpt_*.pth` hold it under "model" too), (b) OpenAI CLIP (a
TorchScript archive like `ViT-B-16.pt`, or a plain state_dict), (c) transformers' CLIPModel
(tcl_jax/weights/hf_clip.py), (d) the CoDe authors' layout (`text_decoder.*`,
`clip_text_encoder.prompt_learner.*`; a CoDeConfig: its three copies of the frozen CLIP must be
equal, and a file without them takes --clip as a TCL file does; the text decoder's heads are the
authors' 8 unless --text_decoder_heads is given). The released `tcl.pth` holds only the learned
weights: `--clip` supplies the frozen CLIP towers and the model dims, and every key the TCL file
holds overrides them and is checked. The model dims are read off tensor shapes as the original's
`build_model` does; attention heads are not in the shapes: a transformers config states them, else
they are width // 64 unless overridden. A CLIP-only source gets a masker initialised from the CLIP
as the original does. The output directory holds `config.json` (the model config and its
"model_kind") and an orbax checkpoint of the parameters under `params/`.

`load_any` reads every checkpoint form the front ends take: a converted directory, a training
workdir, a one-file `.safetensors` export (`python -m tcl_jax.export`), a PyTorch file, a
transformers CLIP directory, or a Hub id of a repository holding any of the last three.
"""

import argparse
import os
import shutil
import signal
import sys
import threading


def _interrupted_at_start(*_):
  print("error: interrupted (Ctrl-C) before any work; nothing written", file=sys.stderr)
  os._exit(130)  # pylint: disable=protected-access


if __name__ == "__main__":  # Ctrl-C while the libraries below load: one line, not a traceback
  signal.signal(signal.SIGINT, _interrupted_at_start)

import jax
import numpy as np

from tcl_jax.models import tcl as tcl_lib
from tcl_jax.weights import loading
from tcl_jax.weights import model_files

# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
  """Usage errors as one `error: ...` line on stderr and exit status 2 (--help unchanged)."""

  def error(self, message):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def heads_summary(cfg: tcl_lib.TCLConfig, heads_from: dict) -> str:
  """'heads: vision 2 (...), text 2 (...)', saying where each count came from (and CoDe's text
  decoder's)."""
  why = {
    "given": "given",
    "config": "from the transformers config",
    "stored": "as exported",
    "assumed": "assumed width // 64: heads are not stored in PyTorch files; pass --{} if "
    "the model has others",
  }
  parts = []
  for tower, key, n in (
    ("vision", "vision_heads", cfg.clip.vision_heads),
    ("text", "text_heads", cfg.clip.transformer_heads),
  ):
    parts.append(f"{tower} {n} ({why[heads_from[key]].format(key)})")
  if hasattr(cfg, "text_decoder_heads"):
    given = heads_from.get("text_decoder_heads")
    parts.append(
      f"text decoder {cfg.text_decoder_heads} ("
      + (
        why[given]
        if given in ("given", "stored")
        else "the authors' TextDecoder's; pass --text_decoder_heads if the model has others"
      )
      + ")"
    )
  return "heads: " + ", ".join(parts)


def _save_whole(out, cfg, params) -> bool:
  """Writes the checkpoint into a staging folder inside `out`, then swaps it in for what `out` held
  (--overwrite): an interrupted or failed write leaves `out` as it was, with no orbax temp folder.
  Ctrl-C is held back meanwhile (orbax's threads would go on writing into a folder being removed);
  after one, the new checkpoint is dropped and False returned."""
  created = not os.path.exists(out)
  os.makedirs(out, exist_ok=True)
  staging = os.path.join(out, f".convert-{os.getpid()}.tmp")
  interrupted = []
  held = threading.current_thread() is threading.main_thread()  # where signals can be handled
  previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) if held else None
  try:
    try:
      model_files.save_checkpoint(staging, cfg, params)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      if created:
        shutil.rmtree(out, ignore_errors=True)
      raise
    if interrupted:
      shutil.rmtree(staging, ignore_errors=True)
      if created:
        shutil.rmtree(out, ignore_errors=True)
      return False
    old = os.path.join(staging, "old")
    os.makedirs(old)
    for name in ("params", "config.json"):
      if os.path.lexists(os.path.join(out, name)):
        os.replace(os.path.join(out, name), os.path.join(old, name))
    for name in ("params", "config.json"):
      os.replace(os.path.join(staging, name), os.path.join(out, name))
    shutil.rmtree(staging)
  finally:
    if held:
      signal.signal(signal.SIGINT, previous)
  return True


def main(argv=None):
  ap = ArgumentParser(prog="python -m tcl_jax.convert", description=__doc__.split("\n")[0])
  ap.add_argument(
    "src",
    help="official tcl.pth, a TCL training checkpoint, OpenAI CLIP .pt "
    "(TorchScript) or a state_dict file, a transformers CLIP directory "
    "or a Hugging Face Hub id (openai/clip-vit-base-patch16)",
  )
  ap.add_argument("--output", required=True, help="output directory (config.json + params/)")
  ap.add_argument(
    "--clip",
    default=None,
    help="the CLIP towers and model dims for a TCL file without them (the official "
    "tcl.pth): OpenAI's ViT-B-16.pt, a transformers CLIP directory or a Hub id; "
    "the TCL file's own keys win",
  )
  ap.add_argument(
    "--ie_freeze",
    type=int,
    default=None,
    help="for CLIP-only sources: first CLIP block copied into the masker "
    "(default: vision_layers - 1, the paper's 11 for ViT-B/16)",
  )
  ap.add_argument(
    "--vision_heads",
    type=int,
    default=None,
    help="vision attention heads (default: the transformers config's, else width // 64)",
  )
  ap.add_argument(
    "--text_heads",
    type=int,
    default=None,
    help="text attention heads (default: the transformers config's, else width // 64)",
  )
  ap.add_argument(
    "--text_decoder_heads",
    type=int,
    default=None,
    help="for CoDe checkpoints: the text decoder's attention heads (default: the authors' 8)",
  )
  ap.add_argument("--seed", type=int, default=0, help="decoder init seed for CLIP-only sources")
  ap.add_argument(
    "--overwrite", action="store_true", help="replace a converted checkpoint already at --output"
  )
  if signal.getsignal(signal.SIGINT) is _interrupted_at_start:  # from here: KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
  args = ap.parse_args(argv)
  for flag in ("vision_heads", "text_heads", "text_decoder_heads"):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  out = args.output
  if os.path.exists(out) and not os.path.isdir(out):
    ap.error(f"--output {out} is a file; give a directory")
  if (
    os.path.isdir(out)
    and not args.overwrite
    and (model_files.is_converted(out) or os.path.exists(os.path.join(out, "params")))
  ):
    ap.error(
      f"--output {out} already holds a converted checkpoint; pass --overwrite to replace "
      f"it, or give another directory"
    )
  if os.path.isdir(args.src) and model_files.is_converted(args.src):
    ap.error(
      f"{args.src} is already a converted tcl_jax checkpoint: use it as it is (e.g. "
      f"--checkpoint {args.src}), or write one file with python -m tcl_jax.export "
      f"{args.src} --output model.safetensors"
    )
  overrides = dict(
    ie_freeze=args.ie_freeze,
    vision_heads=args.vision_heads,
    text_heads=args.text_heads,
    seed=args.seed,
  )
  if args.text_decoder_heads is not None:  # a CoDe setting: TCL and CLIP sources reject it
    overrides["text_decoder_heads"] = args.text_decoder_heads
  try:
    return _convert(args, out, overrides)
  except KeyboardInterrupt:  # while reading the source: nothing was written yet
    print(f"error: interrupted (Ctrl-C); nothing written to {out}", file=sys.stderr)
    return 130


def _convert(args, out, overrides) -> int:
  try:
    local = loading.resolve(args.src)
    if os.path.isfile(local) and local.endswith(".safetensors") and args.clip is None:
      cfg, params = model_files.load_safetensors(local)  # a one-file export back into a directory
      heads_from = {k: "stored" for k in ("vision_heads", "text_heads", "text_decoder_heads")}
    else:
      cfg, params, heads_from = loading.load_source(local, clip=args.clip, **overrides)
  except (ValueError, OSError) as e:  # a wrong path or a file that does not fit: usage error
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    if not _save_whole(out, cfg, params):
      print(f"error: interrupted (Ctrl-C); {out} is left as it was", file=sys.stderr)
      return 130
  except (ValueError, OSError) as e:
    print(f"error: cannot write {out}: {e}", file=sys.stderr)
    return 1
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(
    f"converted {args.src} -> {out}: {loading.dims(cfg)}, {n / 1e6:.1f}M parameters; "
    f"{heads_summary(cfg, heads_from)}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
