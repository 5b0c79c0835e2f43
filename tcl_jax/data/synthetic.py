"""The shapes world: a tiny synthetic image-text world where grounding is learnable and checkable.

Images hold 1-3 objects (COLORS x SHAPES, various sizes and positions, possibly overlapping) on a
plain or textured background of neutral tones that no object uses. Captions name some or all of
the objects in varied templates and orders ("a photo of a red circle and a blue square"). Every
scene also has its pixel labels (index into CLASSES, 0 = background), which the segmentation set
(`synthetic_segmentation.write_synthetic_segmentation(root, "shapes")`, VOC layout) stores. Everything is
deterministic in a seed: example i of a stream is drawn from `default_rng([seed, stream, i])`.

Training pairs go through the same writer and schema as `convert` (`schema.ShardWriter`), with
each caption's nouns (schema `nouns`, for CoDe's batches): the world knows what its captions name,
so no tagger is involved. A caption's nouns are the objects it names, as it names them ("red
circle", or "circle" in a shape-only caption), "<tone> background" when it names the background
(TEMPLATES with `{bg}`), and the template's own noun ("photo", "image", "picture": NLTK's tagger
finds those too, and CoDe's real captions are full of them); unique, sorted. About 80% of the
captions have two or more, enough for CoDe's batches of 2 (objects and background alone: 55%).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw

from tcl_jax.data import schema

COLORS = {
  "red": (215, 40, 40),
  "green": (40, 165, 60),
  "blue": (45, 80, 215),
  "yellow": (235, 205, 35),
}
SHAPES = ("circle", "square", "triangle")
# Segmentation classes: background, then every colour-shape pair.
CLASSES = ("background",) + tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
# Neutral background tones (no object colour), named in some captions.
BACKGROUNDS = {
  "grey": (128, 128, 128),
  "white": (235, 235, 230),
  "black": (30, 30, 30),
  "brown": (120, 85, 55),
  "beige": (205, 190, 160),
}
TEXTURES = ("plain", "noise", "stripes", "checks")
# Caption templates over the listed objects ("a red circle, a blue square and a green triangle").
TEMPLATES = (
  "{}",
  "a photo of {}",
  "there is {}",
  "an image with {}",
  "a picture of {}",
  "{} on a {bg} background",
  "a photo of {} on a {bg} background",
)
# The templates' own nouns, nouns of a caption that uses them.
TEMPLATE_NOUNS = ("photo", "image", "picture")
STREAM_TRAIN, STREAM_EVAL = 0, 1
OBJECT_RADIUS = (0.16, 0.3)  # an object's radius, as a fraction of the image side
# Captions that name the objects by shape alone ("a circle and a square"): pairs in a batch that
# only shape separates, since colour separates most of the others. With the old stage 1 (lr 1e-3,
# 600 steps) they did not help by themselves: the texts "red circle" and "red square" stayed at
# cosine 0.997 with or without them; the learning rate was what mattered (configs/miniature_clip.py).
# Their own effect at the current settings was not isolated.
SHAPE_ONLY_CAPTIONS = 0.3
_MIN_VISIBLE = 0.5  # each object keeps at least this fraction of its pixels after occlusion


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  """Boolean [size, size] mask of one shape (no anti-aliasing, so labels are exact)."""
  im = Image.new("L", (size, size), 0)
  d = ImageDraw.Draw(im)
  if shape == "circle":
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
  elif shape == "square":
    s = r * 0.9  # similar area to the circle
    d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=1)
  else:
    d.polygon(
      [(cx, cy - r * 1.1), (cx - r * 1.1, cy + r * 0.8), (cx + r * 1.1, cy + r * 0.8)], fill=1
    )
  return np.asarray(im, bool)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
  names = list(BACKGROUNDS)
  a, b = rng.choice(len(names), size=2, replace=False)
  base = np.asarray(BACKGROUNDS[names[a]], np.float32)
  other = np.asarray(BACKGROUNDS[names[b]], np.float32)
  texture = TEXTURES[rng.integers(len(TEXTURES))]
  img = np.broadcast_to(base, (size, size, 3)).copy()
  yy, xx = np.mgrid[:size, :size]
  if texture == "noise":
    img += rng.normal(0, 25, size=(size, size, 1))
  elif texture == "stripes":
    period = int(rng.integers(6, 16))
    on = ((xx if rng.random() < 0.5 else yy) // period) % 2 == 1
    img[on] = other
  elif texture == "checks":
    period = int(rng.integers(6, 16))
    img[((xx // period) + (yy // period)) % 2 == 1] = other
  return img, names[a]


def draw_scene(rng: np.random.Generator, size: int = 96, with_nouns: bool = False):
  """One scene. Returns (rgb uint8 [size, size, 3], label uint8 [size, size] of CLASSES indices,
  objects: the class names of the objects in drawing order, caption), and with `with_nouns` the
  caption's nouns (module doc) last; the draws are the same either way."""
  img, bg_name = _background(rng, size)
  label = np.zeros((size, size), np.uint8)
  n = int(rng.integers(1, 4))
  classes = rng.choice(len(CLASSES) - 1, size=n, replace=False) + 1  # distinct classes
  masks = []
  for k in classes:
    colour, shape = CLASSES[k].split(" ")
    r = size * rng.uniform(*OBJECT_RADIUS)
    cx, cy = rng.uniform(r, size - r, size=2)
    m = _shape_mask(shape, size, cx, cy, r)
    fill = np.asarray(COLORS[colour], np.float32) + rng.integers(-20, 21, size=3)
    img[m] = fill
    label[m] = k
    masks.append(m)
  objects = [
    CLASSES[k] for k, m in zip(classes, masks) if (label[m] == k).mean() >= _MIN_VISIBLE
  ]  # mostly hidden objects go unnamed
  if not objects:  # (cannot happen: the last object drawn is fully visible)
    raise AssertionError("no visible object")
  named = list(objects)
  rng.shuffle(named)
  if len(named) > 1 and rng.random() < 0.3:
    named = named[: int(rng.integers(1, len(named)))]  # some captions name only some objects
  if rng.random() < SHAPE_ONLY_CAPTIONS:
    named = [o.split(" ")[1] for o in named]
  words = [f"a {o}" for o in named]
  listing = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
  template = TEMPLATES[rng.integers(len(TEMPLATES))]
  caption = template.format(listing, bg=bg_name)
  rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
  if not with_nouns:
    return rgb, label, objects, caption
  nouns = set(named) | {w for w in TEMPLATE_NOUNS if w in template.split()}
  if "{bg}" in template:
    nouns.add(f"{bg_name} background")
  return rgb, label, objects, caption, sorted(nouns)


def scene(seed: int, stream: int, index: int, size: int = 96, with_nouns: bool = False):
  """Scene `index` of a stream (STREAM_TRAIN / STREAM_EVAL): independent of shard counts."""
  return draw_scene(np.random.default_rng([seed, stream, index]), size, with_nouns)


def vocabulary() -> list[str]:
  """Every word a caption or an evaluation class name can contain (tests, token lists)."""
  words = set()
  for t in TEMPLATES:
    words.update(t.replace("{}", " ").replace("{bg}", " ").split())
  words.update(" ".join(CLASSES + tuple(BACKGROUNDS)).split())
  words.update(["a", "and"])
  return sorted(words)


def write_synthetic_image_text(
  out_dir: str,
  num_examples: int = 256,
  image_size: int = 96,
  num_shards: int = 4,
  seed: int = 0,
  image_format: str = "JPEG",
  quality: int = 90,
  with_nouns: bool = True,
) -> list[str]:
  """Write `num_examples` training pairs into `num_shards` TFRecords; return their paths.

  Deterministic in `seed`; existing complete shards are kept (resumable like the converter).
  Keys are `synth-{i:08d}`. `with_nouns`: store each caption's nouns (schema `nouns`).
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  bounds = np.linspace(0, num_examples, num_shards + 1).astype(int)
  for s in range(num_shards):
    path = os.path.join(out_dir, schema.shard_name(s, num_shards))
    paths.append(path)
    if os.path.exists(path):
      continue
    with schema.ShardWriter(path) as w:
      for i in range(bounds[s], bounds[s + 1]):
        rgb, _, _, caption, nouns = scene(seed, STREAM_TRAIN, i, image_size, with_nouns=True)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(
          buf, format=image_format, **({"quality": quality} if image_format == "JPEG" else {})
        )
        w.write(
          schema.make_example(
            buf.getvalue(),
            caption,
            f"synth-{i:08d}",
            width=image_size,
            height=image_size,
            nouns=nouns if with_nouns else None,
          )
        )
      w.close({"written": w.count, "skipped": {}})
  return paths
