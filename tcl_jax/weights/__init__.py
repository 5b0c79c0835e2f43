"""Weight formats: the original's `.pth` files (a safe torch unpickler and reader), their key maps
to tcl_jax's trees, Hugging Face CLIP files, and tcl_jax's own model files (converted directories,
one-file safetensors). `tcl_jax.convert` is the command over them."""
