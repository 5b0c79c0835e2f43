"""Times the original PyTorch TCL's zero-shot evaluation per image on this machine (for
`tcl_jax.bench`).

  python -m tcl_jax.perf.bench_torch_eval --ref-repo DIR [--images 4] [--sizes 375x500,500x375]
      [--classes 20] [--threads N]

DIR is a plain checkout of github.com/kakaobrain/tcl (never part of this repo). The model is
tcl_jax.perf.bench_torch's: the original TCL with a random-weight ViT-B/16 CLIP. Each image goes the
original's own test path, one window at a time:
  1. mmseg's test pipeline on the BGR uint8 image, as mmcv 1.6 runs it: keep-ratio resize to
     img_scale (2048, 448) (cv2 INTER_LINEAR), BGR->RGB, mean/std normalisation, to a tensor;
  2. mmseg 0.27 `EncoderDecoder.slide_inference` (crop 448, stride 224), each window through the
     original's `TCLSegInference.encode_decode` (segmentation/evaluation/tcl_seg.py: the model's
     `generate_masks` with PAMR and kp_w 0.3, then the constant 0.4 background channel), summed
     into `preds` and `count_mat`, divided; then the resize to the original size, softmax
     (`inference`) and argmax to a numpy label map (`simple_test`).
The checkout's TCLSegInference is imported from its file; mmseg's EncoderDecoder, which it
subclasses for the test path, and mmcv.Config are stubbed here with just what that path uses (the
sliding-window loop is written from mmseg 0.27's, not copied). Evaluation runs in float32, as the
original's (its evaluate() uses no autocast), on CUDA if present, else on the CPU with --threads
threads. The dataset loading (files, worker processes, the IoU metric) is not timed, nor is it in
tcl_jax.bench.

Prints one JSON line: images/s, windows/s, s/image after a warm-up pass over one image of each
size. Only torch, einops, numpy and OpenCV are needed. The synthetic images and class embeddings
come from `synthetic_images` / `synthetic_text`, which tcl_jax.bench also uses (numpy only), so
that both sides see the same inputs. This module imports torch only inside functions.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

# VOC-like sizes (h, w): landscape and portrait 500x375, each 448x597 or 597x448 after the resize:
# two 448x448 windows per image.
VOC_SIZES = ((375, 500), (500, 375))

# mmseg's img_norm_cfg in the original's dataset configs (ImageNet statistics, 0-255).
MEAN_255 = (123.675, 116.28, 103.53)
STD_255 = (58.395, 57.12, 57.375)
IMG_SCALE = (2048, 448)
# The dataset configs' test_cfg.
TEST_CFG = dict(mode="slide", stride=(224, 224), crop_size=(448, 448))
# configs/eval.yml's evaluate section.
EVALUATE = dict(pamr=True, bg_thresh=0.4, kp_w=0.3)


def parse_sizes(text: str) -> tuple:
  """'375x500,500x375' -> ((375, 500), (500, 375)) as (h, w); ValueError on anything else."""
  sizes = []
  for part in text.split(","):
    h, sep, w = part.strip().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
      raise ValueError(f"image size {part.strip()!r} is not HxW (e.g. 375x500)")
    sizes.append((int(h), int(w)))
  return tuple(sizes)


def synthetic_images(count: int, sizes=VOC_SIZES, seed: int = 0) -> list:
  """`count` random BGR uint8 images [h, w, 3], cycling through `sizes` (h, w). Smooth random
  fields plus noise rather than pure noise, so that PAMR's affinities see some structure."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    h, w = sizes[i % len(sizes)]
    coarse = rng.uniform(0, 255, (h // 25 + 2, w // 25 + 2, 3))
    ys = np.linspace(0, coarse.shape[0] - 1.001, h).astype(int)
    xs = np.linspace(0, coarse.shape[1] - 1.001, w).astype(int)
    img = coarse[ys][:, xs] + rng.normal(0, 12, (h, w, 3))
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return out


def synthetic_text(num_classes: int, dim: int, seed: int = 0) -> np.ndarray:
  """Random L2-normalised class embeddings [num_classes, dim], float32."""
  t = np.random.default_rng(seed + 1).standard_normal((num_classes, dim)).astype(np.float32)
  return t / np.linalg.norm(t, axis=-1, keepdims=True)


def time_images(predict, images) -> tuple:
  """(label map shapes, seconds per image) of predict(image) -> labels, one image after another
  (predict returns host arrays, so each time covers the device work too)."""
  shapes, times = [], []
  for img in images:
    t0 = time.perf_counter()
    shapes.append(tuple(predict(img).shape))
    times.append(time.perf_counter() - t0)
  return shapes, times


def timing_fields(warm_s: float, times: list, windows: int) -> dict:
  """The timing fields both sides' eval_image records share (tcl_jax.bench reports them too)."""
  total_s, images = sum(times), len(times)
  return {
    "warmup_s": warm_s,
    "total_s": total_s,
    "load_avg_1m": os.getloadavg()[0],  # other jobs on a shared host skew the figure
    "s_per_image": total_s / images,
    "per_image_s": times,
    "median_s_per_image": float(np.median(times)),
    "images_per_s": images / total_s,
    "windows_per_s": windows / total_s,
  }


def num_windows(h: int, w: int, crop: int = 448, stride: int = 224) -> int:
  """How many windows mmseg's slide_inference visits on an h x w (resized) image."""
  rows = max(h - crop + stride - 1, 0) // stride + 1
  cols = max(w - crop + stride - 1, 0) // stride + 1
  return rows * cols


def rescale_size(h: int, w: int, scale=IMG_SCALE) -> tuple:
  """mmcv.rescale_size for a (long, short) bound, as (new_h, new_w)."""
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


class _Config(dict):
  """mmcv.Config as TCLSegInference uses it: built from a dict, read by attribute."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


def _encoder_decoder_stub():
  """mmseg.models.EncoderDecoder reduced to the test path TCLSegInference inherits (mmseg 0.27:
  slide_inference with rescale, inference's softmax, simple_test's argmax). TCLSegInference's
  __init__ calls BaseSegmentor's (the parent of EncoderDecoder), which is nn.Module's here."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class BaseSegmentor(torch.nn.Module):
    pass

  class EncoderDecoder(BaseSegmentor):
    def slide_inference(self, img, img_meta, rescale):
      h_stride, w_stride = self.test_cfg.stride
      h_crop, w_crop = self.test_cfg.crop_size
      b, _, h_img, w_img = img.size()
      h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
      w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
      preds = img.new_zeros((b, self.num_classes, h_img, w_img))
      count_mat = img.new_zeros((b, 1, h_img, w_img))
      for i in range(h_grids):
        for j in range(w_grids):
          y1, x1 = i * h_stride, j * w_stride
          y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
          y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
          logit = self.encode_decode(img[:, :, y1:y2, x1:x2], img_meta)
          preds += F.pad(logit, (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
          count_mat[:, :, y1:y2, x1:x2] += 1
      assert (count_mat == 0).sum() == 0
      preds = preds / count_mat
      if rescale:
        h, w = img_meta[0]["img_shape"][:2]  # (mmseg removes padding here; none in this test)
        preds = F.interpolate(
          preds[:, :, :h, :w],
          size=img_meta[0]["ori_shape"][:2],
          mode="bilinear",
          align_corners=self.align_corners,
        )
      return preds

    def inference(self, img, img_meta, rescale):
      return F.softmax(self.slide_inference(img, img_meta, rescale), dim=1)

    def simple_test(self, img, img_meta, rescale=True):
      seg_pred = self.inference(img, img_meta, rescale).argmax(dim=1)
      return list(seg_pred.cpu().numpy())

  return EncoderDecoder


def _load_seg_inference(ref_repo: str):
  """TCLSegInference from the checkout's segmentation/evaluation/tcl_seg.py, imported from its
  file (the package's __init__ imports mmseg's datasets) against the stubs above; mmcv and utils
  are bench_torch's stubs, which build_original installs first."""
  mmcv = sys.modules["mmcv"]
  mmcv.Config = _Config
  sys.modules["mmseg"] = type(sys)("mmseg")
  sys.modules["mmseg.models"] = type(sys)("mmseg.models")
  sys.modules["mmseg"].models = sys.modules["mmseg.models"]
  sys.modules["mmseg.models"].EncoderDecoder = _encoder_decoder_stub()
  path = os.path.join(ref_repo, "segmentation", "evaluation", "tcl_seg.py")
  spec = importlib.util.spec_from_file_location("tcl_seg_original", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.TCLSegInference


def mmseg_preprocess(img_bgr: np.ndarray) -> tuple:
  """mmseg's test pipeline as mmcv 1.6 runs it: Resize(keep_ratio) with cv2 INTER_LINEAR,
  Normalize(to_rgb) with cv2's in-place float32 ops, ImageToTensor. Returns (CHW float32 array,
  img_meta)."""
  import cv2  # pylint: disable=g-import-not-at-top

  h, w = img_bgr.shape[:2]
  new_h, new_w = rescale_size(h, w)
  img = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  img = img.astype(np.float32)
  cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
  # mmseg's Normalize holds mean/std as float32; mmcv.imnormalize widens them to float64.
  mean = np.float64(np.array(MEAN_255, np.float32).reshape(1, -1))
  stdinv = 1 / np.float64(np.array(STD_255, np.float32).reshape(1, -1))
  cv2.subtract(img, mean, img)
  cv2.multiply(img, stdinv, img)
  meta = {"ori_shape": (h, w, 3), "img_shape": (new_h, new_w, 3)}
  return np.ascontiguousarray(img.transpose(2, 0, 1)), meta


def run(
  ref_repo: str,
  images: int = 4,
  sizes=VOC_SIZES,
  num_classes: int = 20,
  threads: int = 0,
  seed: int = 0,
) -> dict:
  """Warm-up over one image of each size, then `images` images timed end to end."""
  import torch  # pylint: disable=g-import-not-at-top

  from tcl_jax.perf import bench_torch  # pylint: disable=g-import-not-at-top

  if threads:
    torch.set_num_threads(threads)
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  model = bench_torch.build_original(ref_repo, seed).to(device)
  model.eval()  # (the original's TCL.train returns None: no chaining)
  seg_cls = _load_seg_inference(ref_repo)
  text = torch.from_numpy(synthetic_text(num_classes, bench_torch.CLIP_VIT_B16["embed_dim"], seed))
  seg = seg_cls(model, text.to(device), with_bg=True, test_cfg=TEST_CFG, **EVALUATE)
  seg.eval()
  imgs = synthetic_images(images, sizes, seed)
  warm = synthetic_images(len(sizes), sizes, seed + 7)

  def predict(img_bgr):
    x, meta = mmseg_preprocess(img_bgr)
    x = torch.from_numpy(x)[None].to(device)
    with torch.no_grad():
      (labels,) = seg.simple_test(x, [meta], rescale=True)
    return labels

  t0 = time.perf_counter()
  for img in warm:
    predict(img)
  warm_s = time.perf_counter() - t0
  shapes, times = time_images(predict, imgs)
  if shapes != [img.shape[:2] for img in imgs]:
    raise RuntimeError(f"the original's label maps have sizes {shapes}")
  windows = sum(num_windows(*rescale_size(*img.shape[:2])) for img in imgs)
  return {
    "what": "eval_image",
    "impl": "pytorch original",
    "device": torch.cuda.get_device_name() if cuda else "cpu",
    "threads": None if cuda else torch.get_num_threads(),
    "precision": "float32",
    "images": images,
    "sizes": [list(s) for s in sizes],
    "resized": [list(rescale_size(*s)) for s in sizes],
    "windows": windows,
    "classes": num_classes + 1,
    "window_batch": 1,
    **timing_fields(warm_s, times, windows),
    "torch": torch.__version__,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(
    prog="python -m tcl_jax.perf.bench_torch_eval", description=__doc__.split("\n")[0]
  )
  ap.add_argument("--ref-repo", required=True)
  ap.add_argument("--images", type=int, default=4)
  ap.add_argument("--sizes", default=",".join(f"{h}x{w}" for h, w in VOC_SIZES), help="HxW,...")
  ap.add_argument("--classes", type=int, default=20, help="text classes (+ background)")
  ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if not os.path.isfile(os.path.join(args.ref_repo, "segmentation", "evaluation", "tcl_seg.py")):
    print(
      f"error: {args.ref_repo} is not a checkout of kakaobrain/tcl "
      f"(no segmentation/evaluation/tcl_seg.py)",
      file=sys.stderr,
    )
    return 2
  try:
    sizes = parse_sizes(args.sizes)
  except ValueError as e:
    print(f"error: --sizes: {e}", file=sys.stderr)
    return 2
  if args.images < 1 or args.classes < 1 or args.threads < 0:
    print("error: --images and --classes must be >= 1, --threads >= 0", file=sys.stderr)
    return 2
  try:
    import cv2  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    import einops  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    print(
      f"error: timing the original's evaluation needs torch, einops and OpenCV ({e})",
      file=sys.stderr,
    )
    return 1
  result = run(args.ref_repo, args.images, sizes, args.classes, args.threads, args.seed)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
