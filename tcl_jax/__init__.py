"""tcl_jax: TCL (Cha et al., CVPR 2023) in JAX/Flax. `tcl_jax.from_pretrained` loads a checkpoint."""


def from_pretrained(path_or_hub_id, **overrides):
  """(TCLConfig, params) of a one-file `.safetensors` export, a converted directory, or a Hugging
  Face Hub repository holding `model.safetensors` (a tcl_jax export, or a transformers CLIP that
  is converted on the fly); see `tcl_jax.weights.loading.load_any` for every form. With HF_HUB_OFFLINE=1
  nothing is downloaded."""
  # Imported here so that `import tcl_jax` stays cheap (convert imports jax).
  from tcl_jax.weights import loading  # pylint: disable=g-import-not-at-top

  return loading.from_pretrained(path_or_hub_id, **overrides)
