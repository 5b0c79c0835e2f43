"""setup.sh (the README's first command and .ci/run's) picks a Python >= 3.12 that really runs."""

import os
import shutil
import subprocess
import sys

from conftest import REPO


def test_setup_skips_pyenv_shims_that_exit_127(tmp_path):
  # As on machines where pyenv knows 3.12 but has not selected it: every versioned name on PATH
  # is a shim that fails, and the interpreter lives under $PYENV_ROOT/versions.
  shims = tmp_path / "shims"
  shims.mkdir()
  for name in ("python3.13", "python3.12", "python3"):
    (shims / name).write_text(f"#!/bin/sh\necho 'pyenv: {name}: command not found' >&2\nexit 127\n")
    (shims / name).chmod(0o755)
  installed = tmp_path / "pyenv" / "versions" / "3.12.1" / "bin"
  installed.mkdir(parents=True)
  os.symlink(sys.executable, installed / "python3")
  tools = os.path.dirname(shutil.which("dirname"))  # bash, dirname
  env = dict(os.environ, PATH=f"{shims}:{tools}", PYENV_ROOT=str(tmp_path / "pyenv"))
  proc = subprocess.run(
    ["bash", os.path.join(REPO, "setup.sh"), "--print-python"],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(installed / "python3")
