"""Every command-line mistake ends in one `error: ...` line on stderr and exit status 2 (usage) or
1 (a run that failed), never a traceback (tcl_jax/cli/config_files.py has the convention).

Usage errors are found before TensorFlow or JAX is imported: those runs put a `tensorflow` and a
`jax` on the path that fail on import, so any import of them would show up as a traceback.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import REPO
import pytest

from tcl_jax.data import synthetic_segmentation


@pytest.fixture(scope="module")
def no_heavy_imports(tmp_path_factory):
  """A PYTHONPATH entry whose tensorflow and jax packages raise when imported."""
  root = tmp_path_factory.mktemp("poisoned")
  for name in ("tensorflow", "jax"):
    os.makedirs(root / name)
    (root / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
  return str(root)


def _run(module, *args, cwd=REPO, pythonpath=None, timeout=300, env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="", **(env or {}))
  if pythonpath:
    env["PYTHONPATH"] = pythonpath
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _usage_error(proc) -> str:
  """The one stderr line of a usage error (exit status 2, nothing else printed)."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert proc.stdout == ""
  return lines[0]


def _runtime_error(proc) -> str:
  """The last stderr line of a failed run (exit status 1; log lines may precede it)."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# python -m tcl_jax.main
# ------------------------------------------------------------------------------------------------


def test_main_config_file_not_found(no_heavy_imports, tmp_path):
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/nosuch.py",
      f"--workdir={tmp_path}",
      pythonpath=no_heavy_imports,
    )
  )
  assert line == (
    f"error: --config=configs/nosuch.py: config file configs/nosuch.py not found "
    f"(in {REPO} or in the package's configs, {REPO}/tcl_jax/configs)"
  )


def test_main_misspelt_field_prints_the_hint(no_heavy_imports, tmp_path):
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/synthetic.py",
      f"--workdir={tmp_path}",
      "--config.totl_steps=5",
      pythonpath=no_heavy_imports,
    )
  )
  assert line == (
    "error: --config.totl_steps: the config has no field 'totl_steps'; did you mean "
    "--config.total_steps?"
  )


def test_main_field_of_another_group_points_to_it(no_heavy_imports, tmp_path):
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/tcl.py",
      f"--workdir={tmp_path}",
      "--config.tasks=voc",
      pythonpath=no_heavy_imports,
    )
  )
  assert line == (
    "error: --config.tasks: the config has no field 'tasks'; did you mean --config.evals.tasks?"
  )


def test_main_from_another_directory_finds_configs(no_heavy_imports, tmp_path):
  # The README's relative config path resolves against the checkout; proven by the config's
  # fields being known (the hint) although the cwd has no configs/.
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/synthetic.py:steps=3",
      "--workdir=wd",
      "--config.model.ie_freez=2",
      cwd=tmp_path,
      pythonpath=no_heavy_imports,
    )
  )
  assert line == (
    "error: --config.model.ie_freez: config.model has no field 'ie_freez'; did you "
    "mean --config.model.ie_freeze?"
  )


def test_main_bad_config_arg_value_and_missing_flag(no_heavy_imports, tmp_path):
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/tcl.py:smok",
      f"--workdir={tmp_path}",
      pythonpath=no_heavy_imports,
    )
  )
  assert line == (
    "error: --config=configs/tcl.py:smok: unknown config arg 'smok'; known: ['fsdp', 'smoke']"
  )
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/tcl.py",
      f"--workdir={tmp_path}",
      "--config.total_steps=ten",
      pythonpath=no_heavy_imports,
    )
  )
  assert line == (
    "error: flag --config.total_steps=ten: invalid literal for int() with base 10: 'ten'"
  )
  line = _usage_error(_run("tcl_jax.main", "--config=configs/tcl.py", pythonpath=no_heavy_imports))
  assert line == "error: --workdir is required"


@pytest.mark.parametrize(
  "args, message",
  [
    # A config-file arg of the wrong type (was: a TypeError from inside the config).
    (
      ["--config=configs/synthetic.py:steps=ten"],
      "error: --config=configs/synthetic.py:steps=ten: steps must be a whole number, got 'ten'",
    ),
    (
      ["--config=configs/tcl.py:smoke=maybe"],
      "error: --config=configs/tcl.py:smoke=maybe: smoke must be True or False, got 'maybe'",
    ),
    # Values out of range, found before any work (was: 112 s of work "after -5 TCL steps").
    (
      ["--config=configs/synthetic.py", "--config.total_steps=-5"],
      "error: config.total_steps must be a whole number >= 1, got -5",
    ),
    (
      ["--config=configs/synthetic.py:steps=-5"],
      "error: config.total_steps must be a whole number >= 1, got -5",
    ),
    (
      ["--config=configs/tcl.py", "--config.batch_size=0"],
      "error: config.batch_size must be a whole number >= 1, got 0",
    ),
    (
      ["--config=configs/synthetic.py", "--config.evals.bg_thresh=1.5"],
      "error: config.evals.bg_thresh must be a number in [0.0, 1.0], got 1.5",
    ),
    (
      ["--config=configs/tcl.py", "--config.model.caption_chunk=0"],
      "error: config.model.caption_chunk must be a whole number >= 1, got 0",
    ),
    (
      ["--config=configs/synthetic.py", "--config.synthetic.num_shards=0"],
      "error: config.synthetic.num_shards must be a whole number >= 1, got 0",
    ),
    # CoDe without nouns in its batches (was: a KeyError 'noun_tokens' after the data was read).
    (
      ["--config=configs/code.py", "--config.input.num_nouns=0"],
      "error: --config.model_kind=code trains on each caption's nouns: set "
      "--config.input.num_nouns=2 (the authors' num_words) or start from configs/code.py",
    ),
    (
      ["--config=configs/synthetic.py:model_kind=clip"],
      "error: --config=configs/synthetic.py:model_kind=clip: model_kind must be tcl or code, got "
      "'clip'",
    ),
    (
      ["--config=configs/tcl.py", "--config.evals.img_scale=(2048,0)"],
      "error: config.evals.img_scale must be two whole numbers >= 1 (long side, short side), got "
      "(2048, 0)",
    ),
  ],
)
def test_main_bad_values_before_any_work(no_heavy_imports, tmp_path, args, message):
  line = _usage_error(
    _run("tcl_jax.main", *args, f"--workdir={tmp_path / 'wd'}", pythonpath=no_heavy_imports)
  )
  assert line == message
  assert not os.path.exists(tmp_path / "wd")  # nothing was made


def test_main_missing_init_checkpoint_before_any_work(no_heavy_imports, tmp_path):
  # Was: exit 1 after 10-25 s, with the synthetic data already written.
  missing = tmp_path / "nope.pth"
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/synthetic.py",
      f"--workdir={tmp_path / 'wd'}",
      f"--config.init_checkpoint={missing}",
      pythonpath=no_heavy_imports,
    )
  )
  assert line == (
    f"error: config.init_checkpoint={missing}: {missing} does not exist (a CLIP .pt, "
    "a TCL .pth, a converted directory or a training workdir; '' starts from "
    "random weights)"
  )
  assert os.listdir(tmp_path / "wd") == []
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/synthetic.py",
      f"--workdir={tmp_path / 'wd'}",
      "--config.miniature.clip_weights=nowhere/clip.npz",
      pythonpath=no_heavy_imports,
    )
  )
  assert line == (
    "error: config.miniature.clip_weights=nowhere/clip.npz: no such file (empty: "
    "train the CLIP in the run)"
  )


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory nobody can write to (root too: chattr +i where chmod does not bind root)."""
  path = tmp_path / "read_only"
  path.mkdir()
  if os.geteuid() == 0:
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode:
      pytest.skip("running as root without chattr +i: no directory is read-only")
  else:
    path.chmod(0o555)
  yield path
  if os.geteuid() == 0:
    subprocess.run(["chattr", "-i", str(path)], check=True)
  path.chmod(0o755)


def test_main_read_only_workdir_before_any_work(no_heavy_imports, read_only_dir):
  # Was: an errno line after 35 s that did not say it was the workdir.
  for workdir in (read_only_dir, read_only_dir / "run"):
    line = _usage_error(
      _run(
        "tcl_jax.main",
        "--config=configs/synthetic.py",
        f"--workdir={workdir}",
        pythonpath=no_heavy_imports,
      )
    )
    assert line.startswith(f"error: --workdir={workdir} is not writable (")
    assert line.endswith("); give a directory you can write to")


def test_main_workdir_of_another_run_is_refused(no_heavy_imports, tmp_path):
  # A workdir with a run's files but no record of what made them: the miniature cannot tell
  # whether they are its own, so it does not mix them into its figures.
  (tmp_path / "checkpoints").mkdir()
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/synthetic.py",
      f"--workdir={tmp_path}",
      pythonpath=no_heavy_imports,
    )
  )
  assert line == (
    f"error: --workdir={tmp_path} holds another run's files but no "
    "miniature_run.json (what they were made with is unknown); use a new --workdir"
  )


def test_main_workdir_that_is_a_file(no_heavy_imports, tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  line = _usage_error(
    _run(
      "tcl_jax.main", "--config=configs/tcl.py", f"--workdir={path}", pythonpath=no_heavy_imports
    )
  )
  assert line == f"error: --workdir={path} is a file; give a directory (it is created if missing)"


def test_main_missing_eval_data_before_any_work(no_heavy_imports, tmp_path):
  # Was: trained to the first evaluation, then exit 1 naming --config.data_root (which main
  # refuses), with no checkpoint of the steps trained.
  for root in ("nodata", str(tmp_path / "elsewhere")):
    line = _usage_error(
      _run(
        "tcl_jax.main",
        "--config=configs/tcl.py",
        f"--workdir={tmp_path / 'wd'}",
        "--config.init_checkpoint=",
        f"--config.evals.data_root={root}",
        pythonpath=no_heavy_imports,
      )
    )
    assert line == (
      f"error: t_voc20: data root {root}/VOCdevkit/VOC2012 does not exist (set "
      "--config.evals.data_root to the folder holding VOCdevkit/VOC2012); --config.evals.tasks= "
      "trains without evaluation"
    )
  # Every task is checked: the first one's data present, the second's missing.
  synthetic_segmentation.write_synthetic_segmentation(str(tmp_path / "d"), "t_voc20", num_images=1)
  line = _usage_error(
    _run(
      "tcl_jax.main",
      "--config=configs/tcl.py",
      f"--workdir={tmp_path / 'wd'}",
      "--config.init_checkpoint=",
      f"--config.evals.data_root={tmp_path / 'd'}",
      pythonpath=no_heavy_imports,
    )
  )
  assert line.startswith(f"error: t_context59: data root {tmp_path / 'd'}/VOCdevkit/VOC2010 ")
  assert os.listdir(tmp_path / "wd") == []  # nothing written


def test_main_train_files_matching_nothing(tmp_path):
  pattern = str(tmp_path / "nowhere" / "train-*.tfrecord")
  proc = _run(
    "tcl_jax.main",
    "--config=configs/tcl.py",
    f"--workdir={tmp_path / 'wd'}",
    f"--config.input.train_files=('{pattern}',)",
    "--config.init_checkpoint=",
    "--config.evals.tasks=",
  )
  assert _runtime_error(proc) == f"error: config.input.train_files: no file matches '{pattern}'"


# ------------------------------------------------------------------------------------------------
# python -m tcl_jax.evaluate (checks made before any model work: all usage errors)
# ------------------------------------------------------------------------------------------------


def test_evaluate_usage_errors(tmp_path):
  line = _usage_error(_run("tcl_jax.evaluate", "--config.tasks=voc"))
  assert line.startswith("error: --checkpoint is required")
  line = _usage_error(_run("tcl_jax.evaluate", f"--checkpoint={tmp_path / 'nope'}"))
  assert line == f"error: --checkpoint={tmp_path / 'nope'} does not exist"
  # A Hub id is taken (as by the demo and the app) and resolved offline from the cache: one line.
  synthetic_segmentation.write_synthetic_segmentation(str(tmp_path), "voc", num_images=1)
  line = _usage_error(
    _run(
      "tcl_jax.evaluate",
      "--checkpoint=tiny-org/not-there",
      f"--config.data_root={tmp_path}",
      "--config.tasks=voc",
      env={"HF_HUB_OFFLINE": "1"},
    )
  )
  assert (
    line.startswith("error: cannot load checkpoint tiny-org/not-there: ")
    and "not in the local Hub cache" in line
  ), line
  line = _usage_error(_run("tcl_jax.evaluate", f"--checkpoint={tmp_path}", "--config.task=voc"))
  assert line == (
    "error: --config.task: the config has no field 'task'; did you mean --config.tasks?"
  )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A converted random-weights tiny TCL (what `python -m tcl_jax.convert` writes)."""
  import jax  # pylint: disable=g-import-not-at-top

  from tcl_jax.models import tcl as tcl_lib  # pylint: disable=g-import-not-at-top
  from tcl_jax.weights import model_files  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("tiny") / "ckpt"
  cfg = tcl_lib.tiny_config()
  model_files.save_checkpoint(path, cfg, tcl_lib.init_params(cfg, jax.random.key(0)))
  return path


def test_evaluate_value_out_of_range(tiny_checkpoint):
  line = _usage_error(
    _run("tcl_jax.evaluate", f"--checkpoint={tiny_checkpoint}", "--config.bg_thresh=2")
  )
  assert line == "error: config.bg_thresh must be a number in [0.0, 1.0], got 2.0"


def test_evaluate_a_data_folder_as_checkpoint_is_named_before_the_data(tmp_path):
  # Was: "voc20: data root ... does not exist", about the data, for a wrong --checkpoint.
  synthetic_segmentation.write_synthetic_segmentation(str(tmp_path / "data"), "voc", num_images=1)
  line = _usage_error(
    _run(
      "tcl_jax.evaluate",
      f"--checkpoint={tmp_path / 'data'}",
      "--config.tasks=voc20",
      f"--config.data_root={tmp_path / 'nodata'}",
    )
  )
  assert line == (
    f"error: --checkpoint={tmp_path / 'data'} is a folder without a checkpoint (no config.json, "
    "checkpoints/ or model.safetensors); give a converted directory (python -m tcl_jax.convert), "
    "a training workdir, a .safetensors export, a PyTorch file or a Hugging Face Hub id"
  )


def test_evaluate_read_only_workdir_before_any_work(tiny_checkpoint, read_only_dir, tmp_path):
  # Was: every benchmark evaluated, then a 63-line traceback and no results.json.
  synthetic_segmentation.write_synthetic_segmentation(str(tmp_path / "data"), "voc", num_images=1)
  for workdir in (read_only_dir, read_only_dir / "out"):
    proc = _run(
      "tcl_jax.evaluate",
      f"--checkpoint={tiny_checkpoint}",
      f"--workdir={workdir}",
      "--config.tasks=voc",
      f"--config.data_root={tmp_path / 'data'}",
    )
    line = _usage_error(proc)
    assert line.startswith(f"error: --workdir={workdir} is not writable ("), line
    assert line.endswith("); give a directory you can write to")


def test_evaluate_from_another_directory_uses_the_checkouts_eval_config(tiny_checkpoint, tmp_path):
  # The default --config (configs/eval.py) is found from any directory: the run gets as far as
  # looking for the data, which is missing (a usage error too: it is named by --config.data_root).
  proc = _run(
    "tcl_jax.evaluate",
    f"--checkpoint={tiny_checkpoint}",
    "--config.tasks=voc20",
    "--config.data_root=nodata",
    cwd=tmp_path,
  )
  assert _usage_error(proc) == (
    "error: voc20: data root nodata/VOCdevkit/VOC2012 does not exist (set --config.data_root "
    "to the folder holding VOCdevkit/VOC2012)"
  )


# ------------------------------------------------------------------------------------------------
# python -m tcl_jax.app: where it cannot listen (checked before the model loads)
# ------------------------------------------------------------------------------------------------


def test_app_busy_port_and_foreign_host():
  # Was: Gradio's advice about GRADIO_SERVER_PORT and launch(), which does not apply.
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    line = _usage_error(_run("tcl_jax.app", "--checkpoint=unused", f"--port={port}"))
  assert line == f"error: --port {port}: already in use on 127.0.0.1; pick a free port with --port"
  line = _usage_error(_run("tcl_jax.app", "--checkpoint=unused", "--host=192.0.2.1"))
  assert line == (
    "error: --host 192.0.2.1: not an address of this machine (Cannot assign "
    "requested address); use 127.0.0.1, 0.0.0.0 or one of this machine's own "
    "addresses"
  )


def test_app_without_gradio_names_the_extra(tmp_path):
  # Was: a ModuleNotFoundError traceback after a plain `pip install .` (Gradio is in [demo]).
  (tmp_path / "gradio").mkdir()
  (tmp_path / "gradio" / "__init__.py").write_text(
    "raise ModuleNotFoundError(\"No module named 'gradio'\", name='gradio')\n"
  )
  line = _usage_error(_run("tcl_jax.app", "--checkpoint=unused", pythonpath=str(tmp_path)))
  assert line == (
    'error: the web app needs Gradio, which the demo extra installs: pip install "tcl_jax[demo]"'
  )


def test_app_start_up_names_its_url_without_gradios_hints(tmp_path):
  # Was: Gradio's "To create a public link, set `share=True` in `launch()`."
  import jax  # pylint: disable=g-import-not-at-top

  from tcl_jax.models import tcl as tcl_lib  # pylint: disable=g-import-not-at-top
  from tcl_jax.weights import model_files  # pylint: disable=g-import-not-at-top

  cfg = tcl_lib.tiny_config()
  model_files.save_checkpoint(tmp_path / "ckpt", cfg, tcl_lib.init_params(cfg, jax.random.key(0)))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = tmp_path / "app.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(
      [sys.executable, "-m", "tcl_jax.app", f"--checkpoint={tmp_path / 'ckpt'}", f"--port={port}"],
      stdout=f,
      stderr=subprocess.STDOUT,
      env=dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio")),
    )
  try:
    deadline = time.time() + 180
    while "Serving on" not in log.read_text():
      assert proc.poll() is None and time.time() < deadline, log.read_text()
      time.sleep(0.5)
    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read()
  finally:
    proc.terminate()
    proc.wait(30)
  text = log.read_text()
  assert f"Serving on http://127.0.0.1:{port}/ (Ctrl-C stops it)" in text
  for hint in ("share=True", "GRADIO_SERVER_PORT", "Running on local URL", "Traceback"):
    assert hint not in text, text
