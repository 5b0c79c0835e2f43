"""One-file checkpoints: `python -m tcl_jax.export`, `model_files.load_safetensors`, `from_pretrained`,
and the front ends reading them (the demo CLI). No network: the Hub test reads a Hub cache laid out
in tmp_path with HF_HUB_OFFLINE=1."""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import tcl_jax
from tcl_jax.models import tcl as tcl_lib
from tcl_jax.weights import loading
from tcl_jax.weights import model_files

HF_DIR = (
  Path(__file__).resolve().parents[1].parent
  / "shared"
  / "fixtures"
  / "hf_clip_tiny"
  / "hf_clip_tiny"
)


def _leaves(tree):
  return {
    "/".join(p.key for p in path): np.asarray(x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _assert_bitwise(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
    assert la[k].tobytes() == lb[k].tobytes(), k


def _run(*args, env=None):
  return subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
  )


def _one_line(r, status=2) -> str:
  lines = r.stderr.strip().splitlines()
  assert r.returncode == status and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
  return lines[0]


@pytest.fixture(scope="module")
def model():
  """The tiny model's shapes with distinct values in every leaf (numpy: no compile), the zero-init
  gates and the scalar logit scales included, so a leaf read back under another leaf's name or
  left at an init value would show."""
  cfg = tcl_lib.tiny_config()
  shapes = jax.eval_shape(lambda: tcl_lib.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.05).astype(s.dtype), shapes)
  return cfg, params


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
  """The export CLI's file for the model, from a converted directory."""
  cfg, params = model
  d = tmp_path_factory.mktemp("export")
  model_files.save_checkpoint(d / "ckpt", cfg, params)
  r = _run("-m", "tcl_jax.export", str(d / "ckpt"), "--output", str(d / "model.safetensors"))
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("exported ") and "MiB" in r.stdout
  return d / "model.safetensors"


def test_export_round_trip_is_bitwise_exact(model, exported):
  cfg, params = model
  with safetensors.safe_open(exported, framework="np") as f:
    meta = f.metadata()
    keys = set(f.keys())
  assert json.loads(meta["tcl_jax_config"]) == {"model_kind": "tcl", **cfg.to_dict()}
  # Every parameter, the frozen CLIP towers included.
  assert keys == set(_leaves(params))
  assert any(k.startswith("clip/visual/") for k in keys) and any(
    k.startswith("clip/text/") for k in keys
  )
  cfg2, params2 = model_files.load_safetensors(exported)
  assert cfg2 == cfg
  _assert_bitwise(params2, params)
  _assert_bitwise(loading.load_any(str(exported))[1], params)
  _assert_bitwise(tcl_jax.from_pretrained(exported)[1], params)
  # A directory holding the file (what a Hub snapshot of a published repo is) loads the same.
  d = exported.parent / "repo"
  d.mkdir(exist_ok=True)
  shutil.copy(exported, d / "model.safetensors")
  _assert_bitwise(tcl_jax.from_pretrained(d)[1], params)
  # And `convert` turns the file back into a converted directory.
  r = _run("-m", "tcl_jax.convert", str(exported), "--output", str(exported.parent / "back"))
  assert r.returncode == 0, r.stderr
  _assert_bitwise(model_files.load_checkpoint(exported.parent / "back")[1], params)


def test_bad_files_are_one_line(model, exported, tmp_path):
  cfg, params = model
  data = exported.read_bytes()
  (tmp_path / "truncated.safetensors").write_bytes(data[:-100])
  (tmp_path / "garbage.safetensors").write_bytes(b"hello, not a safetensors file")
  safetensors.numpy.save_file({"a": np.ones(3, np.float32)}, tmp_path / "foreign.safetensors")
  tensors = safetensors.numpy.load_file(exported)
  tensors.pop("masker/sim2mask/w")
  tensors["clip/text/text_projection"] = tensors["clip/text/text_projection"][:, :3]
  with safetensors.safe_open(exported, framework="np") as f:
    meta = f.metadata()
  safetensors.numpy.save_file(tensors, tmp_path / "edited.safetensors", metadata=meta)
  cases = {
    "truncated": "is not a readable safetensors file",
    "garbage": "is not a readable safetensors file",
    "foreign": "its safetensors metadata has no tcl_jax_config",
    "edited": "2 problem(s): tensor clip/text/text_projection is float32[64, 3], the "
    "config implies float32[64, 64]; missing tensor masker/sim2mask/w",
  }
  for name, want in cases.items():
    path = tmp_path / f"{name}.safetensors"
    with pytest.raises(ValueError) as e:
      loading.load_any(str(path))
    assert want in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
  if HF_DIR.is_dir():  # transformers' own weights file: pointed at its directory
    with pytest.raises(ValueError, match="give its directory"):
      model_files.load_safetensors(HF_DIR / "model.safetensors")
  # The command line: one line, exit 2.
  line = _one_line(
    _run(
      "-m",
      "tcl_jax.export",
      str(tmp_path / "truncated.safetensors"),
      "--output",
      str(tmp_path / "x.safetensors"),
    )
  )
  assert "truncated.safetensors is not a readable safetensors file" in line
  assert not (tmp_path / "x.safetensors").exists()
  line = _one_line(
    _run(
      "-m",
      "tcl_jax.export",
      str(tmp_path / "foreign.safetensors"),
      "--output",
      str(tmp_path / "x.npz"),
    )
  )
  assert "must end in .safetensors" in line


def test_demo_cli_runs_on_the_exported_file(exported, tmp_path):
  out = tmp_path / "out.png"
  r = _run(
    "-m",
    "tcl_jax.demo",
    "--checkpoint",
    str(exported),
    "--image",
    "sample",
    "--classes",
    "a, b",
    "--output",
    str(out),
    "--no_pamr",
  )
  assert r.returncode == 0, r.stderr
  assert out.is_file() and f"wrote {out}" in r.stdout


def test_from_pretrained_reads_a_hub_repo_from_the_cache_offline(model, exported, tmp_path):
  """A published repo holding model.safetensors, as huggingface_hub's cache keeps a download."""
  commit = "89abcdef0123456789abcdef0123456789abcdef"
  repo = tmp_path / "hub" / "models--someone--tcl-tiny"
  (repo / "snapshots" / commit).mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  shutil.copy(exported, repo / "snapshots" / commit / "model.safetensors")
  code = (
    "import sys, numpy as np, jax, tcl_jax; from tcl_jax.weights import model_files; "
    "cfg, p = tcl_jax.from_pretrained('someone/tcl-tiny'); "
    "cfg2, q = model_files.load_safetensors(sys.argv[1]); "
    "assert cfg == cfg2 and all(np.asarray(a).tobytes() == np.asarray(b).tobytes() "
    "for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True)); print('same')"
  )
  r = _run("-c", code, str(exported), env={"HF_HUB_CACHE": str(tmp_path / "hub")})
  assert r.returncode == 0 and r.stdout.strip() == "same", r.stderr


def test_export_has_the_umasks_mode_not_0600(exported):
  # Was: 0600 (safetensors' own), unreadable to the group a checkpoint is shared with.
  umask = os.umask(0)
  os.umask(umask)
  assert exported.stat().st_mode & 0o777 == 0o666 & ~umask


def _converting(source, out, *extra):
  return subprocess.Popen(
    [sys.executable, "-m", "tcl_jax.convert", str(source), "--output", str(out), *extra],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=dict(os.environ, HF_HUB_OFFLINE="1"),
  )


def _loading_jax(proc):
  """Whether the process has begun to load jaxlib's native code (Linux: its memory map)."""
  try:
    return "jaxlib" in Path(f"/proc/{proc.pid}/maps").read_text()
  except OSError:
    return False


def _interrupt_when(proc, ready, timeout=300):
  """SIGINT once `ready(proc)` holds (polled every millisecond)."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  deadline = time.time() + timeout
  while not ready(proc) and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.001)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _tree(path):
  return sorted(
    (str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*")
  )


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc/<pid>/maps")
def test_ctrl_c_during_convert_is_one_line_and_loses_nothing(model, exported, tmp_path):
  # Was: 60-213 lines of traceback and a params.orbax-checkpoint-tmp folder left in --output.
  cfg, params = model
  out = tmp_path / "new"
  # While the libraries load; then while the checkpoint is being written (the staging folder is
  # there): both leave no --output behind.
  for ready in (_loading_jax, lambda _: any(out.glob(".convert-*"))):
    status, stdout, err = _interrupt_when(_converting(exported, out), ready)
    assert status == 130 and stdout == "", err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: interrupted (Ctrl-C)"), err
    assert not out.exists()
  # Over a converted checkpoint (--overwrite): the old one is kept whole, nothing else is left.
  old = tmp_path / "old"
  model_files.save_checkpoint(old, cfg, jax.tree.map(lambda x: x + 1, params))
  before = _tree(old)
  status, _, err = _interrupt_when(
    _converting(exported, old, "--overwrite"), lambda _: any(old.glob(".convert-*/params*"))
  )
  assert status == 130 and err == f"error: interrupted (Ctrl-C); {old} is left as it was\n", err
  assert _tree(old) == before
  # Uninterrupted, --overwrite replaces it, leaving no staging folder.
  r = _run("-m", "tcl_jax.convert", str(exported), "--output", str(old), "--overwrite")
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in old.iterdir()) == ["config.json", "params"]
  _assert_bitwise(model_files.load_checkpoint(old)[1], params)
