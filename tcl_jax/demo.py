"""Open-vocabulary segmentation of one image with any list of class names (the demo / Colab path).

  python -m tcl_jax.demo --checkpoint=ckpt/tcl --image=photo.jpg --classes="dog,grass,sky" \
      --output=seg.png [--no_pamr] [--kp_w=0.3] [--bg_thresh=0.4]

`--checkpoint` takes a converted directory, a training workdir or a PyTorch TCL file. The image
goes through the evaluation's test pipeline (keep-ratio resize to short side 448, sliding 448
windows, PAMR and the KP branch); pixels whose best class score is below `bg_thresh` are background.
In Python (e.g. Colab): `labels = segment(params, cfg, rgb_uint8, ["dog", "grass"])`.
"""

import argparse
import sys
from typing import Sequence

import numpy as np

from tcl_jax import evaluate

# Distinct colours for up to 20 classes (background is black); more classes cycle.
PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
    [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]], np.uint8)


def segment(params, cfg, image_rgb: np.ndarray, classes: Sequence[str], *, pamr: bool = True,
            kp_w: float = 0.3, bg_thresh: float = 0.4, template: str = "custom",
            img_scale=(2048, 448), crop: int = 448, stride: int = 224) -> np.ndarray:
  """Label map int32 [H, W] of an RGB uint8 image: 0 = background, i = classes[i - 1]."""
  image_rgb = np.asarray(image_rgb)
  if image_rgb.ndim != 3 or image_rgb.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image_rgb.shape}")
  if not classes:
    raise ValueError("give at least one class name")
  text_emb = evaluate.class_text_embedding(params, cfg, classes, template)
  mask_fn = evaluate.make_mask_fn(params, cfg, text_emb, pamr=pamr, kp_w=kp_w)
  bgr = np.ascontiguousarray(image_rgb[..., ::-1])
  return evaluate.predict_image(bgr, mask_fn, len(classes), img_scale, crop, stride,
                                bg_thresh=bg_thresh)


def overlay(image_rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """The image blended with one colour per class (background left as is)."""
  colours = PALETTE[(labels - 1) % len(PALETTE)]
  out = image_rgb.astype(np.float32)
  fg = labels > 0
  out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
  return out.round().astype(np.uint8)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m tcl_jax.demo", description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--image", required=True)
  ap.add_argument("--classes", required=True, help="comma-separated class names")
  ap.add_argument("--output", default="segmentation.png")
  ap.add_argument("--no_pamr", action="store_true")
  ap.add_argument("--kp_w", type=float, default=0.3)
  ap.add_argument("--bg_thresh", type=float, default=0.4)
  args = ap.parse_args(argv)
  from PIL import Image, UnidentifiedImageError
  from tcl_jax import convert
  classes = [c.strip() for c in args.classes.split(",") if c.strip()]
  try:
    try:
      image = np.asarray(Image.open(args.image).convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
      raise ValueError(f"cannot read image {args.image}: {e}") from None
    cfg, params = convert.load_any(args.checkpoint)
    labels = segment(params, cfg, image, classes, pamr=not args.no_pamr, kp_w=args.kp_w,
                     bg_thresh=args.bg_thresh)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  Image.fromarray(overlay(image, labels)).save(args.output)
  total = labels.size
  for i, name in enumerate(["background"] + classes):
    print(f"{name:>20s}: {100.0 * np.sum(labels == i) / total:5.1f}% of pixels")
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
