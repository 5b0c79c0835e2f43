"""Checkpoints read by every process of a multi-process run: 2 real JAX processes x 2 CPU devices
on localhost (jax.distributed, as the README's multi-host sections run them), issue 30.

* Every form `loading.load_any` takes (a converted directory, a one-file safetensors export, a
  training workdir, a PyTorch .pth converted on the fly) loads in each process onto that
  process's own first device, bitwise as saved; a failure in one process only (its copy is
  damaged) is that process's error there and one OtherProcessFailed naming it in the other.
* `python -m tcl_jax.evaluate` from a converted directory in 2 processes writes the results.json
  of one process on one device; with process 1's copy damaged both stop with one error line.

Before the fix, process 1 could not restore a converted directory (orbax placed every array on
global device 0, which only process 0 has) and process 0 failed 30 s later on a Gloo timeout.

The module doubles as the worker: `python tests/test_multihost_checkpoints.py FORMS PROCESS_ID
PORT OUT` loads the forms listed in the JSON file FORMS.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_DEVICES = 2
# What the tiny random TCL needs to make a prediction on CPU in seconds; bg_thresh 0 so that the
# argmax goes to the classes (a map of background only would compare trivially equal).
EVAL_FLAGS = (
  "--config=configs/eval.py",
  "--config.tasks=voc,voc20",
  "--config.img_scale=(256,96)",
  "--config.crop=96",
  "--config.stride=48",
  "--config.pamr=False",
  "--config.batch=2",
  "--config.bg_thresh=0.0",
)


def _flat(tree):
  import jax  # pylint: disable=g-import-not-at-top

  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# ------------------------------------------------------------------------------------------------
# Worker (one process of the two-process job)
# ------------------------------------------------------------------------------------------------


def worker(forms_path, process_id, port, out):
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
  )
  from tcl_jax import sharding  # pylint: disable=g-import-not-at-top
  from tcl_jax.weights import loading  # pylint: disable=g-import-not-at-top

  with open(forms_path) as f:
    forms = json.load(f)
  arrays, placed = {}, {}
  for name, path in forms["load"].items():
    _, params = loading.load_any(path, **forms["overrides"])
    leaves = _flat(params)
    placed[name] = sorted({str(d) for v in leaves.values() for d in v.devices()})
    arrays.update({f"{name}{k}": np.asarray(v) for k, v in leaves.items()})
  # Process 1's copy is damaged: its own error there, a word from it in process 0.
  path = forms["damaged"] if process_id == 1 else forms["load"]["converted"]
  t0 = time.time()
  try:
    sharding.in_every_process(lambda: loading.load_any(path), "loading the checkpoint")
    outcome = "loaded"
  except ValueError as e:
    outcome = f"{type(e).__name__}: {e}"
  np.savez(out + ".npz", **arrays)
  with open(out + ".json", "w") as f:
    json.dump(
      {
        "local_device": str(jax.local_devices()[0]),
        "placed": placed,
        "outcome": outcome,
        "outcome_s": time.time() - t0,
      },
      f,
    )


# ------------------------------------------------------------------------------------------------
# Tests (pytest process)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny random TCL in every form, saved as the tools save it (from one device), a damaged
  copy of its converted directory, and the flat params as saved."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import torch_files  # pylint: disable=g-import-not-at-top

  from tcl_jax.models import tcl as tcl_lib  # pylint: disable=g-import-not-at-top
  from tcl_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  from tcl_jax.weights import key_maps as convert_maps  # pylint: disable=g-import-not-at-top
  from tcl_jax.weights import model_files  # pylint: disable=g-import-not-at-top

  d = tmp_path_factory.mktemp("forms")
  cfg = tcl_lib.tiny_config()
  # Seed 2: on the eval test's images several classes are predicted and hit (1, 3: one, none).
  params = tcl_lib.init_params(cfg, jax.random.key(2))
  model_files.save_checkpoint(d / "converted", cfg, params)
  model_files.save_safetensors(d / "model.safetensors", cfg, params)
  torch_files.save(
    {"model": torch_files.state_dict(convert_maps.to_torch_state_dict(cfg, params))},
    d / "tcl.pth",
  )
  run = d / "run"
  os.makedirs(run)
  with open(checkpointing.config_path(str(run)), "w") as f:
    json.dump({"model": cfg.to_dict()}, f)
  mngr = checkpointing.create_checkpoint_manager(
    str(run), ml_collections.ConfigDict(dict(keep=1, keep_best=0, async_save=False))
  )
  checkpointing.save(mngr, 5, {"params": params, "step": np.int32(5)}, {})
  mngr.close()
  shutil.copytree(d / "converted", d / "damaged")
  data = [f for f in (d / "damaged" / "params").rglob("*") if f.parent.name == "d"]
  max(data, key=lambda f: f.stat().st_size).unlink()
  return d, {k: np.asarray(v) for k, v in _flat(params).items()}, cfg


def _env(local_devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


def _both(commands, timeout=420):
  """Runs two processes to the end; (returncode, stdout, stderr) of each."""
  procs = [
    subprocess.Popen(
      cmd,
      cwd=REPO,
      env=_env(LOCAL_DEVICES),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for cmd in commands
  ]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def test_every_form_loads_in_each_process_onto_its_own_devices(saved, tmp_path):
  from test_multihost import _free_port  # pylint: disable=g-import-not-at-top

  d, want, cfg = saved
  forms = {
    "load": {
      "converted": str(d / "converted"),
      "safetensors": str(d / "model.safetensors"),
      "workdir": str(d / "run"),
      "pth": str(d / "tcl.pth"),
    },
    "damaged": str(d / "damaged"),
    "overrides": {"vision_heads": cfg.clip.vision_heads, "text_heads": cfg.clip.transformer_heads},
  }
  with open(tmp_path / "forms.json", "w") as f:
    json.dump(forms, f)
  port = _free_port()
  cmd = [sys.executable, os.path.abspath(__file__), str(tmp_path / "forms.json")]
  runs = _both([cmd + [str(p), str(port), str(tmp_path / f"p{p}")] for p in range(2)])
  for p, (code, out, err) in enumerate(runs):
    assert code == 0, f"process {p}:\n{out[-2000:]}\n{err[-3000:]}"
  for p in range(2):
    with open(tmp_path / f"p{p}.json") as f:
      res = json.load(f)
    with np.load(tmp_path / f"p{p}.npz") as z:
      got = dict(z)
    for name in forms["load"]:
      assert res["placed"][name] == [res["local_device"]], (p, name, res)
      for k, v in want.items():
        np.testing.assert_array_equal(got[f"{name}{k}"], v, err_msg=f"process {p} {name} {k}")
    if p == 1:
      assert res["outcome"].startswith(f"ValueError: the checkpoint {d / 'damaged'} is damaged")
    else:
      assert res["outcome"].startswith(
        "OtherProcessFailed: loading the checkpoint failed in process 1 of 2: the checkpoint "
        f"{d / 'damaged'} is damaged: its params/ cannot be read ("
      ), res["outcome"]
    print(f"process {p}: outcome after {res['outcome_s']:.2f}s")


def _eval_cmd(ckpt, data, workdir, *extra):
  return [
    sys.executable,
    "-m",
    "tcl_jax.evaluate",
    *EVAL_FLAGS,
    f"--checkpoint={ckpt}",
    f"--config.data_root={data}",
    f"--workdir={workdir}",
    *extra,
  ]


def _distributed(port, p):
  return (
    "--config.distributed.initialize=True",
    f"--config.distributed.coordinator_address=127.0.0.1:{port}",
    "--config.distributed.num_processes=2",
    f"--config.distributed.process_id={p}",
  )


def _error_lines(err):
  return [line for line in err.splitlines() if line.startswith("error:")]


def test_evaluate_cli_in_two_processes_from_a_converted_directory_equals_one(saved, tmp_path):
  from test_multihost import _free_port  # pylint: disable=g-import-not-at-top

  from tcl_jax.data import synthetic_segmentation  # pylint: disable=g-import-not-at-top

  d, _, _ = saved
  data = tmp_path / "data"
  synthetic_segmentation.write_synthetic_segmentation(str(data), "voc", num_images=3, seed=5)
  ckpt = d / "converted"
  one = subprocess.run(
    _eval_cmd(ckpt, data, tmp_path / "one"),
    cwd=REPO,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=420,
  )
  assert one.returncode == 0, one.stderr[-3000:]
  with open(tmp_path / "one" / "results.json") as f:
    want = json.load(f)
  # Several classes predicted and hit somewhere: equal results say something.
  assert sum(1 for v in want["voc"]["intersect"] if v > 0) >= 2, want["voc"]

  port = _free_port()
  runs = _both(
    [_eval_cmd(ckpt, data, tmp_path / f"two{p}", *_distributed(port, p)) for p in range(2)]
  )
  for p, (code, out, err) in enumerate(runs):
    assert code == 0, f"process {p}:\n{out[-2000:]}\n{err[-3000:]}"
  with open(tmp_path / "two0" / "results.json") as f:
    got = json.load(f)
  assert got == want  # per-class intersect, union, IoU, mIoU, image counts
  assert not (tmp_path / "two1").exists()  # process 0 writes the merged results

  # Process 1's copy is damaged: it says so; process 0 names process 1 and its error. Each stops
  # with one error line, exit status 2, no traceback (before: "damaged" in both, after 30 s).
  port = _free_port()
  t0 = time.time()
  runs = _both(
    [
      _eval_cmd(
        d / ("damaged" if p else "converted"), data, tmp_path / f"bad{p}", *_distributed(port, p)
      )
      for p in range(2)
    ]
  )
  took = time.time() - t0
  lines = [_error_lines(err) for _, _, err in runs]
  assert [code for code, _, _ in runs] == [2, 2], runs
  assert all(len(x) == 1 and "Traceback" not in err for x, (_, _, err) in zip(lines, runs)), lines
  assert lines[1][0].startswith(
    f"error: cannot load checkpoint {d / 'damaged'}: the checkpoint {d / 'damaged'} is damaged"
  ), lines
  assert lines[0][0].startswith(
    f"error: the evaluation's setup failed in process 1 of 2: cannot load checkpoint "
    f"{d / 'damaged'}: "
  ), lines
  assert not (tmp_path / "bad0").exists()
  print(f"both stopped {took:.1f}s after they started")


if __name__ == "__main__":
  worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
