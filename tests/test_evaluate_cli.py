"""End to end: `python -m tcl_jax.evaluate` on a generated mini-dataset in every layout, with a
random-weights tiny TCL saved as a checkpoint directory."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from tcl_jax import kinds
from tcl_jax.data import synthetic_segmentation
from tcl_jax.models import tcl
from tcl_jax.weights import model_files
from tcl_jax.zeroshot import datasets as sd
from tcl_jax.zeroshot import evaluator
from tcl_jax.zeroshot import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(*args, timeout=420):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "tcl_jax.evaluate", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
  from tcl_jax.models import tcl
  from tcl_jax.weights import model_files

  base = tmp_path_factory.mktemp("e2e")
  data = str(base / "data")
  for task in sd.BENCHMARKS:
    synthetic_segmentation.write_synthetic_segmentation(data, task, num_images=1, seed=0)
  # A corrupt entry in the VOC split: skipped and counted by voc and voc20.
  voc = os.path.join(data, "VOCdevkit/VOC2012")
  with open(os.path.join(voc, "JPEGImages/2007_009999.jpg"), "wb") as f:
    f.write(b"\xff\xd8 truncated")
  with open(os.path.join(voc, "ImageSets/Segmentation/val.txt"), "a") as f:
    f.write("2007_009999\n")
  cfg = tcl.tiny_config()
  model_files.save_checkpoint(str(base / "ckpt"), cfg, tcl.init_params(cfg, jax.random.key(0)))
  out = base / "out"
  proc = _run_cli(
    "--config=configs/eval.py",
    f"--checkpoint={base / 'ckpt'}",
    f"--workdir={out}",
    f"--config.data_root={data}",
    "--config.img_scale=(256,96)",
    "--config.crop=96",
    "--config.stride=48",
    "--config.pamr=False",
    "--config.batch=2",
    "--config.class_pad=64",
  )
  return data, out, proc


def _present_classes(task, data):
  spec = sd.TASKS[task]
  present = set()
  for s in sd.SegDataset(task, data):
    label = s.label.astype(np.int64)
    if spec.reduce_zero_label:
      label = metrics.reduce_zero_label(label)
    present |= {int(v) for v in np.unique(label) if v < spec.num_classes}
  return present


def test_cli_all_layouts(e2e):
  data, out, proc = e2e
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "results.json") as f:
    res = json.load(f)
  assert list(res) == list(sd.BENCHMARKS) + ["average"]
  for task in sd.BENCHMARKS:
    r = res[task]
    spec = sd.TASKS[task]
    assert list(r["per_class_iou"]) == list(spec.classes)
    assert r["num_images"] == 1
    assert r["num_skipped"] == (1 if task in ("voc", "voc20") else 0)
    present = _present_classes(task, data)
    assert len(present) >= 2
    for i, (name, iou) in enumerate(r["per_class_iou"].items()):
      if i in present:  # in the labels -> union > 0 -> a number
        assert iou is not None and 0.0 <= iou <= 100.0, (task, name)
      else:  # absent from the labels: 0 if predicted, else null (left out of the mean)
        assert iou is None or iou == 0.0, (task, name, iou)
    values = [v for v in r["per_class_iou"].values() if v is not None]
    assert r["miou"] == round(float(np.mean(values)), 2)
  assert res["average"] == pytest.approx(np.mean([res[t]["miou"] for t in sd.BENCHMARKS]))
  assert res["voc"]["per_class_iou"]["background"] is not None
  assert "bed " in res["ade20k"]["per_class_iou"]
  # printed: a per-class table per benchmark and the summary
  assert proc.stdout.count("per-class IoU (%)") == 8
  summary = proc.stdout[proc.stdout.index("task ") :]
  assert [line.split()[0] for line in summary.splitlines()[1:10]] == list(sd.BENCHMARKS) + [
    "average"
  ]
  assert "skipping" in proc.stderr and "2007_009999" in proc.stderr


def test_cli_same_as_library(e2e):
  """The CLI's numbers are evaluate_tasks' numbers (the training loop's entry point)."""
  data, out, proc = e2e
  assert proc.returncode == 0, proc.stderr[-3000:]
  import importlib.util

  spec = importlib.util.spec_from_file_location("eval_cfg", os.path.join(REPO, "configs/eval.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  assert config.img_scale == (2048, 448) and (config.crop, config.stride) == (448, 224)
  assert (config.pamr, config.bg_thresh, config.kp_w, config.template) == (True, 0.4, 0.3, "custom")
  config.update(
    dict(
      tasks="voc",
      data_root=data,
      img_scale=(256, 96),
      crop=96,
      stride=48,
      pamr=False,
      batch=2,
      class_pad=64,
    )
  )
  cfg, params = model_files.load_checkpoint(str(os.path.dirname(out) + "/ckpt"))
  res = evaluator.evaluate_config(kinds.zero_shot_model(cfg), params, config, progress=False)
  with open(out / "results.json") as f:
    cli = json.load(f)
  assert list(res) == ["voc", "average"]
  assert res["voc"] == cli["voc"]
  assert res["average"] == cli["voc"]["miou"]


def test_cli_missing_data_is_one_line_error(tmp_path):
  cfg = tcl.tiny_config()
  model_files.save_checkpoint(str(tmp_path / "ckpt"), cfg, tcl.init_params(cfg, jax.random.key(0)))
  proc = _run_cli(
    "--config=configs/eval.py",
    f"--checkpoint={tmp_path / 'ckpt'}",
    f"--config.data_root={tmp_path / 'nodata'}",
    "--config.tasks=voc20",
    timeout=120,
  )
  assert proc.returncode == 2  # a usage error: found before any work (tcl_jax/cli/config_files.py)
  err = proc.stderr.strip().splitlines()[-1]
  assert err == (
    f"error: voc20: data root {tmp_path / 'nodata'}/VOCdevkit/VOC2012 does not "
    f"exist (set --config.data_root to the folder holding VOCdevkit/VOC2012)"
  )
  proc = _run_cli(
    "--config=configs/eval.py",
    f"--checkpoint={tmp_path / 'ckpt'}",
    "--config.tasks=voc,nope",
    timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown segmentation task 'nope'")


def test_cli_on_a_training_workdir_reproduces_the_training_time_eval(tmp_path):
  """`--checkpoint=<workdir>` with no other flag evaluates as the run did: its config.json's
  evals (tasks, data root, the small synthetic scales, PAMR off) and its latest parameters."""
  from conftest import load_config_module  # pylint: disable=g-import-not-at-top

  from tcl_jax.train import loop as train  # pylint: disable=g-import-not-at-top

  tcl_config = load_config_module("tcl")
  workdir = tmp_path / "run"
  synthetic_segmentation.write_synthetic_segmentation(
    str(workdir / "data" / "seg"), "voc", num_images=2, seed=0
  )
  config = tcl_config.get_config("smoke")
  with config.unlocked():
    config.model = tcl_config.common.tcl_model(tcl_config.common.clip_tiny(), ie_freeze=3)
  config.input.image_size = 96
  config.batch_size = 8
  config.total_steps = 1
  config.eval_at_end = True
  config.checkpoint.async_save = False
  # Random weights: at bg_thresh 0.1 the scores (not only the background) decide the labels, so
  # the numbers depend on the scales (4.41 here, 3.87 at configs/eval.py's; 14.87 at bg 0.4).
  config.evals.update(
    dict(
      tasks="voc",
      data_root="{workdir}/data/seg",
      img_scale=(256, 96),
      crop=96,
      stride=48,
      pamr=False,
      batch=2,
      bg_thresh=0.1,
    )
  )
  _, history = train.train_and_evaluate(config, str(workdir))
  trained = [h for h in history if "eval/voc/miou_percent" in h]
  assert [h["step"] for h in trained] == [1]

  proc = _run_cli(f"--checkpoint={workdir}", f"--workdir={tmp_path / 'out'}", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "out" / "results.json") as f:
    res = json.load(f)
  assert list(res) == ["voc", "average"]
  assert res["voc"]["num_images"] == 2
  assert res["voc"]["miou"] == trained[0]["eval/voc/miou_percent"] > 0
  assert (
    f"From {workdir}/config.json: tasks=voc, data_root={workdir}/data/seg, pamr=False, "
    "bg_thresh=0.1, img_scale=(256, 96), crop=96, stride=48, batch=2"
  ) in proc.stderr
  assert "mIoU (%)" in proc.stdout
  # Loading the workdir does not print orbax's INFO lines (about 26 of them).
  info = [line for line in proc.stderr.splitlines() if re.match(r"I\d{4} ", line)]
  assert info and all(" evaluate.py:" in line or " evaluator.py:" in line for line in info), info
