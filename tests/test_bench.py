"""The benchmark runs on CPU (small dims) and reports sane numbers; no timing assertions.

`python -m tcl_jax.bench` must run where only jax, flax, optax and numpy are installed (a bare GPU
image): the end-to-end test runs it with TensorFlow, clu, ml_collections, OpenCV and torch made
unimportable.
"""

import json
import os
import subprocess
import sys

from conftest import load_config_module
import numpy as np
import pytest

from tcl_jax import bench
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.perf import chips
from tcl_jax.perf import timing

_BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "ml_collections", "cv2", "torch")
_RUN_BLOCKED = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in {_BLOCKED!r}:
      raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
from tcl_jax import bench
sys.exit(bench.main(sys.argv[1:]))
"""


def test_bench_runs_with_only_jax_flax_optax_numpy(tmp_path):
  out = tmp_path / "r.json"
  r = subprocess.run(
    [
      sys.executable,
      "-c",
      _RUN_BLOCKED,
      "--preset",
      "tiny",
      "--batch",
      "1",
      "--steps",
      "2",
      "--eval-windows",
      "0",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  # The zero-shot engine needs OpenCV: the eval-per-image part says so and steps aside.
  assert "# eval per image skipped: the zero-shot engine needs what is missing here" in r.stdout
  (t,) = json.loads(out.read_text())
  assert t["what"] == "train_step" and t["device"].startswith("CPU (")
  assert "CPU: no MFU" in r.stdout and t["mfu"] is None
  assert t["devices"] == 8 and t["global_batch"] == 8  # conftest: 8 fake CPU devices
  assert t["dtype"] == "float32"  # auto = float32 on CPU
  assert 0 < t["step_s"] < 600 and 0 < t["compile_s"] < 900
  assert t["images_per_s"] == pytest.approx(8 / t["step_s"])
  assert t["step_memory_gib"] > 0 and np.isfinite(t["loss"]) and t["loss"] > 0
  # A ratio needs the original timed in the same run (--torch-ref); none was.
  assert "ratio" not in r.stdout and "ratio_vs_original" not in t


def test_model_flops_scale_with_the_batch_and_match_a_rough_count():
  f1 = timing.model_flops("tiny", 1, "float32")
  f2 = timing.model_flops("tiny", 2, "float32")
  assert 1.9 < f2 / f1 < 2.05  # per-example work dominates; the optimizer update is tiny
  # Lower bound: the vision blocks' forward matmuls alone (features: 3 blocks, masker: 1, the
  # TCL_i pass over masked images: 4), 8 images x 37 tokens x 12 width^2 MACs x 2 FLOPs.
  blocks_fwd = 8 * 8 * 37 * 12 * 128**2 * 2
  assert blocks_fwd < f1 < 100 * blocks_fwd


def test_model_flops_count_every_caption_chunk(monkeypatch):
  # XLA's cost analysis counts a loop body once: the objective's caption chunks (a scan) must not
  # make the count depend on the chunk size (global batch 16: 1 chunk of 64, or 4 of 4).
  want = timing.model_flops("tiny", 2, "float32")
  cfg, res = timing.preset("tiny")
  monkeypatch.setattr(timing, "preset", lambda name: (cfg.replace(caption_chunk=4), res))
  assert timing.model_flops("tiny", 2, "float32") == want


def test_flops_from_the_compiled_step_where_the_lowered_count_is_missing(monkeypatch):
  """jax 0.11's CUDA backend gives no cost analysis of the lowered step (seen on an H200): the
  bench then counts the compiled step's FLOPs instead of crashing after timing; with remat (whose
  compiled step recomputes) it reports none rather than an inflated count."""
  assert (
    timing.cost_flops(None) is None
    and timing.cost_flops([]) is None
    and timing.cost_flops({}) is None
  )
  assert timing.cost_flops([{"flops": 3.0}]) == 3.0 and timing.cost_flops({"flops": 2.0}) == 2.0
  lowered = timing.model_flops("tiny", 1, "float32")
  monkeypatch.setattr(timing, "model_flops", lambda *a: None)
  r = timing.train_bench("tiny", 1, steps=1, dtype="float32")
  assert r["flops_source"] == "XLA cost analysis of the compiled step"
  assert 0.5 < r["model_flops_per_step"] / lowered < 2, (r["model_flops_per_step"], lowered)
  r = timing.train_bench("tiny", 1, steps=1, dtype="float32", remat=True)
  assert r["model_flops_per_step"] is None and r["flops_source"] is None and r["mfu"] is None


def test_eval_bench_reports_windows_per_second_with_and_without_pamr():
  rows = timing.eval_bench("tiny", windows=1, steps=1, res=96, num_classes=3)
  assert [r["pamr"] for r in rows] == [False, True]
  for r in rows:
    assert r["windows_per_s"] > 0 and r["windows_per_s"] == pytest.approx(1 / r["batch_s"])


def _small_protocol():
  from tcl_jax.zeroshot import protocol  # pylint: disable=g-import-not-at-top

  # The protocol at a fifth of its scale (short side 96, windows 96 / stride 48): the same
  # window layout as VOC's at 448 / 224, for the tiny model.
  return protocol.Protocol(img_scale=(410, 96), crop=96, stride=48)


def test_eval_image_bench_runs_the_protocol_per_image():
  sizes = ((75, 100), (100, 75), (60, 200))  # -> 96x128 (2 windows), 128x96 (2), 96x320 (6)
  r = timing.eval_image_bench("tiny", 4, sizes, num_classes=3, protocol=_small_protocol())
  assert r["what"] == "eval_image" and r["impl"] == "tcl_jax" and r["device"].startswith("CPU (")
  assert r["resized"] == [[96, 128], [128, 96], [96, 320]]
  assert r["windows"] == 2 + 2 + 6 + 2  # the 4th image is the 1st size again
  assert r["classes"] == 4 and r["pamr"] is True and (r["kp_w"], r["bg_thresh"]) == (0.3, 0.4)
  assert 0 < r["total_s"] < 60 and r["warmup_s"] > 0
  assert r["images_per_s"] == pytest.approx(4 / r["total_s"])
  assert r["s_per_image"] == pytest.approx(r["total_s"] / 4)
  assert len(r["per_image_s"]) == 4 and sum(r["per_image_s"]) == pytest.approx(r["total_s"])
  assert min(r["per_image_s"]) <= r["median_s_per_image"] <= max(r["per_image_s"])
  assert r["windows_per_s"] == pytest.approx(12 / r["total_s"])


def test_the_originals_side_sees_the_engines_inputs():
  """bench_torch_eval re-derives mmseg's resize, window count and normalisation without jax (it
  runs in the torch environment): they must equal the engine's, or the two sides would time
  different work."""
  from tcl_jax.perf import bench_torch_eval as bte  # pylint: disable=g-import-not-at-top
  from tcl_jax.zeroshot import pipeline  # pylint: disable=g-import-not-at-top

  for h, w in ((375, 500), (500, 375), (1024, 2048), (333, 500), (480, 640), (100, 4000)):
    new_w, new_h = pipeline.mmcv_rescale_size(w, h)
    assert bte.rescale_size(h, w) == (new_h, new_w), (h, w)
    assert bte.num_windows(new_h, new_w) == len(pipeline.slide_windows(new_h, new_w)), (h, w)
  assert bte.num_windows(448, 597) == 2 and bte.num_windows(448, 896) == 3
  img = bte.synthetic_images(1, ((37, 53),), seed=3)[0]
  x, meta = bte.mmseg_preprocess(img)
  np.testing.assert_array_equal(x.transpose(1, 2, 0), pipeline.preprocess(img, pipeline.Protocol()))
  assert meta == {"ori_shape": (37, 53, 3), "img_shape": (448, 642, 3)}
  a, b = (
    bte.synthetic_images(3, ((5, 7), (6, 4)), seed=1),
    bte.synthetic_images(3, ((5, 7), (6, 4)), seed=1),
  )
  assert [i.shape for i in a] == [(5, 7, 3), (6, 4, 3), (5, 7, 3)] and all(
    i.dtype == np.uint8 and (i == j).all() for i, j in zip(a, b)
  )
  t = bte.synthetic_text(5, 16)
  assert t.shape == (5, 16) and np.allclose(np.linalg.norm(t, axis=-1), 1)


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--eval-sizes", "375"], "--eval-sizes: image size '375' is not HxW (e.g. 375x500)"),
    (["--eval-sizes", "375x0"], "--eval-sizes: image size '375x0' is not HxW (e.g. 375x500)"),
    (["--eval-images", "-1"], "--eval-images and --eval-windows must be >= 0, --eval-classes >= 1"),
    (
      ["--torch-python", sys.executable],
      "--torch-python is the interpreter for --torch-ref; give --torch-ref too",
    ),
  ],
)
def test_eval_usage_errors(argv, message, capsys):
  assert bench.main(["--preset", "tiny", *argv]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_bench_torch_eval_usage_errors(tmp_path, capsys):
  from tcl_jax.perf import bench_torch_eval  # pylint: disable=g-import-not-at-top

  assert bench_torch_eval.main(["--ref-repo", str(tmp_path)]) == 2
  (tmp_path / "segmentation" / "evaluation").mkdir(parents=True)
  (tmp_path / "segmentation" / "evaluation" / "tcl_seg.py").write_text("")
  assert bench_torch_eval.main(["--ref-repo", str(tmp_path), "--sizes", "3x"]) == 2
  assert bench_torch_eval.main(["--ref-repo", str(tmp_path), "--images", "0"]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
    f"error: {tmp_path} is not a checkout of kakaobrain/tcl (no segmentation/evaluation/tcl_seg.py)",
    "error: --sizes: image size '3x' is not HxW (e.g. 375x500)",
    "error: --images and --classes must be >= 1, --threads >= 0",
  ]


def test_bench_optimizer_and_dims_are_the_recipe():
  common = load_config_module("common")
  recipe = common.tcl_optim().to_dict()
  assert {k: v for k, v in timing.OPTIM.items() if k != "ust_steps"} == {
    k: v for k, v in recipe.items() if k != "ust_steps"
  }
  assert timing.OPTIM.ust_steps == 0  # the full step: masker backbone trainable
  cfg, res = timing.preset("vitb16")
  tcl_config = load_config_module("tcl").get_config()
  # The same model config (fields a config leaves out take their defaults, e.g. hidden_act).
  assert cfg == tcl_lib.TCLConfig.from_dict(tcl_config.model.to_dict())
  assert res == tcl_config.input.image_size


def test_peak_flops_table_matches_device_kinds():
  kinds = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
  }
  for kind, flops in kinds.items():
    assert next(f for k, f in chips.PEAK_BF16_FLOPS if k.lower() in kind.lower()) == flops, kind


def test_torch_ref_that_is_not_a_checkout_is_a_usage_error(tmp_path):
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.bench", "--torch-ref", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    f"error: --torch-ref {tmp_path} is not a checkout of kakaobrain/tcl (no models/tcl/tcl.py)"
  ]


@pytest.mark.skipif(
  any(os.path.isdir(os.path.join(p, "torch")) for p in sys.path if p),
  reason="torch is installed here",
)
def test_timing_the_original_without_torch_says_so(tmp_path):
  (tmp_path / "models" / "tcl").mkdir(parents=True)
  (tmp_path / "models" / "tcl" / "tcl.py").write_text("")
  (tmp_path / "segmentation" / "evaluation").mkdir(parents=True)
  (tmp_path / "segmentation" / "evaluation" / "tcl_seg.py").write_text("")
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.bench", "--torch-ref", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
  )  # (the original is timed first)
  assert r.returncode == 1
  assert (
    r.stderr.strip()
    .splitlines()[-1]
    .startswith("error: timing the original failed: timing the original needs torch and einops")
  )
  # The original's evaluation, alone (--no-train): the same clean error.
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.bench", "--no-train", "--eval-windows", "0"]
    + ["--eval-images", "1", "--torch-ref", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1
  assert (
    r.stderr.strip()
    .splitlines()[-1]
    .startswith(
      "error: timing the original's evaluation failed: timing the original's evaluation needs "
      "torch, einops and OpenCV"
    )
  )
  # The original is ViT-B/16 only: no ratio against the tiny preset.
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.bench", "--preset", "tiny", "--torch-ref", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert (r.returncode, r.stderr.strip()) == (
    2,
    "error: --torch-ref times the original at ViT-B/16; use it with --preset vitb16",
  )


def test_max_batch_on_cpu_is_a_usage_error(capsys):
  # CPU devices report no memory limit to predict from.
  assert bench.main(["--preset", "tiny", "--max-batch", "--eval-windows", "0"]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
    "error: --max-batch needs a device that reports its memory limit (GPU, TPU)"
  ]


def test_a_global_batch_of_one_is_a_usage_error_before_any_work():
  # Was: a 25-line traceback from the loss after a 40 s compile. One device: batch 1 is global 1.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run(
    [sys.executable, "-m", "tcl_jax.bench", "--preset", "tiny", "--batch", "1"],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(env, JAX_PLATFORMS="cpu"),
  )
  assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [
    "error: --batch 1 on 1 device: TCL's contrastive loss needs a global batch of at least 2; "
    "give --batch 2 or more"
  ]
