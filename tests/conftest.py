"""Test setup, run before any test module imports JAX.

* 8 fake CPU devices (`--xla_force_host_platform_device_count=8`): sharding tests run a real
  8-device mesh; code that does not ask for a mesh still runs on device 0.
* A persistent XLA compilation cache: the train tests compile the same small programs several
  times (and again in subprocesses); identical programs are loaded instead of recompiled.
"""

import os
import tempfile

import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tcl_jax_test_xla_cache")
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module(name: str):
  """configs/<name>.py as a module (configs/ is not a package)."""
  from tcl_jax.cli import config_files  # pylint: disable=g-import-not-at-top

  return config_files.load_module(os.path.join(REPO, "configs", name + ".py"))


@pytest.fixture(scope="module")
def fast_compiles():
  """For modules of tiny models, where compile time dominates: XLA's heavy passes are not what
  they test. Use with `pytestmark = pytest.mark.usefixtures("fast_compiles")`."""
  import jax  # pylint: disable=g-import-not-at-top

  old = jax.config.read("jax_disable_most_optimizations")
  # The flag is not part of jax's in-memory executable caches: without clearing them, an op an
  # earlier module compiled with full optimization is reused here, and a module comparing against
  # a subprocess that runs with the flag (test_hf_clip's CLI) sees 1-ulp differences.
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
  jax.clear_caches()
