"""Open-vocabulary segmentation of one image with any list of class names: the one path behind the
CLI, the notebook (notebooks/zero_shot_demo.ipynb) and the web app (tcl_jax/app.py).

  python -m tcl_jax.demo --checkpoint=ckpt/tcl --image=photo.jpg --classes="dog,grass,sky" \
      [--output=seg.png] [--no_pamr] [--kp_w=0.3] [--bg_thresh=0.4] [--max_side=2048]

`--checkpoint` takes a converted directory, a training workdir or a PyTorch TCL file (a minimal
release `tcl.pth` also needs `--clip ViT-B-16.pt`); `--image` a path, an http(s) URL or `sample`
(the bundled procedural picture). The image goes through the evaluation's test pipeline
(tcl_jax/zeroshot/pipeline.py: keep-ratio resize to short side 448, ImageNet normalisation, sliding 448
windows, PAMR and the KP branch, a constant background channel at `bg_thresh`, bilinear resize
back, argmax). Jitted programs are keyed on bucketed shapes (windows are always crop-sized, their
count is padded, post-processing sizes are padded to 64-pixel buckets, class lists to powers of
two, bg_thresh is traced), so another image of a similar size reuses them.

In Python: `seg = Segmenter(params, cfg)(rgb_uint8, ["dog", "grass"])` -> `seg.labels` (0 =
background), `seg.masks`, `seg.scores`, `seg.simmaps`, `seg.shares()`;
`overlay_with_legend(rgb_uint8, seg)` draws it.
"""

import argparse
import dataclasses
import importlib.resources
import io
import os
import re
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from PIL import ImageOps

from tcl_jax import kinds
from tcl_jax import zeroshot
from tcl_jax.weights import loading
from tcl_jax.zeroshot import pipeline
from tcl_jax.zeroshot import prompts

# Distinct colours for up to 20 classes (background is left uncoloured); more classes cycle.
PALETTE = np.array(
  [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
    [0, 128, 128],
    [220, 190, 255],
    [170, 110, 40],
    [255, 250, 200],
    [128, 0, 0],
    [170, 255, 195],
    [128, 128, 0],
    [255, 215, 180],
    [0, 0, 128],
    [128, 128, 128],
  ],
  np.uint8,
)

SAMPLE_IMAGE = str(importlib.resources.files("tcl_jax") / "assets" / "sample.png")
SAMPLE_CLASSES = "sky, grass, house, sun, tree"


def class_bucket(n: int) -> int:
  """Class lists are padded to the next power of two with copies of the first class (few compiles,
  at most twice the per-class work, e.g. PAMR's); a copy ties with the first class and argmax
  keeps the first, so copies never win a pixel."""
  return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Segmentation:
  """One image's result, all at the input image's size [H, W]."""

  classes: list
  labels: np.ndarray  # int32 [H, W]: 0 = background, i = classes[i - 1]
  scores: np.ndarray  # float32 [N, H, W]: window-averaged soft masks, what bg_thresh is compared to
  simmaps: np.ndarray  # float32 [N, H, W]: the masker's image-text cosine similarity
  bg_thresh: float

  @property
  def masks(self) -> np.ndarray:
    """bool [N, H, W], one mask per class."""
    return self.labels[None] == np.arange(1, len(self.classes) + 1, dtype=np.int32)[:, None, None]

  def shares(self) -> dict:
    """{"background" and each class: % of pixels}."""
    counts = np.bincount(self.labels.ravel(), minlength=len(self.classes) + 1)
    return {
      name: 100.0 * c / self.labels.size
      for name, c in zip(["background"] + list(self.classes), counts)
    }

  def note(self) -> Optional[str]:
    """A line for the user when the result needs explaining (every pixel background)."""
    if (self.labels == 0).all():
      return (
        f"every pixel is background: no class reaches bg_thresh={self.bg_thresh:g} (best "
        f"score {self.scores.max():.3f}); lower bg_thresh, or check the weights (random or "
        f"untrained weights give this)"
      )
    return None


class Segmenter:
  """A model plus the zero-shot protocol; call it on RGB uint8 images. `method` picks the
  checkpoint's own model ("" or "own") or a training-free method on its CLIP
  (tcl_jax.kinds.METHODS); a call may pick another. Models and text embeddings are cached per
  method and class list."""

  def __init__(
    self, params, cfg, *, protocol: zeroshot.Protocol = zeroshot.Protocol(), method: str = ""
  ):
    prompts.get_templates(protocol.template)
    self.params, self.cfg, self.protocol = params, cfg, protocol
    self.method = "" if method == "own" else method
    self._models = {}
    self.model = self.model_for(self.method)
    self._text = {}

  def model_for(self, method: str):
    """The zero-shot model of `method` (ValueError, one line, for one this checkpoint lacks)."""
    method = "" if method == "own" else method
    if method not in self._models:
      self._models[method] = kinds.zero_shot_model(self.cfg, method)
    return self._models[method]

  def text_embedding(self, classes: Sequence[str], method: Optional[str] = None):
    method = self.method if method is None else ("" if method == "own" else method)
    key = (method, tuple(classes))
    if key not in self._text:
      padded = key[1] + key[1][:1] * (class_bucket(len(key[1])) - len(key[1]))
      self._text[key] = prompts.class_text_embedding(
        self.model_for(method), self.params, padded, self.protocol.template
      )
    return self._text[key]

  def __call__(
    self,
    image_rgb: np.ndarray,
    classes: Sequence[str],
    *,
    pamr: bool = zeroshot.Protocol.pamr,
    kp_w: float = zeroshot.Protocol.kp_w,
    bg_thresh: float = zeroshot.Protocol.bg_thresh,
    method: Optional[str] = None,
  ) -> Segmentation:
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[-1] != 3 or image_rgb.dtype != np.uint8:
      raise ValueError(
        f"expected an RGB uint8 image [H, W, 3], got {image_rgb.dtype} {image_rgb.shape}"
      )
    classes = [str(c) for c in classes]
    if not classes:
      raise ValueError("give at least one class name")
    keys = [_class_key(c) for c in classes]
    if len(set(keys)) < len(keys):
      again = [c for i, c in enumerate(classes) if keys[i] in keys[:i]]
      raise ValueError(
        f"class names repeat ({', '.join(map(repr, again))}); give each once (parse_classes "
        "drops repeats): a repeat ties with its first and splits its pixels"
      )
    h0, w0 = image_rgb.shape[:2]
    protocol = dataclasses.replace(
      self.protocol, pamr=bool(pamr), kp_w=float(kp_w), bg_thresh=float(bg_thresh)
    )
    model = self.model_for(self.method if method is None else method)
    if min(pipeline.mmcv_rescale_size(w0, h0, protocol.img_scale)) < model.min_size:
      raise ValueError(f"image {w0}x{h0} is too elongated for the pipeline's resize")
    with jax.default_matmul_precision("highest"):  # as evaluation: float32 matmuls everywhere
      text_emb = self.text_embedding(classes, method)
      n = text_emb.shape[0]  # padded class count
      window_fn = zeroshot.make_window_fn(model, self.params, text_emb, protocol, simmaps=True)
      # The evaluation's pipeline: BGR uint8 -> resize -> normalise -> windows -> labels from
      # the n (padded) mask channels; window-averaged maps of the masks and similarity maps.
      pred = zeroshot.predict(
        np.ascontiguousarray(image_rgb[..., ::-1]),
        window_fn,
        n,
        protocol,
        background=True,
        num_maps=2 * n,
      )
    k = len(classes)
    return Segmentation(
      classes=classes,
      labels=pred.labels,
      scores=pred.maps[:k],
      simmaps=pred.maps[n : n + k],
      bg_thresh=float(bg_thresh),
    )


def _split_classes(text: str) -> list:
  # ';' too: "sky; grass" is two classes, never one named "sky; grass".
  return [c.strip() for c in re.split(r"[,;]", str(text or "")) if c.strip()]


def _class_key(name: str) -> str:
  # What the text tower sees: CLIP's tokenizer lower-cases and collapses whitespace.
  return " ".join(name.lower().split())


def parse_classes(text: str) -> list:
  """'dog, grass,,sky; Dog ' -> ['dog', 'grass', 'sky']: split on ',' or ';', each class once
  (a repeat, which the tokenizer cannot tell apart, would split the class's pixels with it)."""
  out = {}
  for c in _split_classes(text):
    out.setdefault(_class_key(c), c)
  return list(out.values())


def repeated_classes(text: str) -> list:
  """The names `parse_classes` drops as repeats of an earlier one."""
  seen, out = set(), []
  for c in _split_classes(text):
    key = _class_key(c)
    if key in seen:
      out.append(c)
    seen.add(key)
  return out


def load_model(checkpoint: str, clip: Optional[str] = None):
  """(cfg, params) from a converted directory, a training workdir or a PyTorch file; `clip`
  (OpenAI's ViT-B-16.pt) completes a minimal release tcl.pth. Raises ValueError / OSError."""
  if clip:
    return loading.load_any(checkpoint, clip=clip)
  return loading.load_any(checkpoint)


# ----------------------------------------------------------------------------------------------
# Images in and out
# ----------------------------------------------------------------------------------------------


def fit_image(image_rgb: np.ndarray, max_side: Optional[int]):
  """Downscale so the long side is at most max_side -> (image, note or None)."""
  h, w = image_rgb.shape[:2]
  if not max_side or max(h, w) <= max_side:
    return image_rgb, None
  s = max_side / max(h, w)
  nw, nh = max(1, round(w * s)), max(1, round(h * s))
  small = np.asarray(Image.fromarray(image_rgb).resize((nw, nh), Image.Resampling.LANCZOS))
  return small, f"downscaled the image from {w}x{h} to {nw}x{nh} (long side at most {max_side})"


def _rgb(im) -> np.ndarray:
  """RGB uint8 of a PIL image; 16-bit grayscale (modes I;16*, I) scaled from 0..65535, where
  PIL's convert("RGB") clips every value above 255 to white."""
  if im.mode.startswith("I;16") or im.mode == "I":
    grey = np.asarray(im).astype(np.float64).clip(0, 65535) / 257.0
    return np.repeat(grey.round().astype(np.uint8)[..., None], 3, axis=-1)
  return np.asarray(im.convert("RGB"))


def read_image(data, max_side: Optional[int] = None):
  """An image file (path, bytes or file object) -> (RGB uint8 [H, W, 3], note or None), with EXIF
  orientation applied. Raises ValueError with one line for anything PIL cannot decode."""
  if isinstance(data, bytes):
    data = io.BytesIO(data)
  try:
    with Image.open(data) as im:
      rgb = _rgb(ImageOps.exif_transpose(im))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    name = data if isinstance(data, str) else "the file"
    raise ValueError(f"cannot read {name} as an image ({type(e).__name__}: {e})") from None
  return fit_image(rgb, max_side)


def load_image(source: str, max_side: Optional[int] = None):
  """`sample`, an http(s) URL or a path -> (RGB uint8, note or None)."""
  if source == "sample":
    return read_image(SAMPLE_IMAGE, max_side)
  if source.startswith(("http://", "https://")):
    import urllib.request

    try:
      with urllib.request.urlopen(source, timeout=30) as r:
        return read_image(r.read(), max_side)
    except OSError as e:
      raise ValueError(f"cannot download {source}: {e}") from None
  if not os.path.isfile(source):
    raise ValueError(f"no image file at {source}")
  return read_image(source, max_side)


def draw_sample(width: int = 500, height: int = 375) -> np.ndarray:
  """The bundled sample picture (assets/sample.png), drawn procedurally: sky, sun, grass, a house
  and a tree. Regenerate: python -c "import tcl_jax.demo as d; d.save_sample()"."""
  y = np.linspace(0.0, 1.0, height)[:, None, None]
  sky = (1 - y) * np.array([70, 130, 220]) + y * np.array([180, 215, 245])
  img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).round().astype(np.uint8))
  d = ImageDraw.Draw(img)
  horizon = int(height * 0.62)
  d.ellipse([width * 0.74, height * 0.08, width * 0.88, height * 0.27], fill=(255, 215, 60))
  d.rectangle([0, horizon, width, height], fill=(70, 150, 60))
  d.ellipse([-width * 0.2, horizon - 25, width * 0.6, horizon + 40], fill=(80, 160, 65))
  hx, hw_, hh = int(width * 0.18), int(width * 0.3), int(height * 0.26)  # house body
  d.rectangle([hx, horizon - hh + 20, hx + hw_, horizon + 20], fill=(200, 120, 90))
  d.polygon(
    [
      (hx - 12, horizon - hh + 20),
      (hx + hw_ // 2, horizon - hh - 50),
      (hx + hw_ + 12, horizon - hh + 20),
    ],
    fill=(140, 45, 40),
  )
  d.rectangle(
    [hx + hw_ // 2 - 16, horizon - 35, hx + hw_ // 2 + 16, horizon + 20], fill=(90, 60, 40)
  )
  for wx in (hx + 18, hx + hw_ - 48):
    d.rectangle([wx, horizon - hh + 45, wx + 30, horizon - hh + 75], fill=(170, 210, 240))
  tx = int(width * 0.7)  # tree
  d.rectangle([tx - 9, horizon - 40, tx + 9, horizon + 30], fill=(100, 70, 40))
  d.ellipse([tx - 55, horizon - 150, tx + 55, horizon - 25], fill=(35, 110, 45))
  return np.asarray(img)


def save_sample(path: str = SAMPLE_IMAGE) -> None:
  Image.fromarray(draw_sample()).save(path, optimize=True)


def colours(num_classes: int) -> np.ndarray:
  """uint8 [num_classes, 3]: the colour of classes 1..num_classes."""
  return PALETTE[np.arange(num_classes) % len(PALETTE)]


def overlay(image_rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """The image blended with one colour per class (background left as is)."""
  out = image_rgb.astype(np.float32)
  fg = labels > 0
  out[fg] = (1 - alpha) * out[fg] + alpha * PALETTE[(labels[fg] - 1) % len(PALETTE)]
  return out.round().astype(np.uint8)


def _font(size: int):
  return ImageFont.load_default(size=size)  # Pillow's bundled font: same pixels everywhere


def legend(classes: Sequence[str], width: int) -> np.ndarray:
  """uint8 [h, width, 3]: a colour swatch and the name of each class, wrapped into rows."""
  size = max(14, min(32, width // 30))
  font, pad, box = _font(size), size // 2, size
  row_h = size + pad
  places, x, row = [], pad, 0  # lay out first: the height depends on the wrapping
  for name in classes:
    item_w = box + pad // 2 + int(np.ceil(font.getlength(name)))
    if x > pad and x + item_w > width - pad:
      x, row = pad, row + 1
    places.append((x, row))
    x += item_w + 2 * pad
  img = Image.new("RGB", (width, (row + 1) * row_h + pad), (255, 255, 255))
  d = ImageDraw.Draw(img)
  for (x, r), name, colour in zip(places, classes, colours(len(classes))):
    top = pad + r * row_h
    d.rectangle(
      [x, top, x + box - 1, top + box - 1], fill=tuple(int(c) for c in colour), outline=(0, 0, 0)
    )
    d.text((x + box + pad // 2, top + box // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
  return np.asarray(img)


def overlay_with_legend(image_rgb: np.ndarray, seg: Segmentation, alpha: float = 0.5):
  """The overlay with the legend strip below it: uint8 [H + legend height, W, 3]."""
  return np.concatenate(
    [overlay(image_rgb, seg.labels, alpha), legend(seg.classes, image_rgb.shape[1])]
  )


def class_mask_images(image_rgb: np.ndarray, seg: Segmentation) -> list:
  """[(image, caption)] per class: the class's pixels in its colour over a dimmed image."""
  shares = seg.shares()
  out = []
  for i, (name, mask) in enumerate(zip(seg.classes, seg.masks)):
    dim = (image_rgb.astype(np.float32) * 0.35).round().astype(np.uint8)
    dim[mask] = overlay(image_rgb, np.where(mask, i + 1, 0), alpha=0.6)[mask]
    out.append((dim, f"{name}: {shares[name]:.1f}%"))
  return out


def format_shares(seg: Segmentation) -> str:
  return "\n".join(f"{name:>20s}: {v:5.1f}% of pixels" for name, v in seg.shares().items())


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
  """Usage errors as one line on stderr, exit 2."""

  def error(self, message):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv=None):
  defaults = zeroshot.Protocol()
  ap = ArgumentParser(
    prog="python -m tcl_jax.demo",
    description="Segments one image with any list of class names (the "
    "evaluation's zero-shot pipeline) and writes the overlay.",
  )
  ap.add_argument(
    "--checkpoint",
    required=True,
    help="converted directory, training workdir, PyTorch TCL file, .safetensors "
    "file or Hugging Face Hub id",
  )
  ap.add_argument("--clip", default=None, help="OpenAI ViT-B-16.pt, for a minimal release tcl.pth")
  ap.add_argument("--image", required=True, help="path, http(s) URL, or 'sample'")
  ap.add_argument(
    "--classes", required=True, help="class names separated by ',' (or ';'), each once"
  )
  ap.add_argument("--output", default="segmentation.png", help="overlay with legend (PNG)")
  ap.add_argument(
    "--no_pamr",
    action="store_true",
    help="skip PAMR, the mask refinement by image colour (faster, coarser)",
  )
  ap.add_argument(
    "--kp_w",
    type=float,
    default=defaults.kp_w,
    help=f"weight of the KP branch, the frozen CLIP's dense scores (default {defaults.kp_w})",
  )
  ap.add_argument(
    "--bg_thresh",
    type=float,
    default=defaults.bg_thresh,
    help=f"pixels where no class scores above this are background (default "
    f"{defaults.bg_thresh}; lower it to see weak masks)",
  )
  ap.add_argument("--max_side", type=int, default=2048, help="downscale larger images to this")
  ap.add_argument(
    "--method",
    default="own",
    choices=("own", "tcl") + tuple(kinds.METHODS),
    help="the checkpoint's own model (default), or a training-free method on its CLIP",
  )
  args = ap.parse_args(argv)
  classes = parse_classes(args.classes)
  if not classes:
    ap.error("--classes holds no class name")
  again = repeated_classes(args.classes)
  if again:
    print(
      f"note: --classes repeats {', '.join(map(repr, again))}: each class is kept once, where "
      "it first appears",
      file=sys.stderr,
    )
  if not 0.0 <= args.bg_thresh <= 1.0:
    ap.error(f"--bg_thresh must be in [0, 1], got {args.bg_thresh}")
  out_dir = os.path.dirname(os.path.abspath(args.output))
  if not os.path.isdir(out_dir):
    ap.error(f"--output {args.output}: folder {out_dir} does not exist")
  if not os.access(out_dir, os.W_OK):
    ap.error(f"--output {args.output}: folder {out_dir} is not writable")
  try:
    full, _ = load_image(args.image, None)
    image, note = fit_image(full, args.max_side)
    cfg, params = load_model(args.checkpoint, args.clip)
    segmenter = Segmenter(params, cfg, method=args.method)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if note:
    print(note)
  start = time.perf_counter()
  try:
    seg = segmenter(image, classes, pamr=not args.no_pamr, kp_w=args.kp_w, bg_thresh=args.bg_thresh)
  except ValueError as e:  # e.g. an image too elongated for the pipeline's resize
    h, w = full.shape[:2]
    print(f"error: --image {args.image} ({w}x{h}): {e}", file=sys.stderr)
    return 2
  elapsed = time.perf_counter() - start
  try:
    Image.fromarray(overlay_with_legend(image, seg)).save(args.output)
  except (ValueError, OSError) as e:
    print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
    return 1
  print(format_shares(seg))
  if seg.note():
    print(seg.note())
  print(f"wrote {args.output} ({elapsed:.1f} s, compile included)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
