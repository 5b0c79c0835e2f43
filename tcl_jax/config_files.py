"""Config files, and the command line of the absl programs that take one (main, evaluate).

`load_module` loads `configs/*.py` by path: configs/ is a folder of files, not a package, so that
`--config=configs/tcl.py` works from any checkout. A relative `--config` path that does not exist
from the current directory is looked up in this checkout, so the README's commands work from
anywhere.

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

import difflib
import importlib.util
import os
import re
import sys
from typing import NoReturn

# The checkout holding configs/ (tcl_jax is installed in editable mode from it).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def resolve(path: str) -> str:
  """`path` if it exists; else, for a relative path that exists inside this checkout, that file."""
  if os.path.exists(path) or os.path.isabs(path):
    return path
  in_repo = os.path.join(REPO, path)
  return in_repo if os.path.exists(in_repo) else path


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
      return (f"--{flag}.{field}: {flag}.{'.'.join(parts[:i])} is a value, not a group of "
              "fields")
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


def parse_flags(argv: list[str], *, default_config: str | None = None,
                flag: str = "config") -> list[str]:
  """`absl.app.run(main, flags_parser=parse_flags)`: parses `argv` into absl's FLAGS.

  Resolves a relative `--config` path against this checkout when it is not found from the current
  directory; loads the config once to check every `--config.<field>` override; any mistake is a
  usage error (exit status 2, one line). `default_config` stands in for a missing --config (define
  the flag itself without a default: config_flags applies overrides to a default at definition).
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
      usage_error(f"--{flag}={spec}: config file {path} not found (in {os.getcwd()} or in "
                  f"this checkout, {REPO})")
    argv[j] = found + colon + arg
    if j == i:
      argv[j] = f"--{flag}={argv[j]}"
    try:
      module = load_module(found)
      config = module.get_config(arg) if colon else module.get_config()
    except Exception as e:  # pylint: disable=broad-except
      # The config file's own complaint (e.g. an unknown ':arg'), not config_flags' wrapping.
      detail = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() quotes
      usage_error(f"--{flag}={spec}: {type(e).__name__}: {detail}")
    for field in overrides(argv, flag):
      problem = check_override(config, field, flag)
      if problem:
        usage_error(problem)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # unknown flags, bad values, missing required flags
    message = str(e).splitlines()[0]
    missing = re.search(r"Flag --(\w+) must have a value other than None", message)
    usage_error(f"--{missing.group(1)} is required" if missing else message)
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    # What config_flags raises for an override it cannot apply.
    usage_error(f"{type(e).__name__}: {str(e).splitlines()[0]}")
