"""Segmentation sets in the benchmarks' layouts, written for tests and for the miniature's evaluation
set (the shapes world of tcl_jax/data/synthetic.py in the VOC layout)."""

import os

import numpy as np
from PIL import Image

from tcl_jax.data import synthetic
from tcl_jax.zeroshot import datasets


def _save_png(path, arr, palette: bool):
  arr = np.ascontiguousarray(arr, dtype=np.uint8)
  h, w = arr.shape
  im = Image.frombytes("P" if palette else "L", (w, h), arr.tobytes())
  if palette:
    im.putpalette(datasets.voc_palette().reshape(-1).tolist())
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.save(path)


def _save_image(path, rgb):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
  if path.endswith(".jpg"):
    im.save(path, quality=95)
  else:
    im.save(path)


def _random_label(rng, h, w, values, border_255: bool, ignore_frac: float = 0.0):
  """A blocky label map: a background value plus a few rectangles of other values."""
  label = np.full((h, w), values[0], np.uint8)
  for _ in range(rng.integers(2, 5)):
    y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
    y1, x1 = rng.integers(y0 + 3, h + 1), rng.integers(x0 + 3, w + 1)
    label[y0:y1, x0:x1] = values[rng.integers(0, len(values))]
  if border_255:  # VOC-style void outline around the first object
    label[0, :] = datasets.IGNORE_INDEX
  if ignore_frac:
    k = int(ignore_frac * h)
    label[h - k :, : w // 3] = datasets.IGNORE_INDEX
  return label


def _image_for(rng, label):
  """An RGB image that follows the label (a colour per value) plus noise."""
  colours = rng.integers(0, 256, size=(256, 3))
  img = colours[label] + rng.integers(-20, 21, size=label.shape + (3,))
  return np.clip(img, 0, 255).astype(np.uint8)


def _sizes(rng, n):
  # Odd sizes on purpose, landscape and portrait, 48..130 px.
  return [(int(rng.integers(48, 131)), int(rng.integers(48, 131))) for _ in range(n)]


def write_synthetic_segmentation(root: str, task: str, num_images: int = 2, seed: int = 0) -> str:
  """Write a tiny dataset in `task`'s mmseg layout under `root` (the data root) and return the
  task's own root. Tasks that share a layout (voc/voc20/t_voc20, context/context59/t_context59,
  coco_stuff/coco_object) get the same files for the same seed, so writing both is harmless.

  VOC / Context: JPEG images, palette PNG labels, val.txt and train.txt (the same ids).
  COCO-Stuff-164k: JPEG images and, per image, the raw map `<id>.png` (ids 0..181, 255), mmseg's
  `<id>_labelTrainIds.png` and TCL's `<id>_instanceTrainIds.png`.
  Cityscapes: `<city>/<city>_..._leftImg8bit.png` and `..._gtFine_labelTrainIds.png`.
  ADE20K: `ADE_val_*.jpg` and PNG labels 0..150 (0 = other, ignored through reduce_zero_label).
  Shapes (the miniature's world): VOC layout, JPEG scenes and their exact palette PNG labels.
  """
  spec = datasets.get_task(task)
  layout = spec.layout
  rng = np.random.default_rng([seed, sum(map(ord, layout))])
  base = os.path.join(root, spec.root)
  sizes = _sizes(rng, num_images)

  if layout == "shapes":  # scenes of the shapes world's evaluation stream, 96 x 96
    ids = [f"shapes_{i:06d}" for i in range(num_images)]
    for i, stem in enumerate(ids):
      rgb, label, _, _ = synthetic.scene(seed, synthetic.STREAM_EVAL, i)
      _save_image(os.path.join(base, spec.img_dir, stem + ".jpg"), rgb)
      _save_png(os.path.join(base, spec.ann_dir, stem + ".png"), label, palette=True)
    split_dir = os.path.join(base, os.path.dirname(spec.split))
    os.makedirs(split_dir, exist_ok=True)
    with open(os.path.join(split_dir, "val.txt"), "w") as f:
      f.write("".join(s + "\n" for s in ids))
  elif layout in ("voc", "context"):
    n_values = 21 if layout == "voc" else 60
    prefix = "2007_" if layout == "voc" else "2008_"
    ids = [f"{prefix}{i:06d}" for i in range(1, num_images + 1)]
    for stem, (h, w) in zip(ids, sizes):
      label = _random_label(rng, h, w, list(range(n_values)), border_255=(layout == "voc"))
      _save_image(os.path.join(base, spec.img_dir, stem + ".jpg"), _image_for(rng, label))
      _save_png(os.path.join(base, spec.ann_dir, stem + ".png"), label, palette=True)
    split_dir = os.path.join(base, os.path.dirname(spec.split))
    os.makedirs(split_dir, exist_ok=True)
    for split in ("val", "train"):
      with open(os.path.join(split_dir, f"{split}.txt"), "w") as f:
        f.write("".join(s + "\n" for s in ids))
  elif layout == "coco":
    to_train = datasets.coco_stuff_id_to_train_id()
    raw_values = sorted(to_train) + [datasets.IGNORE_INDEX]
    for i, (h, w) in enumerate(sizes):
      stem = f"{139 + 1000 * i:012d}"
      raw = _random_label(rng, h, w, raw_values, border_255=False, ignore_frac=0.2)
      _save_image(os.path.join(base, "images/val2017", stem + ".jpg"), _image_for(rng, raw))
      ann = os.path.join(base, "annotations/val2017")
      _save_png(os.path.join(ann, stem + ".png"), raw, palette=False)
      stuff = np.full_like(raw, datasets.IGNORE_INDEX)
      obj = np.zeros_like(raw)  # stuff and unlabeled -> background (TCL's conversion)
      for r, t in to_train.items():
        stuff[raw == r] = t
        if r <= datasets.COCO_THING_MAX_ID:
          obj[raw == r] = t + 1
      _save_png(os.path.join(ann, stem + "_labelTrainIds.png"), stuff, palette=False)
      _save_png(os.path.join(ann, stem + "_instanceTrainIds.png"), obj, palette=False)
  elif layout == "cityscapes":
    cities = ("frankfurt", "lindau", "munster")
    for i, (h, w) in enumerate(sizes):
      city = cities[i % len(cities)]
      stem = f"{city}/{city}_{i:06d}_000019"
      label = _random_label(rng, h, w, list(range(19)) + [datasets.IGNORE_INDEX], border_255=False)
      _save_image(
        os.path.join(base, spec.img_dir, stem + "_leftImg8bit.png"), _image_for(rng, label)
      )
      _save_png(
        os.path.join(base, spec.ann_dir, stem + "_gtFine_labelTrainIds.png"), label, palette=False
      )
  elif layout == "ade20k":
    for i, (h, w) in enumerate(sizes):
      stem = f"ADE_val_{i + 1:08d}"
      label = _random_label(rng, h, w, list(range(151)), border_255=False)
      _save_image(os.path.join(base, spec.img_dir, stem + ".jpg"), _image_for(rng, label))
      _save_png(os.path.join(base, spec.ann_dir, stem + ".png"), label, palette=False)
  else:  # pragma: no cover
    raise ValueError(layout)
  return base
