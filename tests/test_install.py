"""A plain (non-editable) `pip install .` carries what the README's commands read: the configs and
the assets, found through importlib.resources (tcl_jax/cli/config_files.py), not through a checkout.

The wheel is built from a copy of the package and pyproject.toml (nothing is written into the
checkout). The slow test installs it into a fresh venv, with the dependencies taken from the
test's own environment (no network: `pip install --no-index` must find every requirement
satisfied), and runs the README's default command, unchanged but for `:steps=20`, from a directory
that is not the checkout.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from conftest import REPO
import pytest

CONFIGS = ("common.py", "eval.py", "miniature_clip.py", "synthetic.py", "tcl.py")
ASSETS = ("bpe_simple_vocab_16e6.txt.gz", "miniature_clip.npz", "sample.png")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
  src = tmp_path_factory.mktemp("src")
  shutil.copytree(
    os.path.join(REPO, "tcl_jax"), src / "tcl_jax", ignore=shutil.ignore_patterns("__pycache__")
  )
  shutil.copy(os.path.join(REPO, "pyproject.toml"), src)
  out = tmp_path_factory.mktemp("wheel")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "--no-index",
      "-q",
      "-w",
      str(out),
      str(src),
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (path,) = glob.glob(str(out / "tcl_jax-*.whl"))
  return path


def test_wheel_holds_the_configs_and_assets(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  for name in CONFIGS:
    assert f"tcl_jax/configs/{name}" in names, name
  for name in ASSETS:
    assert f"tcl_jax/assets/{name}" in names, name
  assert not any(n.startswith(("tests/", "configs/")) for n in names)


@pytest.mark.slow
def test_fresh_venv_runs_the_readme_default_outside_the_checkout(wheel, tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  py = str(venv / "bin" / "python")
  site = subprocess.run(
    [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  # The dependencies: this environment's site-packages on the path (a .pth line adds the folder
  # only; its own .pth files, such as the checkout's editable install, are not run).
  with open(os.path.join(site, "deps.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  proc = subprocess.run(
    [py, "-m", "pip", "install", "--no-index", "-q", wheel],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  where = subprocess.run(
    [py, "-c", "import tcl_jax; print(tcl_jax.__file__)"],
    cwd=elsewhere,
    env=env,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  assert where.startswith(site) and not where.startswith(REPO), where
  proc = subprocess.run(
    [py, "-m", "tcl_jax.main", "--config=configs/synthetic.py:steps=20", "--workdir=tcl_synth"],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert proc.stdout.strip().splitlines()[-1].startswith("miniature (seed 0): zero-shot mIoU")
  for name in ("miniature.json", "miniature_masks.png", "miniature_run.json"):
    assert os.path.exists(elsewhere / "tcl_synth" / name), name


def test_notebook_colab_cell_tells_the_readmes_cuda_story():
  # Was: the Colab cell installed jax[cuda12] while the [gpu] extra is CUDA 13. Now one rule, the
  # README's: CUDA 13 (the extra's jax[cuda13]) on a driver >= 580, else jax[cuda12].
  import json  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top

  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    gpu = tomllib.load(f)["project"]["optional-dependencies"]["gpu"]
  assert any(r.startswith("jax[cuda13]") for r in gpu), gpu
  with open(os.path.join(REPO, "notebooks", "zero_shot_demo.ipynb")) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  colab = "".join(cells[0]["source"])
  assert 'cuda = "cuda13" if driver.isdigit() and int(driver) >= 580 else "cuda12"' in colab
  assert 'f"jax[{cuda}]=={jax_version}"' in colab and "jax[cuda12]==" not in colab
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  assert "(R580 or later); on an older driver (R525+) use" in readme
