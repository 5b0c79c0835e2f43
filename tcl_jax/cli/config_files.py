"""Config files, and the command line of the absl programs that take one (main, evaluate).

`load_module` loads config files by path: the package's configs (tcl_jax/configs/, also reachable as
the checkout's `configs/`) are a folder of files, not modules, so that `--config=` takes any file. A
relative `configs/X.py` (or `tcl_jax/...`) path that does not exist from the current directory is
the installed package's file (`packaged`, through importlib.resources), so the README's commands
work from any directory, in a checkout or after a plain `pip install .`.

`parse_flags` is the flags parser those programs hand to `absl.app.run`. Exit statuses, the same in
every command-line program of the package (main, evaluate, convert, demo, app):
  2  usage error, found before the work starts: the command line is wrong (an unknown or missing
     flag, a config file or `--config.<field>` that does not exist, a value of the wrong type, a
     --workdir that is a file) or names something that is missing or unreadable (a checkpoint,
     an image, a data root). Flag and config mistakes are found before any heavy import;
  1  runtime failure: the work started and failed (e.g. in training: no file matches the data
     pattern, an init checkpoint that does not load, a non-finite loss).
Either way the user sees one line, `error: ...`, on stderr, never a traceback.
"""

import contextlib
import difflib
import importlib.resources
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import NoReturn

from tcl_jax.cli import config_checks

# Relative paths that name the package's own files: configs/X.py -> tcl_jax/configs/X.py.
_PACKAGE_PREFIXES = {"configs/": "configs/", "tcl_jax/": ""}


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


def packaged(name: str) -> str:
  """The path of the installed package's file `name` (e.g. "configs/synthetic.py",
  "assets/miniature_clip.npz"), found through importlib.resources."""
  return os.fspath(importlib.resources.files("tcl_jax").joinpath(name))


def resolve(path: str) -> str:
  """`path` if it exists or is absolute; else, for `configs/X` or `tcl_jax/X`, the installed
  package's file when it has one; else `path` unchanged."""
  if os.path.exists(path) or os.path.isabs(path):
    return path
  norm = path.replace(os.sep, "/").removeprefix("./")
  for prefix, inside in _PACKAGE_PREFIXES.items():
    if norm.startswith(prefix):
      found = packaged(inside + norm[len(prefix) :])
      if os.path.exists(found):
        return found
  return path


def usage_error(message: str) -> NoReturn:
  """Exit status 2 with one line on stderr."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


class _QuietOrbax:
  """Drops orbax's INFO records (several lines per checkpoint saved or loaded) from absl's
  console handler; its warnings and errors still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname


def quiet_orbax_info() -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.get_absl_handler().addFilter(_QuietOrbax())


# ------------------------------------------------------------------------------------------------
# The --config flag
# ------------------------------------------------------------------------------------------------


def _find_config_arg(argv: list[str], name: str) -> int:
  """Index of the `--config=...` / `--config ...` argument (-1 if absent)."""
  for i, arg in enumerate(argv):
    if re.match(rf"^--?{name}(=|$)", arg):
      return i
  return -1


def overrides(argv: list[str], name: str = "config") -> list[str]:
  """Field paths of the `--config.a.b=v` / `--noconfig.a` arguments."""
  out = []
  for arg in argv:
    m = re.match(rf"^--?(?:no)?{name}\.([^=\s]+)", arg)
    if m:
      out.append(m.group(1))
  return out


def _all_paths(node, prefix: str = "") -> list[str]:
  out = []
  for key in node.keys():
    path = f"{prefix}{key}"
    out.append(path)
    if hasattr(node[key], "keys"):
      out.extend(_all_paths(node[key], path + "."))
  return out


def check_override(config, field: str, flag: str = "config") -> str | None:
  """Why `--{flag}.{field}` cannot apply to `config` (None if it can); suggests the field meant."""
  if "[" in field:  # indexing into a sequence field: left to ml_collections
    return None
  parts = field.split(".")
  node = config
  for i, part in enumerate(parts):
    if not hasattr(node, "keys"):
      return f"--{flag}.{field}: {flag}.{'.'.join(parts[:i])} is a value, not a group of fields"
    if part in node:
      node = node[part]
      continue
    group = ".".join(parts[:i])
    where = f"{flag}.{group}" if group else f"the {flag}"
    msg = f"--{flag}.{field}: {where} has no field {part!r}"
    close = difflib.get_close_matches(part, list(node.keys()), n=1)
    if close:  # a typo of a field in the same group
      return msg + f"; did you mean --{flag}.{'.'.join(parts[:i] + close)}?"
    elsewhere = [p for p in _all_paths(config) if p.split(".")[-1] == part]
    if elsewhere:  # a field that lives in another group (--config.tasks -> evals.tasks)
      return msg + "; did you mean " + " or ".join(f"--{flag}.{p}" for p in elsewhere) + "?"
    return msg + f" (its fields: {', '.join(sorted(node.keys()))})"
  return None


def parse_flags(
  argv: list[str], *, default_config: str | None = None, flag: str = "config"
) -> list[str]:
  """`absl.app.run(main, flags_parser=parse_flags)`: parses `argv` into absl's FLAGS.

  Resolves a relative `configs/...` path against the installed package when it is not found from
  the current directory; loads the config once to check every `--config.<field>` override, and
  checks the values of the parsed config (config_checks.value_problem); any mistake is a usage
  error (exit status 2, one line). `default_config` stands in for a missing --config (define the
  flag itself without a default: config_flags applies overrides to a default at definition).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  argv = list(argv)
  i = _find_config_arg(argv, flag)
  if i < 0 and default_config:
    argv.insert(1, f"--{flag}={default_config}")
    i = 1
  if i >= 0:
    j = i if "=" in argv[i] else i + 1
    if j >= len(argv):
      usage_error(f"--{flag} needs a value: a config file such as configs/synthetic.py")
    spec = argv[j].split("=", 1)[1] if j == i else argv[j]
    path, colon, arg = spec.partition(":")
    found = resolve(path)
    if not os.path.isfile(found):
      usage_error(
        f"--{flag}={spec}: config file {path} not found (in {os.getcwd()} or in "
        f"the package's configs, {packaged('configs')})"
      )
    argv[j] = found + colon + arg
    if j == i:
      argv[j] = f"--{flag}={argv[j]}"
    try:
      module = load_module(found)
      config = module.get_config(arg) if colon else module.get_config()
    except Exception as e:  # pylint: disable=broad-except
      # The config file's own complaint (e.g. an unknown ':arg'), not config_flags' wrapping;
      # ValueError and KeyError are the configs' own (common.parse_arg), others get their name.
      if isinstance(e, (KeyError, ValueError)) and e.args:
        detail = e.args[0]  # KeyError's str() quotes
      else:
        detail = f"{type(e).__name__}: {e}"
      usage_error(f"--{flag}={spec}: {detail}")
    for field in overrides(argv, flag):
      problem = check_override(config, field, flag)
      if problem:
        usage_error(problem)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # unknown flags, bad values, missing required flags
    message = str(e).splitlines()[0]
    missing = re.search(r"Flag --(\w+) must have a value other than None", message)
    usage_error(f"--{missing.group(1)} is required" if missing else message)
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    # What config_flags raises for an override it cannot apply.
    usage_error(f"{type(e).__name__}: {str(e).splitlines()[0]}")
  config = getattr(flags.FLAGS, flag, None) if flag in flags.FLAGS else None
  problem = config_checks.value_problem(config, flag) if config is not None else None
  if problem:
    usage_error(problem)
  return rest


# Lines native libraries print to stderr while they load, which a user can do nothing about:
# TensorFlow's oneDNN and CPU-feature notices (absl's C++ logging ignores TF_CPP_MIN_LOG_LEVEL).
_NATIVE_NOISE = re.compile(
  r"All log messages before absl::InitializeLog\(\) is called|oneDNN custom operations are on"
  r"|cpu_feature_guard\.cc|To enable the following instructions:|rebuild TensorFlow with the "
  r"appropriate compiler flags"
)


@contextlib.contextmanager
def quiet_native_stderr():
  """Holds back what native code writes to file descriptor 2 inside the block, then writes it
  out without the known start-up notices (`_NATIVE_NOISE`): anything else still shows."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      for line in held.read().decode("utf-8", "replace").splitlines(keepends=True):
        if not _NATIVE_NOISE.search(line):
          sys.stderr.write(line)
      sys.stderr.flush()


def quiet_startup() -> None:
  """Silences start-up messages a user cannot act on; call before TensorFlow or JAX is imported:
  TensorFlow's C++ INFO and WARNING lines (the `TF_CPP_MIN_LOG_LEVEL` a user sets wins; worker
  processes inherit it) and JAX's INFO lines about the backends it did not find (no TPU, no
  IFRT proxy). Import TensorFlow inside `quiet_native_stderr()` for its load-time notices."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
