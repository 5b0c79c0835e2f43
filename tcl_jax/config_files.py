"""Loading `configs/*.py` files as modules by path (configs/ is a folder of files, not a package,
so that `--config=configs/tcl.py` works from any checkout)."""

import importlib.util
import os


def load_module(path: str):
  """The Python file at `path` as a fresh module."""
  name = "_tcl_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file: str, name: str):
  """configs/<name>.py next to `config_file` (a config's `__file__`)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py"))
