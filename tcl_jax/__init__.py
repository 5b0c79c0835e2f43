"""tcl_jax: TCL (Cha et al., CVPR 2023) in JAX/Flax. `tcl_jax.from_pretrained` loads a checkpoint."""

import importlib.util as _importlib_util
import os as _os


def _quiet_libtpu_without_tpus() -> None:
  """With libtpu installed (the `tpu` extra, e.g. for tcl_jax.tools.scaling's TPU compiles) on a
  machine without TPU chips, every JAX start would print libtpu's warnings about TPU workers and
  host bounds it cannot find. It finds no chips either way; these tell it not to look. Only where
  no TPU chip is attached and the user set none of them."""
  if _importlib_util.find_spec("libtpu") is None:
    return
  if any(k in _os.environ for k in ("TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS")):
    return
  try:  # the check JAX makes before starting its TPU backend (PCI ids; stdlib only, loaded as a
    # file so that `import tcl_jax` still does not import jax)
    jax_dir = _importlib_util.find_spec("jax").submodule_search_locations[0]
    path = _os.path.join(jax_dir, "_src", "hardware_utils.py")
    spec = _importlib_util.spec_from_file_location("_tcl_jax_hardware_utils", path)
    hardware_utils = _importlib_util.module_from_spec(spec)
    spec.loader.exec_module(hardware_utils)
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
      return
  except Exception:  # pylint: disable=broad-except
    return  # an unknown jax: leave libtpu as it is
  _os.environ.update(TPU_WORKER_HOSTNAMES="localhost", TPU_HOST_BOUNDS="1,1,1")


_quiet_libtpu_without_tpus()


def from_pretrained(path_or_hub_id, **overrides):
  """(cfg, params) of a one-file `.safetensors` export, a converted directory, or a Hugging
  Face Hub repository holding `model.safetensors` (a tcl_jax export, or a transformers CLIP that
  is converted on the fly); see `tcl_jax.weights.loading.load_any` for every form. `cfg` is a
  TCLConfig, or a CoDeConfig for a CoDe checkpoint (the kind the file records). With
  HF_HUB_OFFLINE=1 nothing is downloaded."""
  # Imported here so that `import tcl_jax` stays cheap (convert imports jax).
  from tcl_jax.weights import loading  # pylint: disable=g-import-not-at-top

  return loading.from_pretrained(path_or_hub_id, **overrides)
