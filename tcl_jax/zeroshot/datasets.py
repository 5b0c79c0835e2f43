"""Readers for the eight zero-shot segmentation benchmarks, in mmsegmentation's directory layouts.

Each task names the dataset class the original evaluates with (mmseg 0.27, or TCL's own
`segmentation/datasets/*.py`), its directory layout (`segmentation/configs/_base_/datasets/*.py`),
its class names in order, and its label handling. See /work/shared/EVAL_PROTOCOL.md.

Images are read as mmseg's LoadImageFromFile does (`mmcv.imfrombytes(flag='color')`: OpenCV
imdecode, BGR uint8); label maps as its LoadAnnotations (Pillow, unchanged: palette indices for the
VOC/Context PNGs; squeezed, as uint8).
`reduce_zero_label` is *not* applied here: like mmseg 0.27, it is applied once, inside the metric.

`write_synthetic_segmentation` writes tiny datasets in the same layouts for tests and for the
training loop's default evaluation.
"""

import dataclasses
import logging
import os
from typing import Iterator, Optional

import cv2
import numpy as np
from PIL import Image

from tcl_jax.data import synthetic

IGNORE_INDEX = 255

# ----------------------------------------------------------------------------------------------
# Class names (the tuples of the dataset classes, in order)
# ----------------------------------------------------------------------------------------------

# Tables of names, kept compact.
# fmt: off
# mmseg PascalVOCDataset.
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")

# tcl PascalVOCDataset20: VOC without background.
VOC20_CLASSES = VOC_CLASSES[1:]

# mmseg 0.27 PascalContextDataset59 (alphabetical); PascalContextDataset prepends background.
CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood")
CONTEXT_CLASSES = ("background",) + CONTEXT59_CLASSES

# mmseg COCOStuffDataset: the 80 things then the 91 stuff classes (171).
COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood")

# tcl COCOObjectDataset: background + the 80 COCO thing classes.
COCO_OBJECT_CLASSES = ("background",) + COCO_STUFF_CLASSES[:80]

# mmseg CityscapesDataset (the 19 train ids).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")

# mmseg ADE20KDataset. Quirk kept from mmseg: 'bed ' has a trailing space (it reaches the
# prompts, e.g. "a photo of bed s.").
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag")
# fmt: on


# ----------------------------------------------------------------------------------------------
# COCO-Stuff raw ids -> train ids (shared by the synthetic writer and the COCO-Object converter)
# ----------------------------------------------------------------------------------------------

# COCO-Stuff-164k label maps store (COCO category id - 1), 0..181, and 255 for unlabeled. Eleven
# of the 182 ids have no category; the other 171 take train ids 0..170 in increasing order. Raw
# ids 0..90 are the 80 things.
COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_THING_MAX_ID = 90


def coco_stuff_id_to_train_id() -> dict:
  """{raw id: train id} for the 171 used COCO-Stuff ids (mmseg's `_labelTrainIds` mapping)."""
  used = [i for i in range(182) if i not in COCO_UNUSED_IDS]
  return {raw: train for train, raw in enumerate(used)}


# ----------------------------------------------------------------------------------------------
# Task specs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One benchmark: where its files are (relative to the data root) and how to read them."""

  name: str
  dataset_class: str
  root: str  # relative to the data root (the original's ./data)
  img_dir: str
  ann_dir: str
  img_suffix: str
  seg_map_suffix: str
  split: Optional[str]  # split file relative to root; None: scan img_dir recursively
  classes: tuple
  reduce_zero_label: bool
  layout: str  # which synthetic layout writes it

  @property
  def with_bg(self) -> bool:
    """The original adds a constant background channel iff the first class is 'background'."""
    return self.classes[0] == "background"

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def text_classes(self) -> tuple:
    """The classes that get a text embedding (all but background)."""
    return self.classes[1:] if self.with_bg else self.classes


def _voc(name, cls_name, classes, rzl, split="val"):
  return TaskSpec(
    name,
    cls_name,
    "VOCdevkit/VOC2012",
    "JPEGImages",
    "SegmentationClass",
    ".jpg",
    ".png",
    f"ImageSets/Segmentation/{split}.txt",
    classes,
    rzl,
    "voc",
  )


def _context(name, cls_name, classes, rzl, split="val"):
  return TaskSpec(
    name,
    cls_name,
    "VOCdevkit/VOC2010",
    "JPEGImages",
    "SegmentationClassContext",
    ".jpg",
    ".png",
    f"ImageSets/SegmentationContext/{split}.txt",
    classes,
    rzl,
    "context",
  )


# A table: one task a line.
# fmt: off
TASKS = {
    "voc": _voc("voc", "PascalVOCDataset", VOC_CLASSES, False),
    "voc20": _voc("voc20", "PascalVOCDataset20", VOC20_CLASSES, True),
    "context": _context("context", "PascalContextDataset", CONTEXT_CLASSES, False),
    "context59": _context("context59", "PascalContextDataset59", CONTEXT59_CLASSES, True),
    "coco_stuff": TaskSpec("coco_stuff", "COCOStuffDataset", "coco_stuff164k", "images/val2017",
                           "annotations/val2017", ".jpg", "_labelTrainIds.png", None,
                           COCO_STUFF_CLASSES, False, "coco"),
    "coco_object": TaskSpec("coco_object", "COCOObjectDataset", "coco_stuff164k",
                            "images/val2017", "annotations/val2017", ".jpg",
                            "_instanceTrainIds.png", None, COCO_OBJECT_CLASSES, False, "coco"),
    "cityscapes": TaskSpec("cityscapes", "CityscapesDataset", "cityscapes", "leftImg8bit/val",
                           "gtFine/val", "_leftImg8bit.png", "_gtFine_labelTrainIds.png", None,
                           CITYSCAPES_CLASSES, False, "cityscapes"),
    "ade20k": TaskSpec("ade20k", "ADE20KDataset", "ade", "ADEChallengeData2016/images/validation",
                       "ADEChallengeData2016/annotations/validation", ".jpg", ".png", None,
                       ADE20K_CLASSES, True, "ade20k"),
    # The training-time evaluation of the original (configs/tcl.yml): the same datasets on their
    # train splits.
    "t_voc20": _voc("t_voc20", "PascalVOCDataset20", VOC20_CLASSES, True, split="train"),
    "t_context59": _context("t_context59", "PascalContextDataset59", CONTEXT59_CLASSES, True,
                            split="train"),
    # The miniature's shapes world (tcl_jax/data/synthetic.py) in the VOC layout, as the voc /
    # voc20 pair: with a background class (a bg_thresh channel) and one class per colour-shape
    # pair; and the same files scored on object pixels only (background ignored).
    "shapes": TaskSpec("shapes", "PascalVOCDataset", "shapes/VOC2012", "JPEGImages",
                       "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/val.txt",
                       synthetic.CLASSES, False, "shapes"),
    "shapes12": TaskSpec("shapes12", "PascalVOCDataset20", "shapes/VOC2012", "JPEGImages",
                         "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/val.txt",
                         synthetic.CLASSES[1:], True, "shapes"),
}

BENCHMARKS = ("voc", "voc20", "context", "context59", "coco_stuff", "coco_object", "cityscapes",
              "ade20k")
# fmt: on


def get_task(name: str) -> TaskSpec:
  if name not in TASKS:
    raise ValueError(f"unknown segmentation task {name!r}; known: {', '.join(TASKS)}")
  return TASKS[name]


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class DataError(FileNotFoundError):
  """A data root, image folder or split file is missing (one-line message)."""


class CorruptSample(ValueError):
  """An image or label map that cannot be read (or whose sizes disagree)."""


def read_image_bgr(path: str) -> np.ndarray:
  """`mmcv.imfrombytes(bytes, 'color')` (cv2 backend): OpenCV imdecode to BGR uint8 [H, W, 3]."""
  try:
    buf = np.fromfile(path, dtype=np.uint8)
  except OSError as e:
    raise CorruptSample(f"cannot read image {path}: {e}") from None
  img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
  if img is None:
    raise CorruptSample(f"cannot decode image {path}")
  return img


def read_label(path: str) -> np.ndarray:
  """mmseg LoadAnnotations (pillow backend, 'unchanged'): uint8 [H, W] of stored values."""
  try:
    with Image.open(path) as im:
      arr = np.array(im)
  except (OSError, ValueError, SyntaxError) as e:
    raise CorruptSample(f"cannot read label map {path}: {e}") from None
  arr = np.squeeze(arr)
  if arr.ndim != 2:
    raise CorruptSample(f"label map {path} has shape {arr.shape}, expected a single channel")
  return arr.astype(np.uint8)


def data_problem(task, data_root: str, flag: str = "--config.data_root") -> str | None:
  """Why `task`'s files cannot be listed under `data_root` (None: they can): its root, image
  folder or split file is missing. `flag` is the option that sets the data root."""
  spec = get_task(task) if isinstance(task, str) else task
  root = os.path.join(data_root, spec.root)
  if not os.path.isdir(root):
    return (
      f"{spec.name}: data root {root} does not exist (set {flag} to the folder holding {spec.root})"
    )
  img_dir = os.path.join(root, spec.img_dir)
  if not os.path.isdir(img_dir):
    return f"{spec.name}: image folder {img_dir} does not exist"
  if spec.split is not None and not os.path.isfile(os.path.join(root, spec.split)):
    return f"{spec.name}: split file {os.path.join(root, spec.split)} does not exist"
  return None


@dataclasses.dataclass
class Sample:
  name: str  # image path relative to img_dir, as mmseg's `filename`
  image: np.ndarray  # BGR uint8 [H, W, 3]
  label: np.ndarray  # uint8 [H, W], as stored


class SegDataset:
  """The (image, label map) pairs of one task, in mmseg's order.

  With a split file: its lines (stripped, blank lines skipped) + suffixes. Without one: every
  file under img_dir ending with the image suffix, recursively, sorted (mmseg's scandir).
  Iterating skips unreadable samples and counts them in `num_skipped` (names in `skipped`).
  """

  def __init__(self, task, data_root: str, max_images: Optional[int] = None):
    self.spec = get_task(task) if isinstance(task, str) else task
    spec = self.spec
    self.data_root = data_root
    self.root = os.path.join(data_root, spec.root)
    self.img_dir = os.path.join(self.root, spec.img_dir)
    self.ann_dir = os.path.join(self.root, spec.ann_dir)
    problem = data_problem(spec, data_root)
    if problem:
      raise DataError(problem)
    if spec.split is not None:
      split_path = os.path.join(self.root, spec.split)
      with open(split_path) as f:
        stems = [line.strip() for line in f]
      names = [s + spec.img_suffix for s in stems if s]
    else:
      names = []
      for dirpath, _, files in os.walk(self.img_dir):
        rel = os.path.relpath(dirpath, self.img_dir)
        for fn in files:
          if fn.endswith(spec.img_suffix) and not fn.startswith("."):  # mmcv skips hidden files
            names.append(fn if rel == "." else os.path.join(rel, fn))
      names.sort()
    if max_images and max_images > 0:
      names = names[:max_images]
    self.names = names
    self.num_skipped = 0
    self.skipped: list = []

  def __len__(self) -> int:
    return len(self.names)

  def paths(self, i: int):
    name = self.names[i]
    stem = name[: -len(self.spec.img_suffix)]
    return (
      os.path.join(self.img_dir, name),
      os.path.join(self.ann_dir, stem + self.spec.seg_map_suffix),
    )

  def load(self, i: int) -> Sample:
    """Sample i; raises CorruptSample if the image or label cannot be read or sizes differ."""
    img_path, ann_path = self.paths(i)
    image = read_image_bgr(img_path)
    label = read_label(ann_path)
    if image.shape[:2] != label.shape:
      raise CorruptSample(
        f"{self.names[i]}: image {image.shape[:2]} and label {label.shape} sizes differ"
      )
    return Sample(self.names[i], image, label)

  def __iter__(self) -> Iterator[Sample]:
    self.num_skipped = 0
    self.skipped = []
    for i in range(len(self.names)):
      try:
        yield self.load(i)
      except CorruptSample as e:
        self.num_skipped += 1
        self.skipped.append(self.names[i])
        logging.warning("%s: skipping %s", self.spec.name, e)


# ----------------------------------------------------------------------------------------------
# Label colours (the synthetic writer is tcl_jax.data.synthetic_segmentation)
# ----------------------------------------------------------------------------------------------


def voc_palette(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map ([n, 3] uint8): bits of the index spread over R, G, B."""
  pal = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= (c & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    pal[i] = (r, g, b)
  return pal
