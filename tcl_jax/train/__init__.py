"""Training: the loop (`loop.train_and_evaluate`), the jitted step, the input wiring, the optimizer,
the workdir's checkpoints, preemption handling and summaries. Kind-agnostic: a model kind brings its
loss (`tcl_jax.kinds`)."""
