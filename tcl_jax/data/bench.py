"""Input pipeline throughput per CPU core.

    python -m tcl_jax.data.bench [--num-images 256] [--seconds 20] [--image-size 224]

Writes ~512 px JPEGs (quality 95, short side 512 like img2dataset output,
textured so they do not decode unrealistically fast) as TFRecords into a temp
dir, then runs the training pipeline with a one-thread private tf.data pool
(``threading.private_threadpool_size = 1``), and reports decoded + augmented
+ tokenized images/s. Configurations: with / without the DeiT options, and
tokenization in the pipeline vs ids stored in the records.

Reference (original PyTorch per-sample path, one core of the dev machine):
271 img/s with the DeiT options, 317 without.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np

REFERENCE = {"deit": 271.0, "plain": 317.0}


def make_jpeg(rng: np.random.Generator) -> bytes:
  from PIL import Image

  w, h = (
    (512, int(rng.integers(384, 769))) if rng.random() < 0.5 else (int(rng.integers(512, 769)), 512)
  )
  # smooth colour field + fine grain: roughly photo-like JPEG entropy
  low = rng.integers(0, 256, size=(h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
  img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
  arr = np.asarray(img).astype(np.int16) + rng.integers(-5, 6, size=(h, w, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def write_bench_data(
  out_dir: str, num_images: int, num_shards: int = 4, seed: int = 0
) -> list[str]:
  from tcl_jax.data import schema
  from tcl_jax.tokenizer import tokenize

  rng = np.random.default_rng(seed)
  words = (
    "a photo of the dog cat man woman tree car red blue big small on in with street beach".split()
  )
  paths = []
  for s in range(num_shards):
    path = os.path.join(out_dir, schema.shard_name(s, num_shards))
    with schema.ShardWriter(path) as w:
      for i in range(s, num_images, num_shards):
        cap = " ".join(rng.choice(words, size=int(rng.integers(6, 20))))
        w.write(schema.make_example(make_jpeg(rng), cap, f"{i:09d}", tokens=tokenize([cap])[0]))
    paths.append(path)
  return paths


def measure(
  files,
  *,
  deit: bool,
  tokens_from_record: bool,
  image_size: int,
  seconds: float,
  batch: int = 32,
  threads: int = 1,
) -> tuple[float, float]:
  """Returns (images per CPU-second, images per wall-second)."""
  import tensorflow as tf

  from tcl_jax.data.augment import AugmentConfig
  from tcl_jax.data.input_pipeline import make_train_dataset

  cfg = AugmentConfig(image_size=image_size, deit_aug=deit)
  ds = make_train_dataset(
    files,
    global_batch_size=batch,
    seed=0,
    image_size=image_size,
    process_index=0,
    process_count=1,
    augment=cfg,
    shuffle_buffer=256,
    threads=threads,
    tokens_from_record=tokens_from_record,
    with_metadata=False,
    cycle_length=4,
  ).repeat()
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = threads
  it = ds.with_options(opts).as_numpy_iterator()
  for _ in range(3):  # warm-up: tracing, shuffle buffer fill
    next(it)
  # CPU seconds of this process (all threads): per-core throughput that
  # stays meaningful when other jobs share the machine.
  n, t0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    n += next(it)["image"].shape[0]
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return n / cpu, n / wall


def measure_pil(files, *, image_size: int, seconds: float) -> tuple[float, float]:
  """Same-moment baseline: the original's plain per-sample path (PIL decode,
  torchvision-style RandomResizedCrop with PIL bilinear, flip, ToTensor +
  Normalize, per-caption tokenize) in numpy, one thread."""
  import math

  from PIL import Image
  import tensorflow as tf

  from tcl_jax.data import schema
  from tcl_jax.models import clip as clip_lib
  from tcl_jax.tokenizer import tokenize

  recs = [
    tf.io.parse_single_example(r, schema.parse_spec())
    for f in files
    for r in tf.data.TFRecordDataset(f)
  ]
  pairs = [(r["image"].numpy(), r["caption"].numpy().decode()) for r in recs]
  rng = np.random.default_rng(0)
  mean = np.array(clip_lib.IMAGE_MEAN, np.float32)
  std = np.array(clip_lib.IMAGE_STD, np.float32)

  def one(data, cap):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    W, H = img.size
    for _ in range(10):
      ta = W * H * rng.uniform(0.08, 1.0)
      ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
      w, h = round(math.sqrt(ta * ar)), round(math.sqrt(ta / ar))
      if 0 < w <= W and 0 < h <= H:
        i, j = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        break
    else:
      i, j, h, w = 0, 0, H, W
    img = img.resize((image_size, image_size), Image.BILINEAR, box=(j, i, j + w, i + h))
    if rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = (np.asarray(img, np.float32) / 255.0 - mean) / std
    return x, tokenize([cap])

  n, t0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    one(*pairs[n % len(pairs)])
    n += 1
  return n / (time.process_time() - c0), n / (time.perf_counter() - t0)


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  p = argparse.ArgumentParser(
    prog="python -m tcl_jax.data.bench",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--num-images", type=int, default=256)
  p.add_argument("--seconds", type=float, default=15.0, help="timed run per configuration")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--threads", type=int, default=1, help="tf.data threads (1 = per core)")
  args = p.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    files = write_bench_data(tmp, args.num_images)
    mb = sum(os.path.getsize(f) for f in files) / 2**20
    results = {}
    for name, deit in (("deit", True), ("plain", False)):
      for tok_name, from_rec in (("pipeline", False), ("record", True)):
        results[f"{name}/{tok_name}"] = measure(
          files,
          deit=deit,
          tokens_from_record=from_rec,
          image_size=args.image_size,
          seconds=args.seconds,
          threads=args.threads,
        )
    results["plain/pil-baseline"] = measure_pil(
      files, image_size=args.image_size, seconds=args.seconds
    )
  print(
    f"{args.num_images} JPEGs ~512px ({mb:.1f} MiB), {args.image_size}^2 output, "
    f"{args.threads} tf.data thread(s)"
  )
  print(
    f"{'augmentation':<12} {'tokenize in':<18} {'img/cpu-s':>9} {'vs torch':>8} {'img/wall-s':>10}"
  )
  for key, (per_cpu, per_wall) in results.items():
    name, tok = key.split("/")
    print(
      f"{name:<12} {tok:<18} {per_cpu:>9.1f} {per_cpu / REFERENCE[name]:>7.2f}x {per_wall:>10.1f}"
    )
  print(
    json.dumps(
      {
        "img_per_cpu_s": {k: round(v[0], 1) for k, v in results.items()},
        "img_per_wall_s": {k: round(v[1], 1) for k, v in results.items()},
        "reference_torch": REFERENCE,
        "threads": args.threads,
        "image_size": args.image_size,
      }
    )
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
