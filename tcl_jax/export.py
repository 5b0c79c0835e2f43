"""Write a tcl_jax checkpoint as one safetensors file (every parameter, the config in its metadata).

  python -m tcl_jax.export CKPT --output model.safetensors [--clip CLIP] [--text_heads N]
      [--vision_heads N]

CKPT is anything the front ends take (`tcl_jax.weights.loading.load_any`): a converted directory, a
training workdir, a PyTorch file (the official tcl.pth with `--clip ViT-B-16.pt`), a transformers
CLIP directory or a Hugging Face Hub id. The file holds every parameter, the frozen CLIP towers
included, under its flax path ('clip/visual/conv1/kernel', ...), and the model config with its
"model_kind" ("tcl", "code") as JSON in the safetensors metadata (`tcl_jax_config`); `tcl_jax.from_pretrained(FILE)`, `load_any` and every
`--checkpoint` read it back bitwise. Publish it with huggingface_hub (see the README).
"""

import os
import sys

import jax
import numpy as np

from tcl_jax import convert
from tcl_jax.weights import loading
from tcl_jax.weights import model_files


def main(argv=None):
  ap = convert.ArgumentParser(prog="python -m tcl_jax.export", description=__doc__.split("\n")[0])
  ap.add_argument(
    "checkpoint",
    help="converted directory, training workdir, PyTorch file, "
    "transformers CLIP directory or Hub id",
  )
  ap.add_argument("--output", required=True, help="the .safetensors file to write")
  ap.add_argument(
    "--clip",
    default=None,
    help="completes a minimal release tcl.pth (OpenAI's "
    "ViT-B-16.pt, a transformers CLIP or a Hub id)",
  )
  ap.add_argument(
    "--vision_heads",
    type=int,
    default=None,
    help="for PyTorch sources: vision attention heads (default width // 64)",
  )
  ap.add_argument(
    "--text_heads",
    type=int,
    default=None,
    help="for PyTorch sources: text attention heads (default width // 64)",
  )
  args = ap.parse_args(argv)
  out = args.output
  if not out.endswith(".safetensors"):
    ap.error(f"--output {out} must end in .safetensors")
  if os.path.isdir(out):
    ap.error(f"--output {out} is a directory; give a file name ending in .safetensors")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    ap.error(f"--output {out}: its directory {parent} does not exist")
  overrides = {
    k: v
    for k, v in (
      ("clip", args.clip),
      ("vision_heads", args.vision_heads),
      ("text_heads", args.text_heads),
    )
    if v is not None
  }
  try:
    cfg, params = loading.load_any(args.checkpoint, **overrides)
  except (ValueError, OSError) as e:
    print(f"error: cannot load {args.checkpoint}: {e}", file=sys.stderr)
    return 2
  try:
    model_files.save_safetensors(out, cfg, params)
    # safetensors creates the file 0600; a file to publish or share gets the umask's mode, as
    # any other file written here.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)
  except (ValueError, OSError) as e:
    print(f"error: cannot write {out}: {e}", file=sys.stderr)
    return 1
  leaves = jax.tree.leaves(params)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  print(
    f"exported {args.checkpoint} -> {out}: {len(leaves)} tensors, {n / 1e6:.1f}M parameters, "
    f"{os.path.getsize(out) / 2**20:.1f} MiB"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
