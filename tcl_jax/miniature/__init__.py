"""TCL in miniature, the default run: `experiment` (baseline, TCL training, report), `record` (what a
workdir was made with; standard library only, read before JAX loads). `python -m tcl_jax.miniature
--rebuild_clip` (this package's `__main__`) rebuilds the shipped stage-1 CLIP."""
