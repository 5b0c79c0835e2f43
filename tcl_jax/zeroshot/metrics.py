"""mmseg 0.27's segmentation metric (core/evaluation/metrics.py): per-class intersection and union
histograms summed over a dataset, mIoU as their nanmean."""

import warnings

import numpy as np


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """0 -> 255 (ignored), x -> x - 1, and 255 stays 255 (mmseg, on uint8)."""
  label = np.asarray(label).astype(np.int64)
  out = label - 1
  out[label == 0] = 255
  out[label == 255] = 255
  return out


def intersect_and_union(
  pred: np.ndarray,
  label: np.ndarray,
  num_classes: int,
  ignore_index: int = 255,
  reduce_zero: bool = False,
):
  """Per-class (area_intersect, area_union, area_pred, area_label), int64 [num_classes].

  Pixels whose (reduced) label is ignore_index are dropped. As mmseg's histc, label values
  outside [0, num_classes) count in no label bin (their predictions still count in area_pred).
  """
  pred = np.asarray(pred).reshape(-1).astype(np.int64)
  label = np.asarray(label).reshape(-1)
  label = reduce_zero_label(label) if reduce_zero else label.astype(np.int64)
  if pred.shape != label.shape:
    raise ValueError(f"prediction has {pred.size} pixels, label {label.size}")
  keep = label != ignore_index
  pred, label = pred[keep], label[keep]
  hit = pred[pred == label]
  area_intersect = np.bincount(hit, minlength=num_classes)[:num_classes]
  area_pred = np.bincount(pred, minlength=num_classes)[:num_classes]
  in_range = (label >= 0) & (label < num_classes)
  area_label = np.bincount(label[in_range], minlength=num_classes)[:num_classes]
  area_union = area_pred + area_label - area_intersect
  return area_intersect, area_union, area_pred, area_label


def mean_iou(total_intersect: np.ndarray, total_union: np.ndarray):
  """(mIoU, per-class IoU) as fractions; a class with union 0 has IoU NaN and is left out of the
  mean (NaN if every class is)."""
  inter = np.asarray(total_intersect, np.float64)
  union = np.asarray(total_union, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / union
  iou[union == 0] = np.nan
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    miou = float(np.nanmean(iou)) if iou.size else float("nan")
  return miou, iou


class IoUAccumulator:
  """Dataset-level sums of the four histograms (exact int64; mmseg sums float32 histc counts)."""

  def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero: bool = False):
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.reduce_zero = reduce_zero
    self.intersect = np.zeros(num_classes, np.int64)
    self.union = np.zeros(num_classes, np.int64)
    self.pred = np.zeros(num_classes, np.int64)
    self.label = np.zeros(num_classes, np.int64)
    self.count = 0

  def update(self, pred, label):
    i, u, p, l = intersect_and_union(
      pred, label, self.num_classes, self.ignore_index, self.reduce_zero
    )
    self.intersect += i
    self.union += u
    self.pred += p
    self.label += l
    self.count += 1

  def result(self):
    return mean_iou(self.intersect, self.union)
