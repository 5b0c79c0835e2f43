"""Make the COCO-Object label maps from COCO-Stuff-164k (TCL's convert_dataset/convert_coco_object.py).

    python -m tcl_jax.tools.convert_coco_object COCO_STUFF_ROOT [-o OUT_DIR] [--nproc N]

COCO_STUFF_ROOT is the `coco_stuff164k` folder (images/{train,val}2017,
annotations/{train,val}2017/<id>.png with raw ids 0..181 and 255 = unlabeled). For every raw map
(files whose name holds 'TrainIds' are left out) this writes
annotations/<split>/<id>_instanceTrainIds.png where

  * thing ids 0..90 become their COCO-Stuff train id + 1, i.e. 1..80 (the 80 things in order);
  * stuff ids > 90 become 0 (background);
  * quirk of the original, kept: the unlabeled value 255 also becomes 0, so COCO-Object has no
    ignored pixels;
  * ids without a category (11, 25, 28, ...; absent from real maps) are left as they are, as the
    original's lookup table does not list them.

The output name is the part of the file name before its first '.', plus '_instanceTrainIds.png'
(as the original). The original also asserts the full 123,287 maps; here a different count only
warns, so partial copies (or the val split alone) can be converted.
With -o, images/ is copied to OUT_DIR and the label maps are written there.
"""

import argparse
import functools
import multiprocessing
import os
import shutil
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from tcl_jax.zeroshot import datasets as seg_data

COCO_LEN = 123287  # train2017 + val2017 label maps


def object_lut() -> np.ndarray:
  """[256] uint8 lookup table raw COCO-Stuff id -> COCO-Object label (identity where unlisted)."""
  lut = np.arange(256, dtype=np.uint8)
  for raw, train in seg_data.coco_stuff_id_to_train_id().items():
    lut[raw] = train + 1 if raw <= seg_data.COCO_THING_MAX_ID else 0
  lut[seg_data.IGNORE_INDEX] = 0  # quirk: unlabeled -> background
  return lut


def convert_labels(raw: np.ndarray) -> np.ndarray:
  """Raw COCO-Stuff label map (uint8) -> COCO-Object label map."""
  return object_lut()[np.asarray(raw, dtype=np.uint8)]


def output_name(mask_path: str) -> str:
  return os.path.basename(mask_path).split(".")[0] + "_instanceTrainIds.png"


def convert_file(mask_path: str, out_split_dir: str) -> str:
  with Image.open(mask_path) as im:
    raw = np.array(im)
  out = os.path.join(out_split_dir, output_name(mask_path))
  Image.fromarray(convert_labels(raw)).save(out, "PNG")
  return out


def _raw_maps(folder: str) -> list:
  if not os.path.isdir(folder):
    return []
  return sorted(
    os.path.join(folder, f)
    for f in os.listdir(folder)
    if f.endswith(".png") and "TrainIds" not in f
  )


def convert(coco_path: str, out_dir: str = None, nproc: int = 1, progress: bool = True) -> int:
  """Convert every raw map of train2017 and val2017; returns the number written."""
  ann_in = os.path.join(coco_path, "annotations")
  if not os.path.isdir(ann_in):
    raise FileNotFoundError(
      f"{ann_in} does not exist (expected COCO-Stuff-164k's annotations/{{train,val}}2017)"
    )
  out_dir = out_dir or coco_path
  if os.path.abspath(out_dir) != os.path.abspath(coco_path):
    src_images = os.path.join(coco_path, "images")
    if os.path.isdir(src_images):
      shutil.copytree(src_images, os.path.join(out_dir, "images"), dirs_exist_ok=True)
  jobs = []
  for split in ("train2017", "val2017"):
    out_split = os.path.join(out_dir, "annotations", split)
    os.makedirs(out_split, exist_ok=True)
    jobs.append((split, _raw_maps(os.path.join(ann_in, split)), out_split))
  total = sum(len(files) for _, files, _ in jobs)
  if total == 0:
    raise FileNotFoundError(f"no raw label maps (*.png) under {ann_in}/{{train,val}}2017")
  if total != COCO_LEN:
    print(
      f"warning: {total} label maps found, the full COCO-Stuff-164k has {COCO_LEN}", file=sys.stderr
    )
  done = 0
  for split, files, out_split in jobs:
    if not files:
      continue
    fn = functools.partial(convert_file, out_split_dir=out_split)
    it = files
    if nproc > 1:
      pool = multiprocessing.Pool(nproc)
      it = pool.imap(fn, files, chunksize=16)
    else:
      it = map(fn, files)
    if progress:
      it = tqdm(it, total=len(files), desc=split)
    for _ in it:
      done += 1
    if nproc > 1:
      pool.close()
      pool.join()
  return done


def main(argv=None):
  parser = argparse.ArgumentParser(description="Convert COCO-Stuff-164k annotations to COCO-Object")
  parser.add_argument("coco_path", help="the coco_stuff164k folder")
  parser.add_argument("-o", "--out_dir", help="output folder (default: coco_path)")
  parser.add_argument("--nproc", type=int, default=1, help="worker processes")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    n = convert(args.coco_path, args.out_dir, args.nproc, progress=not args.no_progress)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Done! {n} label maps written.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
