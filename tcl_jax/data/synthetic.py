"""Tiny synthetic image-text dataset (coloured shapes with matching captions).

Used as the training default when no real data is configured, and by tests.
Captions look like "a red circle on a blue background"; the shape is large
and roughly centred so that random crops usually keep part of it. Files go
through the same writer and schema as ``convert`` (``schema.ShardWriter``).
"""

from __future__ import annotations

import io
import os

import numpy as np

from tcl_jax.data import schema

COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220),
    "yellow": (240, 220, 40), "purple": (140, 50, 170), "orange": (250, 140, 20),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


def draw_example(rng: np.random.Generator, image_size: int):
    """Returns (PIL image, caption)."""
    from PIL import Image, ImageDraw

    names = list(COLORS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    img = Image.new("RGB", (image_size, image_size), COLORS[names[bg]])
    d = ImageDraw.Draw(img)
    r = image_size * rng.uniform(0.2, 0.4)
    cx, cy = image_size * rng.uniform(0.35, 0.65, size=2)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=COLORS[names[fg]])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[names[fg]])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[names[fg]])
    return img, f"a {names[fg]} {shape} on a {names[bg]} background"


def write_synthetic_image_text(out_dir: str, num_examples: int = 256, image_size: int = 128,
                               num_shards: int = 4, seed: int = 0, image_format: str = "JPEG",
                               quality: int = 90) -> list[str]:
    """Write ``num_examples`` pairs into ``num_shards`` TFRecords; return their paths.

    Deterministic in ``seed``; existing complete shards are kept (resumable like
    the converter). Keys are ``synth-{i:08d}``.
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
                rng = np.random.default_rng([seed, i])  # per example: shard-count independent
                img, caption = draw_example(rng, image_size)
                buf = io.BytesIO()
                img.save(buf, format=image_format, **({"quality": quality}
                                                      if image_format == "JPEG" else {}))
                w.write(schema.make_example(buf.getvalue(), caption, f"synth-{i:08d}",
                                            width=image_size, height=image_size))
            w.close({"written": w.count, "skipped": {}})
    return paths
