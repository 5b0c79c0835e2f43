"""Evaluation protocol pieces (no model): resize/normalize, sliding windows, bilinear resize,
mIoU, dataset readers, the COCO-Object converter, and the whole per-dataset loop against a
plain reference implementation of mmseg's semantics."""

import functools
import json
import math
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from tcl_jax import kinds
from tcl_jax import sharding
from tcl_jax.data import synthetic_segmentation
from tcl_jax.models import resize
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.models import tcl_inference
from tcl_jax.tools import convert_coco_object as cco
from tcl_jax.zeroshot import datasets as sd
from tcl_jax.zeroshot import evaluator
from tcl_jax.zeroshot import metrics
from tcl_jax.zeroshot import pipeline
from tcl_jax.zeroshot import prompts


# The production pieces the evaluator runs (pipeline.run_windows, average_windows,
# labels_from_scores, resize.resize_with_taps), composed for tests at explicit sizes.
def slide_scores(image, fn, num_classes, crop=448, stride=224, batch=8, bg_thresh=None):
  h, w = image.shape[:2]
  win = pipeline.run_windows(image, fn, num_classes, crop, stride, batch)
  return jax.jit(
    functools.partial(
      pipeline.average_windows, num_channels=num_classes, bg_thresh=bg_thresh, hb=h, wb=w
    )
  )(win.outs, win.y1, win.x1, win.valid)


def resize_bilinear(x, size):
  return resize.resize_with_taps(
    jnp.asarray(x),
    resize.bilinear_taps(x.shape[-2], size[0]),
    resize.bilinear_taps(x.shape[-1], size[1]),
  )


def scores_to_labels(scores, size):
  return pipeline.labels_from_scores(
    jnp.asarray(scores),
    resize.bilinear_taps(scores.shape[-2], size[0]),
    resize.bilinear_taps(scores.shape[-1], size[1]),
  )


# ----------------------------------------------------------------------------------------------
# Resize and normalization
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "size,scale,expected",
  [
    ((500, 375), (2048, 448), (597, 448)),  # VOC landscape: 500 * 448/375 = 597.33
    ((375, 500), (2048, 448), (448, 597)),
    ((501, 375), (2048, 448), (599, 448)),  # 598.53 + 0.5 -> 599 (rounding, not truncation)
    ((2048, 1024), (2048, 448), (896, 448)),  # Cityscapes
    ((4000, 100), (2048, 448), (2048, 51)),  # long side bound wins: 100 * 0.512 = 51.2
    ((300, 200), (2048, 448), (672, 448)),  # up-scaling
    ((130, 48), (256, 96), (256, 95)),  # 48 * 256/130 = 94.52 -> 95
    ((501, 375), (96, 256), (128, 96)),  # (long, short) order does not matter
  ],
)
def test_mmcv_rescale_size(size, scale, expected):
  assert pipeline.mmcv_rescale_size(*size, scale=scale) == expected


def test_resize_keep_ratio_is_opencv_fixed_point_linear():
  row = np.array([0, 100, 200, 255], np.uint8)
  img = np.repeat(np.tile(row, (2, 1))[..., None], 3, axis=2)  # 2 x 4 x 3
  out = pipeline.resize_keep_ratio(img, (8, 4))  # factor min(8/4, 4/2) = 2 -> 4 x 8
  assert out.shape == (4, 8, 3) and out.dtype == np.uint8
  # half-pixel linear taps 0.25/0.75; 213.75 -> 214 and 241.25 -> 241 (uint8 rounding)
  np.testing.assert_array_equal(out[..., 0], np.tile([0, 25, 75, 125, 175, 214, 241, 255], (4, 1)))


def test_normalize_image_matches_mmcv_imnormalize():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)
  ours = pipeline.normalize_image(img)
  # mmcv.imnormalize_(img, mean, std, to_rgb=True) on mmseg's float32 mean/std:
  ref = img.astype(np.float32)
  mean = np.float64(np.array(pipeline.IMAGE_MEAN_255, np.float32).reshape(1, -1))
  stdinv = 1 / np.float64(np.array(pipeline.IMAGE_STD_255, np.float32).reshape(1, -1))
  cv2.cvtColor(ref, cv2.COLOR_BGR2RGB, ref)
  cv2.subtract(ref, mean, ref)
  cv2.multiply(ref, stdinv, ref)
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, ref)
  px = pipeline.normalize_image(np.array([[[0, 128, 255]]], np.uint8))[0, 0]  # BGR
  np.testing.assert_allclose(
    px, [(255 - 123.675) / 58.395, (128 - 116.28) / 57.12, (0 - 103.53) / 57.375], rtol=1e-6
  )


def test_templates():
  custom = prompts.get_templates("custom")
  assert len(custom) == 9
  assert custom[0] == "itap of a {}." and custom[6] == "a photo of the small {}."
  assert custom[7:] == ("a photo of many {}.", "a photo of {}s.")
  assert prompts.get_templates("simple") == ("a photo of a {}.",)
  with pytest.raises(ValueError, match="unknown template set"):
    prompts.get_templates("nope")


# ----------------------------------------------------------------------------------------------
# Sliding windows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "h,w,expected",
  [
    (300, 300, [(0, 300, 0, 300)]),  # smaller than a crop: one window
    (448, 448, [(0, 448, 0, 448)]),  # exactly a crop
    (448, 597, [(0, 448, 0, 448), (0, 448, 149, 597)]),  # VOC 500x375 after resize
    (448, 672, [(0, 448, 0, 448), (0, 448, 224, 672)]),  # 448 + stride: no extra window
    (448, 673, [(0, 448, 0, 448), (0, 448, 224, 672), (0, 448, 225, 673)]),
    (449, 200, [(0, 448, 0, 200), (1, 449, 0, 200)]),  # narrow: windows 200 wide
    (600, 200, [(0, 448, 0, 200), (152, 600, 0, 200)]),
    (448, 896, [(0, 448, 0, 448), (0, 448, 224, 672), (0, 448, 448, 896)]),  # Cityscapes
  ],
)
def test_slide_windows(h, w, expected):
  assert pipeline.slide_windows(h, w, 448, 224) == expected


def test_slide_windows_grid_order_rows_outer():
  assert pipeline.slide_windows(7, 6, crop=4, stride=3) == [
    (0, 4, 0, 4),
    (0, 4, 2, 6),
    (3, 7, 0, 4),
    (3, 7, 2, 6),
  ]
  assert pipeline.slide_windows(5, 9, crop=(5, 4), stride=(2, 4)) == [
    (0, 5, 0, 4),
    (0, 5, 4, 8),
    (0, 5, 5, 9),
  ]


class _Recorder:
  """Fake mask function: class c of a window is (c + 1) * the window's value at its top-left
  pixel of channel 0, constant over the window; it records the batch shapes it sees."""

  def __init__(self, n):
    self.n = n
    self.shapes = []

  def __call__(self, windows):
    windows = np.asarray(windows)
    self.shapes.append(windows.shape)
    k, h, w, _ = windows.shape
    v = windows[:, 0, 0, 0]
    return np.broadcast_to(
      (v[:, None] * np.arange(1, self.n + 1))[:, :, None, None], (k, self.n, h, w)
    ).astype(np.float32)


def test_slide_inference_overlap_average_and_background():
  # 4 x 6 image, crop 4, stride 2 -> windows x [0, 4) and [2, 6); channel 0 holds the column.
  img = np.zeros((4, 6, 3), np.float32)
  img[..., 0] = np.arange(6)
  fn = _Recorder(2)
  scores = np.asarray(slide_scores(img, fn, 2, crop=4, stride=2, batch=8, bg_thresh=0.4))
  assert scores.shape == (3, 4, 6)
  np.testing.assert_array_equal(scores[0], np.full((4, 6), 0.4, np.float32))
  # window 1 gives 0, window 2 gives 2 * (c + 1): columns 0-1 alone, 2-3 averaged, 4-5 alone
  np.testing.assert_allclose(scores[1], np.tile([0, 0, 1, 1, 2, 2], (4, 1)))
  np.testing.assert_allclose(scores[2], np.tile([0, 0, 2, 2, 4, 4], (4, 1)))
  assert fn.shapes == [(2, 4, 4, 3)]


def test_slide_inference_batches_and_padding_windows():
  # 7 x 6, crop 4, stride 3 -> 4 windows; window value = its (y1 + 10 * x1) via channel 0.
  img = np.zeros((7, 6, 3), np.float32)
  img[..., 0] = np.arange(7)[:, None] + 10 * np.arange(6)[None, :]
  fn = _Recorder(1)
  scores = np.asarray(slide_scores(img, fn, 1, crop=4, stride=3, batch=3))
  assert fn.shapes == [(3, 4, 4, 3), (3, 4, 4, 3)]  # 4 windows padded to 6, chunks of 3
  # windows (y1, x1): (0,0)=0, (0,2)=20, (3,0)=3, (3,2)=23
  expected = np.zeros((7, 6))
  count = np.zeros((7, 6))
  for y1, x1, v in [(0, 0, 0), (0, 2, 20), (3, 0, 3), (3, 2, 23)]:
    expected[y1 : y1 + 4, x1 : x1 + 4] += v
    count[y1 : y1 + 4, x1 : x1 + 4] += 1
  np.testing.assert_allclose(scores[0], expected / count, rtol=1e-6)
  assert scores[0, 0, 0] == 0 and scores[0, 6, 5] == 23 and scores[0, 3, 2] == pytest.approx(11.5)
  fn1 = _Recorder(1)
  np.testing.assert_allclose(np.asarray(slide_scores(img, fn1, 1, 4, 3, batch=8)), scores)
  assert fn1.shapes == [(4, 4, 4, 3)]
  fn2 = _Recorder(1)
  slide_scores(img[:, :5], fn2, 1, 4, 3, batch=8)  # 2 x 2 windows -> one chunk of 4
  assert fn2.shapes == [(4, 4, 4, 3)]
  fn3 = _Recorder(1)
  slide_scores(img[:4, :5], fn3, 1, 4, 3, batch=8)  # 2 windows -> power of two, 2
  assert fn3.shapes == [(2, 4, 4, 3)]


def test_slide_inference_image_smaller_than_crop():
  img = np.ones((3, 5, 3), np.float32) * 2
  fn = _Recorder(2)
  scores = np.asarray(slide_scores(img, fn, 2, crop=6, stride=3, batch=4))
  assert fn.shapes == [(1, 3, 5, 3)]  # a single 3 x 5 window, not padded to the crop
  fn2 = _Recorder(2)
  slide_scores(img, fn2, 2, crop=4, stride=3, batch=4)  # narrower only in height
  assert fn2.shapes == [(2, 3, 4, 3)]
  np.testing.assert_array_equal(scores, np.stack([np.full((3, 5), 2.0), np.full((3, 5), 4.0)]))


def test_slide_inference_rejects_wrong_mask_shape():
  with pytest.raises(ValueError, match="window function returned"):
    slide_scores(
      np.zeros((4, 4, 3), np.float32), lambda w: np.zeros((len(w), 2, 3, 3), np.float32), 2, 4, 2
    )


def test_num_padded_windows():
  assert [pipeline.num_padded_windows(n, 8) for n in (1, 2, 3, 5, 8, 9, 17)] == [
    1,
    2,
    4,
    8,
    8,
    16,
    24,
  ]
  assert [pipeline.num_padded_windows(n, 3) for n in (1, 2, 3, 4)] == [1, 2, 3, 6]


# ----------------------------------------------------------------------------------------------
# Bilinear resize (torch, align_corners=False)
# ----------------------------------------------------------------------------------------------


def test_bilinear_resize_hand_values():
  up = np.asarray(resize_bilinear(np.array([[0.0, 10.0]], np.float32), (1, 4)))
  np.testing.assert_allclose(up, [[0.0, 2.5, 7.5, 10.0]])  # src -0.25(->0), .25, .75, 1.25(->1)
  down = np.asarray(resize_bilinear(np.array([[0.0, 3.0, 6.0]], np.float32), (1, 2)))
  np.testing.assert_allclose(down, [[0.75, 5.25]])  # src 0.25, 1.75 (no antialias)
  down5 = np.asarray(resize_bilinear(np.arange(5, dtype=np.float32)[None], (1, 2)))
  np.testing.assert_allclose(down5, [[0.75, 3.25]])  # src 0.75, 3.25
  sq = np.asarray(resize_bilinear(np.array([[0.0, 1.0], [2.0, 3.0]], np.float32), (3, 3)))
  np.testing.assert_allclose(sq, [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]])
  chans = np.stack([np.ones((2, 2)), 2 * np.ones((2, 2))]).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(resize_bilinear(chans, (3, 5))), np.stack([np.ones((3, 5)), 2 * np.ones((3, 5))])
  )
  i0, i1, l0, l1 = resize.bilinear_taps(3, 2)
  assert i0.tolist() == [0, 1] and i1.tolist() == [1, 2]
  np.testing.assert_allclose(l1, [0.25, 0.75])


def test_scores_to_labels_softmax_argmax_and_bucketed_path_agree():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(3, 5, 7)).astype(np.float32)
  labels = np.asarray(scores_to_labels(scores, (9, 4)))
  ref = np.asarray(resize_bilinear(scores, (9, 4))).argmax(0)
  np.testing.assert_array_equal(labels, ref)
  assert labels.shape == (9, 4) and labels.dtype == np.int32
  # The padded/bucketed production path gives the same class map.
  img = rng.normal(size=(11, 13, 3)).astype(np.float32)
  fn = lambda w: np.asarray(w).transpose(0, 3, 1, 2) * np.float32(1.5)
  a, _ = pipeline.predict_normalized(
    img,
    (17, 6),
    fn,
    3,
    pipeline.Protocol(crop=8, stride=4, batch=2, bg_thresh=0.1),
    background=True,
  )
  a = np.asarray(a)
  scores = slide_scores(img, fn, 3, crop=8, stride=4, batch=2, bg_thresh=0.1)
  b = np.asarray(scores_to_labels(scores, (17, 6)))
  assert a.shape == (64, 64)
  np.testing.assert_array_equal(a[:17, :6], b)
  assert set(np.unique(b)) <= {0, 1, 2, 3} and len(np.unique(b)) > 1


# ----------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------


def test_intersect_and_union_hand_confusion():
  pred = np.array([[0, 0, 1], [1, 2, 2], [2, 0, 1]])
  label = np.array([[0, 1, 1], [255, 2, 0], [2, 7, 1]])  # 255 ignored; 7 is out of range
  inter, union, ap, al = metrics.intersect_and_union(pred, label, 3)
  # kept pixels (pred, label): (0,0) (0,1) (1,1) (2,2) (2,0) (2,2) (0,7) (1,1)
  assert inter.tolist() == [1, 2, 2]
  assert ap.tolist() == [3, 2, 3]  # the out-of-range label pixel still counts its prediction
  assert al.tolist() == [2, 3, 2]
  assert union.tolist() == [4, 3, 3]


def test_reduce_zero_label():
  label = np.array([0, 1, 2, 150, 254, 255], np.uint8)
  assert metrics.reduce_zero_label(label).tolist() == [255, 0, 1, 149, 253, 255]
  pred = np.array([0, 0, 1, 2, 2, 2])
  inter, union, ap, al = metrics.intersect_and_union(pred, label, 3, reduce_zero=True)
  # kept: (pred, reduced label) (0,0) (1,1) (2,149) (2,253)
  assert inter.tolist() == [1, 1, 0] and ap.tolist() == [1, 1, 2] and al.tolist() == [1, 1, 0]
  assert union.tolist() == [1, 1, 2]


def test_mean_iou_accumulates_over_images_and_skips_absent_classes():
  acc = metrics.IoUAccumulator(4)
  acc.update(np.array([[0, 0], [1, 1]]), np.array([[0, 1], [1, 1]]))
  acc.update(np.array([[2, 0], [0, 0]]), np.array([[0, 0], [255, 0]]))
  # class 0: I = 1 + 2, pred 2 + 2, label 1 + 3 -> U = 5; class 1: I 2, P 2, L 3 -> U 3
  # class 2: I 0, P 1, L 0 -> U 1 (IoU 0); class 3: U 0 -> NaN, left out of the mean
  assert acc.intersect.tolist() == [3, 2, 0, 0] and acc.union.tolist() == [5, 3, 1, 0]
  miou, iou = acc.result()
  np.testing.assert_allclose(iou[:3], [0.6, 2 / 3, 0.0])
  assert math.isnan(iou[3])
  assert miou == pytest.approx((0.6 + 2 / 3 + 0.0) / 3)
  # dataset-level sums, not a mean of per-image IoUs
  per_image = np.mean([np.nanmean([1 / 2, 2 / 3]), np.nanmean([2 / 3, np.nan, 0.0])])
  assert abs(miou - per_image) > 0.01
  assert math.isnan(metrics.mean_iou(np.zeros(2), np.zeros(2))[0])


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def test_task_specs_classes():
  t = sd.TASKS
  assert (
    t["voc"].num_classes,
    t["voc20"].num_classes,
    t["context"].num_classes,
    t["context59"].num_classes,
    t["coco_stuff"].num_classes,
    t["coco_object"].num_classes,
    t["cityscapes"].num_classes,
    t["ade20k"].num_classes,
  ) == (21, 20, 60, 59, 171, 81, 19, 150)
  assert [k for k in sd.BENCHMARKS if t[k].with_bg] == ["voc", "context", "coco_object"]
  assert [k for k in sd.BENCHMARKS if t[k].reduce_zero_label] == ["voc20", "context59", "ade20k"]
  assert t["voc"].classes[:2] == ("background", "aeroplane") and t["voc"].classes[-1] == "tvmonitor"
  assert t["voc"].text_classes == t["voc20"].classes
  assert t["voc20"].classes[10] == "diningtable" and t["voc20"].classes[15] == "pottedplant"
  assert t["context59"].classes[:4] == ("aeroplane", "bag", "bed", "bedclothes")
  assert t["context"].text_classes == t["context59"].classes
  assert t["coco_object"].classes[1] == "person" and t["coco_object"].classes[-1] == "toothbrush"
  assert t["coco_stuff"].classes[80] == "banner" and t["coco_stuff"].classes[-1] == "wood"
  assert t["cityscapes"].classes[6] == "traffic light"
  assert t["ade20k"].classes[7] == "bed " and t["ade20k"].classes[-1] == "flag"
  assert len(set(t["ade20k"].classes)) == 150 and len(set(t["coco_stuff"].classes)) == 171
  assert t["t_voc20"].split == "ImageSets/Segmentation/train.txt"


def test_synthetic_layouts_and_reader(tmp_path):
  root = str(tmp_path)
  for task in sd.BENCHMARKS + ("shapes",):
    synthetic_segmentation.write_synthetic_segmentation(root, task, num_images=2, seed=0)
  names = {t: sd.SegDataset(t, root).names for t in sd.TASKS}
  assert names["voc"] == ["2007_000001.jpg", "2007_000002.jpg"] == names["t_voc20"]
  assert names["context59"] == ["2008_000001.jpg", "2008_000002.jpg"]
  assert names["coco_object"] == ["000000000139.jpg", "000000001139.jpg"] == names["coco_stuff"]
  assert names["cityscapes"] == [
    "frankfurt/frankfurt_000000_000019_leftImg8bit.png",
    "lindau/lindau_000001_000019_leftImg8bit.png",
  ]
  assert names["ade20k"] == ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"]
  ds = sd.SegDataset("cityscapes", root)
  assert ds.paths(0)[1].endswith(
    "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png"
  )
  voc_png = os.path.join(root, "VOCdevkit/VOC2012/SegmentationClass/2007_000001.png")
  assert Image.open(voc_png).mode == "P"
  for task in sd.TASKS:
    samples = list(sd.SegDataset(task, root))
    assert len(samples) == 2
    for s in samples:
      assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.image.shape[2] == 3
      assert s.label.shape == s.image.shape[:2] and 48 <= min(s.label.shape)
      values = set(np.unique(s.label).tolist())
      top = {
        "voc": 20,
        "context": 59,
        "coco_stuff": 170,
        "coco_object": 80,
        "cityscapes": 18,
        "ade20k": 150,
        "shapes": 12,
      }[task if task.startswith("coco") else sd.TASKS[task].layout]
      assert max(values - {255}) <= top
      if task == "coco_object":
        assert 255 not in values
  # The three COCO maps of an image agree: object = thing train id + 1, else 0.
  ann = os.path.join(root, "coco_stuff164k/annotations/val2017/000000000139")
  raw = np.array(Image.open(ann + ".png"))
  stuff = np.array(Image.open(ann + "_labelTrainIds.png"))
  obj = np.array(Image.open(ann + "_instanceTrainIds.png"))
  np.testing.assert_array_equal(obj, cco.convert_labels(raw))
  np.testing.assert_array_equal(obj, np.where(stuff < 80, stuff + 1, 0))
  # Same seed -> same files for tasks sharing a layout.
  before = open(voc_png, "rb").read()
  synthetic_segmentation.write_synthetic_segmentation(root, "voc20", num_images=2, seed=0)
  assert open(voc_png, "rb").read() == before


def test_reader_errors_and_corrupt_samples(tmp_path):
  root = str(tmp_path)
  with pytest.raises(sd.DataError, match=r"^voc: data root .*VOCdevkit/VOC2012 does not exist"):
    sd.SegDataset("voc", root)
  with pytest.raises(ValueError, match="unknown segmentation task 'vocx'"):
    sd.SegDataset("vocx", root)
  synthetic_segmentation.write_synthetic_segmentation(root, "voc", num_images=3)
  os.remove(os.path.join(root, "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"))
  with pytest.raises(sd.DataError, match=r"^voc: split file .*val.txt does not exist$"):
    sd.SegDataset("voc", root)
  synthetic_segmentation.write_synthetic_segmentation(root, "ade20k", num_images=3)
  img_dir = os.path.join(root, "ade/ADEChallengeData2016/images/validation")
  with open(os.path.join(img_dir, "ADE_val_00000002.jpg"), "wb") as f:
    f.write(b"not a jpeg")
  os.remove(
    os.path.join(root, "ade/ADEChallengeData2016/annotations/validation/ADE_val_00000003.png")
  )
  with open(os.path.join(img_dir, "._ADE_val_00000001.jpg"), "wb") as f:  # hidden: not listed
    f.write(b"junk")
  ds = sd.SegDataset("ade20k", root)
  assert len(ds) == 3
  got = [s.name for s in ds]
  assert got == ["ADE_val_00000001.jpg"]
  assert ds.num_skipped == 2 and ds.skipped == ["ADE_val_00000002.jpg", "ADE_val_00000003.jpg"]
  assert len(sd.SegDataset("ade20k", root, max_images=2)) == 2


# ----------------------------------------------------------------------------------------------
# COCO-Object conversion
# ----------------------------------------------------------------------------------------------


def test_coco_object_mapping_hand_values():
  raw = np.array([0, 10, 12, 89, 91, 181, 255, 11, 90], np.uint8)
  # person 0 -> 1; 10 -> 11; 12 (train 11) -> 12; 89 (toothbrush, train 79) -> 80;
  # stuff 91, 181 -> 0; unlabeled 255 -> 0 (quirk); unused ids 11, 90 stay as they are
  assert cco.convert_labels(raw).tolist() == [1, 11, 12, 80, 0, 0, 0, 11, 90]
  lut = cco.object_lut()
  assert sorted(set(lut[[i for i in range(182) if i not in sd.COCO_UNUSED_IDS]].tolist())) == list(
    range(81)
  )


def test_convert_coco_object_command(tmp_path, capsys):
  root = tmp_path / "coco_stuff164k"
  for split, stem, values in [
    ("val2017", "000000000139", [0, 91, 255, 5]),
    ("train2017", "000000000009", [89, 12, 100, 255]),
  ]:
    d = root / "annotations" / split
    d.mkdir(parents=True)
    Image.fromarray(np.array([values[:2], values[2:]], np.uint8)).save(d / f"{stem}.png")
    # an existing mmseg output must not be converted again
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(d / f"{stem}_labelTrainIds.png")
  assert cco.main([str(root), "--no_progress"]) == 0
  out = np.array(Image.open(root / "annotations/val2017/000000000139_instanceTrainIds.png"))
  assert out.tolist() == [[1, 0], [0, 6]]
  out = np.array(Image.open(root / "annotations/train2017/000000000009_instanceTrainIds.png"))
  assert out.tolist() == [[80, 12], [0, 0]]
  assert sorted(os.listdir(root / "annotations/val2017")) == [
    "000000000139.png",
    "000000000139_instanceTrainIds.png",
    "000000000139_labelTrainIds.png",
  ]
  assert "Done! 2 label maps written." in capsys.readouterr().out
  assert cco.main([str(tmp_path / "missing"), "--no_progress"]) == 1


# ----------------------------------------------------------------------------------------------
# The per-dataset loop against a plain reference of mmseg's semantics
# ----------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(7)
_COEF = _RNG.normal(size=(80, 4)).astype(np.float32)


def _fake_masks(windows):
  """Per-pixel, batch-independent fake masks [k, 80, h, w] from the normalized RGB values."""
  x = np.asarray(windows, np.float32)
  logits = np.einsum("khwc,nc->knhw", x, _COEF[:, :3]) + _COEF[:, 3][None, :, None, None]
  return (1 / (1 + np.exp(-logits))).astype(np.float32)


def _ref_bilinear(x, out_h, out_w):
  """torch upsample_bilinear2d (align_corners=False) written per output pixel, float32."""

  def taps(n_in, n_out):
    out = []
    scale = np.float32(n_in) / np.float32(n_out)
    for d in range(n_out):
      src = max(scale * (np.float32(d) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
      i = int(src)
      ip = 1 if i < n_in - 1 else 0
      lam = np.float32(src - np.float32(i))
      out.append((i, i + ip, np.float32(1) - lam, lam))
    return out

  if x.shape[1:] == (out_h, out_w):
    return x
  res = np.zeros((x.shape[0], out_h, out_w), np.float32)
  for oy, (y0, y1, ly0, ly1) in enumerate(taps(x.shape[1], out_h)):
    for ox, (x0, x1, lx0, lx1) in enumerate(taps(x.shape[2], out_w)):
      res[:, oy, ox] = ly0 * (lx0 * x[:, y0, x0] + lx1 * x[:, y0, x1]) + ly1 * (
        lx0 * x[:, y1, x0] + lx1 * x[:, y1, x1]
      )
  return res


def _ref_evaluate(task, root, img_scale, crop, stride, bg_thresh):
  spec = sd.TASKS[task]
  n_text = len(spec.text_classes)
  c = spec.num_classes
  conf = np.zeros((c, c), np.int64)
  for s in sd.SegDataset(task, root):
    img = s.image
    h, w = img.shape[:2]
    f = min(max(img_scale) / max(h, w), min(img_scale) / min(h, w))
    r = cv2.resize(img, (int(w * f + 0.5), int(h * f + 0.5)), interpolation=cv2.INTER_LINEAR)
    x = r.astype(np.float32)
    cv2.cvtColor(x, cv2.COLOR_BGR2RGB, x)
    cv2.subtract(x, np.float64(np.array(pipeline.IMAGE_MEAN_255, np.float32).reshape(1, -1)), x)
    cv2.multiply(x, 1 / np.float64(np.array(pipeline.IMAGE_STD_255, np.float32).reshape(1, -1)), x)
    hh, ww = x.shape[:2]
    preds = np.zeros((c, hh, ww), np.float32)
    count = np.zeros((hh, ww), np.float32)
    for i in range(max(hh - crop + stride - 1, 0) // stride + 1):
      for j in range(max(ww - crop + stride - 1, 0) // stride + 1):
        y1, x1 = i * stride, j * stride
        y2, x2 = min(y1 + crop, hh), min(x1 + crop, ww)
        y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
        out = _fake_masks(x[None, y1:y2, x1:x2])[0, :n_text]
        if spec.with_bg:
          out = np.concatenate([np.full((1,) + out.shape[1:], bg_thresh, np.float32), out])
        preds[:, y1:y2, x1:x2] += out
        count[y1:y2, x1:x2] += 1
    pred = _ref_bilinear(preds / count, h, w).argmax(0)
    label = s.label.astype(np.int64)
    if spec.reduce_zero_label:
      label = np.where(label == 0, 255, label - 1)
      label[label == 254] = 255
    keep = label != 255
    conf += np.bincount(label[keep] * c + pred[keep], minlength=c * c).reshape(c, c)
  inter = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
  return iou


@pytest.mark.parametrize("task", ["voc", "context59", "coco_object"])
def test_evaluate_dataset_matches_reference(tmp_path, task):
  root = str(tmp_path)
  synthetic_segmentation.write_synthetic_segmentation(root, task, num_images=3, seed=3)
  opts = pipeline.Protocol(img_scale=(160, 64), crop=48, stride=32, batch=2, bg_thresh=0.5)
  res = evaluator.evaluate_dataset(sd.SegDataset(task, root), _fake_masks, opts, progress=False)
  ref = _ref_evaluate(task, root, (160, 64), 48, 32, 0.5)
  spec = sd.TASKS[task]
  assert list(res["per_class_iou"]) == list(spec.classes)
  got = np.array([np.nan if v is None else v for v in res["per_class_iou"].values()])
  np.testing.assert_allclose(got, ref * 100, rtol=0, atol=1e-9)
  assert res["miou"] == round(float(np.nanmean(ref)) * 100, 2)
  assert (res["num_images"], res["num_skipped"]) == (3, 0)
  assert np.isfinite(got).sum() >= 2  # some classes present; absent ones are null
  assert any(v is None for v in res["per_class_iou"].values())
  json.dumps(res, allow_nan=False)


def test_mask_fn_splits_windows_over_devices_with_the_same_result():
  assert jax.local_device_count() == 8  # tests/conftest.py
  cfg = tcl_lib.tiny_config()
  params = tcl_lib.init_params(cfg, jax.random.key(0))
  text_emb = jax.random.normal(jax.random.key(1), (3, 64))
  windows = np.asarray(jax.random.normal(jax.random.key(2), (3, 40, 56, 3)))  # 3 -> padded to 8
  protocol = pipeline.Protocol(pamr=False, kp_w=0.3)
  got = np.asarray(
    evaluator.make_window_fn(
      kinds.zero_shot_model(cfg), params, text_emb, protocol, mesh=sharding.local_mesh()
    )(windows)
  )
  want, _ = tcl_inference.generate_masks(params, cfg, jnp.asarray(windows), text_emb, kp_w=0.3)
  assert got.shape == (3, 3, 40, 56)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


# Informative predictions: a VOC-layout dataset whose grey level encodes, per 16 x 16 block, a code
# that a window function decodes into a prediction. Most codes predict their own class; a few are
# controlled errors (CONFUSED). The per-class IoUs then follow from counting blocks by hand.
BLOCK = 16
CONFUSED = {18: 5, 19: 0, 20: 3}  # code -> predicted class: bg read as 5, 5 missed, 2 read as 3
_LABELS = [
  np.array([[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 3, 0, 0, 0], [3, 3, 3, 0, 0, 0]]),
  np.array([[5, 5, 5, 0, 0, 0], [5, 5, 5, 0, 1, 1], [0, 0, 0, 0, 1, 1], [2, 2, 0, 0, 0, 0]]),
]
_CODES = [
  np.where(
    np.isin(np.arange(24).reshape(4, 6), [11]),
    20,  # (1, 5): a 2 read as 3
    np.where(np.isin(np.arange(24).reshape(4, 6), [23]), 18, _LABELS[0]),
  ),  # bg as 5
  np.where(
    np.isin(np.arange(24).reshape(4, 6), [0]),
    19,  # (0, 0): a 5 missed
    np.where(np.isin(np.arange(24).reshape(4, 6), [19]), 20, _LABELS[1]),
  ),
]  # 2 as 3


def _grey(code):
  return 8 + 12 * code  # 12 grey levels apart: JPEG (quality 100, flat 16 x 16 blocks) keeps it


def _write_coded_voc(root):
  base = os.path.join(root, "VOCdevkit", "VOC2012")
  for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(base, d), exist_ok=True)
  ids = []
  for i, (label, code) in enumerate(zip(_LABELS, _CODES)):
    stem = f"2007_{i + 1:06d}"
    ids.append(stem)
    up = lambda a: np.kron(a, np.ones((BLOCK, BLOCK), np.int64)).astype(np.uint8)
    grey = up(_grey(code))
    cv2.imwrite(
      os.path.join(base, "JPEGImages", stem + ".jpg"),
      np.repeat(grey[..., None], 3, -1),
      [cv2.IMWRITE_JPEG_QUALITY, 100],
    )
    Image.fromarray(up(label)).save(os.path.join(base, "SegmentationClass", stem + ".png"))
  with open(os.path.join(base, "ImageSets/Segmentation/val.txt"), "w") as f:
    f.write("".join(s + "\n" for s in ids))


def _decoding_masks(windows):
  """[k, 20, h, w]: 0.9 for the class a pixel's code predicts, 0.1 elsewhere (all 0.1: below the
  background threshold 0.5, i.e. background)."""
  x = np.asarray(windows, np.float32)[..., 0]
  grey = x * pipeline.IMAGE_STD_255[0] + pipeline.IMAGE_MEAN_255[0]  # channel 0 (R = G = B)
  code = np.clip(np.rint((grey - 8) / 12).astype(np.int64), 0, 20)
  pred = code.copy()
  for c, p in CONFUSED.items():
    pred[code == c] = p
  out = np.full(x.shape[:1] + (20,) + x.shape[1:], 0.1, np.float32)
  for c in range(1, 21):
    out[:, c - 1][pred == c] = 0.9
  return out


def test_evaluate_dataset_informative_predictions_hand_iou(tmp_path):
  root = str(tmp_path)
  _write_coded_voc(root)
  # Images 64 x 96 at img_scale (96, 64): no resize; overlapping 48-pixel windows all see the
  # same per-pixel outputs, so each pixel's prediction is its code's.
  opts = pipeline.Protocol(img_scale=(96, 64), crop=48, stride=32, batch=2, bg_thresh=0.5)
  res = evaluator.evaluate_dataset(
    sd.SegDataset("voc", root), _decoding_masks, opts, progress=False
  )
  # By hand, in 16 x 16 blocks (label / predicted / both):
  #   background 22 / 22 / 21 -> 21/23;  1: 8 / 8 / 8 -> 1;  2: 6 / 4 / 4 -> 4/6;
  #   3: 6 / 8 / 6 -> 6/8;  5: 6 / 6 / 5 -> 5/7;  the 16 other classes are absent (None).
  want = {"background": 21 / 23, "aeroplane": 1.0, "bicycle": 4 / 6, "bird": 6 / 8, "bottle": 5 / 7}
  iou = res["per_class_iou"]
  assert sorted(k for k, v in iou.items() if v is not None) == sorted(want)
  for name, v in want.items():
    assert iou[name] == pytest.approx(100 * v, abs=1e-9), name
  # The mean over the 5 present classes, 80.88 (counting the absent 16 as 0 would give 19.26).
  assert res["miou"] == round(100 * np.mean(list(want.values())), 2) == 80.88
  assert (res["num_images"], res["num_skipped"]) == (2, 0)
  # The hand counts are the blocks' counts (guards the table above against typos).
  lab = np.concatenate([l.ravel() for l in _LABELS])
  pred = np.concatenate([np.vectorize(lambda c: CONFUSED.get(c, c))(c).ravel() for c in _CODES])
  for c, v in zip((0, 1, 2, 3, 5), want.values()):
    inter = np.sum((lab == c) & (pred == c))
    assert inter / (np.sum(lab == c) + np.sum(pred == c) - inter) == pytest.approx(v)
