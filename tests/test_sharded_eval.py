"""Evaluation sharded over devices and processes gives the counts of one process on one device.

1 process x 1 device, 1 process x 8 devices (tests/conftest.py) and 2 real JAX processes x 4
devices on localhost evaluate the same generated VOC-layout set with one unreadable image; the
per-class intersections and unions are compared, pixel for pixel. With 2 processes each reads
and predicts only its share (images 0, 2, 4 / 1, 3), so the bad image is met by one process and
counted once in the merged result.

The module doubles as the worker: `python tests/test_sharded_eval.py ROOT PROCESS_ID PORT OUT`.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 5  # odd: the processes' shares differ in size
BAD = 3  # this image's JPEG is truncated: process 1's share
PROTOCOL = dict(img_scale=(160, 64), crop=48, stride=32, batch=3, pamr=False, bg_thresh=0.25)


@dataclasses.dataclass(frozen=True)
class ChannelConfig:
  """A model kind of a few jax ops: class i scores by a fixed mix of the window's channels."""

  num_classes: int = 20


def _window_masks(params, text_emb, windows, *, pamr, kp_w, simmaps, cfg):
  del params, pamr, kp_w, simmaps, cfg
  n = text_emb.shape[0]
  mix = jnp.sin(jnp.arange(3 * n, dtype=jnp.float32)).reshape(n, 3)  # [N, 3] fixed weights
  scores = jnp.einsum("khwc,nc->knhw", windows, mix)
  return jax.nn.sigmoid(scores + jnp.cos(jnp.arange(n, dtype=jnp.float32))[None, :, None, None])


def channel_model():
  from tcl_jax.kinds import base  # pylint: disable=g-import-not-at-top

  cfg = ChannelConfig()
  return base.ZeroShotModel(
    cfg=cfg,
    text_embedding=lambda params, tokens: jnp.ones((tokens.shape[0], 4)),
    window_masks=jax.jit(
      lambda *a, **k: _window_masks(*a, **k, cfg=cfg), static_argnames=("pamr", "kp_w", "simmaps")
    ),
    min_size=1,
  )


def write_set(root):
  from tcl_jax.data import synthetic_segmentation  # pylint: disable=g-import-not-at-top
  from tcl_jax.zeroshot import datasets  # pylint: disable=g-import-not-at-top

  synthetic_segmentation.write_synthetic_segmentation(root, "voc", num_images=NUM_IMAGES, seed=4)
  ds = datasets.SegDataset("voc", root)
  img = ds.paths(BAD)[0]
  data = open(img, "rb").read()
  with open(img, "wb") as f:
    f.write(data[: len(data) // 3])
  return ds.names[BAD]


def evaluate(root, mesh):
  from tcl_jax import zeroshot  # pylint: disable=g-import-not-at-top
  from tcl_jax.zeroshot import pipeline  # pylint: disable=g-import-not-at-top

  tasks = zeroshot.open_datasets("voc", root)
  return zeroshot.evaluate_tasks(
    channel_model(), {}, tasks, pipeline.Protocol(**PROTOCOL), mesh=mesh, progress=False
  )["voc"]


def worker(root, process_id, port, out):
  jax.config.update("jax_num_cpu_devices", 4)
  from tcl_jax import sharding  # pylint: disable=g-import-not-at-top

  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
  )
  assert jax.process_count() == 2 and jax.local_device_count() == 4
  res = evaluate(root, sharding.local_mesh())
  with open(out, "w") as f:
    json.dump(res, f)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_one_device_eight_devices_and_two_processes_count_the_same_pixels(tmp_path):
  from tcl_jax import sharding  # pylint: disable=g-import-not-at-top

  root = str(tmp_path / "data")
  bad_name = write_set(root)

  one = evaluate(root, None)
  assert jax.local_device_count() == 8
  eight = evaluate(root, sharding.local_mesh())

  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.abspath(__file__),
        root,
        str(p),
        str(port),
        str(tmp_path / f"p{p}.json"),
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for p in range(2)
  ]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  two = [json.load(open(tmp_path / f"p{p}.json")) for p in range(2)]

  assert one["num_images"] == NUM_IMAGES - 1 and one["num_skipped"] == 1
  assert sum(one["union"]) > 0 and one["miou"] is not None and one["miou"] > 0
  # Predictions vary: several classes are hit somewhere (a one-class map would hide a shuffled
  # share or a lost window).
  assert sum(1 for v in one["intersect"] if v > 0) >= 2
  for name, res in [
    ("1 x 8 devices", eight),
    ("2 processes, p0", two[0]),
    ("2 processes, p1", two[1]),
  ]:
    assert res["intersect"] == one["intersect"], name
    assert res["union"] == one["union"], name
    assert (res["num_images"], res["num_skipped"]) == (NUM_IMAGES - 1, 1), name
    assert res["per_class_iou"] == one["per_class_iou"] and res["miou"] == one["miou"], name
  # Only process 1 met the bad image (its share is 1, 3): named in its log, once.
  assert bad_name in logs[1] and bad_name not in logs[0]


if __name__ == "__main__":
  worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
